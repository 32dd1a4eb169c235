"""Fault injection from the test side: the trainer raises at a step, as a bug in a step would.

    fail_at(3)                         # in this process (train.main in the test): rank 0 raises at step 3
    env = in_trainers(fail_at_step=1, fail_rank=1)   # for a launcher, torchrun or a notebook started by the test
"""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fail_at(step: int, rank: int = 0, monkeypatch=None, signum: int = 0) -> None:
    """The trainer's optimizer schedules (called once per training step with its index) raise at `step` on `rank`
    (or, with signum, the process sends itself that signal: SIGKILL as the OOM killer would):
    embxlib.optim.apply_schedules, and the trainer's own name for it when embxlib.train is imported already."""
    import sys

    from embxlib import optim
    from embxlib.dist import env

    real = optim.apply_schedules

    def apply_schedules(step_idx, *args, **kwargs):
        if step_idx == step and env().rank == rank:
            if signum:
                os.kill(os.getpid(), signum)
            raise RuntimeError(f"injected fault at step {step} on rank {rank} (test fault injection)")
        return real(step_idx, *args, **kwargs)

    targets = [optim] + [m for m in (sys.modules.get("embxlib.train"),) if m is not None]
    for module in targets:
        if monkeypatch is not None:
            monkeypatch.setattr(module, "apply_schedules", apply_schedules)
        else:
            module.apply_schedules = apply_schedules


def in_trainers(fail_at_step: int, fail_rank: int = 0, signum: int = 0) -> dict:
    """Environment variables under which trainers started from here (through PYTHONPATH) raise at fail_at_step on
    fail_rank, or send themselves signum (tests/faults/sitecustomize.py)."""
    return {"PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "EMBXLIB_TEST_FAIL_AT_STEP": str(fail_at_step), "EMBXLIB_TEST_FAIL_RANK": str(fail_rank),
            "EMBXLIB_TEST_FAIL_SIGNAL": str(signum)}
