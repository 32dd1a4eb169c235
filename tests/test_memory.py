"""Memory: validation holds at most one chunk of logits, and the fake-tensor estimate of --dry-run matches a real
run's peak. Peaks are measured with memory.PeakMemory, which counts live tensor storage."""
import numpy as np
import pytest
import torch

from embxlib import memory, train
from embxlib.config import PRESETS, medium, medium_x01, tiny
from embxlib.dist import Dist
from embxlib.data import shard_files
from embxlib.model import GPT

torch.set_num_threads(2)
MiB = 2**20


def validation_peak(corpus, val_seq_len: int, chunk: int) -> int:
    """Peak bytes of train.evaluate (all validation batches, the norms pass) beyond what the model holds."""
    cfg = tiny(val_seq_len=val_seq_len, val_tokens=4096, train_seq_len=val_seq_len, data_dir=str(corpus))
    torch.manual_seed(0)
    model = GPT(cfg)
    model.loss_chunk = chunk
    D = Dist(torch.device("cpu"))
    with memory.PeakMemory(*model.parameters(), *model.buffers()) as pm:
        loss, norms = train.evaluate(model, model, cfg, shard_files(corpus, "val"), cfg.val_steps(1), D,
                                     torch.device("cpu"), torch.tensor(2))
    assert np.isfinite(loss) and len(norms) == cfg.num_layers
    return pm.peak - sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])


def test_validation_memory_grows_by_activations_not_logits(corpus):
    """Four times the validation sequence: the peak grows by the (small) activations of the longer sequence, not
    by its logits (3,072 more rows x 50,304 x 4 bytes = 590 MiB if they were all held at once), and a chunk of
    256 rows (49 MiB of fp32 logits) bounds what the head adds."""
    short, long = validation_peak(corpus, 1024, 256), validation_peak(corpus, 4096, 256)
    logits_growth = 3072 * 50304 * 4
    assert long - short < logits_growth / 5, (short / MiB, long / MiB)
    chunk_logits = 256 * 50304 * 4
    assert long < 4 * chunk_logits + 4096 * 128 * 4 * 60, long / MiB  # a few chunk-sized tensors + activations
    assert validation_peak(corpus, 4096, 4096) > long + (4096 - 256) * 50304 * 4  # unchunked: visibly more


def test_fake_tensor_estimate_matches_a_real_step():
    """memory.estimate builds the model from fake tensors (no storage); on the CPU path it must reproduce the peak
    of the same step run for real."""
    cfg = tiny(extra_embeds=1)
    est = memory.estimate(cfg, device_type="cpu")
    torch.manual_seed(0)
    real_train = memory.measure(GPT(cfg), cfg, train=True)
    real_val = memory.measure(GPT(cfg), cfg, train=False)
    for phase, real in (("train", real_train), ("val", real_val)):
        assert abs(est[phase]["total"] - real["total"]) < 0.02 * real["total"], (phase, est[phase], real)
        assert est[phase]["parameters"] == real["parameters"]


def test_dry_run_reports_memory_and_says_when_it_does_not_fit(capsys):
    lines = memory.report(medium_x01(), 8, capacity=40 * 2**30)
    text = "\n".join(lines)
    assert "training step, 65,536 tokens per micro-step" in text and "validation, 262,144 tokens per batch" in text
    assert "EXCEEDS 40.0 GiB" in text  # an eager medium step needs more than 40 GiB
    assert "upstream's medium_x01 log: peak memory allocated 53,988 MiB" in text
    est = memory.estimate(medium_x01())
    assert est["train"]["parameters"] == (608_885_856 - 96 - 50304 * 1024) * 2 + (96 + 50304 * 1024) * 4
    assert est["val"]["total"] < est["train"]["total"] < est["train_graph_loss"]["total"]
    train.main(["--preset", "medium_x01", "--dry-run", "--world-size", "4"])
    out = capsys.readouterr().out
    assert "608,885,856" in out and "grad_accum 2" in out and "peak memory per process at world_size 4" in out


def test_compiled_step_estimate_is_upstreams_measured_peak():
    """The dry run's model of a compiled CUDA step (saved tensors from inductor's partitioner, state at the world
    size, the logits' gradient) against the peaks upstream's logs report on 8 H100s: within 5% for the x01 record
    and for Record 8. Muon's state is the rank's own matrices': at 8 ranks an eighth (rank 0: 6 of the 47)."""
    for cfg in (medium_x01(), medium()):
        est = memory.compiled_train_estimate(cfg, 8)
        upstream = memory.UPSTREAM_PEAK_MIB[cfg.preset] * MiB
        assert abs(est["total"] / upstream - 1) < 0.05, (cfg.preset, est["total"] / MiB)
        assert est["saved_activations"] > 0.6 * est["total"]  # most of a step is what the forward keeps
    one, eight = memory.compiled_train_estimate(medium_x01(), 1), memory.compiled_train_estimate(medium_x01(), 8)
    matrices = 15 * 4 * 1024**2 + 16 * 2 * 4096 * 1024
    assert one["optimizer"] - eight["optimizer"] == 6 * (matrices - (2 * 4 * 1024**2 + 4 * 4096 * 1024))
    lines = "\n".join(memory.report(medium_x01(), 8))
    assert "this estimate of training" in lines


@pytest.mark.parametrize("preset", ["medium_r12", "medium_r13", "medium_r14", "medium_r15", "medium_r16"])
def test_compiled_step_estimate_of_the_records_built_on_x01(preset):
    """Records 12-16 (tests/test_upstream_records.py): Snoo's outer copy and momentum (every parameter, on every
    rank) and Muon's bf16 smoothing buffer (the rank's own matrices) on top of x01's state; the estimate within 5%
    of each record's logged peak."""
    cfg = PRESETS[preset]()
    est = memory.compiled_train_estimate(cfg, 8)
    upstream = memory.UPSTREAM_PEAK_MIB[preset] * MiB
    assert abs(est["total"] / upstream - 1) < 0.05, (preset, est["total"] / MiB)
    base = memory.compiled_train_estimate(medium_x01(), 8)["optimizer"]
    params = (608_885_856 - 96 - 50304 * 1024) * 2 + (96 + 50304 * 1024) * 4  # x01's bytes (+ a few scalars)
    scalars = 4 * (cfg.smear + 2 * (cfg.backout_layer >= 0))  # the records' new fp32 scalars
    snoo = 2 * (params + scalars) if cfg.snoo_every else 0
    owned = 2 * 4 * 1024**2 + 4 * 4096 * 1024  # rank 0's matrices at 8 ranks
    smoothing = 2 * owned if cfg.muon_smoothing else 0
    assert est["optimizer"] - base == snoo + smoothing + 2 * scalars  # (+ the new scalars' Adam moments)


def test_dry_run_of_record_16(capsys):
    train.main(["--preset", "medium_r16", "--dry-run", "--world-size", "8"])
    out = capsys.readouterr().out
    assert "parameters: 608,885,859" in out and "upstream's medium_r16 log: peak memory allocated 56,810 MiB" in out
    pct = float(out.split("this estimate of training ")[1].split("%")[0])
    assert abs(pct) < 5, out
