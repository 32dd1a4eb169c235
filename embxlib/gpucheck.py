"""The GPU check: one prepared command for a machine with one GPU and no internet, that returns numbers from the
first minutes it gets.

    make gpu-check                                               # the line below, into $OUT if set, else runs/bench
    PYTHONPATH=. python3 -m embxlib.gpucheck --out runs/bench    # <= 8 min by design (--budget-s 450) on one GPU
    python -m embxlib.gpucheck --cpu --out /tmp/check            # the same staged plan on a CPU at tiny size

Needs the built corpus in data/shakespeare (~3 MiB, git-ignored: carry it to the GPU machine) and the machine's own
torch; nothing else (no papermill, no .venv, no internet). Each stage runs in its own process
(`python -m embxlib.gpucheck --stage NAME`, its output in <out>/gpucheck-stages/NAME.log), so a fatal CUDA error or
a timeout in one keeps the others' numbers; <out>/gpu-<device>.json is rewritten when a stage starts and after it
ends. The stages, most valuable first:
1. run: medium_x01 on this one GPU through train.main: gradient accumulation 8, 3 warmup steps, the real schedule
   of 5690 steps for --steps steps, the bundled corpus (repeated: it holds under 3 steps), a validation at the full
   val_seq_len (262,144 tokens) before and after, no checkpoint: the train_time of every step (from the run's
   log.txt), ms/step over steps 3..N against upstream's own x01 log over the same steps (tokens/s per GPU), MFU,
   peak memory of training (after warmup) and of validation. Its steps so far are read from its log also when it
   is stopped. (The fake-tensor memory estimate is CPU work: `python -m embxlib.train --preset medium_x01 --dry-run`.)
2. flex_attention, 3. head_loss, 4. compiled_model, 5. compiled_autograd: kernels, each against an independent
   reference (the check_* functions below).
--budget-s bounds the whole check: a stage whose estimate (STAGE_SECONDS) no longer fits in what is left is skipped
and listed under "skipped" with why; the stage running when the budget is spent is stopped (SIGTERM, then SIGKILL
after STOP_GRACE_S). A SIGTERM, SIGINT or SIGHUP to the check stops the running stage the same way, records it and
what did not run, and exits 128 + the signal; after a SIGKILL the JSON holds every stage finished before it (a
stage's process gets SIGTERM when the check dies). The allocator setting (embxlib.cudaenv) is made before torch is
imported, in every stage's process, as in the trainer; the compile flags come from dist.set_compile_flags.
Every configuration it runs on CUDA is in plan(); tests/test_gpu.py holds them against the FlexAttention kernel
tiles of sm80/sm90/sm100 and traces the small ones through the CUDA attention branch on the CPU, and runs the whole
staged plan on the CPU (CUDA parts on their CPU stand-ins: SDPA, no compile in the run, aot_eager), stopping it at a
stage boundary and mid-stage.
"""
from __future__ import annotations

import os

from .cudaenv import set_cuda_env

set_cuda_env()  # before torch is imported: each stage is its own process, so this precedes anything CUDA

import argparse  # noqa: E402
import ctypes  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import ROOT  # noqa: E402
from .config import EOT_TOKEN, Config, cpu_bf16_matmul, medium_x01, tiny  # noqa: E402
from .data import read_shard, shard_files, write_shard  # noqa: E402
from .model import GPT, HeadLoss, SoftCap, attend, dense_mask, document_ids, flex_block_mask  # noqa: E402
from .runfolder import parse_step_line, read_json, write_json_atomically  # noqa: E402

SMALL = dict(train_seq_len=1024, window_max=512, attn_block_size=128)  # FlexAttention's CUDA tiles need 128 blocks
RUN_FLAGS = ["--no-coordinate-descent-tuning", "--warmup-steps", "3", "--no-save-checkpoint"]
UPSTREAM_X01_LOG = (ROOT / "published" / "modded-nanogpt-logs" /
                    "2025-09-11_GPT2MediumX01" / "000_592014ec-6781-4f59-b274-c4af68ccfe75.txt")
STAGES = ("run", "flex_attention", "head_loss", "compiled_model", "compiled_autograd")  # most valuable first
# seconds each stage is expected to take, its process start included. CUDA (one H100, issue 32's estimate): the run
# is its compiles (training graph, three Muon shapes, the 262,144-token validation graph, the eager flex pass),
# 3.5-6 min, + 20 steps at ~1.85 s + two validations; each compile of the small checks ~30-60 s.
# CPU: measured on 2 shared cores (load ~4-11), 6 tiny steps in bf16 (AVX-512 BF16/AMX).
STAGE_SECONDS = {"cuda": dict(run=360, flex_attention=60, head_loss=45, compiled_model=90, compiled_autograd=90),
                 "cpu": dict(run=150, flex_attention=20, head_loss=25, compiled_model=60, compiled_autograd=70)}
BUDGET_S = 450  # default --budget-s: with a stopped stage's STOP_GRACE_S and the process starts, within 8 minutes
STOP_GRACE_S = 15  # a stopped stage's time to record itself (the trainer writes its summary) before SIGKILL
CUDA_STEPS = 20


def cpu_precision() -> str:
    """bf16 where this CPU multiplies bf16 matrices in hardware, else fp32 (~7x faster there; same code paths)."""
    return "bf16" if cpu_bf16_matmul() else "fp32"


def cpu_steps() -> int:
    """Steps of the tiny run on a CPU (> 3: ms/step is timed from step 3): 2.3 s each in bf16 with AVX-512 BF16/AMX on
    an idle 2-core machine (~25 s at load 11), ~15-20 s in fp32 on AVX2."""
    return 6 if cpu_bf16_matmul() else 4


def plan(device: str = "cuda") -> dict[str, Config]:
    """Every configuration the check runs through the model on `device`: the small compiled ones and the run."""
    kw = dict(device=device) if device == "cuda" else dict(device=device, precision=cpu_precision())
    out = {"compiled_model": tiny(**SMALL, **kw), "compiled_autograd": tiny(**SMALL, **kw, compiled_autograd=True)}
    if device == "cuda":
        out["run"] = medium_x01(coordinate_descent_tuning=False, warmup_steps=3, save_checkpoint=False, device="cuda")
    return out


def compile_backend(device: str) -> str:
    """inductor on CUDA; aot_eager on a CPU (the same dynamo and autograd capture, without a minute of C++ compile)."""
    return "inductor" if device == "cuda" else "aot_eager"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _small_model(cfg: Config, device: str) -> GPT:
    """The model of a small check at seed 0, its zero-initialised matrices made random (every gradient nonzero)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.02)
    return model


def _batch(cfg: Config, device: str):
    tok = torch.randint(0, cfg.vocab_size, (1, cfg.train_seq_len + 1), device=device)
    return tok[:, :-1].int(), tok[:, 1:].long(), torch.tensor(4, dtype=torch.int32, device=device)


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


def _eager_reference(cfg: Config, device: str):
    """The reference of a compile check: a small model on the device, one batch, and its eager loss and gradients
    (the model's own gradients cleared again for the compiled pass)."""
    model = _small_model(cfg, device)
    batch = _batch(cfg, device)
    eager = model(*batch)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return model, batch, eager, grads


def check_compiled_model(device: str) -> dict:
    """A tiny model with the GPU code path (FlexAttention on CUDA, bf16 policy), eager vs torch.compile (with the
    trainer's compile flags)."""
    from .dist import set_compile_flags
    cfg = plan(device)["compiled_model"]
    set_compile_flags(cfg)
    model, (x, y, window), eager, g_eager = _eager_reference(cfg, device)
    compiled = torch.compile(model, dynamic=False, backend=compile_backend(device))(x, y, window)
    compiled.backward()
    grad_err = max(_rel(p.grad, g) for p, g in zip(model.parameters(), g_eager) if g.abs().sum())
    loss_err = abs(compiled.item() - eager.item()) / eager.item()
    torch._dynamo.reset()
    return dict(backend=compile_backend(device), eager_loss=eager.item(), compiled_loss=compiled.item(),
                loss_rel_err=loss_err, max_grad_rel_err=grad_err, ok=loss_err < 1e-3 and grad_err < 5e-2)


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


def check_compiled_autograd(device: str, backward_inside: bool = True) -> dict:
    """Record 8 (preset medium) sets torch._dynamo.config.compiled_autograd; upstream dropped it in #119 because
    FlexAttention failed under it. Does a compiled training step of the model capture its backward with it, and are
    the gradients right? The flag is read when torch.compile wraps a function and reaches a backward only while a
    call of the wrapped function runs (dynamo enters compiled autograd around each call): so here it is set first
    (through dist.set_compile_flags, as the trainer), and what is compiled is forward and backward together.
    Captures are counted by torch._dynamo's counters; ok: at least one backward graph captured and the gradients those of eager.
    backward_inside=False compiles the forward only and calls .backward() on its loss outside, as the trainer and
    upstream's Record 8 do: nothing is captured and ok is False (tests/test_gpucheck.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from .dist import set_compile_flags
    cfg = plan(device)["compiled_autograd"]
    model, (x, y, window), eager, g_eager = _eager_reference(cfg, device)
    torch._dynamo.reset()
    counters.clear()
    set_compile_flags(cfg)  # compiled_autograd=True, before torch.compile reads it
    try:
        if backward_inside:
            def step(x, y, window):
                loss = model(x, y, window)
                loss.backward()
                return loss.detach()
            loss = torch.compile(step, dynamic=False, backend=compile_backend(device))(x, y, window)
        else:
            loss = torch.compile(model, dynamic=False, backend=compile_backend(device))(x, y, window)
            loss.backward()
        captures = int(counters["compiled_autograd"]["captures"])
    finally:
        torch._dynamo.config.compiled_autograd = False
        torch._dynamo.reset()
    grads = [(p.grad, g) for p, g in zip(model.parameters(), g_eager) if g.abs().sum()]
    grad_err = max(_rel(a, g) if a is not None else math.inf for a, g in grads)
    loss_err = abs(loss.item() - eager.item()) / eager.item()
    return dict(torch=torch.__version__, backend=compile_backend(device), backward_inside_compiled_call=backward_inside,
                captures=captures, loss_rel_err=loss_err, max_grad_rel_err=grad_err,
                ok=captures >= 1 and loss_err < 1e-3 and grad_err < 5e-2)


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



def run_argv(device: str, steps: int, corpus: Path, run_dir: Path) -> list[str]:
    """train.main's arguments for the run stage: medium_x01 on CUDA; on a CPU tiny, uncompiled, at cpu_precision()."""
    if device == "cuda":
        base, val_tokens = ["--preset", "medium_x01", *RUN_FLAGS], 4 * 262144
    else:
        base = ["--preset", "tiny", "--device", "cpu", "--no-compile", "--warmup-steps", "0", "--no-save-checkpoint",
                "--precision", cpu_precision()]
        val_tokens = 4 * 1024
    return [*base, "--data-dir", str(corpus), "--repeat-data", "--val-tokens", str(val_tokens),
            "--max-steps", str(steps), "--run-dir", str(run_dir)]


def stage_run(device: str, args) -> dict:
    """The run stage's process: a short run at full size through train.main. Its numbers are read from the run
    folder by the check (run_numbers), also when this process is stopped or dies."""
    from . import train
    val_tokens = 4 * 262144 if device == "cuda" else 4 * 1024
    corpus = corpus_dir(Path(args.data), Path(tempfile.mkdtemp()), val_tokens)
    try:
        train.main(run_argv(device, args.steps, corpus, Path(args.run_dir)))
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    return {}


def run_numbers(run_dir: Path, device: str, device_name: str, steps: int) -> dict:
    """What the run folder says so far: every logged step's train_time, ms/step over steps 3..N (1..N for a run of
    3 steps or fewer), tokens/s, and on CUDA MFU, upstream's x01 log over the same steps and the peak memory."""
    run_dir = Path(run_dir)
    summary, cfg = read_json(run_dir / "summary.json") or {}, read_json(run_dir / "config.json") or {}
    log = run_dir / "log.txt"
    times = step_times(log) if log.exists() else {0: 0}
    done = max(times)
    first = 3 if done > 3 else 1  # (the first steps after warmup still settle)
    ms = ms_per_step(times, first=first)
    tokens = cfg.get("train_batch_tokens")
    vals = [p for p in map(parse_step_line, log.read_text().splitlines()) if p and p["val_loss"] is not None] if (
        log.exists()) else []
    res = dict(preset=cfg.get("preset"), precision=cfg.get("precision"), steps_planned=steps, steps=done,
               status=summary.get("status"), num_iterations=summary.get("num_iterations", cfg.get("num_iterations")),
               grad_accum_steps=summary.get("grad_accum_steps"), train_time_ms=[times[s] for s in sorted(times)],
               step_ms=[times[s] - times[s - 1] for s in sorted(times) if s and s - 1 in times],
               first_timed_step=first, ms_per_step=ms, tokens_per_s=tokens / ms * 1000 if ms and tokens else None,
               val_loss_start=vals[0]["val_loss"] if vals and vals[0]["step"] == 0 else None,
               val_loss_end=summary.get("final_val_loss"),
               peak_memory_train_mib=summary.get("peak_memory_train_mib"),
               peak_memory_val_mib=summary.get("peak_memory_val_mib"), run_dir=str(run_dir))
    if device == "cuda" and ms and tokens:
        from .stepmodel import PEAK_BF16_FLOPS, matmul_flops
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
        flops = matmul_flops(medium_x01(train_batch_tokens=tokens))  # matmul FLOPs only: a lower bound
        res["mfu"] = flops / (ms / 1000) / peak if peak else None
        up_times = step_times(UPSTREAM_X01_LOG)
        up = ms_per_step(up_times, first=first, last=done)
        res["upstream_step_ms"] = [up_times[s] - up_times[s - 1] for s in range(1, done + 1)
                                   if s in up_times and s - 1 in up_times]
        res["upstream_8xH100_ms_per_step_same_steps"] = up
        res["tokens_per_s_per_gpu"] = tokens / ms * 1000
        res["upstream_tokens_per_s_per_gpu"] = tokens / 8 / up * 1000 if up else None
        res["vs_upstream_per_gpu"] = res["tokens_per_s_per_gpu"] / res["upstream_tokens_per_s_per_gpu"] if up else None
    end = res["val_loss_end"]
    res["ok"] = bool(ms) and done >= steps and end is not None and math.isfinite(end)
    return res


STAGE_FNS = {"run": stage_run,
             "flex_attention": lambda device, args: check_flex_attention(device),
             "head_loss": lambda device, args: check_head_loss(device),
             "compiled_model": lambda device, args: check_compiled_model(device),
             "compiled_autograd": lambda device, args: check_compiled_autograd(device)}


def stage_main(args) -> int:
    """One stage in this process: its result (ok, its numbers, or the error) to --result, atomically."""
    device = "cpu" if args.cpu else "cuda"
    res: dict = dict(alloc_conf=os.environ.get("PYTORCH_ALLOC_CONF"), pid=os.getpid())
    t = time.perf_counter()
    code = 0
    try:
        if args.hold == f"in:{args.stage}":  # test hook: a stage that never ends (stopped from outside)
            time.sleep(3600)
        res.update(STAGE_FNS[args.stage](device, args))
        res.setdefault("ok", True)
    except BaseException as e:  # a failed stage is a result, not the end of the check (a stop is recorded too)
        res.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    res["stage_seconds"] = round(time.perf_counter() - t, 1)
    try:
        res["device_name"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    except Exception as e:  # a poisoned context: the result above still counts
        res["device_name_error"] = f"{type(e).__name__}: {e}"
    write_json_atomically(args.result, res)
    return code


# --- the check: one process per stage, the JSON after every stage ---------------------------------------------

class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_GOT: list[int] = []  # the first stop signal the check got; acted on where no record is half-made (_stop_point)


def _on_signal(signum, frame):
    if not _GOT:
        _GOT.append(signum)


def _stop_point() -> None:
    if _GOT:
        raise Stopped(_GOT[0])


def _die_with(parent: int) -> None:
    """In a stage's process before exec (Linux): SIGTERM when the check's process dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def device_name_guess(device: str) -> str:
    """The GPU's name without touching it from this process (nvidia-smi), else 'cuda' until a stage says."""
    if device == "cpu":
        return "cpu"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        return r.stdout.strip().splitlines()[0].strip() or "cuda"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "cuda"


def result_path(out: Path, device_name: str) -> Path:
    return out / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-').lower()}.json"


class Check:
    """The parent: starts each stage's process, stops it at the budget or a signal, keeps the JSON current."""

    def __init__(self, args, device: str):
        self.args, self.device = args, device
        self.out = Path(args.out).resolve()  # (the stages run in the repository root)
        args.data = str(Path(args.data).resolve())
        self.stage_dir = self.out / "gpucheck-stages"
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.run_dir = self.out / f"gpucheck-run-{time.strftime('%Y%m%d-%H%M%S')}"
        name = device_name_guess(device)
        self.path = result_path(self.out, name)
        self.result = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda,
                           python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M:%S"),
                           command="python -m embxlib.gpucheck " + " ".join(args.argv), budget_s=args.budget_s,
                           steps=args.steps, status="running", elapsed_s=0.0, running=None, stages=[], skipped=[])

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json_atomically(self.path, self.result)

    def learn_device(self, name: str | None) -> None:
        if self.device == "cuda" and name and name != self.result["device"]:
            old = self.path
            self.result["device"], self.path = name, result_path(self.out, name)
            self.write()
            if old != self.path:
                old.unlink(missing_ok=True)

    def stage_cmd(self, stage: str, result_file: Path) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "embxlib.gpucheck", "--stage", stage, "--out", str(self.out), "--data",
               str(a.data), "--steps", str(a.steps), "--result", str(result_file), "--run-dir", str(self.run_dir)]
        return cmd + ["--cpu"] * a.cpu + (["--hold", a.hold] if a.hold else [])

    def run_stage(self, stage: str) -> None:
        result_file, log_file = self.stage_dir / f"{stage}.json", self.stage_dir / f"{stage}.log"
        result_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        timeout = max(self.left(), 1.0)
        t = time.monotonic()
        with open(log_file, "w") as lf:
            proc = subprocess.Popen(self.stage_cmd(stage, result_file), stdout=lf, stderr=subprocess.STDOUT, env=env,
                                    cwd=ROOT, preexec_fn=functools.partial(_die_with, os.getpid()))
        self.result["running"] = dict(stage=stage, pid=proc.pid, log=str(log_file), timeout_s=round(timeout))
        self.write()
        print(f"gpucheck: {stage} (pid {proc.pid}, at most {timeout:.0f} s; log {log_file})", flush=True)
        stopped = None
        try:
            while proc.poll() is None:
                _stop_point()
                if time.monotonic() - t > timeout:
                    stopped = f"stopped: --budget-s {self.args.budget_s:g} spent after {time.monotonic() - t:.0f} s"
                    self.stop(proc)
                    break
                time.sleep(0.2)
        except Stopped as e:
            self.stop(proc)
            self.record(stage, proc, t, result_file, log_file, f"stopped: the check got {e}")
            raise
        self.record(stage, proc, t, result_file, log_file, stopped)

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def record(self, stage, proc, t, result_file: Path, log_file: Path, stopped: str | None) -> None:
        rec: dict = dict(stage=stage, ok=False, seconds=round(time.monotonic() - t, 1), returncode=proc.returncode)
        got = read_json(result_file) if result_file.exists() else None
        if got:
            rec.update(got, ok=bool(got.get("ok")) and stopped is None)
            self.learn_device(got.get("device_name"))
        else:
            rec["error"] = stopped or f"the stage's process ended with {proc.returncode} and no result"
        if stopped:
            rec["stopped"] = stopped
        if not rec["ok"]:
            rec["log_tail"] = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        if stage == "run":
            numbers = run_numbers(self.run_dir, self.device, self.result["device"], self.args.steps)
            rec.update(numbers, ok=rec["ok"] and numbers["ok"])
        self.result["stages"].append(rec)
        self.result["running"] = None
        self.write()
        brief = {k: v for k, v in rec.items() if k not in ("trace", "log_tail", "train_time_ms", "step_ms",
                                                           "upstream_step_ms")}
        print(json.dumps(brief), flush=True)

    def skip(self, stage: str, why: str) -> None:
        self.result["skipped"].append(dict(stage=stage, why=why))
        self.write()
        print(f"gpucheck: {stage} skipped: {why}", flush=True)

    def main(self, stages: list[str]) -> int:
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.write()
            for i, stage in enumerate(stages):
                _stop_point()
                if self.args.hold == f"before:{stage}":  # test hook: wait at this stage boundary (stopped from outside)
                    self.result["holding"] = f"before {stage}"
                    self.write()
                    while True:
                        _stop_point()
                        time.sleep(0.2)
                est = STAGE_SECONDS[self.device][stage]
                if i and est > self.left():  # the first stage always runs, within the budget
                    self.skip(stage, f"needs ~{est} s, {max(self.left(), 0):.0f} s of --budget-s "
                                     f"{self.args.budget_s:g} left")
                    continue
                self.run_stage(stage)
            _stop_point()
            self.result["status"] = "finished"
        except Stopped as e:
            done = {r["stage"] for r in self.result["stages"]} | {s["stage"] for s in self.result["skipped"]}
            for stage in stages:
                if stage not in done:
                    self.result["skipped"].append(dict(stage=stage, why=f"the check got {e} first"))
            self.result.update(status=f"stopped by {e}", running=None)
            self.write()
            print(f"gpucheck: stopped by {e}; wrote {self.path}", flush=True)
            return 128 + e.signum
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
        self.write()
        print(json.dumps(self.result, indent=2))
        print(f"wrote {self.path}")
        return 0 if all(r["ok"] for r in self.result["stages"]) else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m embxlib.gpucheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench", help="folder for gpu-<device>.json, the run folder and the "
                    "stages' logs")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps of the run (default {CUDA_STEPS} on "
                    f"CUDA; on a CPU cpu_steps(): 6 with bf16 matrix units, else 4)")
    ap.add_argument("--data", default="data/shakespeare", help="the built bundled corpus")
    ap.add_argument("--cpu", action="store_true", help="the same plan on the CPU at tiny size (what the tests do)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole check: stages that no "
                    "longer fit are skipped (and listed), a stage running when it is spent is stopped "
                    f"(default {BUDGET_S})")
    ap.add_argument("--only", default=None, metavar="STAGE,...", help=f"run these stages only, in the plan's order "
                    f"({','.join(STAGES)})")
    ap.add_argument("--skip-kernels", action="store_true", help="the run only (= --only run)")
    ap.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # one stage's own process
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hold", default=None, help=argparse.SUPPRESS)  # test hook: before:STAGE or in:STAGE waits
    args = ap.parse_args(argv)
    args.argv = argv
    device = "cpu" if args.cpu else "cuda"
    if args.steps is None:
        args.steps = CUDA_STEPS if device == "cuda" else cpu_steps()
    if args.stage:
        return stage_main(args)
    if device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, "error: CUDA is not available here; use --cpu for the CPU version of this check\n")
    stages = list(STAGES)
    if args.skip_kernels:
        stages = ["run"]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(STAGES))
        if unknown:
            ap.error(f"--only {args.only}: no stage {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
        stages = [s for s in STAGES if s in wanted]
    return Check(args, device).main(stages)


if __name__ == "__main__":
    sys.exit(main())
