"""The GPU check: one prepared command for a machine with one GPU and no internet.

    PYTHONPATH=. python3 -m embxlib.gpucheck --out runs/bench      # <= 6 min on one H100/H200
    python -m embxlib.gpucheck --cpu --out /tmp/check              # the same script on a CPU at tiny size (tests)

Needs the built corpus in data/shakespeare (carry it to the GPU machine) and nothing else outside this tree.
1. Kernels, each against an independent reference: FlexAttention forward and backward (bf16, compiled, with the
   block mask of the model) against fp32 SDPA with the same keys; the compiled model against the eager one;
   HeadLoss against the compiled autograd graph of head + soft-cap + cross-entropy; compiled_autograd (Record 8's
   flag) with FlexAttention.
2. medium_x01 on this one GPU through train.main: gradient accumulation 8, 3 warmup steps, the real schedule of
   5690 steps for --steps steps, the bundled corpus (repeated: it holds under 3 steps), a validation at the full
   val_seq_len (262,144 tokens) before and after, no checkpoint: ms/step over steps 3..N against upstream's own
   x01 log over the same steps (tokens/s per GPU), MFU, peak memory of training (after warmup) and validation.
   (The fake-tensor memory estimate is CPU work: `python -m embxlib.train --preset medium_x01 --dry-run`.)
Every configuration it runs on CUDA is in plan(); tests/test_gpu.py holds them against the FlexAttention kernel
tiles of sm80/sm90/sm100 and traces the small ones through the CUDA attention branch on the CPU.
Writes <out>/gpu-<device>.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import EOT_TOKEN, Config, medium_x01, tiny
from .data import read_shard, shard_files, write_shard
from .model import GPT, HeadLoss, SoftCap, attend, dense_mask, document_ids, flex_block_mask
from .runfolder import parse_step_line

SMALL = dict(train_seq_len=1024, window_max=512, attn_block_size=128)  # FlexAttention's CUDA tiles need 128 blocks
RUN_FLAGS = ["--no-coordinate-descent-tuning", "--warmup-steps", "3", "--no-save-checkpoint"]
UPSTREAM_X01_LOG = (Path(__file__).resolve().parents[1] / "published" / "modded-nanogpt-logs" /
                    "2025-09-11_GPT2MediumX01" / "000_592014ec-6781-4f59-b274-c4af68ccfe75.txt")


def plan(device: str = "cuda") -> dict[str, Config]:
    """Every configuration the check runs through the model on `device`: the small compiled ones and the run."""
    out = {"compiled_model": tiny(**SMALL, device=device), "compiled_autograd": tiny(**SMALL, device=device)}
    if device == "cuda":
        out["run"] = medium_x01(coordinate_descent_tuning=False, warmup_steps=3, save_checkpoint=False, device="cuda")
    return out


def _check(name: str, fn) -> dict:
    t = time.perf_counter()
    try:
        detail = fn()
        ok = detail.pop("ok", True)
    except (Exception, SystemExit) as e:  # a failed check is a result, not the end of the script
        ok, detail = False, {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    out = {"check": name, "ok": bool(ok), "seconds": round(time.perf_counter() - t, 1), **detail}
    print(json.dumps({k: v for k, v in out.items() if k != "trace"}), flush=True)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def check_flex_attention(device: str) -> dict:
    """bf16 FlexAttention (compiled on CUDA) with the model's block mask vs fp32 SDPA with the dense mask."""
    T, H, D, B = 2048, 4, 128, 128
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50000, (T,), generator=g)
    tokens[torch.randint(0, T, (12,), generator=g)] = EOT_TOKEN
    docs = document_ids(tokens).to(device)
    q, k, v = (torch.randn(1, T, H, D, generator=g).to(device) for _ in range(3))
    out = {}
    for w in (1, 5):
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attend(*ref_in, dense_mask(docs, w, B), 0.12)
        ref.square().sum().backward()
        lo = [t.to(torch.bfloat16).requires_grad_(device == "cuda") for t in (q, k, v)]
        y = attend(*lo, flex_block_mask(docs, torch.tensor(w, device=device), B), 0.12)
        out[f"window{w}_out_rel_err"] = _rel(y, ref)
        if device == "cuda":  # FlexAttention has no CPU backward
            y.float().square().sum().backward()
            out[f"window{w}_grad_rel_err"] = max(_rel(a.grad, b.grad) for a, b in zip(lo, ref_in))
    out["ok"] = all(v < 2e-2 for v in out.values())
    return out


def check_compiled_model(device: str) -> dict:
    """A tiny model with the GPU code path (FlexAttention on CUDA, bf16 policy), eager vs torch.compile."""
    cfg = plan(device)["compiled_model"]
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.02)
    tok = torch.randint(0, cfg.vocab_size, (1, 1025), device=device)
    x, y = tok[:, :-1].int(), tok[:, 1:]
    window = torch.tensor(4, dtype=torch.int32, device=device)
    eager = model(x, y, window)
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, dynamic=False)(x, y, window)
    compiled.backward()
    grad_err = max(_rel(p.grad, g) for p, g in zip(model.parameters(), g_eager) if g.abs().sum())
    loss_err = abs(compiled.item() - eager.item()) / eager.item()
    return dict(eager_loss=eager.item(), compiled_loss=compiled.item(), loss_rel_err=loss_err,
                max_grad_rel_err=grad_err, ok=loss_err < 1e-3 and grad_err < 5e-2)


def check_head_loss(device: str) -> dict:
    """HeadLoss (chunked, gradient in the same pass) vs the compiled autograd graph that CUDA training uses."""
    g = torch.Generator().manual_seed(0)
    n = 4096 if device == "cuda" else 64  # (CPUs without bf16 matrix units run this head 7x slower than fp32)
    x = torch.randn(n, 1024, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(50304, 1024, generator=g) * 0.05).to(device).requires_grad_()
    y = torch.randint(0, 50257, (n,), generator=g).to(device)

    def graph(x, w, y):
        return F.cross_entropy(SoftCap.apply(F.linear(x, w.type_as(x)).float(), 15.0), y)
    fn = torch.compile(graph, dynamic=False) if device == "cuda" else graph
    ref = fn(x, w, y)
    rx, rw = torch.autograd.grad(ref, (x, w))
    out = HeadLoss.apply(x, w, y, 15.0, n // 4)
    fx, fw = torch.autograd.grad(out, (x, w))
    res = dict(loss_graph=ref.item(), loss_head_loss=out.item(), loss_rel_err=abs(out.item() - ref.item()) / ref.item(),
               dx_rel_err=_rel(fx, rx), dw_rel_err=_rel(fw, rw))
    res["ok"] = res["loss_rel_err"] < 1e-4 and res["dx_rel_err"] < 2e-2 and res["dw_rel_err"] < 2e-2
    return res


def check_compiled_autograd(device: str) -> dict:
    """Record 8 (preset medium) sets torch._dynamo.config.compiled_autograd; upstream dropped it in #119 because
    FlexAttention failed under it. Does a compiled step of the model work with it in this torch?"""
    import torch._dynamo
    cfg = plan(device)["compiled_autograd"]
    model = GPT(cfg).to(device)
    tok = torch.randint(0, cfg.vocab_size, (1, 1025), device=device)
    fwd = torch.compile(model, dynamic=False)
    torch._dynamo.config.compiled_autograd = True
    try:
        for _ in range(2):
            fwd(tok[:, :-1].int(), tok[:, 1:], torch.tensor(4, device=device)).backward()
    finally:
        torch._dynamo.config.compiled_autograd = False
        torch._dynamo.reset()
    return dict(torch=torch.__version__)


def corpus_dir(src: Path, tmp: Path, val_tokens: int) -> Path:
    """The bundled corpus with a validation shard long enough for full-size validation batches: the training
    tokens again (the check measures memory and time at that size; its loss is not a result)."""
    train = shard_files(src, "train")
    for f in train:
        (tmp / Path(f).name).symlink_to(Path(f).resolve())
    tokens = np.concatenate([read_shard(f) for f in train])
    if len(tokens) < val_tokens + 2:
        raise ValueError(f"{src}: {len(tokens)} tokens, fewer than a validation of {val_tokens} needs")
    write_shard(tmp / "check_val_000000.bin", tokens[: val_tokens + 2])  # + 2: as upstream, a batch needs
    # pos + batch + 1 < len
    return tmp


def run_medium(device: str, steps: int, data: Path, out: Path) -> dict:
    """A short run at full size through train.main; returns its timings and memory."""
    from . import train
    if device == "cuda":
        base, name = ["--preset", "medium_x01", *RUN_FLAGS], "medium_x01"
        val_tokens = 4 * 262144
    else:
        base, name = ["--preset", "tiny", "--device", "cpu", "--no-compile", "--warmup-steps", "0",
                      "--no-save-checkpoint"], "tiny"
        val_tokens = 4 * 1024
    run_dir = out / f"gpucheck-run-{time.strftime('%Y%m%d-%H%M%S')}"
    corpus = corpus_dir(Path(data), Path(tempfile.mkdtemp()), val_tokens)
    t0 = time.perf_counter()
    train.main([*base, "--data-dir", str(corpus), "--repeat-data", "--val-tokens", str(val_tokens),
                "--max-steps", str(steps), "--run-dir", str(run_dir)])
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    times = step_times(run_dir / "log.txt")
    first = 3 if steps > 3 else 1  # (the first steps after warmup still settle)
    ms = ms_per_step(times, first=first)
    tokens = cfg["train_batch_tokens"]
    res = dict(preset=name, steps=summary["steps"], num_iterations=summary["num_iterations"],
               grad_accum_steps=summary["grad_accum_steps"], ms_per_step=ms,
               tokens_per_s=tokens / ms * 1000 if ms else None, wall_s=round(wall, 1),
               val_loss_start=None, val_loss_end=summary["final_val_loss"],
               peak_memory_train_mib=summary.get("peak_memory_train_mib"),
               peak_memory_val_mib=summary.get("peak_memory_val_mib"), run_dir=str(run_dir))
    vals = [p["val_loss"] for p in map(parse_step_line, (run_dir / "log.txt").read_text().splitlines())
            if p and p["step"] == 0 and p["val_loss"] is not None]
    res["val_loss_start"] = vals[0] if vals else None
    if device == "cuda" and ms:
        from .stepmodel import PEAK_BF16_FLOPS, matmul_flops
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        flops = matmul_flops(medium_x01(train_batch_tokens=tokens))  # matmul FLOPs only: a lower bound
        res["mfu"] = flops / (ms / 1000) / peak if peak else None
        up = ms_per_step(step_times(UPSTREAM_X01_LOG), first=first, last=max(times))
        res["upstream_8xH100_ms_per_step_same_steps"] = up
        res["tokens_per_s_per_gpu"] = tokens / ms * 1000
        res["upstream_tokens_per_s_per_gpu"] = tokens / 8 / up * 1000 if up else None
        res["vs_upstream_per_gpu"] = res["tokens_per_s_per_gpu"] / res["upstream_tokens_per_s_per_gpu"] if up else None
    res["ok"] = bool(ms) and np.isfinite(summary["final_val_loss"])
    return res


def step_times(log: Path) -> dict[int, int]:
    """train_time (ms) at each step line of one of our logs or an upstream log (theirs have no train_loss)."""
    lines = [p for p in map(parse_step_line, Path(log).read_text().splitlines()) if p and p["val_loss"] is None
             and p["train_time_ms"] is not None]
    return {0: 0} | {p["step"]: int(p["train_time_ms"]) for p in lines}


def ms_per_step(times: dict[int, int], first: int = 3, last: int | None = None) -> float | None:
    """Mean ms per step over steps first..last (the first steps after warmup still settle)."""
    last = max(times) if last is None and times else last
    if not times or last is None or first - 1 not in times or last not in times or last < first:
        return None
    return (times[last] - times[first - 1]) / (last - first + 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embxlib.gpucheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench", help="folder for gpu-<device>.json and the short run")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the medium_x01 run")
    ap.add_argument("--data", default="data/shakespeare", help="the built bundled corpus")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU at tiny size (what the tests do)")
    ap.add_argument("--skip-kernels", action="store_true", help="only the medium run")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, "error: CUDA is not available here; use --cpu for the CPU version of this check\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), checks=[])
    if not args.skip_kernels:
        for check in (check_flex_attention, check_compiled_model, check_head_loss, check_compiled_autograd):
            if device == "cpu" and check in (check_compiled_model, check_compiled_autograd):
                continue  # compile on CPU takes most of a minute each: the tests cover them elsewhere
            result["checks"].append(_check(check.__name__[6:], lambda: check(device)))
    result["run"] = _check("run_" + ("medium_x01" if device == "cuda" else "tiny"),
                           lambda: run_medium(device, args.steps, Path(args.data), out))
    path = out / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if all(c["ok"] for c in result["checks"]) and result["run"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
