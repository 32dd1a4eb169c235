"""Shared fixtures. Training tests use the tiny architecture at a smaller batch so each step takes ~0.1 s."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
