"""Training end to end on CPU: every variant trains, losses fall, torchrun agrees with one process, resume is exact,
failures keep their logs. Real processes, real corpus, real log files."""
import json
import math
import re
import subprocess

import pytest

from embxlib import train
from conftest import FAST, PYTHON, python_env
from faults import fail_at

pytestmark = pytest.mark.slow
VAL = re.compile(r"^step:(\d+)/(\d+) val_loss:([\d.na]+) train_time:(\d+)ms", re.M)


def val_losses(run_dir) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in VAL.finditer((run_dir / "log.txt").read_text())}


def read_json(path):
    return json.loads(path.read_text())


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags", [
    ["--extra-embeds", "3"],
    ["--value-embeds", "3"],
    ["--value-embeds", "1"],
    ["--ve-layout", "mirrored"],
    ["--ve-layout", "adjacent", "--ve-span", "1", "--value-embeds", "3"],
    ["--ve-shift", "1", "--value-embeds", "1"],
    ["--ve-remove", "1"],
    ["--ve-layers", "0,-1,-1,-1,0,1"],
    ["--token-lambdas", "x00"],
    ["--extra-embeds", "2", "--token-lambdas", "x02", "--value-embeds", "3", "--ve-remove", "0", "--seed", "3"],
    ["--bigram-embeds", "1"],
    ["--bigram-embeds", "1", "--bigram-control", "1"],
    ["--ve-gates", "x"],
    ["--extra-embeds", "1", "--bigram-embeds", "1", "--ve-gates", "x_ve", "--ve-gate-dim", "12", "--ve-init-std", "0.01"],
], ids=lambda f: " ".join(f))
def test_every_variant_trains(fast_args, tmp_path, flags):
    run = tmp_path / "run"
    train.main(fast_args(run, "--num-iterations", "2", *flags))
    summary = read_json(run / "summary.json")
    assert summary["status"] == "finished" and math.isfinite(summary["final_val_loss"])
    cfg = read_json(run / "config.json")
    recs = metrics(run)
    assert [r["step"] for r in recs] == [0, 2]
    lam = recs[-1]["lambdas"]
    assert set(lam) >= {"x", "v", "ve", "skip"} | {f"x0{k}" for k in range(cfg["extra_embeds"] + 1)}
    assert len(recs[-1]["norms"]) == cfg["num_layers"] and all(n > 0 for n in recs[-1]["norms"])
    assert lam["x01" if cfg["extra_embeds"] else "x00"] != [0.0] * 6  # the new lambdas move off their init
    import torch
    weights = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    if cfg["bigram_embeds"]:  # (its lambdas see a gradient only once a pair recurs: not within 2 steps)
        assert len(lam["bigram"]) == 6 and weights["bigram_embed.weight"].any()
    if cfg["ve_gates"] != "off":  # the gates replace the ve lambda (zero head and projections: they learn from step 3)
        assert all(v is None for v in lam["ve"])
        gates = [v for k, v in weights.items() if "ve_gate" in k]
        assert [tuple(g.shape) for g in gates] == [(2, cfg["ve_gate_dim"])] * 4
    assert val_losses(run)[2] == pytest.approx(summary["final_val_loss"], abs=1e-6)
    assert (run / "checkpoint.pt").exists()


def test_validation_loss_falls_over_50_steps(fast_args, tmp_path):
    run = tmp_path / "run"
    train.main(fast_args(run, "--num-iterations", "50", "--val-loss-every", "25"))
    v = val_losses(run)
    assert v[0] == pytest.approx(math.log(50304), abs=0.01)  # zero-init head: uniform over the padded vocab
    assert v[0] > v[25] > v[50] and v[50] < v[0] - 2.5
    summary = read_json(run / "summary.json")
    assert summary["tokens_per_s"] > 0 and summary["num_params"] == 26_851_742


def test_torchrun_two_processes_match_one(fast_args, tmp_path):
    """Same global batch: 1 process x 2 accumulation steps vs 2 gloo ranks x 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(fast_args(one))
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # = torchrun
                        "-m", "embxlib.train", *fast_args(two)], capture_output=True, text=True, env=python_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_json(two / "summary.json")["world_size"] == 2
    assert read_json(two / "summary.json")["grad_accum_steps"] == 1
    a, b = val_losses(one), val_losses(two)
    assert a.keys() == b.keys() == {0, 2, 4}
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=2e-4), s
    assert a[4] < a[0]


def test_four_and_eight_ranks_match_one_process(corpus, tmp_path):
    """A global batch of 8 sequences: 1 process x 8 micro-steps, 4 ranks x 2, 8 ranks x 1. With 8 ranks Muon has
    more ranks than matrices of one shape (6 MLP matrices of each shape, 5 attention ones): the padded all_gather.
    Each rank updates only its own matrices' fp32 masters (bf16 + mantissa); the checkpoint must hold them all."""
    import torch
    from embxlib.optim import join_master
    flags = ["--preset", "tiny", "--train-seq-len", "64", "--train-batch-tokens", "512", "--val-seq-len", "64",
             "--val-tokens", "512", "--window-max", "64", "--num-iterations", "4", "--val-loss-every", "2",
             "--no-compile", "--warmup-steps", "0", "--data-dir", str(corpus)]
    train.main([*flags, "--run-dir", str(tmp_path / "w1")])
    for world in (4, 8):
        r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                            "-m", "embxlib.train", *flags, "--run-dir", str(tmp_path / f"w{world}")],
                           capture_output=True, text=True, env=python_env(), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        s = read_json(tmp_path / f"w{world}" / "summary.json")
        assert (s["world_size"], s["grad_accum_steps"]) == (world, 8 // world)
        a, b = val_losses(tmp_path / "w1"), val_losses(tmp_path / f"w{world}")
        assert a.keys() == b.keys() == {0, 2, 4}
        for step in a:  # bf16 gradients summed in another order: a few bf16 roundings apart
            assert b[step] == pytest.approx(a[step], abs=2e-3), (world, step)
    one = torch.load(tmp_path / "w1" / "checkpoint.pt", weights_only=True)
    eight = torch.load(tmp_path / "w8" / "checkpoint.pt", weights_only=True)
    masters_one, masters_eight = ([join_master(p, st["mantissa"]) for p, (_, st) in
                                   zip(_muon_params(ck), sorted(ck["muon"]["state"].items()))] for ck in (one, eight))
    assert len(masters_eight) == 17
    for m1, m8 in zip(masters_one, masters_eight):
        assert (m8.view(torch.int32) & 0xFFFF).any()  # every mantissa reached rank 0, not only its own
        torch.testing.assert_close(m8, m1, atol=1e-2, rtol=0.05)  # 4 steps apart by bf16 gradient roundings


def _muon_params(ck):
    """The Muon parameters of a tiny checkpoint in the optimiser's order: attention matrices, then MLP ones."""
    m = ck["model"]
    attn = [m[k] for k in m if k.endswith("attn.qkvo_w")]
    mlp = [m[k] for k in m if k.endswith(("mlp.fc_w", "mlp.proj_w"))]
    return attn + mlp


def test_killed_run_resumes_to_the_same_loss(fast_args, tmp_path, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train.main(fast_args(full, "--num-iterations", "6", "--save-every", "2"))
    with pytest.raises(RuntimeError, match="injected fault at step 3"), monkeypatch.context() as m:
        fail_at(3, monkeypatch=m)
        train.main(fast_args(crashed, "--num-iterations", "6", "--save-every", "2"))
    assert read_json(crashed / "summary.json")["status"] == "failed"
    assert "FAILED" in (crashed / "log.txt").read_text() and "step:3/6 train_loss" in (crashed / "log.txt").read_text()
    train.main(["--resume", str(crashed)])
    assert read_json(crashed / "summary.json")["status"] == "finished"
    a, b = val_losses(full), val_losses(crashed)
    assert b[6] == pytest.approx(a[6], abs=1e-6)
    assert [r["step"] for r in metrics(crashed)] == [0, 2, 4, 6]  # each validation once


def test_records_mechanisms_resume_bit_for_bit(fast_args, tmp_path, monkeypatch):
    """Snoo (every 3 steps: at 0 and at 3, after the resume from step 2), Muon's update smoothing, the lr floor,
    backout and smear: a killed run resumed from its checkpoint ends with the uninterrupted run's weights and
    Snoo state, to the bit."""
    import torch
    flags = ["--num-iterations", "6", "--save-every", "2", "--snoo-every", "3", "--muon-smoothing", "0.2",
             "--final-lr-frac", "0.01", "--backout-layer", "3", "--smear"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train.main(fast_args(full, *flags))
    with pytest.raises(RuntimeError, match="injected fault at step 3"), monkeypatch.context() as m:
        fail_at(3, monkeypatch=m)
        train.main(fast_args(crashed, *flags))
    train.main(["--resume", str(crashed)])
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, crashed))
    assert a["step"] == b["step"] == 6 and a["snoo"]["calls"] == b["snoo"]["calls"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x, y in zip(a["snoo"]["outer"] + a["snoo"]["momentum"], b["snoo"]["outer"] + b["snoo"]["momentum"]):
        assert torch.equal(x, y)
    smooth = [st["smooth_buffer"] for st in a["muon"]["state"].values()]
    assert smooth and all(t.dtype == torch.bfloat16 for t in smooth)
    assert read_json(full / "config.json")["name"] == "x00-ve2-backout3-smear-snoo3-smooth0.2-lrfloor0.01-fp32"


def test_non_finite_loss_stops_and_keeps_logs(fast_args, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite"):
        train.main(fast_args(run, "--scalar-lr", "1e30"))
    s = read_json(run / "summary.json")
    assert s["status"] == "failed" and "non-finite" in s["error"]
    assert val_losses(run)[0] == pytest.approx(math.log(50304), abs=0.01)  # the log up to the failure is there


def test_run_folder_is_never_overwritten(fast_args, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("precious\n")
    r = subprocess.run([PYTHON, "-m", "embxlib.train", *fast_args(run)], capture_output=True, text=True,
                       env=python_env(), timeout=120)
    assert r.returncode == 2 and "never overwritten" in r.stderr
    assert (run / "log.txt").read_text() == "precious\n"


def test_resume_refuses_config_flags(tmp_path):
    r = subprocess.run([PYTHON, "-m", "embxlib.train", "--resume", str(tmp_path), "--extra-embeds", "2"],
                       capture_output=True, text=True, env=python_env(), timeout=120)
    assert r.returncode == 2 and "--extra-embeds" in r.stderr


def test_too_little_data_stops_before_the_run_folder(corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"run out at step 700.*repeat_data=True"):  # 2,048-token steps
        train.main(["--preset", "tiny", "--num-iterations", "800", "--data-dir", str(corpus), "--run-dir", str(run)])
    assert not run.exists()


def test_repeat_data_goes_round_and_logs_the_epochs(fast_args, tmp_path):
    import numpy as np
    from embxlib.data import read_shard, shard_files, write_shard
    from conftest import CORPUS
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "s_train_000000.bin", read_shard(shard_files(CORPUS, "train")[0])[:1000])  # 3 steps of 256
    write_shard(data / "s_val_000000.bin", read_shard(shard_files(CORPUS, "val")[0])[:1000])
    with pytest.raises(SystemExit, match="run out at step 3"):
        train.main(fast_args(tmp_path / "no", "--data-dir", str(data)))
    train.main(fast_args(tmp_path / "yes", "--data-dir", str(data), "--repeat-data"))
    log = (tmp_path / "yes" / "log.txt").read_text()
    assert "# data: epoch 2 of the training shards starts at step 4 (repeat_data)" in log
    assert "1.33 passes, repeat_data" in log and read_json(tmp_path / "yes" / "summary.json")["data_epochs"] == 1
    assert np.isfinite(val_losses(tmp_path / "yes")[4])


def test_allocator_setting_is_upstreams():
    r = subprocess.run([PYTHON, "-c", "import os, embxlib.train; print(os.environ['PYTORCH_ALLOC_CONF'])"],
                       capture_output=True, text=True, env={k: v for k, v in python_env().items()
                                                            if "ALLOC_CONF" not in k})
    assert r.stdout.strip() == "expandable_segments:True", r.stderr


def test_compiled_training_compiles_once_in_the_warmup(fast_args, tmp_path):
    """With compile, the warmup steps compile the training graph and validation compiles its own (no_grad); the
    timed steps then compile nothing more (a warmup batch of another stride than the stream's cost the first
    timed step a recompile: seconds of train_time on a CPU)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    train.main(fast_args(tmp_path / "run", "--compile", "--warmup-steps", "1", "--num-iterations", "3"))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()


def test_compiled_cpu_training_is_deterministic(fast_args, tmp_path):
    """Two compiled runs of one config (each compiling afresh) log the same losses and save the same weights and
    optimiser state, bit for bit: what a post's "made again from this commit" rests on."""
    import torch._dynamo
    flags = ["--compile", "--warmup-steps", "1", "--num-iterations", "12", "--val-loss-every", "6",
             "--train-seq-len", "512", "--train-batch-tokens", "2048"]  # (the tiny preset's own shapes)
    for name in ("a", "b"):
        torch._dynamo.reset()
        train.main(fast_args(tmp_path / name, *flags))
    torch._dynamo.reset()
    assert len(val_losses(tmp_path / "a")) == 3 and val_losses(tmp_path / "a") == val_losses(tmp_path / "b")
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("a", "b"))
    torch.testing.assert_close(a["model"], b["model"], rtol=0, atol=0)  # tolerance 0: equal, bit for bit
    assert a["stream"] == b["stream"]  # position, epoch and the shards' fingerprints: plain data
    for opt in ("adam", "muon"):
        torch.testing.assert_close(a[opt]["state"], b[opt]["state"], rtol=0, atol=0)


def test_sparse_table_comm_trains_as_the_dense_all_reduce(corpus, tmp_path):
    """Two ranks exchanging only the looked-up table rows reach the losses of two ranks all-reducing the dense
    tables, and of one process (fp32: the sums differ in order only)."""
    flags = [*FAST, "--data-dir", str(corpus), "--bigram-embeds", "1", "--train-batch-tokens", "512"]
    train.main([*flags, "--run-dir", str(tmp_path / "one")])
    for name, extra in (("dense", []), ("sparse", ["--sparse-table-comm"])):
        r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                            "embxlib.train", *flags, *extra, "--run-dir", str(tmp_path / name)],
                           capture_output=True, text=True, env=python_env(), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    one, dense, sparse = (val_losses(tmp_path / n) for n in ("one", "dense", "sparse"))
    assert one.keys() == sparse.keys() == {0, 2, 4}
    for step in one:
        assert sparse[step] == pytest.approx(dense[step], abs=1e-5) and sparse[step] == pytest.approx(one[step], abs=1e-4)
    assert read_json(tmp_path / "sparse" / "config.json")["sparse_table_comm"] is True
