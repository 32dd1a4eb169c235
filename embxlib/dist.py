"""This process's place in a run and the process-wide settings a trainer makes: its rank, world size and local
rank, read from torchrun's environment in one place (env()); the device; the collectives (Dist); glibc's memory
setting, the thread count and the compile flags."""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config


@dataclass(frozen=True)
class Env:
    world: int = 1
    rank: int = 0
    local_rank: int = 0


def env() -> Env:
    """WORLD_SIZE, RANK and LOCAL_RANK as torchrun sets them (1, 0, 0 in a plain process)."""
    return Env(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
               int(os.environ.get("LOCAL_RANK", "0")))


class Dist:
    def __init__(self, device: torch.device):
        e = env()
        self.world, self.rank, self.local_rank = e.world, e.rank, e.local_rank
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

    def broadcast(self, t: torch.Tensor) -> None:
        """rank 0's values into t on every rank."""
        if self.on:
            dist.broadcast(t, 0)

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
        torch.cuda.set_device(env().local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def share_threads() -> None:
    """Under torchrun without OMP_NUM_THREADS: the CPU's threads shared among the node's processes."""
    world = env().world
    if world != 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def set_compile_flags(cfg: Config) -> None:
    import torch._dynamo
    import torch._inductor.config
    torch._inductor.config.coordinate_descent_tuning = cfg.coordinate_descent_tuning
    torch._dynamo.config.compiled_autograd = cfg.compiled_autograd
