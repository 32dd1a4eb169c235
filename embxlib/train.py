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

# upstream's allocator setting (large, changing activation sizes fragment the default allocator); read at the first
# CUDA allocation, so set before torch is imported, unless the user chose otherwise
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import _thread  # noqa: E402
import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zipfile  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from .config import Config, add_config_args, config_differences, config_from_args, cpu_bf16_matmul  # noqa: E402
from .data import ShardError, TokenStream, check_enough_data, check_shards, shard_files  # noqa: E402
from .model import GPT, count_params, window_blocks  # noqa: E402
from .optim import apply_schedules, build_optimizers, build_snoo  # noqa: E402
from .runfolder import (MAX_NAME_BYTES, RUN_LOCK, SLURM_RECORD, FolderLock, FolderLocked, end_torn_line,  # noqa: E402
                        lock_info, process_alive, read_json, read_jsonl, remove_stale_tmp, write_atomically,
                        write_json_atomically, write_text_atomically)
from .streams import describe_stream, mixing_columns, streams  # noqa: E402

CHECKPOINT = "checkpoint.pt"


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
            given = [f for f, v in vars(args).items() if v is not None and (f in Config.__dataclass_fields__
                                                                             or f == "config")]
            if given:
                raise ValueError(f"--resume uses the run's own config.json; drop {['--' + g.replace('_', '-') for g in given]}")
            cfg_path = Path(args.resume) / "config.json"
            if not (Path(args.resume) / CHECKPOINT).exists():
                raise ValueError(f"--resume {args.resume}: no {CHECKPOINT} there to continue from (the run ended "
                                 f"before its first checkpoint; its logs stay there): start a new run in another "
                                 f"folder, e.g. --config {cfg_path} --run-dir <new folder>")
            saved = read_json(cfg_path)
            if saved is None:
                raise ValueError(f"--resume {args.resume}: {cfg_path} is missing or unreadable")
            cfg = Config.from_dict(saved)
            check_resume(Path(args.resume), cfg, args.max_steps)
        else:
            cfg = config_from_args(args)
            too_long = [part for part in Path(args.run_dir or "").parts if len(part.encode()) > MAX_NAME_BYTES]
            if too_long:
                raise ValueError(f"--run-dir {args.run_dir[:60]!r}...: the folder name {too_long[0][:40]!r}... has "
                                 f"{len(too_long[0].encode())} bytes; at most {MAX_NAME_BYTES}")
            if args.run_dir and not is_new_run_dir(Path(args.run_dir)):
                resumable = (Path(args.run_dir) / CHECKPOINT).exists()
                raise ValueError(f"--run-dir {args.run_dir} already exists and is not empty; runs are never "
                                 f"overwritten: choose another folder"
                                 + (f" or continue it with --resume {args.run_dir}" if resumable else
                                    f" (it holds no {CHECKPOINT} to resume from)"))
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps {args.max_steps}: must be >= 1 (the steps to train up to, at most "
                             f"num_iterations={cfg.num_iterations})")
        cfg.validate(args.world_size or world if args.dry_run else world)
        if not args.dry_run:
            check_device(cfg)
    except ValueError as e:  # one line naming the field, not the whole usage text
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    return args, cfg


def peek_checkpoint(path: Path) -> dict | None:
    """The checkpoint's step and config without reading its tensors (memory-mapped), or None when it cannot be
    read: the real load reports why (corrupt, or holding code) and records it in the summary."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(step=int(ck["step"]), config=ck.get("config"))
    except Exception:  # noqa: BLE001 (any failure: the load in training names it)
        return None


def check_resume(run_dir: Path, cfg: Config, max_steps: int | None) -> None:
    """A resume continues only what it can continue as it was: never a finished run, never back to an earlier
    step, never with a config.json edited since the checkpoint."""
    summary = read_json(run_dir / "summary.json") or {}
    if summary.get("status") == "finished":
        raise ValueError(f"--resume {run_dir}: the run is finished ({summary.get('steps', cfg.num_iterations)} of "
                         f"{cfg.num_iterations} steps); a finished run is never extended or rewritten: start a new "
                         f"run, e.g. --config {run_dir / 'config.json'} --num-iterations N --run-dir <new folder>")
    ck = peek_checkpoint(run_dir / CHECKPOINT)
    if ck is None:
        return
    if max_steps is not None and max_steps < ck["step"]:
        raise ValueError(f"--max-steps {max_steps}: below the step of {run_dir / CHECKPOINT} ({ck['step']}); a "
                         f"resume continues from there: give --max-steps {ck['step'] + 1}..{cfg.num_iterations} "
                         f"or leave it out")
    if ck["config"] is not None:
        diff = config_differences(ck["config"], cfg.to_dict(), f"in {CHECKPOINT}", "in config.json")
        if diff:
            raise ValueError(f"--resume {run_dir}: config.json differs from the config its {CHECKPOINT} was "
                             f"trained with: {'; '.join(diff)}; a resume continues the checkpoint's run: restore "
                             f"config.json, or start a new run in another folder")


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
        self.wait(self.reduce_mean([t]))
        return t

    def reduce_mean(self, tensors) -> list:
        """Start averaging tensors over the ranks in place (as upstream: AVG in their own dtype, bf16 gradients of
        bf16 parameters); returns what wait() needs. Nothing blocks here."""
        if not self.on:
            return []
        if dist.get_backend() == "nccl":
            return [(dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True), None) for t in tensors]
        return [(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True), t) for t in tensors]  # gloo has no AVG

    def wait(self, works) -> None:
        """Wait for reduce_mean's works (NCCL: the current stream waits, the host does not)."""
        for w, t in works:
            w.wait()
            if t is not None:
                t /= self.world

    def reduce_rows(self, grad: torch.Tensor, rows: torch.Tensor) -> bool:
        """Average a table gradient whose only non-zero rows are among `rows` (what this rank looked up) by
        exchanging just those rows, if that moves fewer bytes than the all-reduce: a ring all-reduce sends
        2 (W-1)/W of the table per rank, the all_gather (W-1) x the largest rank's rows. Returns False, having
        done nothing, otherwise. The row counts are all_gathered first and read (gloo: no device to sync)."""
        uniq = torch.unique(rows.reshape(-1).long())
        n = torch.tensor([uniq.numel()])
        counts = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(counts, n)
        top = max(int(c) for c in counts)
        if top >= 2 * grad.size(0) / self.world:
            return False
        idx = torch.zeros(top, dtype=torch.long)  # padding: zero rows added to row 0
        idx[:uniq.numel()] = uniq
        vals = grad.new_zeros(top, grad.size(1))
        vals[:uniq.numel()] = grad[uniq]
        all_idx, all_vals = [torch.empty_like(idx) for _ in counts], [torch.empty_like(vals) for _ in counts]
        works = [dist.all_gather(all_idx, idx, async_op=True), dist.all_gather(all_vals, vals, async_op=True)]
        for w in works:
            w.wait()
        grad.zero_()
        for i, v in zip(all_idx, all_vals):  # rank by rank: the same order on every rank, so the same sums
            grad.index_add_(0, i, v)
        grad /= self.world
        return True

    def broadcast_object(self, obj):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.on and dist.is_initialized():
            dist.destroy_process_group()


def check_device(cfg: Config) -> None:
    """A medium preset where there is no GPU is a mistake, not a reason to train 600M parameters on a CPU."""
    if cfg.device == "auto" and cfg.preset.startswith("medium") and not torch.cuda.is_available():
        raise ValueError(f"preset={cfg.preset!r} is sized for GPUs (H100s) and CUDA is not available here; "
                         f"use --preset tiny for a CPU run, or --device cpu to run {cfg.preset} on the CPU anyway")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available here; use --device cpu or auto")


def resolve_device(cfg: Config) -> torch.device:
    check_device(cfg)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- run folder and logging ----------------------------------------------------------------------

def is_new_run_dir(d: Path) -> bool:
    """Nothing there yet but what the launcher writes first: the executed notebook, console.log, its lock, and a
    SLURM sweep's record of the run's job."""
    return not d.exists() or all(p.suffix == ".ipynb" or p.name in ("console.log", RUN_LOCK, SLURM_RECORD)
                                 for p in d.iterdir())


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
        self.replace_from: int | None = None  # resumed: the first new record replaces the old ones from this step
        self.finished: dict | None = None  # resumed after finishing: the summary that stays until it finishes again

    def line(self, s: str, console: bool = True) -> None:
        if not self.active:
            return
        try:
            self.log.write(s + "\n")
        except OSError as e:  # a full disk: say which file it refused
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(self.dir / "log.txt")) from e
            raise
        if console:
            print(s, flush=True)

    def metrics(self, rec: dict) -> None:
        if not self.active:
            return
        path = self.dir / "metrics.jsonl"
        if self.replace_from is None:
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:  # a full disk: say which file it refused
                if e.filename is None:
                    raise OSError(e.errno, e.strerror, str(path)) from e
                raise
            return
        # replaced now that a new record exists, not at the resume: a resume that dies first loses nothing
        old, notes = read_jsonl(path)
        for note in notes:
            self.line(f"# {note}")
        keep = [r for r in old if isinstance(r.get("step"), int) and r["step"] < self.replace_from]
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in keep + [rec]))
        self.replace_from = None

    def write_json(self, name: str, obj: dict) -> None:
        if self.active:
            write_json_atomically(self.dir / name, obj)

    def resume(self) -> None:
        """Continue a run folder: clear what the interrupted process left half-written, keep what it finished."""
        if not self.active:
            return
        if end_torn_line(self.dir / "log.txt"):  # before our first line, which would be glued to it
            self.line(f"# {self.dir / 'log.txt'}: ended its torn last line (the run was stopped mid-write)")
        for name in remove_stale_tmp(self.dir):
            self.line(f"# removed {name}: a half-written file of the interrupted run")
        previous = read_json(self.dir / "summary.json")
        self.finished = previous if previous and previous.get("status") == "finished" else None

    def write_summary(self, summary: dict, in_place: bool = False) -> None:
        """summary.json holds the newest complete results: while a resumed finished run runs or fails, its finished
        summary stays (status, numbers) and the resume's own status and error are under "resume". in_place: over
        the old file's bytes instead of write-then-rename (a full disk has no block for the .tmp)."""
        if self.finished is not None and summary.get("status") != "finished":
            summary = {**self.finished, "resume": {k: summary[k] for k in ("status", "error") if k in summary}}
        if not in_place:
            self.write_json("summary.json", summary)
        elif self.active:
            path = self.dir / "summary.json"
            data = json.dumps(summary, indent=2).encode()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from e

    def fatal_errors_to_log(self):
        """A fatal signal no Python code can handle (SIGBUS, SIGSEGV, SIGFPE, SIGABRT, SIGILL) ends log.txt with
        faulthandler's report and the Python traceback, instead of leaving it without a word. Returns the undo."""
        if not self.active:
            return lambda: None
        was = faulthandler.is_enabled()
        self.log.flush()
        faulthandler.enable(file=self.log, all_threads=False)

        def undo():
            faulthandler.disable()
            if was:  # as it was: to stderr
                try:
                    faulthandler.enable(file=sys.__stderr__)
                except (AttributeError, ValueError, OSError):
                    pass
        return undo

    def close(self):
        if self.log:
            try:
                self.log.close()
            except OSError:  # its last lines could not be written (a full disk): the error said so already
                pass


ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def provenance(run_dir: Path) -> str:
    """The commit the run was made from; uncommitted changes to tracked files go to <run>/git.diff, so that the
    commit plus that diff (`git apply`) is the code that ran."""
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return "unknown (not a git checkout)"
    diff = _git("diff", "HEAD", "--binary") or ""
    if not diff:
        return f"{commit} (clean)"
    (run_dir / "git.diff").write_text(diff)
    files = len((_git("diff", "HEAD", "--name-only") or "").split())
    return f"{commit} + uncommitted changes to {files} tracked file(s), saved in git.diff"


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
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if _has("nvidia-smi") else ""
        lines += [torch.cuda.get_device_name(device), *smi.rstrip().splitlines()]
    return lines + [f"device: {device}, world_size: {world}, grad_accum_steps: {accum}", "=" * 100]


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else platform.processor(), else 'unknown'."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found[1].strip() if found else platform.processor() or "unknown"


def _has(cmd: str) -> bool:
    import shutil
    return shutil.which(cmd) is not None


# --- metrics -------------------------------------------------------------------------------------

def lambda_record(model: GPT) -> dict:
    """Per-layer lambdas, named as snimu's logs: x and each input stream (x00..x0N, bigram), v (sa λ0), ve (sa λ1,
    None without a value embedding or where a gate replaces it), skip (weight of the skip leaving layer j, None where
    unused), token-lambda means."""
    cfg = model.cfg
    lam = model.block_lambdas().detach().float().cpu()
    sa = model.sa_lambdas().detach().float().cpu()
    sk = model.skip_weights().detach().float().cpu()
    srcs = {s for _, s in cfg.skip_pairs}
    rec = {name: lam[:, c].tolist() for c, name in enumerate(mixing_columns(cfg))}
    has_attn = [b.attn is not None for b in model.blocks]
    rec["v"] = [float(sa[i, 0]) if has_attn[i] else None for i in range(cfg.num_layers)]
    rec["ve"] = [float(sa[i, 1]) if model.ve_map[i] is not None and model.blocks[i].attn.ve_gate_w is None else None
                 for i in range(cfg.num_layers)]
    rec["skip"] = [float(sk[i]) if i in srcs else None for i in range(cfg.num_layers)]
    if model.table("token_lambda") is not None:
        rec["token_lambda_mean"] = model.table("token_lambda").weight.detach().float().mean(0).tolist()
    return rec


# --- stopping with the launcher ------------------------------------------------------------------

_STOPPED_BY: list[str] = []  # why the watchdog interrupted training: the summary's error

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Ctrl-C; kill, timeout, Slurm, docker stop, torchrun; a closed terminal
_SIGNALS: list[int] = []  # the signals received, first first
_ARMED = [False]  # whether a stop signal raises StopSignal now (not while the run's record is being written)


class StopSignal(KeyboardInterrupt):
    """A stop signal arrived: training ends as after Ctrl-C, the summary says `stopped` and names the signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_FROM_WATCHDOG = [False]  # the next SIGINT is the watchdog's interrupt_main, not a signal from outside


def _on_stop_signal(signum, frame) -> None:
    if signum == signal.SIGINT and _FROM_WATCHDOG[0]:
        _FROM_WATCHDOG[0] = False
    else:
        _SIGNALS.append(signum)
        _STOPPED_BY.append(f"stopped by {signal.Signals(signum).name}")
    if _ARMED[0]:
        _ARMED[0] = False  # one interruption: a second signal must not tear the record being written
        raise StopSignal(signum)


def stop_signal() -> int | None:
    """The first stop signal this process received (while stop_signals() was on), or None."""
    return _SIGNALS[0] if _SIGNALS else None


@contextlib.contextmanager
def stop_signals():
    """SIGINT, SIGTERM and SIGHUP raise StopSignal in the main thread (a Python handler runs between bytecodes,
    so also inside torch.save's writes and between the ops of a step); a signal that is ignored (nohup's SIGHUP, a
    background job's SIGINT) stays ignored. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _on_stop_signal)
    _SIGNALS.clear()
    _STOPPED_BY.clear()
    _ARMED[0] = True
    try:
        yield
    finally:
        _ARMED[0] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_with_parents(poll_s: float = 0.5, grace_s: float = 10.0) -> None:
    """Under torchrun or our launcher, stop when they are gone: a SIGKILLed launcher cannot stop its children, and
    a trainer left behind keeps training a folder that a rerun would then train twice. A plain `python -m
    embxlib.train` is not watched: nohup must keep it running when its shell goes."""
    torchrun = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    launcher = int(os.environ["EMBXLIB_LAUNCHER_PID"]) if os.environ.get("EMBXLIB_LAUNCHER_PID") else None
    if torchrun is None and launcher is None:
        return

    def watch():
        while True:
            time.sleep(poll_s)
            if torchrun is not None and os.getppid() != torchrun:
                _STOPPED_BY.append(f"stopped: torchrun (pid {torchrun}) is gone")
            elif launcher is not None and not process_alive(launcher):
                _STOPPED_BY.append(f"stopped: the launcher (pid {launcher}) is gone")
            else:
                continue
            _FROM_WATCHDOG[0] = True
            _thread.interrupt_main()  # a KeyboardInterrupt in the training loop: the summary and log say why
            time.sleep(grace_s)  # stuck in a collective whose peers are gone: leave without cleaning up
            os._exit(1)

    threading.Thread(target=watch, name="stop-with-parents", daemon=True).start()


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
    lock = hold_run_dir(run_dir) if D.rank == 0 else None
    log = RunLog(run_dir, D.rank == 0)
    crash_to_log = log.fatal_errors_to_log()  # SIGBUS (a shard truncated under its memmap), SIGSEGV: in log.txt
    if resume:
        log.resume()
    summary = dict(status="running", run_dir=str(run_dir), name=cfg.name, preset=cfg.preset, seed=cfg.seed)
    log.write_summary(summary)  # a run killed from outside still says it never finished
    try:
        if stop_signal() is not None:  # a signal that came while the folder was being set up
            raise StopSignal(stop_signal())
        if resume:
            log.line(f"# resumed from {CHECKPOINT} with world_size {D.world}")
        else:
            log.write_json("config.json", cfg.to_dict())
            commit = provenance(run_dir) if D.rank == 0 else ""
            for s in header_lines(cfg, argv, D.world, accum, device, commit):
                log.line(s, console=False)
            log.line("data: " + check_enough_data(train_files, val_files, cfg, D.world), console=False)
        summary = _train_loop(cfg, args, D, device, accum, val_steps, train_files, val_files, run_dir, log, summary)
    except BaseException as e:  # keep what we have, say what happened, then fail loudly
        _ARMED[0] = False  # from here on a signal is noted, not raised: the record below is written whole
        # a stop from outside is what happened, also when it surfaced as another error (torch.save reports an
        # interrupted write as "unexpected pos")
        if _STOPPED_BY and _STOPPED_BY[0].startswith("stopped by SIG"):
            summary.update(status="stopped", error=_STOPPED_BY[0])
            message = (f"# STOPPED on rank {D.rank}: {_STOPPED_BY[0]}; --resume {run_dir} continues from its last "
                       f"checkpoint")
        else:
            error = (_STOPPED_BY[0] if isinstance(e, KeyboardInterrupt) and _STOPPED_BY
                     else f"{type(e).__name__}: {e}")
            summary.update(status="failed", error=error)
            message = f"# FAILED on rank {D.rank}: {error}"
        try:
            log.line(message)
        except OSError as le:  # the disk that failed the run may refuse this line too; the summary below says it
            print(f"error: could not write {run_dir / 'log.txt'}: {le}; {message[2:]}", file=sys.stderr, flush=True)
        if D.rank != 0:
            print(f"[rank {D.rank}] {message[2:]}", file=sys.stderr, flush=True)
        if summary["status"] == "failed":
            traceback.print_exc()
        raise
    finally:
        _ARMED[0] = False
        try:
            write_summary_or_say_so(log, summary)
        finally:
            crash_to_log()
            log.close()
            if lock is not None:
                lock.release()
            D.close()  # last: with a peer gone it may wait; the record and the lock are done by then
    return run_dir


def write_summary_or_say_so(log: "RunLog", summary: dict) -> None:
    """The summary, whole; when even that fails (a full disk: its .tmp needs a new block), rewrite summary.json in
    place (its own blocks are enough) and say so on stderr and in log.txt, naming the file."""
    try:
        log.write_summary(summary)
        return
    except OSError as e:
        problem = e
    path = log.dir / "summary.json"
    text = f"could not write {path} whole ({problem})"
    try:
        log.write_summary(summary, in_place=True)
        text += f"; rewrote it in place: status {summary.get('status')}"
    except OSError as e2:
        text += f", nor in place ({e2}); it is out of date: the run's status is {summary.get('status')}" + (
            f" ({summary['error']})" if summary.get("error") else "")
    print(f"error: {text}", file=sys.stderr, flush=True)
    try:
        log.line(f"# {text}", console=False)
    except OSError:
        pass


def hold_run_dir(run_dir: Path) -> FolderLock | None:
    """Rank 0 holds the run folder's lock while it trains; a launcher holds it for the trainers it starts."""
    holder = lock_info(run_dir)
    launcher = os.environ.get("EMBXLIB_LAUNCHER_PID")
    if launcher and str(holder.get("pid")) == launcher and holder.get("host") == socket.gethostname():
        return None
    return FolderLock(run_dir, RUN_LOCK).acquire()


def _train_loop(cfg, args, D: Dist, device, accum, val_steps, train_files, val_files, run_dir, log, summary):
    set_compile_flags(cfg)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    for p in model.parameters():  # identical start on every rank
        if D.on:
            dist.broadcast(p.data, 0)
    num_params = sum(p.numel() for p in model.parameters())
    adam, muon = build_optimizers(model, cfg, D.rank, D.world)
    snoo = build_snoo(model, cfg)  # Snoo (medium records 12, 14-16) over all parameters, after the broadcast; None: off
    fwd = torch.compile(model, dynamic=False) if cfg.compile else model
    stream = TokenStream(train_files, cfg.train_seq_len, D.rank, D.world, accum, repeat=cfg.repeat_data,
                         order_seed=cfg.seed if cfg.shuffle_data else None)
    step, train_ms, history = 0, 0.0, []
    if args.resume:
        ck = load_checkpoint(run_dir / CHECKPOINT, device)
        model.load_state_dict(ck["model"])
        adam.load_state_dict(ck["adam"])
        muon.load_state_dict(ck["muon"])
        if snoo is not None:  # Snoo's outer copy, momentum and call count
            snoo.load_state_dict(ck["snoo"])
        stream.load_state_dict(ck["stream"])
        step, train_ms = ck["step"], ck["train_time_ms"]
        # the step is validated again when it is a validation step or the end (its new record then replaces the
        # old from there on); a --max-steps stop between validations keeps its record
        end = cfg.num_iterations if args.max_steps is None else min(cfg.num_iterations, args.max_steps)
        again = step % cfg.val_loss_every == 0 or step >= end
        history = [h for h in ck["history"] if h[0] < step or not again]
        log.replace_from = step if again else step + 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    windows: dict[int, torch.Tensor] = {}

    def window(step_idx) -> torch.Tensor:  # a tensor per window size: the compiled forward never recompiles for it
        w = window_blocks(step_idx, cfg)
        if w not in windows:  # from pinned memory, as upstream: a pageable copy would wait for the GPU
            pinned = torch.tensor(w, dtype=torch.int32, pin_memory=device.type == "cuda")
            windows[w] = pinned.to(device, non_blocking=True)
        return windows[w]

    def step_fn(step_idx, batches):
        return train_step(fwd, model, D, adam, muon, cfg, step_idx, batches, window(step_idx), accum, snoo=snoo)

    if cfg.compile:  # minutes on a CPU before the first step line: say what is happening
        warm = cfg.warmup_steps and not args.resume
        log.line("# compiling the model (torch.compile)"
                 + (f" and warming up: {cfg.warmup_steps} untimed step{'s' * (cfg.warmup_steps != 1)} on random "
                    "tokens" if warm else "")
                 + "; the first validation compiles its own graph; on a CPU this takes minutes before the first step")
    # without compile there is nothing to warm up: the steps would only cost time
    if cfg.compile and cfg.warmup_steps and not args.resume:  # let torch.compile see every shape, then forget them
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

    N = cfg.num_iterations
    stop = N if args.max_steps is None else min(N, args.max_steps)
    tokens_per_step = cfg.train_batch_tokens
    peaks = PeakTracker(device)  # (after warmup, as upstream: its state copy is not part of a training step)
    lines = StepLines(log, N, device, run_dir)
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
            log.line(f"step:{step}/{N} val_loss:{val_loss:.6f} train_time:{train_ms:.0f}ms "
                     f"step_avg:{train_ms / max(step, 1):.2f}ms")
            log.metrics(dict(step=step, val_loss=val_loss, train_time_ms=round(train_ms, 3),
                             lambdas=lambda_record(model), norms=norms))
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite val_loss {val_loss} at step {step}; logs kept in {run_dir}")
            t0 = time.perf_counter()
        if cfg.save_checkpoint and (last or (cfg.save_every and step and step % cfg.save_every == 0)):
            lines.flush()
            train_ms += 1000 * (time.perf_counter() - t0)
            muon.gather_state()  # (collective: every rank) the momenta and mantissas each rank keeps for its own matrices
            save_checkpoint(run_dir, D.rank == 0, model, adam, muon, stream, step, train_ms, history, cfg, snoo=snoo)
            muon.drop_foreign_state()
            t0 = time.perf_counter()
        if last:
            break
        if step == args.fail_at_step and D.rank == args.fail_rank:
            raise RuntimeError(f"injected fault at step {step} on rank {D.rank} (--fail-at-step)")
        epoch = stream.epoch
        loss, works = step_fn(step, [stream.next(device) for _ in range(accum)])
        if stream.epoch != epoch:
            log.line(f"# data: epoch {stream.epoch + 1} of the training shards starts at step {step + 1} (repeat_data)")
        step += 1
        lines.add(step, loss, works, train_ms + 1000 * (time.perf_counter() - t0), D)

    if stop < N:
        log.line(f"# stopped at step {stop} of {N} (--max-steps); --resume continues it")
    target_hit = next(((s, t) for s, v, t in history if v <= cfg.target_val_loss), (None, None))
    summary.update(status="finished" if stop == N else "stopped", **peaks.summary(),
                   final_val_loss=history[-1][1], train_time_ms=train_ms, num_iterations=N, steps=stop,
                   target_val_loss=cfg.target_val_loss, step_to_target=target_hit[0], time_to_target_ms=target_hit[1],
                   num_params=num_params, tokens_per_step=tokens_per_step,
                   tokens_per_s=stop * tokens_per_step / (train_ms / 1000) if train_ms else None,
                   world_size=D.world, grad_accum_steps=accum, device=str(device), data_epochs=stream.epoch)
    if device.type == "cuda":
        log.line(f"peak memory allocated: {max(peaks.peak.values()) // 2**20} MiB "
                 f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    return summary


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


class StepLines:
    """The per-step lines `step:N/M train_loss:X train_time:Tms step_avg:Sms` without a host sync in the loop:
    each step's loss is copied to host memory asynchronously and its line written once the copy has landed (on a
    GPU a step or so later, on a CPU at once); train_time is the host's clock when the step was issued, as
    upstream's step lines. flush() waits for the rest (at validation and checkpoints) and stops the run at a
    non-finite loss, naming its step."""

    def __init__(self, log, N: int, device: torch.device, run_dir):
        self.log, self.N, self.cuda, self.run_dir = log, N, device.type == "cuda", run_dir
        self.pending: list = []

    def add(self, step: int, loss: torch.Tensor, works, now_ms: float, D: Dist) -> None:
        D.wait(works)  # (NCCL: a stream wait; the host goes on)
        host = torch.empty((), dtype=loss.dtype, pin_memory=self.cuda)
        host.copy_(loss, non_blocking=self.cuda)
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        self.pending.append((step, host, done, now_ms))
        self.write(wait=False)

    def flush(self) -> None:
        self.write(wait=True)

    def write(self, wait: bool) -> None:
        while self.pending:
            step, host, done, ms = self.pending[0]
            if done is not None and not done.query():
                if not wait:
                    return
                done.synchronize()
            self.pending.pop(0)
            loss = float(host.numpy())  # host memory the copy has filled: no device sync
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite train loss {loss} at step {step}; stopping, logs kept in "
                                         f"{self.run_dir}")
            self.log.line(f"step:{step}/{self.N} train_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{ms / step:.2f}ms")


class PeakTracker:
    """Peak CUDA memory allocated during training steps and during validations, kept apart (validation holds the
    long val_seq_len sequence, training the backward pass); counted from its creation (after warmup)."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.peak = {"train": 0, "val": 0}
        if self.on:
            torch.cuda.reset_peak_memory_stats()

    def end(self, phase: str) -> None:
        if self.on:
            self.peak[phase] = max(self.peak[phase], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def summary(self) -> dict:
        return {f"peak_memory_{k}_mib": v // 2**20 for k, v in self.peak.items()} if self.on else {}


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


def load_checkpoint(path: Path, device="cpu") -> dict:
    """Tensors and plain data only (weights_only): unpickling anything else could run code from a shared file."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"[Uu]nsupported [^\n]*?(?=\.?\n|\.?$)", str(e))
        if not zipfile.is_zipfile(path) or "GLOBAL" not in str(e):  # torch.save writes a zip; code needs a GLOBAL
            raise ValueError(f"{path}: corrupt: not a checkpoint as torch.save writes one (unpickling failed: "
                             f"{found[0] if found else 'unreadable'}); resume from a good copy or start a new "
                             f"run") from None
        detail = found[0] if found else "not a weights-only checkpoint"
        raise ValueError(f"{path}: holds more than tensors and plain data ({detail}); refusing to unpickle it: "
                         f"it could run code") from None


def save_checkpoint(run_dir, is_rank0, model, adam, muon, stream, step, train_ms, history, cfg, snoo=None):
    if not is_rank0:
        return
    ck = dict(model=model.state_dict(), adam=adam.state_dict(), muon=muon.state_dict(), stream=stream.state_dict(),
              step=step, train_time_ms=train_ms, history=history, config=cfg.to_dict())
    if snoo is not None:  # Snoo's state (the same on every rank)
        ck["snoo"] = snoo.state_dict()
    write_atomically(run_dir / CHECKPOINT, lambda f: torch.save(ck, f))  # never a half-written checkpoint


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


@record  # under torchrun, a failing rank's traceback is reported as the root cause
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse(argv)
    if args.dry_run:
        dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        return
    keep_freed_memory()
    if os.environ.get("WORLD_SIZE", "1") != "1" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    try:  # before any folder is made: the shards exist, are sound (every one, read by rank 0) and hold enough tokens
        train_files, val_files = shard_files(cfg.data_dir, "train"), shard_files(cfg.data_dir, "val")
        if int(os.environ.get("RANK", "0")) == 0:  # one reader is enough: the other ranks wait for its run folder
            check_shards(train_files + val_files, cfg.vocab_size)
        check_enough_data(train_files, val_files, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (FileNotFoundError, ShardError) as e:
        sys.exit(f"error: data_dir={cfg.data_dir!r}: {e}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    stop_with_parents()
    with stop_signals():
        try:
            run_dir = train(cfg, args, ["python -m embxlib.train", *argv])
        except FolderLocked as e:
            sys.exit(f"error: {e}")
        except BaseException:
            if stop_signal() is None:
                raise
            # recorded (summary `stopped`, a log line naming the signal); exit as the signal's conventional 128+n
            print(_STOPPED_BY[0], file=sys.stderr, flush=True)
            raise SystemExit(128 + stop_signal()) from None
        if stop_signal() is not None:  # arrived while the finished run's record was being written
            print(f"{_STOPPED_BY[0]} after the run had finished: {run_dir}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
