"""NorMuon, record 18's optimiser of the block matrices and gates (upstream train_gpt_medium.py at f411b3d3):
Nesterov-style momentum, Polar Express orthogonalisation, NorMuon's second-moment (variance) rescale along one
dimension, and cautious weight decay, with upstream's parameter grouping and its distributed layout.

Layout, as upstream: the parameters are taken in groups (one per label, in first-seen order; at world size 8
upstream's custom groups: attn_gate 16, value_embed_gate 10, attn 16, mlp 16 + 16). Each group's gradients are
stacked, padded with zeros to chunk_size x world_size and reduce-scattered (AVG): rank r updates the r-th chunk of
chunk_size parameters and keeps that chunk's momentum and second-moment buffers (on the group dict, as upstream),
then all-gathers the updated parameters. Attention tensors (4*dim, dim) are orthogonalised as their four
(dim, dim) matrices. lr and weight decay per parameter: lr * max(1, rows/cols)**0.5 * lr_mul and
lr * weight_decay * wd_mul, as upstream (whose model sets lr_mul/wd_mul on the tensors; here LabelledParam).

GPU-only pieces in torch: upstream's Triton XXT and ba_plus_cAA kernels are A = X @ X.mT and B = b*A + c*(A@A)
(the kernel accumulates A@A in fp32 and rounds B once; these round each product and sum in bf16). gloo and NCCL
both carry the AVG reduce-scatter (torch >= 2.13 gloo implements AVG), so no SUM-then-divide is needed.

Not wired into the trainer yet (issue 29). The test holding its equality: tests/test_upstream_r18_optim.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

# Computed for num_iters=5, safety_factor=2e-2, cushion=2 (upstream)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# upstream's custom grouping at 8 ranks (a rank never holds both attn and mlp matrices)
CUSTOM_ORDER = ("attn_gate", "value_embed_gate", "attn", "mlp")
CUSTOM_SIZES = (16, 10, 16, 16, 16)


class LabelledParam(NamedTuple):
    """A parameter with upstream's optimiser attributes: its label (which group and which rules) and multipliers."""
    param: Tensor
    label: str
    lr_mul: float = 1.0
    wd_mul: float = 1.0


def polar_express(G: Tensor, split_baddbmm: bool = False, coefficients=POLAR_EXPRESS_COEFFS) -> Tensor:
    """Orthogonalise the last two dims of G in bf16 (Polar Express, arXiv 2505.16932), as upstream: the wide side
    iterated, the Frobenius norm inflated by 2% for safety. The step X <- a X + B X is one fused baddbmm/addmm, or
    (split_baddbmm, upstream's choice for the MLP) a matmul and then an add, as upstream: they round differently."""
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)
    X = X.contiguous()
    for a, b, c in coefficients:
        A = X @ X.mT  # upstream: the Triton XXT kernel
        B = b * A + c * (A @ A)  # upstream: the Triton ba_plus_cAA kernel
        if split_baddbmm:
            X = (B @ X).add_(X, alpha=a)
        else:
            X = (torch.baddbmm if X.ndim > 2 else torch.addmm)(X, B, X, beta=a)
    return X.mT if tall else X


def variance_rescale(v: Tensor, second_moment: Tensor, beta2: float, red_dim: int) -> Tensor:
    """NorMuon's rescale of the orthogonalised update v (in place): the mean square along red_dim updates the
    second-moment buffer (an EMA), v is divided by its root and rescaled to keep its Frobenius norm."""
    v_mean = v.float().square().mean(dim=red_dim, keepdim=True)
    n = v.size(red_dim)
    v_norm = v_mean.sum(dim=(-2, -1), keepdim=True).mul_(n).sqrt_()
    second_moment.lerp_(v_mean.to(dtype=second_moment.dtype), 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt_()
    scaled_sq_sum = (v_mean * n) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt_()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min_(1e-10))
    return v.mul_(final_scale.type_as(v))


def cautious_step(p: Tensor, v: Tensor, wd: Tensor, lr: Tensor) -> None:
    """p <- p - lr*wd*p where the update v and p agree in sign (cautious weight decay, arXiv 2510.12402) - lr*v, in
    p's dtype. wd and lr are 0-d CPU float32 tensors (upstream: so that inductor folds them as constants)."""
    mask = (v * p) >= 0
    wd, lr = wd.to(p.dtype), lr.to(p.dtype)
    p.copy_(p - (p * mask * wd * lr) - (v * lr))


def normuon_groups(params: list[LabelledParam], world_size: int, custom_sizing: bool = True) -> list[dict]:
    """Upstream's groups: at 8 ranks (custom_sizing) CUSTOM_ORDER cut into CUSTOM_SIZES (a stable sort: model order
    within a label), else one group per label in the order labels first appear. Each group: its parameters, their
    labels, lr_muls and wd_muls, and chunk_size = ceil(len / world_size)."""
    params = list(params)
    if custom_sizing and world_size == 8:
        params.sort(key=lambda e: CUSTOM_ORDER.index(e.label))
        assert len(params) == sum(CUSTOM_SIZES), (len(params), CUSTOM_SIZES)
        cuts, start = [], 0
        for size in CUSTOM_SIZES:
            cuts.append(params[start:start + size])
            start += size
    else:
        by_label: dict[str, list] = {}
        for e in params:
            by_label.setdefault(e.label, []).append(e)
        cuts = list(by_label.values())
    return [dict(params=[e.param for e in cut], labels=[e.label for e in cut], lr_muls=[e.lr_mul for e in cut],
                 wd_muls=[e.wd_mul for e in cut], chunk_size=(len(cut) + world_size - 1) // world_size)
            for cut in cuts]


_COMPILED: dict = {}


def compiled(fn):
    """fn compiled as upstream compiles its three NorMuon helpers (dynamic=False, fullgraph=True), on first use
    (importing embxlib must not start inductor). Inductor keeps bf16 intermediates in fp32 inside a fused kernel, so
    compiled and eager differ by bf16 roundings; compiled, they equal upstream's compiled helpers."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


class NorMuon(torch.optim.Optimizer):
    """Record 18's NorMuon (upstream's defaults: lr 0.015, momentum 0.95, beta2 0.95, weight decay 1.2 in the record).
    params: LabelledParams; labels 'attn' (stacked q/k/v/o: (4*dim, dim), orthogonalised as four matrices), 'mlp'
    (orthogonalised with the split matmul-then-add), and gates (a label containing 'gate': second moment along the
    last dim). rank and world_size as the process group's (no collective in one process). compile=True runs
    polar_express, variance_rescale and cautious_step compiled, as upstream runs them (the GPU path)."""

    def __init__(self, params, lr=0.02, weight_decay=0.01, momentum=0.95, beta2=0.95, custom_sizing=True,
                 rank: int = 0, world_size: int = 1, compile: bool = False):
        self.rank, self.world_size, self.compile = rank, world_size, compile
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2)
        super().__init__(normuon_groups(params, world_size, custom_sizing), defaults)

    def reset(self):
        """Zero the momentum and second-moment buffers (upstream resets them after its warm-up)."""
        for group in self.param_groups:
            if "momentum_buffer" in group:
                group["momentum_buffer"].zero_()
                group["second_momentum_buffer"].zero_()

    @torch.no_grad()
    def step(self):
        rank, world = self.rank, self.world_size
        chunks = []  # first: every group's gradients reduce-scattered, all in flight together
        for group in self.param_groups:
            params, chunk_size = group["params"], group["chunk_size"]
            stacked = torch.empty((chunk_size * world, *params[0].shape), dtype=params[0].dtype,
                                  device=params[0].device)
            for i, p in enumerate(params):
                stacked[i].copy_(p.grad, non_blocking=True)
            stacked[len(params):].zero_()
            if world == 1:
                chunks.append((stacked, None))
            else:
                chunk = torch.empty_like(stacked[:chunk_size])
                chunks.append((chunk, dist.reduce_scatter_tensor(chunk, stacked, op=dist.ReduceOp.AVG,
                                                                 async_op=True)))
        gathers = []  # then each group's update of this rank's chunk, its all_gather started at once
        for group, (grad_chunk, work) in zip(self.param_groups, chunks):
            if work is not None:
                work.wait()
            updated = self._update(group, grad_chunk)
            if world == 1:
                gathers.append((group["params"], updated, None))
            else:
                stacked = torch.empty((group["chunk_size"] * world, *updated.shape[1:]), dtype=updated.dtype,
                                      device=updated.device)
                gathers.append((group["params"], stacked, dist.all_gather_into_tensor(stacked, updated,
                                                                                      async_op=True)))
        for params, stacked, work in gathers:
            if work is not None:
                work.wait()
            for p, new in zip(params, stacked.unbind(0)):
                p.copy_(new, non_blocking=True)

    def _update(self, group: dict, grad_chunk: Tensor) -> Tensor:
        """This rank's chunk of the group, updated (zero-padded to chunk_size)."""
        params, labels, chunk_size = group["params"], group["labels"], group["chunk_size"]
        start = self.rank * chunk_size
        first = start if start < len(params) else 0  # (a rank without parameters still computes on zeros)
        n = min(chunk_size, max(0, len(params) - start))
        if "momentum_buffer" not in group:
            group["momentum_buffer"] = torch.zeros_like(grad_chunk[:n])
        buf = group["momentum_buffer"]
        buf.lerp_(grad_chunk[:n], 1 - group["momentum"])
        g = grad_chunk[:n].lerp_(buf, group["momentum"])
        grad_shape = g.shape
        label = labels[first]
        if label == "attn":  # q, k, v, o stacked along the rows: four square matrices each
            assert all(lab == "attn" for lab in labels[first:first + n])
            g = g.view(4 * grad_shape[0], grad_shape[1] // 4, grad_shape[2])
        shape = params[first].shape
        is_gate = "gate" in label
        wide_rows = shape[-2] >= shape[-1]
        if "second_momentum_buffer" not in group:  # (shape heuristics on the parameter's shape, as upstream)
            group["second_momentum_buffer"] = (torch.zeros_like(g[..., :, :1]) if is_gate or wide_rows
                                               else torch.zeros_like(g[..., :1, :]))
        if "param_lr_cpu" not in group:  # per parameter of the whole group, CPU float32 as upstream
            group["param_lr_cpu"] = torch.tensor(
                [(max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5 if p.ndim >= 2 else 1.0) * m
                 for p, m in zip(params, group["lr_muls"])], dtype=torch.float32)
            group["param_wd_cpu"] = torch.tensor(group["wd_muls"], dtype=torch.float32)
        lr_all = group["param_lr_cpu"] * group["lr"]
        wd_all = group["param_wd_cpu"] * group["weight_decay"] * group["lr"]
        fn = compiled if self.compile else (lambda f: f)
        v = g if n == 0 else fn(polar_express)(g, split_baddbmm=label == "mlp")
        red_dim = -1 if (is_gate or wide_rows) else -2
        v = fn(variance_rescale)(v, group["second_momentum_buffer"], group["beta2"], red_dim).view(grad_shape)
        updated = torch.empty_like(grad_chunk)
        if n > 0:
            chunk = torch.stack(params[first:first + n])
            for i in range(n):
                fn(cautious_step)(chunk[i], v[i], wd_all[first + i], lr_all[first + i])
            updated[:n].copy_(chunk)
        updated[n:].zero_()
        return updated
