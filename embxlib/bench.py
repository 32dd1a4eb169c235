"""Benchmarks: `python -m embxlib.bench` prints tables of timings and writes them to bench/out/bench.json.

    python -m embxlib.bench                      # training (eager + compiled) and analysis
    python -m embxlib.bench --no-compile --steps 2 --rounds 2
    python -m embxlib.bench --only analysis
    python -m embxlib.bench --gpu-model --preset medium_x01 --extra-embeds 2 --world-size 8   # expected H100 ms/step

Training: the tiny preset for extra_embeds 0..4 against a plain nanoGPT-style GPT of the same width, depth,
sequence length, batch and vocabulary (AdamW, tied embedding, no value embeddings, no lambdas), in the same run,
median ms/step after warm-up. With CUDA: medium_x01 on one GPU with gradient accumulation, tokens/s and MFU.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# --- analysis ---------------------------------------------------------------------------------------------

_VARIANTS = ["baseline", "x01", "x02", "x03"]


def _synthetic_run(rng: np.random.Generator, n_points: int, every: int = 25):
    """Steps, times (ms) and losses of one made-up run: a decaying loss with noise, a run-specific speed."""
    steps = np.arange(n_points) * every
    ms = np.cumsum(np.r_[0.0, rng.normal(240.0 + rng.normal(0, 5), 2.0, n_points - 1) * every])
    loss = 2.9 + 8.0 * np.exp(-steps / (n_points * every / 8)) + rng.normal(0, 0.002, n_points)
    return steps, ms, loss


def _val_lines(steps, ms, loss) -> list[str]:
    total = steps[-1]
    return [f"step:{s}/{total} val_loss:{v:.6f} train_time:{t:.0f}ms step_avg:{t / max(s, 1):.2f}ms"
            for s, t, v in zip(steps, ms, loss)]


def _write_synthetic(root: Path, n_runs: int, n_points: int, seed: int = 0) -> list[Path]:
    """A third of the runs each as embxlib run folders, upstream logs and sections of one results markdown."""
    rng = np.random.default_rng(seed)
    n_md = n_log = n_runs // 3
    n_folder = n_runs - n_md - n_log
    markdown = ["# Results", ""]
    for i in range(n_runs):
        variant = _VARIANTS[i % len(_VARIANTS)]
        steps, ms, loss = _synthetic_run(rng, n_points)
        if i < n_folder:
            folder = root / "runs" / f"{variant}-s{i}"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"name": variant, "seed": i}))
            (folder / "log.txt").write_text("\n".join(_val_lines(steps, ms, loss)) + "\n")
            (folder / "metrics.jsonl").write_text("".join(
                json.dumps({"step": int(s), "val_loss": float(v), "train_time_ms": float(t),
                            "lambdas": {"x": [1.0] * 4, "x00": [0.5] * 4}, "norms": [1.0] * 4}) + "\n"
                for s, t, v in zip(steps, ms, loss)))
        elif i < n_folder + n_log:
            log = root / "logs" / variant / f"{i:03d}.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            lines = ["[training script source omitted: 500 lines]", "=" * 100]
            for line, s, t in zip(_val_lines(steps, ms, loss), steps, ms):
                if s:  # the training-step line that upstream prints before each validation
                    lines.append(f"step:{s}/{steps[-1]} train_time:{t:.0f}ms step_avg:{t / s:.2f}ms")
                lines.append(line)
            log.write_text("\n".join(lines) + "\n")
        else:
            markdown += [f"## {variant}-{i}", "", *_val_lines(steps, ms, loss), ""]
    (root / "results.md").write_text("\n".join(markdown) + "\n")
    return [root / "runs", root / "logs" / "*" / "*.txt", root / "results.md"]


def bench_analysis(n_runs: int = 100, n_points: int = 6000, tmpdir=None) -> dict:
    """Seconds to load, average (on a common time grid) and plot n_runs synthetic runs of n_points validations."""
    from embxlib.plots import plot_val_loss, save
    from embxlib.runs import load_runs
    from embxlib.stats import average_runs

    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        inputs = _write_synthetic(Path(tmp), n_runs, n_points)
        t0 = time.perf_counter()
        df = load_runs(inputs)
        t1 = time.perf_counter()
        avg = average_runs(df, x="train_time_s", band="ci95")
        t2 = time.perf_counter()
        save(plot_val_loss(df, x="train_time_s", average=True, band="ci95"), Path(tmp) / "val_loss-time.png")
        t3 = time.perf_counter()
    assert df["run"].nunique() == n_runs and len(df) == n_runs * n_points, "synthetic runs did not all load"
    return {"runs": n_runs, "points": len(df), "curves": avg["variant"].nunique(),
            "load_s": t1 - t0, "average_s": t2 - t1, "plot_s": t3 - t2, "total_s": t3 - t0}


# --- training ---------------------------------------------------------------------------------------------

class PlainGPT(__import__("torch").nn.Module):
    """The reference point, written the way nanoGPT writes it: LayerNorm, GELU MLP, fused c_attn, causal SDPA,
    learned positions, the token embedding tied to the LM head."""

    def __init__(self, vocab: int, layers: int, dim: int, heads: int, seq_len: int):
        import torch.nn as nn
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(dim), c_attn=nn.Linear(dim, 3 * dim), c_proj=nn.Linear(dim, dim),
            ln_2=nn.LayerNorm(dim), c_fc=nn.Linear(dim, 4 * dim), mlp_proj=nn.Linear(4 * dim, dim)))
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        import torch
        import torch.nn.functional as F
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["c_proj"](y)
            x = x + b["mlp_proj"](F.gelu(b["c_fc"](b["ln_2"](x))))
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _median_step_ms(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))


def _batches(cfg, device):
    import torch
    g = torch.Generator().manual_seed(0)
    accum = cfg.grad_accum_steps(1)
    out = []
    for _ in range(accum):
        t = torch.randint(0, cfg.vocab_size, (1, cfg.train_seq_len + 1), generator=g)
        t[0, :: 97] = 50256  # a few documents per sequence, as in real data
        out.append((t[:, :-1].to(device).int(), t[:, 1:].to(device).long()))
    return out


def embxlib_step(cfg, device="cpu", compile=False):
    """One full training step of embxlib's model and optimisers (the same calls as train.py)."""
    import torch
    from embxlib.model import GPT, window_blocks
    from embxlib.optim import apply_schedules, build_optimizers
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    adam, muon = build_optimizers(model, cfg)
    fwd = torch.compile(model, dynamic=False) if compile else model
    batches, accum = _batches(cfg, device), cfg.grad_accum_steps(1)
    window = torch.tensor(window_blocks(cfg.num_iterations // 2, cfg), dtype=torch.int32, device=device)

    def step():
        for x, y in batches:
            loss = fwd(x, y, window) / accum
            loss.backward()
        apply_schedules(cfg.num_iterations // 2, cfg, adam, muon)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
    return step


def plain_step(cfg, device="cpu", compile=False):
    import torch
    torch.manual_seed(0)
    model = PlainGPT(cfg.head_vocab, cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.train_seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    fwd = torch.compile(model, dynamic=False) if compile else model
    batches, accum = _batches(cfg, device), cfg.grad_accum_steps(1)

    def step():
        for x, y in batches:
            (fwd(x.long(), y) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# the tiny variants the training bench times: name -> Config fields (x00..x04, then one per newer stream)
TRAINING_VARIANTS = {**{f"x0{n}": dict(extra_embeds=n) for n in range(5)}, "x00-bigram": dict(bigram_embeds=1),
                     "x01-bigram": dict(extra_embeds=1, bigram_embeds=1), "x00-gatex": dict(ve_gates="x"),
                     "x00-gatexve": dict(ve_gates="x_ve", ve_gate_dim=12)}


def bench_training(variants=tuple(TRAINING_VARIANTS), steps: int = 3, warmup: int = 3, compile_modes=(False, True),
                   rounds: int = 8, precision: str | None = None) -> list[dict]:
    """ms per training step of the plain GPT and embxlib tiny variants (TRAINING_VARIANTS), eager and compiled. All
    models are built (and compiled) first, then timed in `rounds` interleaved rounds of `steps` steps each, every
    other round in reverse order, so that a slow spell of the machine hits every model alike; the median over all
    timed steps is reported, with the quartiles. vs_x00 and vs_plain compare with the same mode's x00 and plain
    GPT, vs_plain_eager with the eager plain GPT. precision: None is bf16 where the CPU multiplies bf16 in hardware,
    else fp32 (as launch.demo trains)."""
    from embxlib.config import cpu_bf16_matmul, tiny
    precision = precision or ("bf16" if cpu_bf16_matmul() else "fp32")
    variants = ["x00", *[v for v in variants if v != "x00"]]  # the reference of vs_x00
    models = []
    for compiled in compile_modes:
        models.append(("plain GPT (nanoGPT style)", compiled, plain_step(tiny(), compile=compiled)))
        models += [(f"embxlib tiny {v}", compiled, embxlib_step(tiny(precision=precision, **TRAINING_VARIANTS[v]),
                                                                compile=compiled)) for v in variants]
    times: list[list[float]] = [[] for _ in models]
    for _, _, step in models:
        for _ in range(warmup):
            step()
    for r in range(rounds):
        order = list(enumerate(models))
        for i, (_, _, step) in order[::-1] if r % 2 else order:
            for _ in range(steps):
                t = time.perf_counter()
                step()
                times[i].append(1000 * (time.perf_counter() - t))
    tokens = tiny().train_batch_tokens
    ms = {(name, compiled): float(np.median(t)) for (name, compiled, _), t in zip(models, times)}
    plain = models[0][0]
    rows = []
    for (name, compiled, _), t in zip(models, times):
        m = ms[(name, compiled)]
        q25, q75 = np.percentile(t, [25, 75])
        row = dict(model=name, compiled=compiled, precision=precision if name != plain else "fp32", ms_per_step=m,
                   ms_q25=float(q25), ms_q75=float(q75), tokens_per_s=tokens / m * 1000)
        if name != plain:
            row.update(vs_x00=m / ms[("embxlib tiny x00", compiled)], vs_plain=m / ms[(plain, compiled)],
                       vs_plain_eager=m / ms[(plain, False)] if (plain, False) in ms else None)
        rows.append(row)
    return rows


def bench_bigram_hash(repeats: int = 200) -> list[dict]:
    """Microseconds of streams.bigram_hash per micro-batch on this CPU: the tiny micro-batch (512 tokens) and a
    medium one (65,536 tokens per rank). Against a tiny step of a few hundred ms, hashing inside the forward costs
    nothing measurable; in the loader it would cost the same, plus a second index tensor to move and checkpoint."""
    import torch
    from embxlib.config import medium, tiny
    from embxlib.streams import bigram_hash, bigram_rows
    rows = []
    for cfg in (tiny(), medium()):
        idx = torch.randint(0, cfg.vocab_size, (1, cfg.train_seq_len), dtype=torch.int32)
        n = bigram_rows(cfg)
        for _ in range(5):
            bigram_hash(idx, n)
        t = time.perf_counter()
        for _ in range(repeats):
            bigram_hash(idx, n)
        rows.append(dict(tokens=cfg.train_seq_len, us_per_hash=1e6 * (time.perf_counter() - t) / repeats))
    return rows


def bench_gpu(steps: int = 20, warmup: int = 5) -> dict | None:
    """medium_x01 on one GPU (gradient accumulation 8): ms/step, tokens/s, model FLOPs utilisation."""
    import torch
    if not torch.cuda.is_available():
        return None
    from embxlib.config import medium_x01
    from embxlib.stepmodel import PEAK_FLOPS, matmul_flops
    cfg = medium_x01(compile=True)
    ms = _median_step_ms(embxlib_step(cfg, device="cuda", compile=True), warmup, steps)
    tokens = cfg.train_batch_tokens
    flops = matmul_flops(cfg)  # attention's (windowed) FLOPs are left out: a lower bound
    return dict(model="medium_x01, 1 GPU", ms_per_step=ms, tokens_per_s=tokens / ms * 1000,
                mfu=flops / (ms / 1000) / PEAK_FLOPS)  # (an H100's)


def main(argv=None):
    import argparse
    from tabulate import tabulate
    ap = argparse.ArgumentParser(prog="python -m embxlib.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["training", "analysis"], default=None)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round (median reported)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds over all configurations")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    ap.add_argument("--compiled-only", action="store_true", help="skip the eager measurements (the CPU trains compiled)")
    ap.add_argument("--variants", default=",".join(TRAINING_VARIANTS),
                    help=f"tiny variants to time, comma-separated (x00 always; allowed: {', '.join(TRAINING_VARIANTS)})")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="of the embxlib models (default: bf16 where the CPU has bf16 matrix units, else fp32)")
    ap.add_argument("--out", default="bench/out/bench.json")
    ap.add_argument("--gpu-model", action="store_true", help="print the expected H100 ms/step of a config given with "
                    "the train flags (--preset, --extra-embeds, ..., --world-size N) and how well the model predicts "
                    "the published runs (embxlib.stepmodel); no training")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu-model" in argv:
        return gpu_model([a for a in argv if a != "--gpu-model"])
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in TRAINING_VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; allowed: {', '.join(TRAINING_VARIANTS)}")
    if args.no_compile and args.compiled_only:
        ap.error("--no-compile and --compiled-only leave nothing to time")
    from embxlib.dist import keep_freed_memory
    keep_freed_memory()  # as train.py does; both models below run in this process, under the same allocator
    result = {}
    if args.only in (None, "training"):
        import torch
        modes = (False,) if args.no_compile else (True,) if args.compiled_only else (False, True)
        result["training"] = bench_training(variants, steps=args.steps, rounds=args.rounds, compile_modes=modes,
                                            precision=args.precision)
        result["bigram_hash"] = bench_bigram_hash()
        print(tabulate(result["bigram_hash"], headers="keys", tablefmt="github", floatfmt=".1f"))
        result.update(threads=torch.get_num_threads(), rounds=args.rounds, steps_per_round=args.steps)
        print(tabulate(result["training"], headers="keys", tablefmt="github", floatfmt=".3f"))
        gpu = bench_gpu()
        if gpu:
            result["gpu"] = gpu
            print(tabulate([gpu], headers="keys", tablefmt="github", floatfmt=".3f"))
    if args.only in (None, "analysis"):
        result["analysis"] = bench_analysis()
        print(tabulate([[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in result["analysis"].items()],
                       headers=["analysis", "value"], tablefmt="github"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def gpu_model(argv: list[str]) -> None:
    import argparse
    from tabulate import tabulate
    from embxlib import stepmodel
    from embxlib.config import add_config_args, config_from_args
    ap = argparse.ArgumentParser(prog="python -m embxlib.bench --gpu-model", description=stepmodel.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=8, help="GPUs of the run")
    add_config_args(ap)
    args = ap.parse_args(argv)
    cfg = config_from_args(args) if args.preset or args.config else None
    print(tabulate(stepmodel.report(cfg, args.world_size), headers="keys", tablefmt="github", floatfmt=".3f"))


if __name__ == "__main__":
    main()
