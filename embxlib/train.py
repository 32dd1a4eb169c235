"""Train any embxlib variant, in one process or under torchrun.

    python -m embxlib.train --preset tiny --extra-embeds 2                  # CPU, one process
    torchrun --standalone --nproc_per_node=2 -m embxlib.train --preset tiny # CPU, gloo
    torchrun --standalone --nproc_per_node=8 -m embxlib.train --preset medium_x01   # 8 GPUs, NCCL
    python -m embxlib.train --preset medium_x01 --dry-run                   # resolved config, no training
    python -m embxlib.train --resume runs/<run>                             # continue from its checkpoint

The global batch (train_batch_tokens) is the same for any world size: gradient accumulation makes up the rest.
Each run writes a new folder under runs/: config.json, log.txt (upstream format), metrics.jsonl, summary.json,
checkpoint.pt. Training time excludes validation, as upstream.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from .config import Config, add_config_args, config_from_args
from .data import TokenStream, shard_files
from .model import GPT, count_params, window_schedule
from .optim import apply_schedules, build_optimizers

CHECKPOINT = "checkpoint.pt"


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m embxlib.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config, parameter count and tokens "
                    "per step (model built on the meta device) and exit")
    ap.add_argument("--run-dir", default=None, help="folder of this run (must not exist yet); default "
                    "<runs-root>/<date>_<name>_s<seed>")
    ap.add_argument("--runs-root", default="runs", help="parent of the default run folder")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR from its checkpoint "
                    "with its own config.json (no config flags allowed)")
    ap.add_argument("--fail-at-step", type=int, default=-1, help="test-only fault injection: raise at this step")
    ap.add_argument("--fail-rank", type=int, default=0, help="test-only: the rank that raises")
    add_config_args(ap)
    return ap


def parse(argv=None) -> tuple[argparse.Namespace, Config]:
    ap = build_parser()
    args = ap.parse_args(argv)  # unknown flags and badly typed values exit 2 here
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if args.resume:
            given = [f for f, v in vars(args).items() if v is not None and f in Config.__dataclass_fields__]
            if given:
                raise ValueError(f"--resume uses the run's own config.json; drop {['--' + g.replace('_', '-') for g in given]}")
            cfg_path = Path(args.resume) / "config.json"
            if not (Path(args.resume) / CHECKPOINT).exists():
                raise ValueError(f"--resume {args.resume}: no {CHECKPOINT} there to continue from")
            cfg = Config.from_dict(json.loads(cfg_path.read_text()))
        else:
            cfg = config_from_args(args)
            if args.run_dir and not is_new_run_dir(Path(args.run_dir)):
                raise ValueError(f"--run-dir {args.run_dir} already exists and is not empty; runs are never "
                                 f"overwritten: choose another folder or --resume it")
        cfg.validate(world)
    except ValueError as e:  # one line naming the field, not the whole usage text
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    return args, cfg


# --- distributed helpers -------------------------------------------------------------------------

class Dist:
    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on = self.world > 1
        if self.on:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                    if device.type == "cuda" else None)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def all_reduce_grads(self, params) -> None:
        if not self.on:
            return
        grads = [p.grad for p in params]
        works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
        for w, g in zip(works, grads):
            w.wait()
            g /= self.world

    def broadcast_object(self, obj):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.on and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use --device cpu or auto")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- run folder and logging ----------------------------------------------------------------------

def is_new_run_dir(d: Path) -> bool:
    """Nothing there yet but what the launcher writes first: the executed notebook and console.log."""
    return not d.exists() or all(p.suffix == ".ipynb" or p.name == "console.log" for p in d.iterdir())


def new_run_dir(args, cfg: Config) -> Path:
    if args.run_dir:
        d = Path(args.run_dir)
    else:
        d = Path(args.runs_root) / f"{datetime.now():%Y%m%d-%H%M%S}_{cfg.name}_s{cfg.seed}"
    if not is_new_run_dir(d):
        raise FileExistsError(f"run folder {d} already exists and is not empty; runs are never overwritten: "
                              f"choose another --run-dir, or continue it with --resume {d}")
    d.mkdir(parents=True, exist_ok=True)
    return d


class RunLog:
    """Rank 0 writes log.txt (upstream line format) and metrics.jsonl as it goes, flushing every line, so a crash
    keeps everything written so far. Other ranks write nothing."""

    def __init__(self, run_dir: Path, active: bool, echo_every: int = 1):
        self.dir, self.active, self.echo_every = run_dir, active, echo_every
        self.log = open(run_dir / "log.txt", "a", buffering=1) if active else None

    def line(self, s: str, console: bool = True) -> None:
        if not self.active:
            return
        self.log.write(s + "\n")
        if console:
            print(s, flush=True)

    def metrics(self, rec: dict) -> None:
        if self.active:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def write_json(self, name: str, obj: dict) -> None:
        if self.active:
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps(obj, indent=2))
            os.replace(tmp, self.dir / name)

    def close(self):
        if self.log:
            self.log.close()


def header_lines(cfg: Config, argv: list[str], world: int, accum: int, device: torch.device) -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return [f"embxlib run: {' '.join(argv)}", f"git commit: {commit}", "config: " + json.dumps(cfg.to_dict()),
            "=" * 100, f"Running Python {sys.version.split()[0]} on {platform.platform()}",
            f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}",
            f"device: {device}, world_size: {world}, grad_accum_steps: {accum}", "=" * 100]


# --- metrics -------------------------------------------------------------------------------------

def lambda_record(model: GPT) -> dict:
    """Per-layer lambdas, named as snimu's logs: x, x00..x0N, v (sa λ0), ve (sa λ1, None without a value
    embedding), skip (weight of the skip leaving layer j, None where unused), token-lambda means."""
    cfg = model.cfg
    lam = model.block_lambdas().detach().float().cpu()
    sa = model.sa_lambdas().detach().float().cpu()
    sk = model.skip_weights().detach().float().cpu()
    srcs = {s for _, s in cfg.skip_pairs}
    rec = {"x": lam[:, 0].tolist()}
    for k in range(model.K):
        rec[f"x0{k}"] = lam[:, 1 + k].tolist()
    has_attn = [b.attn is not None for b in model.blocks]
    rec["v"] = [float(sa[i, 0]) if has_attn[i] else None for i in range(cfg.num_layers)]
    rec["ve"] = [float(sa[i, 1]) if model.ve_map[i] is not None else None for i in range(cfg.num_layers)]
    rec["skip"] = [float(sk[i]) if i in srcs else None for i in range(cfg.num_layers)]
    if model.token_lambda is not None:
        rec["token_lambda_mean"] = model.token_lambda.weight.detach().float().mean(0).tolist()
    return rec


# --- training ------------------------------------------------------------------------------------

def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory in the process. By default it hands every large block (the logits of each
    micro-step, a hundred MB on a tiny CPU run) back to the kernel and the next step page-faults it in again:
    half of a tiny CPU step was spent in the kernel. The same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**30."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)


def set_compile_flags(cfg: Config) -> None:
    import torch._dynamo
    import torch._inductor.config
    torch._inductor.config.coordinate_descent_tuning = cfg.coordinate_descent_tuning
    torch._dynamo.config.compiled_autograd = cfg.compiled_autograd


def train(cfg: Config, args, argv: list[str]) -> Path:
    device = resolve_device(cfg)
    D = Dist(device)
    accum = cfg.grad_accum_steps(D.world)
    val_steps = cfg.val_steps(D.world)
    train_files, val_files = shard_files(cfg.data_dir, "train"), shard_files(cfg.data_dir, "val")
    resume = args.resume is not None
    run_dir = Path(args.resume) if resume else D.broadcast_object(new_run_dir(args, cfg) if D.rank == 0 else None)
    log = RunLog(run_dir, D.rank == 0)
    summary = dict(status="running", run_dir=str(run_dir), name=cfg.name, preset=cfg.preset, seed=cfg.seed)
    log.write_json("summary.json", summary)  # a run killed from outside still says it never finished
    try:
        if resume:
            log.line(f"# resumed from {CHECKPOINT} with world_size {D.world}")
        else:
            log.write_json("config.json", cfg.to_dict())
            for s in header_lines(cfg, argv, D.world, accum, device):
                log.line(s, console=False)
        summary = _train_loop(cfg, args, D, device, accum, val_steps, train_files, val_files, run_dir, log, summary)
    except BaseException as e:  # keep what we have, say what happened, then fail loudly
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        log.line(f"# FAILED on rank {D.rank}: {type(e).__name__}: {e}")
        if D.rank != 0:
            print(f"[rank {D.rank}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        raise
    finally:
        log.write_json("summary.json", summary)
        log.close()
        D.close()
    return run_dir


def _train_loop(cfg, args, D: Dist, device, accum, val_steps, train_files, val_files, run_dir, log, summary):
    set_compile_flags(cfg)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    for p in model.parameters():  # identical start on every rank
        if D.on:
            dist.broadcast(p.data, 0)
    num_params = sum(p.numel() for p in model.parameters())
    adam, muon = build_optimizers(model, cfg, D.rank, D.world)
    fwd = torch.compile(model, dynamic=False) if cfg.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    stream = TokenStream(train_files, cfg.train_seq_len, D.rank, D.world)
    step, train_ms, history = 0, 0.0, []
    if args.resume:
        ck = torch.load(run_dir / CHECKPOINT, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        adam.load_state_dict(ck["adam"])
        muon.load_state_dict(ck["muon"])
        stream.load_state_dict(ck["stream"])
        step, train_ms = ck["step"], ck["train_time_ms"]
        history = [h for h in ck["history"] if h[0] < step]  # step `step` itself is validated again below
        _drop_metrics_from(run_dir, step, D.rank == 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(step_idx, batches):
        windows = window_schedule(step_idx, cfg)
        total = torch.zeros((), device=device)
        for x, y in batches:
            with amp:
                loss = fwd(x, y, masks=model.masks(x, windows)) / accum
            loss.backward()
            total += loss.detach()
        D.all_reduce_grads(model.parameters())
        apply_schedules(step_idx, cfg, adam, muon)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        return D.all_reduce_mean(total)

    if cfg.warmup_steps and not args.resume:  # let torch.compile see every shape, then forget the steps
        state = copy.deepcopy(dict(model=model.state_dict(), adam=adam.state_dict(), muon=muon.state_dict()))
        for i in range(cfg.warmup_steps):
            rand = torch.randint(0, cfg.vocab_size, (1, cfg.train_seq_len + 1), device=device)
            train_step(i, [(rand[:, :-1].int(), rand[:, 1:].long())] * accum)
            log.line(f"Warmup step {i + 1}/{cfg.warmup_steps}")
        model.load_state_dict(state["model"])
        adam.load_state_dict(state["adam"])
        muon.load_state_dict(state["muon"])
        del state

    N = cfg.num_iterations
    tokens_per_step = cfg.train_batch_tokens
    sync()
    t0 = time.perf_counter()
    while True:
        last = step == N
        if last or step % cfg.val_loss_every == 0:
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss, norms = evaluate(model, fwd, cfg, val_files, val_steps, D, device, amp, window_schedule(step, cfg))
            history.append((step, val_loss, train_ms))
            log.line(f"step:{step}/{N} val_loss:{val_loss:.6f} train_time:{train_ms:.0f}ms "
                     f"step_avg:{train_ms / max(step, 1):.2f}ms")
            log.metrics(dict(step=step, val_loss=val_loss, train_time_ms=round(train_ms, 3),
                             lambdas=lambda_record(model), norms=norms))
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite val_loss {val_loss} at step {step}; logs kept in {run_dir}")
            t0 = time.perf_counter()
        if last or (cfg.save_every and step and step % cfg.save_every == 0):
            train_ms += 1000 * (time.perf_counter() - t0)
            save_checkpoint(run_dir, D.rank == 0, model, adam, muon, stream, step, train_ms, history, cfg)
            t0 = time.perf_counter()
        if last:
            break
        if step == args.fail_at_step and D.rank == args.fail_rank:
            raise RuntimeError(f"injected fault at step {step} on rank {D.rank} (--fail-at-step)")
        loss = train_step(step, [stream.next(device) for _ in range(accum)]).item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite train loss {loss} at step {step + 1}; stopping, logs kept in {run_dir}")
        step += 1
        now_ms = train_ms + 1000 * (time.perf_counter() - t0)
        log.line(f"step:{step}/{N} train_loss:{loss:.4f} train_time:{now_ms:.0f}ms step_avg:{now_ms / step:.2f}ms")

    target_hit = next(((s, t) for s, v, t in history if v <= cfg.target_val_loss), (None, None))
    summary.update(status="finished", final_val_loss=history[-1][1], train_time_ms=train_ms, num_iterations=N,
                   target_val_loss=cfg.target_val_loss, step_to_target=target_hit[0], time_to_target_ms=target_hit[1],
                   num_params=num_params, tokens_per_step=tokens_per_step,
                   tokens_per_s=N * tokens_per_step / (train_ms / 1000) if train_ms else None,
                   world_size=D.world, grad_accum_steps=accum, device=str(device), data_epochs=stream.epoch)
    if device.type == "cuda":
        log.line(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                 f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    return summary


@torch.no_grad()
def evaluate(model, fwd, cfg, val_files, val_steps, D, device, amp, windows):
    """Mean loss over the fixed first val_tokens of the val shards, and the RMS norm of the residual entering
    each layer (first val batch of rank 0's view; averaged over ranks)."""
    model.eval()
    stream = TokenStream(val_files, cfg.val_seq_len, D.rank, D.world)
    total = torch.zeros((), device=device)
    norms = None
    for i in range(val_steps):
        x, y = stream.next(device)
        masks = model.masks(x, windows)
        with amp:
            if i == 0:
                acts: dict = {}
                total += model(x, y, collect=acts, masks=masks)
                norms = torch.stack([acts[f"x-{j}"].float().pow(2).mean().sqrt() for j in range(cfg.num_layers)])
            else:
                total += fwd(x, y, masks=masks)
    model.train()
    val = D.all_reduce_mean(total / val_steps).item()
    return val, D.all_reduce_mean(norms).tolist()


def save_checkpoint(run_dir, is_rank0, model, adam, muon, stream, step, train_ms, history, cfg):
    if not is_rank0:
        return
    ck = dict(model=model.state_dict(), adam=adam.state_dict(), muon=muon.state_dict(), stream=stream.state_dict(),
              step=step, train_time_ms=train_ms, history=history, config=cfg.to_dict())
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)  # never a half-written checkpoint


def _drop_metrics_from(run_dir: Path, step: int, active: bool) -> None:
    """Validation records from the checkpoint's step on are recomputed on resume; keep each step once."""
    path = run_dir / "metrics.jsonl"
    if not active or not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
    path.write_text("".join(ln + "\n" for ln in keep))


def dry_run(cfg: Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(cfg.to_json())
    print(f"variant: {cfg.name}")
    print(f"value embeddings per layer: {cfg.ve_map()}")
    print(f"parameters: {count_params(cfg):,}")
    print(f"tokens per step: {cfg.train_batch_tokens:,} (world_size {world} x train_seq_len {cfg.train_seq_len:,} "
          f"x grad_accum {cfg.grad_accum_steps(world)})")


@record  # under torchrun, a failing rank's traceback is reported as the root cause
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse(argv)
    if args.dry_run:
        dry_run(cfg)
        return
    keep_freed_memory()
    if os.environ.get("WORLD_SIZE", "1") != "1" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    try:
        shard_files(cfg.data_dir, "train"), shard_files(cfg.data_dir, "val")
    except FileNotFoundError as e:
        sys.exit(f"error: data_dir={cfg.data_dir!r}: {e}")
    train(cfg, args, ["python -m embxlib.train", *argv])


if __name__ == "__main__":
    main()
