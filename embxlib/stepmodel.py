"""What an H100 step of a variant should cost, for a CPU-only user: `python -m embxlib.bench --gpu-model`.

    ms/step = FLOPs per GPU / (989 TFLOP/s x MFU)  +  per embedding table: bytes it moves / bandwidth

FLOPs: 6 x the block and head parameters x tokens, plus attention over the keys each query sees, averaged over the
window schedule of the whole run (FlexAttention skips the blocks outside the window). Per embedding table (input
or value, vocab x model_dim, bf16): its dense gradient (written in fp32 and cast), fused Adam (reads weight,
gradient and two moments, writes three), the ring all-reduce of its gradient (2 (W-1)/W of its bytes per GPU), and
for an input embedding its term in every layer's residual mix (read in the forward, twice in the backward).
HBM at 3.35 TB/s, NVLink all-reduce at 360 GB/s bus bandwidth (H100 SXM, NCCL), taken at full speed and not
overlapped (an upper bound of what a table adds). The medium records' mechanisms (12-16) are memory-bound passes
too, each costed by the bytes it moves (`mechanism_bytes`): Snoo every k steps (outer - current, the copy back,
fused SGD-Nesterov, the outer copy: 11 passes over every parameter's bytes), Muon's update smoothing (the bf16
buffer read and written and the update read, on a rank's own matrices), backout (a norm of layer 11's output and
the weighted sum, forward and backward) and smear (the shifted add, forward and backward). The model has one free number, the MFU, calibrated on upstream's Record 8 log (step_avg 246.46 ms); `report` says how well it
then predicts the other upstream logs and snimu's x01..x04 runs (the published files embxlib ships).
"""
from __future__ import annotations

import re
from pathlib import Path

from .config import Config, medium, medium_r12, medium_r13, medium_r14, medium_r15, medium_r16, medium_x01
from .model import count_params, window_blocks
from .runfolder import parse_step_line
from .streams import streams, table_params, tables

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, SXM: the one home of these
PEAK_FLOPS = PEAK_BF16_FLOPS["H100"]  # the machine of the published runs
HBM_BYTES_S = 3.35e12
ALLREDUCE_BUS_BYTES_S = 360e9
PUBLISHED = Path(__file__).resolve().parents[1] / "published"


def attention_flops(cfg: Config) -> float:
    """Forward + backward FLOPs of attention per step (4 T K D forward for QK^T and AV, backward twice that), K the
    keys a query sees on average (half its window, capped by its position in a document-free stream), averaged
    over every step of the schedule."""
    layers = [i for i in range(cfg.num_layers) if i not in cfg.no_attn_layers]
    T, bs = cfg.train_seq_len, cfg.attn_block_size
    total = 0.0
    steps = range(0, cfg.num_iterations, max(1, cfg.num_iterations // 200))
    for s in steps:
        long = window_blocks(s, cfg) * bs
        for i in layers:
            w = long if cfg.window_pattern[i] == "L" else max(bs, long // 2)
            total += 12 * cfg.train_batch_tokens * min(w, T) / 2 * cfg.model_dim
    return total / len(steps)


def table_bytes(cfg: Config, world: int, rows: int, width: int, input_streams: int) -> dict[str, float]:
    """Bytes one embedding table (rows x width, bf16) moves per step and GPU, by where (HBM or the all-reduce);
    input_streams: how many of its slices are mixed into the residual before every layer."""
    n = rows * width
    local_tokens = cfg.train_batch_tokens // world
    hbm = n * (4 + 4 + 2) + n * 2 * 7  # dense backward: fp32 zero-fill and scatter, bf16 cast; Adam: 4 reads, 3 writes
    hbm += input_streams * 3 * cfg.num_layers * local_tokens * cfg.model_dim * 2
    return dict(hbm=hbm, allreduce=2 * (world - 1) / world * n * 2 if world > 1 else 0.0)


def _table_ms(cfg: Config, world: int, rows: int, width: int, input_streams: int) -> float:
    b = table_bytes(cfg, world, rows, width, input_streams)
    return (b["hbm"] / HBM_BYTES_S + b["allreduce"] / ALLREDUCE_BUS_BYTES_S) * 1000


def matmul_flops(cfg: Config) -> float:
    """6 x the multiplied parameters x the tokens of a step: every parameter but the looked-up tables (streams)."""
    return 6 * (count_params(cfg) - table_params(cfg)) * cfg.train_batch_tokens


def mechanism_bytes(cfg: Config, world: int) -> dict[str, float]:
    """HBM bytes per step and GPU of each medium-record mechanism that is on (see the module doc)."""
    import torch
    from .model import GPT
    from .optim import build_optimizers, smoothing_on
    out = {}
    with torch.device("meta"):
        model = GPT(cfg)
        _, muon = build_optimizers(model, cfg, rank=0, world_size=world)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if cfg.snoo_every:  # read outer, p; write g; copy outer -> p; SGD reads p, g, buf, writes p, buf; p -> outer
        out["snoo"] = 11 * param_bytes / cfg.snoo_every
    if smoothing_on(cfg):  # buf, v read, buf written (+ buf, v read again for the nesterov form), bf16
        passes = 5 if cfg.muon_smoothing_mode == "nesterov" else 3
        out["smoothing"] = passes * 2 * sum(p.numel() for p in muon.owned())
    activation = cfg.train_batch_tokens // world * cfg.model_dim * 2  # one bf16 pass over the residual
    if cfg.backout_layer >= 0:  # norm + scale + add, forward (4 passes) and backward (8)
        out["backout"] = 12 * activation
    if cfg.smear:  # the shifted multiply-add and the concatenation, forward (3) and backward (4)
        out["smear"] = 7 * activation
    return out


def predict(cfg: Config, world: int, mfu: float) -> dict:
    flops = (matmul_flops(cfg) + attention_flops(cfg)) / world
    compute_ms = flops / (PEAK_FLOPS * mfu) * 1000
    inputs = [s.table for s in streams(cfg) if s.kind == "input"]
    per_table = {t.name: _table_ms(cfg, world, t.rows, t.width, inputs.count(t.name)) for t in tables(cfg)}
    mechanisms = {k: b / HBM_BYTES_S * 1000 for k, b in mechanism_bytes(cfg, world).items()}
    return dict(ms_per_step=compute_ms + sum(per_table.values()) + sum(mechanisms.values()), compute_ms=compute_ms,
                tables_ms=per_table, mechanisms_ms=mechanisms,
                per_input_table_ms=_table_ms(cfg, world, cfg.vocab_size, cfg.model_dim, 1),
                tflops_per_gpu=flops / 1e12)


def calibrate(cfg: Config, world: int, logged_ms: float) -> float:
    """The MFU at which predict() gives logged_ms (bisection: ms falls as the MFU rises)."""
    lo, hi = 0.05, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(cfg, world, mid)["ms_per_step"] > logged_ms else (lo, mid)
    return (lo + hi) / 2


def logged_step_avg(path: Path, section: str | None = None) -> float:
    """The final step_avg of an upstream log, or of one `## section` of a published results markdown."""
    text = Path(path).read_text()
    if section is not None:
        text = re.split(r"^## ", text, flags=re.M)
        text = next(t for t in text if t.split("\n", 1)[0].strip() == section)
    ends = [p for p in map(parse_step_line, text.splitlines()) if p and p["step"] == p["total"]
            and p["val_loss"] is not None and p["step_avg_ms"] is not None]
    return ends[-1]["step_avg_ms"]


def references() -> list[tuple[str, Config, float]]:
    """(label, config, logged ms/step) of every published 8xH100 run embxlib ships."""
    logs = PUBLISHED / "modded-nanogpt-logs"
    out = [("Record 8 (upstream log)", medium(), logged_step_avg(next((logs / "2025-04-22_Record8").glob("*.txt")))),
           ("5 value embeddings (upstream log)", medium(value_embeds=5, num_iterations=5820),
            logged_step_avg(next((logs / "2025-08-28_Medium_NewValemb").glob("*.txt")))),
           ("x01 record (upstream log)", medium_x01(),
            logged_step_avg(next((logs / "2025-09-11_GPT2MediumX01").glob("*.txt"))))]
    for label, make, folder in (("record 12 Snoo", medium_r12, "2025-09-16_Snoo"),
                                ("record 13 update smoothing", medium_r13, "2025-09-17_UpdateSmoothing"),
                                ("record 14 smoothed Snoo", medium_r14, "2025-09-30_SmoothedSnooMedium"),
                                ("record 15 backout", medium_r15, "2025-10-04_GPT2MediumLayerReuse"),
                                ("record 16 smear", medium_r16, "2025-11-02-Smear-MTP")):
        out.append((f"{label} (upstream log)", make(), logged_step_avg(next((logs / folder).glob("*.txt")))))
    results = PUBLISHED / "snimu-experiments" / "00004-x0" / "results.md"
    for section, extra in (("999-0", 0), ("999-1", 0), ("0", 1), ("1", 2), ("2", 3), ("3", 4)):
        out.append((f"snimu x0{extra} (run {section})", medium(extra_embeds=extra), logged_step_avg(results, section)))
    return out


def report(cfg: Config | None = None, world: int = 8) -> list[dict]:
    """The model calibrated on Record 8, its predictions of the published runs, and, given cfg, of cfg at world."""
    refs = references()
    mfu = calibrate(refs[0][1], 8, refs[0][2])
    rows = []
    for label, c, logged in refs:
        p = predict(c, 8, mfu)
        rows.append(dict(run=label, world=8, logged_ms=logged, predicted_ms=p["ms_per_step"],
                         error_pct=100 * (p["ms_per_step"] / logged - 1), mfu=mfu,
                         per_input_table_ms=p["per_input_table_ms"], mechanisms_ms=p["mechanisms_ms"]))
    if cfg is not None:
        p = predict(cfg, world, mfu)
        rows.append(dict(run=f"{cfg.preset} {cfg.name}", world=world, logged_ms=None, predicted_ms=p["ms_per_step"],
                         error_pct=None, mfu=mfu, per_input_table_ms=p["per_input_table_ms"],
                         mechanisms_ms=p["mechanisms_ms"]))
    return rows


def comm_bytes(cfg: Config, world: int) -> dict:
    """Bytes one rank hands to collectives per training step of cfg at `world` ranks, as train.train_step issues
    them (tests/test_cuda_step.py counts them under gloo): every gradient all-reduced dense (the tables' too), the
    loss, and Muon's all_gathers of the updated matrices (one tensor per chunk of `world` matrices of a shape).
    `ring_*`: what a ring algorithm then sends per rank (all-reduce 2 (W-1)/W of the bytes, all_gather W-1 times).
    `tables`: the all-reduced bytes of each table; `sparse_rows`: at most what cfg.sparse_table_comm hands over
    instead (an int64 index and the row of each of the rank's tokens, all_gathered; it sends the distinct ones
    only, and keeps the all-reduce where that moves fewer bytes)."""
    import torch
    from .model import GPT
    from .optim import build_optimizers
    with torch.device("meta"):
        model = GPT(cfg)
        adam, muon = build_optimizers(model, cfg, rank=0, world_size=world)
    nbytes = lambda p: p.numel() * p.element_size()  # noqa: E731  (a gradient has its parameter's dtype)
    reduce = sum(nbytes(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]) + 4  # + the loss
    gather = sum(nbytes(chunk[0][0]) for _, chunks in muon._chunks() for chunk in chunks) if world > 1 else 0
    local_tokens = cfg.train_batch_tokens // world
    tabs = {t.name: nbytes(model.table(t.name).weight) for t in tables(cfg)}
    sparse = {t.name: local_tokens * (8 + t.width * model.table(t.name).weight.element_size()) for t in tables(cfg)}
    ring = (lambda n: 2 * (world - 1) / world * n) if world > 1 else (lambda n: 0.0)
    return dict(all_reduce=reduce if world > 1 else 0, all_gather=gather, ring_all_reduce=ring(reduce),
                ring_all_gather=(world - 1) * gather, tables=tabs, ring_tables={k: ring(v) for k, v in tabs.items()},
                sparse_rows=sparse, ring_sparse_rows={k: (world - 1) * v for k, v in sparse.items()})
