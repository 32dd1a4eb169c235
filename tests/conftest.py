"""Shared fixtures. Training tests use the tiny architecture at a smaller batch so each step takes ~0.1 s."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The trainer and the launcher leave a signal their parent ignores ignored (nohup, a shell's background job): the
# user's choice. The tests that send SIGINT, SIGHUP or SIGTERM need them delivered however the suite was started, so
# the suite's process (and, through exec, every process it starts) gets the default dispositions back.
for _sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)
CORPUS = ROOT / "data" / "shakespeare"

# a few steps of the tiny architecture on short sequences; every training test starts from these flags
FAST = ["--preset", "tiny", "--train-seq-len", "128", "--train-batch-tokens", "256", "--val-seq-len", "128",
        "--val-tokens", "512", "--window-max", "128", "--num-iterations", "4", "--val-loss-every", "2",
        "--muon-momentum-warmup-steps", "10", "--warmup-steps", "0", "--no-compile",  # (a compile takes longer than 4 steps)
        "--precision", "fp32"]  # the same code paths; on a CPU without bf16 matrix units (AVX2) ~10x faster than bf16.
# upstream's bf16 policy has its own tests (test_model, test_upstream, test_optim, test_train's 4/8-rank test)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The bundled corpus, built by `make corpus`; built here if a test run starts without it."""
    if not (CORPUS / "shakespeare_val_000000.bin").exists():
        from embxlib.data import build_corpus
        build_corpus(CORPUS)
    return CORPUS


@pytest.fixture
def fast_args(corpus):
    def make(run_dir, *extra):
        return [*FAST, "--data-dir", str(corpus), "--run-dir", str(run_dir), *map(str, extra)]
    return make


def python_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
