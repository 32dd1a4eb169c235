"""Train any embxlib variant, in one process or under torchrun.

    python -m embxlib.train --preset tiny --extra-embeds 2                  # CPU, one process
    torchrun --standalone --nproc_per_node=2 -m embxlib.train --preset tiny # CPU, gloo
    torchrun --standalone --nproc_per_node=8 -m embxlib.train --preset medium_x01   # 8 GPUs, NCCL
    python -m embxlib.train --preset medium_x01 --dry-run                   # resolved config, no training
    python -m embxlib.train --resume runs/<run>                             # continue from its checkpoint
    python -m embxlib.train --config runs/<run>/config.json --seed 1        # a config file, flags override it

The global batch (train_batch_tokens) is the same for any world size: gradient accumulation makes up the rest.
Each run writes a new folder under runs/: config.json, log.txt (upstream format), metrics.jsonl, summary.json,
checkpoint.pt. Training time excludes validation, as upstream.
"""
from __future__ import annotations

import os

from .cudaenv import set_cuda_env

set_cuda_env()  # upstream's allocator setting, before torch is imported (the GPU check's stages share it)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.distributed.elastic.multiprocessing import errors as elastic  # noqa: E402

from . import runfolder  # noqa: E402
from .checkpoint import CHECKPOINT, check_new_run_dir, load_checkpoint, resume_config, save_checkpoint  # noqa: E402
from .config import Config, add_config_args, config_from_args, cpu_bf16_matmul  # noqa: E402
from .data import ShardError, TokenStream, check_enough_data, check_shards, shard_files  # noqa: E402
from .dist import Dist, check_device, env, keep_freed_memory, resolve_device, set_compile_flags, share_threads  # noqa: E402
from .memory import check_fits  # noqa: E402
from .metrics import PeakTracker, StepLines, lambda_record  # noqa: E402
from .model import GPT, count_params, window_blocks  # noqa: E402
from .optim import apply_schedules, build_optimizers, build_snoo  # noqa: E402
from .runfolder import FolderLocked, new_run_dir, provenance, step_line  # noqa: E402
from .stops import Stops  # noqa: E402
from .streams import describe_stream, streams  # noqa: E402


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m embxlib.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config, parameter count and tokens "
                    "per step (model built on the meta device) and exit")
    ap.add_argument("--world-size", type=int, default=None, help="with --dry-run: the number of processes to size "
                    "gradient accumulation and memory for (default: WORLD_SIZE, or 1)")
    ap.add_argument("--run-dir", default=None, help="folder of this run (must not exist yet); default "
                    "<runs-root>/<date>_<name>_s<seed>")
    ap.add_argument("--runs-root", default="runs", help="parent of the default run folder")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR from its checkpoint "
                    "with its own config.json (no config flags allowed)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (validating and "
                    "checkpointing there; the schedules stay those of num_iterations): a short look at a long run")
    add_config_args(ap)
    return ap


def parse(argv=None) -> tuple[argparse.Namespace, Config]:
    ap = build_parser()
    args = ap.parse_args(argv)  # unknown flags and badly typed values exit 2 here
    world = env().world
    try:
        if args.resume:
            given = [f for f, v in vars(args).items() if v is not None and (f in Config.__dataclass_fields__
                                                                             or f == "config")]
            if given:
                raise ValueError(f"--resume uses the run's own config.json; drop {['--' + g.replace('_', '-') for g in given]}")
            cfg = resume_config(Path(args.resume), args.max_steps)
        else:
            cfg = config_from_args(args)
            check_new_run_dir(args.run_dir)
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps {args.max_steps}: must be >= 1 (the steps to train up to, at most "
                             f"num_iterations={cfg.num_iterations})")
        cfg.validate(args.world_size or world if args.dry_run else world)
        if not args.dry_run:
            check_device(cfg)
    except ValueError as e:  # one line naming the field, not the whole usage text
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    return args, cfg


def header_lines(cfg: Config, argv: list[str], world: int, accum: int, device: torch.device, commit: str) -> list[str]:
    lines = [f"embxlib run: {' '.join(argv)}", f"git commit: {commit}", "config: " + json.dumps(cfg.to_dict()),
             "=" * 100, f"Running Python {sys.version.split()[0]} on {platform.platform()}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}",
             f"python: {sys.executable}; torch: {torch.__version__} (git {torch.version.git_version}, "
             f"debug {torch.version.debug}) from {Path(torch.__file__).parent}"]
    if device.type == "cpu":  # a run's clock is this machine's: name it (sessions move between CPU models)
        lines.append(f"cpu: {cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
                     f"bf16 matmul in hardware: {'yes' if cpu_bf16_matmul() else 'no'}")
    if device.type == "cuda":  # as upstream: the GPUs, their memory and driver
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else ""
        lines += [torch.cuda.get_device_name(device), *smi.rstrip().splitlines()]
    return lines + [f"device: {device}, world_size: {world}, grad_accum_steps: {accum}", "=" * 100]


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else platform.processor(), else 'unknown'."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found[1].strip() if found else platform.processor() or "unknown"


# --- training ------------------------------------------------------------------------------------

def train(cfg: Config, args, argv: list[str], stops: Stops) -> Path:
    # --- setup: device, process group, data, run folder ----------------------------------------------
    device = resolve_device(cfg)
    D = Dist(device)
    accum, val_steps = cfg.grad_accum_steps(D.world), cfg.val_steps(D.world)
    train_files, val_files = shard_files(cfg.data_dir, "train"), shard_files(cfg.data_dir, "val")
    resume = args.resume is not None
    run_dir = Path(args.resume) if resume else D.broadcast_object(
        new_run_dir(args.run_dir, args.runs_root, cfg.name, cfg.seed) if D.rank == 0 else None)
    try:
        with runfolder.record(run_dir, D.rank, stops, resume, lambda: (run_dir / CHECKPOINT).exists(),
                              name=cfg.name, preset=cfg.preset, seed=cfg.seed) as log:
            if resume:
                log.line(f"# resumed from {CHECKPOINT} with world_size {D.world}")
            else:
                log.write_json("config.json", cfg.to_dict())
                commit = provenance(run_dir) if D.rank == 0 else ""
                for s in header_lines(cfg, argv, D.world, accum, device, commit):
                    log.line(s, console=False)
                log.line("data: " + check_enough_data(train_files, val_files, cfg, D.world), console=False)

            # --- model, optimizers, data stream: the same start on every rank --------------------------
            set_compile_flags(cfg)
            torch.manual_seed(cfg.seed)
            model = GPT(cfg).to(device)
            for p in model.parameters():
                D.broadcast(p.data)
            num_params = sum(p.numel() for p in model.parameters())
            adam, muon = build_optimizers(model, cfg, D.rank, D.world)
            snoo = build_snoo(model, cfg)  # Snoo (records 12, 14-16) over all parameters, after the broadcast; None: off
            fwd = torch.compile(model, dynamic=False) if cfg.compile else model
            stream = TokenStream(train_files, cfg.train_seq_len, D.rank, D.world, accum, repeat=cfg.repeat_data,
                                 order_seed=cfg.seed if cfg.shuffle_data else None)
            N = cfg.num_iterations
            stop = N if args.max_steps is None else min(N, args.max_steps)

            # --- resume: the checkpoint's state; its step is validated again when it is a validation step or
            # the end (the new record then replaces the old from there on), a --max-steps stop keeps its record
            step, train_ms, history = 0, 0.0, []
            if resume:
                ck = load_checkpoint(run_dir / CHECKPOINT, device)
                model.load_state_dict(ck["model"])
                adam.load_state_dict(ck["adam"])
                muon.load_state_dict(ck["muon"])
                if snoo is not None:  # Snoo's outer copy, momentum and call count
                    snoo.load_state_dict(ck["snoo"])
                stream.load_state_dict(ck["stream"])
                step, train_ms = ck["step"], ck["train_time_ms"]
                again = step % cfg.val_loss_every == 0 or step >= stop
                history = [h for h in ck["history"] if h[0] < step or not again]
                log.replace_from = step if again else step + 1

            windows: dict[int, torch.Tensor] = {}

            def window(step_idx) -> torch.Tensor:  # a tensor per window size: the compiled forward never recompiles
                w = window_blocks(step_idx, cfg)
                if w not in windows:  # from pinned memory, as upstream: a pageable copy would wait for the GPU
                    windows[w] = torch.tensor(w, dtype=torch.int32, pin_memory=device.type == "cuda").to(
                        device, non_blocking=True)
                return windows[w]

            def step_fn(step_idx, batches):
                return train_step(fwd, model, D, adam, muon, cfg, step_idx, batches, window(step_idx), accum,
                                  snoo=snoo)

            # --- warmup: let torch.compile see every shape on random tokens, then forget the steps -------
            warm = cfg.compile and cfg.warmup_steps and not resume  # without compile: nothing to warm up
            if cfg.compile:  # minutes on a CPU before the first step line: say what is happening
                log.line("# compiling the model (torch.compile)"
                         + (f" and warming up: {cfg.warmup_steps} untimed step{'s' * (cfg.warmup_steps != 1)} on "
                            "random tokens" if warm else "")
                         + "; the first validation compiles its own graph; on a CPU this takes minutes before the "
                           "first step")
            if warm:
                state = copy.deepcopy(dict(model=model.state_dict(), adam=adam.state_dict(), muon=muon.state_dict(),
                                           snoo=snoo.state_dict() if snoo is not None else None))  # Snoo's too, as upstream
                for i in range(cfg.warmup_steps):
                    # contiguous like the stream's batches: a slice's strides would make the first real step recompile
                    x, y = (torch.randint(0, cfg.vocab_size, (1, cfg.train_seq_len), device=device) for _ in range(2))
                    D.wait(step_fn(i, [(x.int(), y.long())] * accum)[1])
                    log.line(f"Warmup step {i + 1}/{cfg.warmup_steps}")
                model.load_state_dict(state["model"])
                adam.load_state_dict(state["adam"])
                muon.load_state_dict(state["muon"])
                if snoo is not None:
                    snoo.load_state_dict(state["snoo"])
                del state

            # --- the loop: validate, checkpoint, step ----------------------------------------------------
            peaks = PeakTracker(device)  # (after warmup, as upstream: its state copy is not part of a step)
            lines = StepLines(log, N, device, run_dir)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            while True:
                last = step >= stop  # (a resume never starts past stop: parse() refuses it)
                if last or step % cfg.val_loss_every == 0:
                    lines.flush()  # every train loss read (finite, or the run stops) before the clock stops
                    sync()
                    train_ms += 1000 * (time.perf_counter() - t0)
                    peaks.end("train")
                    val_loss, norms = evaluate(model, fwd, cfg, val_files, val_steps, D, device, window(step))
                    peaks.end("val")
                    history.append((step, val_loss, train_ms))
                    log.line(step_line(step, N, train_ms, val_loss=val_loss))
                    log.metrics(dict(step=step, val_loss=val_loss, train_time_ms=round(train_ms, 3),
                                     lambdas=lambda_record(model), norms=norms))
                    if not math.isfinite(val_loss):
                        raise FloatingPointError(f"non-finite val_loss {val_loss} at step {step}; logs kept in {run_dir}")
                    t0 = time.perf_counter()
                if cfg.save_checkpoint and (last or (cfg.save_every and step and step % cfg.save_every == 0)):
                    lines.flush()
                    train_ms += 1000 * (time.perf_counter() - t0)
                    muon.gather_state()  # (collective: every rank) the momenta and mantissas each rank keeps
                    save_checkpoint(run_dir, D.rank == 0, model, adam, muon, stream, step, train_ms, history, cfg,
                                    snoo=snoo)
                    muon.drop_foreign_state()
                    t0 = time.perf_counter()
                if last:
                    break
                epoch = stream.epoch
                loss, works = step_fn(step, [stream.next(device) for _ in range(accum)])
                if stream.epoch != epoch:
                    log.line(f"# data: epoch {stream.epoch + 1} of the training shards starts at step {step + 1} "
                             f"(repeat_data)")
                step += 1
                lines.add(step, loss, works, train_ms + 1000 * (time.perf_counter() - t0), D)

            # --- summary ---------------------------------------------------------------------------------
            if stop < N:
                log.line(f"# stopped at step {stop} of {N} (--max-steps)" + "; --resume continues it" *
                         cfg.save_checkpoint)
            target_hit = next(((s, t) for s, v, t in history if v <= cfg.target_val_loss), (None, None))
            log.summary.update(
                status="finished" if stop == N else "stopped", **peaks.summary(), final_val_loss=history[-1][1],
                train_time_ms=train_ms, num_iterations=N, steps=stop, target_val_loss=cfg.target_val_loss,
                step_to_target=target_hit[0], time_to_target_ms=target_hit[1], num_params=num_params,
                tokens_per_step=cfg.train_batch_tokens,
                tokens_per_s=stop * cfg.train_batch_tokens / (train_ms / 1000) if train_ms else None,
                world_size=D.world, grad_accum_steps=accum, device=str(device), data_epochs=stream.epoch)
            if device.type == "cuda":
                log.line(f"peak memory allocated: {max(peaks.peak.values()) // 2**20} MiB "
                         f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    finally:
        D.close()  # last: with a peer gone it may wait; the record and the lock are done by then
    return run_dir


def train_step(fwd, model, D: Dist, adam, muon, cfg, step_idx: int, batches, window, accum: int, snoo=None):
    """One optimiser step over the micro-batches, in upstream's order and without a host sync: the gradients are
    reduced asynchronously, Adam's first, so that Adam steps while Muon's are still in flight. Returns the
    (rank-local until waited for) mean loss on the device and the work of its reduction (StepLines reads it)."""
    total = torch.zeros((), device=window.device)
    for x, y in batches:
        loss = fwd(x, y, window) / accum
        loss.backward()
        total += loss.detach()
    rows = {}  # cfg.sparse_table_comm: each table's looked-up rows, by its weight's id
    if cfg.sparse_table_comm and D.on:
        looked_up = [model.table_indices(x) for x, _ in batches]
        rows = {id(model.table(t.name).weight): torch.cat([ix[t.name].reshape(-1) for ix in looked_up])
                for t in model.tables}
    adam_grads = D.reduce_mean([p.grad for g in adam.param_groups for p in g["params"] if id(p) not in rows])
    muon_grads = D.reduce_mean([p.grad for g in muon.param_groups for p in g["params"]])
    for p in (p for g in adam.param_groups for p in g["params"] if id(p) in rows):
        if not D.reduce_rows(p.grad, rows[id(p)]):
            adam_grads += D.reduce_mean([p.grad])
    loss_mean = D.reduce_mean([total])
    apply_schedules(step_idx, cfg, adam, muon)
    D.wait(adam_grads)
    adam.step()
    D.wait(muon_grads)
    muon.step()
    if snoo is not None:  # Snoo after Adam and Muon, as upstream (it never touches .grad)
        snoo.step()
    model.zero_grad(set_to_none=True)
    return total, loss_mean


NORM_TOKENS = 8192  # the residual norms logged with each validation are measured on this many tokens


@torch.no_grad()
def evaluate(model, fwd, cfg, val_files, val_steps, D, device, window):
    """Mean loss over the fixed first val_tokens of the val shards, through the (compiled) model with the loss
    in chunks of model.loss_chunk rows, as upstream's 4 chunks; and the RMS norm of the residual entering each
    layer, from a second pass over the first NORM_TOKENS tokens of rank 0's first batch (all the activations of
    a 262,144-token batch would not fit), averaged over ranks."""
    model.eval()
    stream = TokenStream(val_files, cfg.val_seq_len, D.rank, D.world)
    total = torch.zeros((), device=device)
    for i in range(val_steps):
        x, y = stream.next(device)
        total += fwd(x, y, window)
        if i == 0:
            acts: dict = {}
            model.trunk(x[:, :min(NORM_TOKENS, x.size(1))], window, collect=acts)
            norms = torch.stack([acts[f"x-{j}"].float().pow(2).mean().sqrt() for j in range(cfg.num_layers)])
            del acts
    model.train()
    val = D.all_reduce_mean(total / val_steps).item()
    return val, D.all_reduce_mean(norms).tolist()


def dry_run(cfg: Config, world: int) -> None:
    from .memory import report
    print(cfg.to_json())
    print(f"variant: {cfg.name}")
    print(f"value embeddings per layer: {cfg.ve_map()}")
    print("streams: " + "; ".join(describe_stream(cfg, s) for s in streams(cfg)))
    print(f"parameters: {count_params(cfg):,}")
    print(f"tokens per step: {cfg.train_batch_tokens:,} (world_size {world} x train_seq_len {cfg.train_seq_len:,} "
          f"x grad_accum {cfg.grad_accum_steps(world)})")
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and (torch.cuda.is_available() or cfg.preset != "tiny"))
    for line in report(cfg, world, device_type="cuda" if on_gpu else "cpu"):
        print(line)


@elastic.record  # under torchrun, a failing rank's traceback is reported as the root cause
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse(argv)
    if args.dry_run:
        dry_run(cfg, args.world_size or env().world)
        return
    keep_freed_memory()
    share_threads()
    try:  # before any folder is made: the parameters fit the memory they would train in
        check_fits(cfg, resolve_device(cfg).type)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:  # before any folder is made: the shards exist, are sound (every one, read by rank 0) and hold enough tokens
        train_files, val_files = shard_files(cfg.data_dir, "train"), shard_files(cfg.data_dir, "val")
        if env().rank == 0:  # one reader is enough: the other ranks wait for its run folder
            check_shards(train_files + val_files, cfg.vocab_size)
        check_enough_data(train_files, val_files, cfg, env().world)
    except (FileNotFoundError, ShardError) as e:
        sys.exit(f"error: data_dir={cfg.data_dir!r}: {e}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    stops = Stops()
    stops.with_parents()
    with stops.handling():
        try:
            run_dir = train(cfg, args, ["python -m embxlib.train", *argv], stops)
        except FolderLocked as e:
            sys.exit(f"error: {e}")
        except BaseException:
            if stops.signal is None:
                raise
            # recorded (summary `stopped`, a log line naming the signal); exit as the signal's conventional 128+n
            print(stops.reason, file=sys.stderr, flush=True)
            raise SystemExit(128 + stops.signal) from None
        if stops.signal is not None:  # arrived while the finished run's record was being written
            print(f"{stops.reason} after the run had finished: {run_dir}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
