"""The GPU check's kernel checks as tests (CUDA only; `python -m embxlib.gpucheck` runs them without pytest on the
GPU machine), and the check script itself, end to end at tiny size on the CPU."""
import json
import subprocess

import pytest
import torch

from embxlib import gpucheck
from conftest import PYTHON, python_env

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run `python -m embxlib.gpucheck` there)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("check", [gpucheck.check_flex_attention, gpucheck.check_compiled_model,
                                   gpucheck.check_head_loss], ids=lambda c: c.__name__)
def test_kernel_against_its_reference_on_cuda(check):
    result = check("cuda")
    assert result.pop("ok", True), result


@pytest.mark.slow
def test_gpucheck_script_runs_end_to_end_on_cpu(corpus, tmp_path):
    r = subprocess.run([PYTHON, "-m", "embxlib.gpucheck", "--cpu", "--steps", "2", "--out", str(tmp_path),
                        "--data", str(corpus)], capture_output=True, text=True, env=python_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert [c["check"] for c in result["checks"]] == ["flex_attention", "head_loss"]
    assert all(c["ok"] for c in result["checks"]) and result["run"]["ok"]
    run = result["run"]
    assert run["steps"] == 2 and run["num_iterations"] == 200 and run["val_loss_end"] < run["val_loss_start"]
    assert result["estimate_mib"]["train"] > 0
    summary = json.loads((tmp_path / run["run_dir"].split("/")[-1] / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 2
