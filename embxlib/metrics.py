"""What the trainer measures as it goes, besides the losses: the per-step lines without a host sync, the peak
CUDA memory of training and of validation, and the per-layer lambdas logged with each validation."""
from __future__ import annotations

import math
import typing

import torch

from .model import GPT
from .runfolder import step_line
from .streams import mixing_columns

if typing.TYPE_CHECKING:  # (annotations only)
    from .dist import Dist


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
            self.log.line(step_line(step, self.N, ms, train_loss=loss))


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
