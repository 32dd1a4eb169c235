"""Test-only fault injection into trainers that run in other processes (started by torchrun, the launcher, a
notebook's kernel), from the test side: a test puts this folder first on PYTHONPATH and sets
EMBXLIB_TEST_FAIL_AT_STEP=N (and EMBXLIB_TEST_FAIL_RANK=R, default 0); the trainer of rank R then raises at its
step N, as a bug in a step would. Nothing in the package knows about it."""
import os
import sys

if os.environ.get("EMBXLIB_TEST_FAIL_AT_STEP") and "embxlib.train" in getattr(sys, "orig_argv", []):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for faults
    from faults import fail_at  # noqa: E402

    fail_at(int(os.environ["EMBXLIB_TEST_FAIL_AT_STEP"]), int(os.environ.get("EMBXLIB_TEST_FAIL_RANK", "0")),
            signum=int(os.environ.get("EMBXLIB_TEST_FAIL_SIGNAL", "0")))
