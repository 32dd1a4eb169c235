"""DistAdam, record 18's Adam (upstream train_gpt_medium.py at f411b3d3): sharded state in bf16, cautious weight
decay, gradients synchronised by hooks during the backward pass, and (as the record runs it) a step on odd steps only,
the gradients of the even step and the odd step accumulating in .grad in between.

Layout, as upstream: groups in a given label order (unlabelled parameters last). A parameter of >= 1024 values is
sharded along dim 0: its gradient is reduce-scattered (AVG), rank r keeps Adam state for and updates rows
[r*n/world, (r+1)*n/world) and all-gathers the parameter; a smaller one is all-reduced (AVG) and updated whole on
every rank. exp_avg and exp_avg_sq are bf16 (the update is computed in bf16, as upstream's). A parameter is stepped
only if its hook fired since the last step (a parameter without a gradient, e.g. the input embedding while the head
is tied, keeps its state and step count).

The update, as upstream's: m, v EMAs; update = m / (sqrt(v) + eps) * lr * sqrt(1-beta2^t) / (1-beta1^t);
where update and p agree in sign, update += lr * (lr * wd * wd_mul) * p (weight decay scaled by lr twice, as
upstream's); p -= update. lr = group lr * lr_mul.

Odd-step use (upstream's TrainingManager): `begin_last_microstep(step)` before the last micro-step's backward arms
the hooks on active steps, `finish_step(step, lr_mult)` steps, zeroes the gradients and disarms them; on inactive
steps the gradients stay and accumulate.

Not wired into the trainer yet (issue 29). Upstream compiles its step (torch.compile); this runs eager. The test
holding its equality: tests/test_upstream_r18_optim.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .normuon import LabelledParam

SMALL = 1024  # parameters with fewer values are all-reduced and updated whole on every rank


class DistAdam(torch.optim.Optimizer):
    """params: LabelledParams; label_order: the groups' order (upstream: lm_head, value_embed, smear_gate,
    skip_gate, x0_lambdas, embed2, embed; the scalars in a second DistAdam). odd_steps_only: upstream's setting
    for both of its DistAdams."""

    def __init__(self, params: list[LabelledParam], label_order: list[str], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 rank: int = 0, world_size: int = 1, odd_steps_only: bool = True):
        self.rank, self.world_size, self.odd_steps_only = rank, world_size, odd_steps_only
        params = list(params)
        self.lr_mul = {e.param: e.lr_mul for e in params}
        self.wd_mul = {e.param: e.wd_mul for e in params}
        by_label: dict = {}
        for e in params:
            by_label.setdefault(e.label, []).append(e.param)
        groups = [dict(params=by_label[label]) for label in label_order if label in by_label]
        if None in by_label:
            groups.append(dict(params=by_label[None]))
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for g in self.param_groups:
            g["initial_lr"] = g["lr"]
        for e in params:
            p = e.param
            chunk = p if p.numel() < SMALL else p[:p.size(0) // world_size]
            exp_avg = torch.zeros_like(chunk, dtype=torch.bfloat16, device=p.device)
            self.state[p] = dict(step=0, exp_avg=exp_avg, exp_avg_sq=torch.zeros_like(exp_avg))
        self.should_sync = False
        self._pending: dict = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._sync_gradient)
                       for g in self.param_groups for p in g["params"]]

    def active(self, step: int) -> bool:
        return step % 2 == 1 or not self.odd_steps_only

    def begin_last_microstep(self, step: int) -> None:
        """Arm the hooks before the last micro-step's backward of a step where this optimiser steps."""
        if self.active(step):
            self.should_sync = True

    def finish_step(self, step: int, lr_mult: float) -> bool:
        """On an active step: lr = initial lr x lr_mult, step, zero the gradients (to None), disarm the hooks.
        Returns whether it stepped."""
        if not self.active(step):
            return False
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * lr_mult
        self.step()
        self.zero_grad(set_to_none=True)
        if self.odd_steps_only:
            self.should_sync = False
        return True

    @torch.no_grad()
    def _sync_gradient(self, p: Tensor) -> None:
        if not self.should_sync:
            return
        g = p.grad
        if self.world_size == 1:
            self._pending[p] = (None, g)  # (upstream reduces over one rank: the same values)
        elif p.numel() < SMALL:
            self._pending[p] = (dist.all_reduce(g, op=dist.ReduceOp.AVG, async_op=True), g)
        else:
            g_slice = torch.empty_like(g[:g.shape[0] // self.world_size])
            self._pending[p] = (dist.reduce_scatter_tensor(g_slice, g, op=dist.ReduceOp.AVG, async_op=True), g_slice)

    def copy_state(self, src: Tensor, dst: Tensor) -> None:
        """dst takes src's weights and Adam state (step count included): upstream's copy_lm_to_embed, the tied
        head becoming the input embedding at the split step."""
        s, d = self.state[src], self.state[dst]
        d["step"] = s["step"]
        d["exp_avg"] = s["exp_avg"].clone()
        d["exp_avg_sq"] = s["exp_avg_sq"].clone()
        dst.data.copy_(src.data)

    @torch.no_grad()
    def step(self):
        gathers = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p not in self._pending:
                    continue
                work, g = self._pending[p]
                if work is not None:
                    work.wait()
                small = p.numel() < SMALL
                if small:
                    p_slice = p
                else:
                    n = p.shape[0] // self.world_size
                    p_slice = p[self.rank * n:(self.rank + 1) * n]
                lr = group["lr"] * self.lr_mul[p]
                state = self.state[p]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v.sqrt().add_(eps)
                update = m.div(denom).mul_(lr * ((1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)))
                mask = (update * p_slice) > 0  # cautious weight decay
                update.addcmul_(p_slice, mask, value=lr * wd * self.wd_mul[p] * lr)
                p_slice.add_(other=update, alpha=-1.0)
                if not small and self.world_size > 1:
                    gathers.append(dist.all_gather_into_tensor(p, p_slice, async_op=True))
        self._pending.clear()
        for w in gathers:
            w.wait()
