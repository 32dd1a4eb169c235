"""The CUDA step's structure, proven on CPU (issue 17): what upstream's training step does and does not do.

With gloo at 2, 4 and 8 ranks, the trainer's own step function (train.train_step + StepLines) is run under a
dispatch mode that counts every read of a tensor's value into Python (a host-device sync on a GPU) and with every
torch.distributed collective counted by how it is issued: a training step reads nothing back and blocks in no
collective, and Muon keeps the momentum and mantissa of the rank's own matrices only."""
import json
import subprocess

import pytest

from conftest import PYTHON, ROOT, python_env


@pytest.mark.slow
@pytest.mark.parametrize("world,precision", [(2, "bf16"), (4, "fp32"), (8, "fp32")])
def test_a_training_step_syncs_nothing_and_muon_state_is_split(corpus, tmp_path, world, precision):
    """(bf16 at 2 ranks: the mantissa buffers are split too; fp32 elsewhere, fast on any CPU.)"""
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                        str(ROOT / "tests" / "step_probe.py"), str(corpus), str(tmp_path)],
                       capture_output=True, text=True, env=python_env(PROBE_PRECISION=precision), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(world)]
    for res in ranks:
        step = res["step1"]  # (step 0 creates the optimiser state)
        assert step["host_reads"] == [], step["host_reads"]
        assert step["blocking"] == [], step["blocking"]
        assert step["issued"] > 0  # gradients, loss and Muon's all_gathers, all asynchronous
        # each rank holds the fp32 momentum (+ uint16 mantissa under bf16) of its own matrices, nothing else
        assert res["muon_state_bytes"] == res["owned_bytes"]
    total = sum(r["muon_state_bytes"] for r in ranks)
    owned = sum(r["owned"] for r in ranks)
    assert owned == 17  # tiny: 5 attention tensors (layer 2 has none) + 6 fc + 6 proj, each on one rank
    assert max(r["muon_state_bytes"] for r in ranks) <= total / world * 2  # about 1/world each (chunks of world)
    assert ranks[0]["lines"] and ranks[0]["lines"][0].startswith("step:1/")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_table_comm"])
def test_gradient_bytes_per_step_are_what_stepmodel_counts(corpus, tmp_path, sparse):
    """The bytes each rank hands to gloo in a step of tiny + bigram hash at 2 ranks, counted on the real calls,
    against stepmodel.comm_bytes (which the closing notes use for medium_x01 + bigram at 8 ranks). With
    sparse_table_comm the tables go as their looked-up rows (int64 index + row each), the rest as before."""
    from embxlib.config import Config
    from embxlib.stepmodel import comm_bytes
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "step_probe.py"), str(corpus), str(tmp_path)], capture_output=True,
                       text=True, env=python_env(PROBE_BIGRAM="1", PROBE_SPARSE_COMM=str(int(sparse))), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        cfg = Config.from_dict(res["config"])
        expected = comm_bytes(cfg, 2)
        assert expected["tables"]["bigram_embed"] == 50304 * 5 * 128 * 4  # fp32: the dense table goes over the wire
        got = res["step1"]["bytes"]
        if not sparse:
            assert got == {"all_reduce": expected["all_reduce"], "all_gather": expected["all_gather"]}
            continue
        assert got["all_reduce"] == expected["all_reduce"] - sum(expected["tables"].values())
        rows = got["all_gather"] - expected["all_gather"] - 8 * len(expected["tables"])  # (the row counts: int64s)
        tokens = cfg.train_batch_tokens // 2  # this rank's, over its micro-steps: at most that many distinct rows
        widths = [128, 2 * 128, 128]  # embed (x00), value_embed (2 tables), bigram: (8 + 4 x width) bytes a row
        assert 0 < rows <= tokens * sum(8 + 4 * w for w in widths) < sum(expected["tables"].values()) / 100
