"""Optimisers and schedules of the x01 record: Muon for the block matrices, Adam for everything else.

Muon's work and state are split across ranks as upstream: parameters of one shape are taken in chunks of
world_size, rank r updates the r-th of each chunk (and keeps only its momentum and mantissa) and all_gathers in
flight together hand the results to everyone; a checkpoint gathers the state first (Muon.gather_state).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.sgd import sgd as functional_sgd  # torch.optim.SGD's step on explicit gradient lists (Snoo)

from . import streams as spec
from .config import Config

# Five quintic Newton-Schulz iterations, each with its own coefficients (upstream, 34f5696a)
NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def orthogonalize(G: Tensor, coefficients=NS_COEFFICIENTS, eps: float = 1e-7, dtype=torch.bfloat16) -> Tensor:
    """Approximate U V^T of G = U S V^T for the last two dims (leading dims are a batch, e.g. q/k/v/o), in upstream's
    expressions: in bf16 each product and sum rounds where upstream's rounds (a fused baddbmm rounds once and
    differs by up to ~2% of an element), and compiled, inductor fuses them as it fuses upstream's."""
    shape = G.shape
    X = G.to(dtype).reshape(-1, *shape[-2:])
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix X X^T is then the small one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm = 1
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return (X.mT if tall else X).reshape(shape)


def join_master(weight: Tensor, mantissa: Tensor) -> Tensor:
    """The fp32 master weight of a bf16 parameter: its bits on top, the 16-bit mantissa buffer below (upstream's
    mixed-precision Muon). A forward pass sees the master truncated (not rounded) to bf16."""
    hi = weight.view(torch.int16).to(torch.int32) << 16
    return (hi | (mantissa.view(torch.int16).to(torch.int32) & 0xFFFF)).view(torch.float32)


def split_master(master: Tensor, weight: Tensor, mantissa: Tensor) -> None:
    bits = master.view(torch.int32)
    weight.view(torch.int16).copy_((bits >> 16).to(torch.int16))
    mantissa.view(torch.int16).copy_(bits.to(torch.int16))  # the low half (the cast wraps)


def muon_update(weights: list[Tensor], mantissas: list[Tensor | None], bufs: list[Tensor], grads: list[Tensor],
                momentum: Tensor, lr: Tensor, decay: Tensor, coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                ns_dtype=torch.bfloat16, smooth_bufs: list[Tensor] | None = None, smoothing: Tensor | None = None,
                nesterov_smoothing: bool = False) -> None:
    """One Muon step of matrices of one shape, as upstream's `update`: the momentum buffer becomes
    m buf + (1 - m) g, the Nesterov direction m buf + (1 - m) g is orthogonalised (all of them in one batched
    Newton-Schulz: bit for bit one call per matrix, fewer calls), then the fp32 master (a bf16 weight and its 16-bit
    mantissa, or an fp32 weight) is decayed and stepped by lr. momentum, lr and decay (lr * weight decay) are 0-d
    float64 tensors on the CPU (upstream's _as_tensor_fullprec), so that a compiled update never recompiles as the
    schedules move them and never copies them to the device.
    smooth_bufs (medium records 13-16): each orthogonalised update v first goes through smooth_update."""
    directions = []
    for buf, g in zip(bufs, grads):
        g = g.float()
        buf.copy_(momentum * buf + (1 - momentum) * g)
        directions.append(momentum * buf + (1 - momentum) * g)
    updates = orthogonalize(torch.stack(directions), coefficients, eps, ns_dtype)
    for i, (w, mantissa, update) in enumerate(zip(weights, mantissas, updates.unbind(0))):
        if smooth_bufs is not None:
            update = smooth_update(smooth_bufs[i], update, smoothing, nesterov_smoothing)
        _step_master(w, mantissa, update, lr, decay)


def smooth_update(buf: Tensor, v: Tensor, s: Tensor, nesterov: bool) -> Tensor:
    """Upstream's update smoothing: the bf16 buffer becomes s buf + (1 - s) v; the update is the buffer (records
    14-16, "ema") or s buf + (1 - s) v again (record 13, "nesterov"). In upstream's expressions: eager, each product
    and sum rounds to bf16; compiled (inside the compiled update, as upstream's), inductor computes the expression
    in fp32 and rounds once on the store."""
    buf.copy_(s * buf + (1 - s) * v)
    return s * buf + (1 - s) * v if nesterov else buf


def _step_master(w: Tensor, mantissa: Tensor | None, update: Tensor, lr: Tensor, decay: Tensor) -> None:
    if mantissa is not None:
        master = join_master(w, mantissa)
        master.mul_(1 - decay).add_(update, alpha=-lr)
        split_master(master, w, mantissa)
    else:
        w.mul_(1 - decay).add_(update.to(w.dtype), alpha=-lr)


def muon_update_one(w: Tensor, mantissa: Tensor | None, buf: Tensor, g: Tensor, momentum: Tensor, lr: Tensor,
                    decay: Tensor, coefficients=NS_COEFFICIENTS, eps: float = 1e-7, ns_dtype=torch.bfloat16,
                    smooth_buf: Tensor | None = None, smoothing: Tensor | None = None,
                    nesterov_smoothing: bool = False) -> None:
    """muon_update of one matrix: what runs compiled (one graph per shape, as upstream's compiled `update`, whose
    fusions it then shares; a batched graph would fuse, and so round, otherwise)."""
    g = g.float()
    buf.copy_(momentum * buf + (1 - momentum) * g)
    update = orthogonalize(momentum * buf + (1 - momentum) * g, coefficients, eps, ns_dtype)
    if smooth_buf is not None:
        update = smooth_update(smooth_buf, update, smoothing, nesterov_smoothing)
    _step_master(w, mantissa, update, lr, decay)


_compiled_update = None


def compiled_muon_update(weights, mantissas, bufs, grads, *args, smooth_bufs=None, smoothing=None,
                         nesterov_smoothing=False) -> None:
    global _compiled_update
    if _compiled_update is None:  # (compiled on first use: importing embxlib must not start inductor)
        _compiled_update = torch.compile(muon_update_one, dynamic=False)
    for i, (w, mantissa, buf, g) in enumerate(zip(weights, mantissas, bufs, grads)):
        if smooth_bufs is None:  # (the call of every run without smoothing, as before)
            _compiled_update(w, mantissa, buf, g, *args)
        else:
            _compiled_update(w, mantissa, buf, g, *args, smooth_bufs[i], smoothing, nesterov_smoothing)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then orthogonalise, then a step scaled by sqrt(max(1, rows/cols)), as upstream.
    Groups may set `wd_mul` (upstream: 2 on the MLP). lr is multiplied by the schedule from outside.
    bf16 parameters keep a uint16 mantissa buffer each: weight and buffer together are an fp32 master weight that
    the step updates in fp32, as upstream.

    Work and state are split across ranks as upstream's: parameters of one shape are taken in chunks of world_size,
    rank r updates the r-th of each chunk and keeps only its momentum and mantissa (1/world_size of the state), and
    the new weights reach every rank by all_gathers issued asynchronously and waited for once at the end.
    `gather_state()` hands every rank all state before a checkpoint, `drop_foreign_state()` frees it again.
    compile=True runs each shape's update as one compiled graph (upstream compiles its per-matrix update)."""

    def __init__(self, params, lr=0.025, momentum=0.95, weight_decay=0.01, coefficients=NS_COEFFICIENTS,
                 eps=1e-7, ns_dtype=torch.bfloat16, rank=0, world_size=1, compile=False, smoothing=None,
                 nesterov_smoothing=False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, wd_mul=1.0)
        if smoothing is not None:  # update smoothing on (medium records 13-16): groups carry s, the schedule moves it
            defaults["smoothing"] = smoothing
        super().__init__(params, defaults)
        self.coefficients, self.eps, self.ns_dtype = coefficients, eps, ns_dtype
        self.smoothing, self.nesterov_smoothing = smoothing is not None, nesterov_smoothing
        self.rank, self.world_size, self.compile = rank, world_size, compile

    def _chunks(self):
        """Per shape (largest first), the parameters in chunks of world_size: rank r updates the r-th of each."""
        by_shape: dict[tuple, list] = {}
        for group in self.param_groups:
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append((p, group))
        for shape, items in sorted(by_shape.items(), key=lambda kv: -torch.Size(kv[0]).numel()):
            yield shape, [items[base: base + self.world_size] for base in range(0, len(items), self.world_size)]

    def owned(self) -> list[Tensor]:
        """The parameters this rank updates."""
        return [chunk[self.rank][0] for _, chunks in self._chunks() for chunk in chunks if self.rank < len(chunk)]

    def _gather(self, chunk, tensors: list[Tensor]):
        """Start handing every rank the owner's version of tensors[j] (the j-th parameter's, or its state's);
        returns the work to wait for (None in one process)."""
        if self.world_size == 1:
            return None
        mine = tensors[self.rank] if self.rank < len(chunk) else torch.empty_like(tensors[0])
        outs = tensors + [torch.empty_like(mine) for _ in range(self.world_size - len(chunk))]
        return dist.all_gather(outs, mine.contiguous(), async_op=True)

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            if p.dtype == torch.bfloat16:
                state["mantissa"] = torch.zeros_like(p, dtype=torch.uint16)
            if self.smoothing:  # upstream's smoothing buffer is bf16 whatever the parameter (rank-split like the rest)
                state["smooth_buffer"] = torch.zeros_like(p, dtype=torch.bfloat16)
        return state

    @torch.no_grad()
    def step(self):
        update = compiled_muon_update if self.compile else muon_update
        works = []
        for shape, chunks in self._chunks():
            by_group: dict[int, list] = {}  # this rank's matrices of this shape, per group (lr, decay differ)
            for chunk in chunks:
                if self.rank < len(chunk):
                    p, group = chunk[self.rank]
                    by_group.setdefault(id(group), [group, []])[1].append(p)
            for group, ps in by_group.values():
                states = [self._state(p) for p in ps]
                rows, cols = shape[-2:]
                full = torch._as_tensor_fullprec  # 0-d float64 CPU tensors, as upstream's
                lr = full(group["lr"] * max(1, rows / cols) ** 0.5)
                decay = full(group["lr"] * group["weight_decay"] * group["wd_mul"])
                smooth = {}
                if self.smoothing:
                    smooth = dict(smooth_bufs=[st["smooth_buffer"] for st in states],
                                  smoothing=full(group["smoothing"]), nesterov_smoothing=self.nesterov_smoothing)
                update(ps, [st.get("mantissa") for st in states], [st["momentum_buffer"] for st in states],
                       [p.grad for p in ps], full(group["momentum"]), lr, decay,
                       self.coefficients, self.eps, self.ns_dtype, **smooth)
            works += [self._gather(chunk, [p for p, _ in chunk]) for chunk in chunks]
        for w in works:  # as upstream: every all_gather in flight at once, one wait at the end
            if w is not None:
                w.wait()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts all state to its parameter's dtype on load; the state of a bf16 matrix is an fp32 momentum
        # buffer and a uint16 mantissa (as upstream's), which must come back bit for bit
        saved = {i: dict(st) for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(indices, params):
            for k, v in saved.get(i, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
        self.drop_foreign_state()

    @torch.no_grad()
    def gather_state(self) -> None:
        """Hand every rank the owners' momentum and mantissa buffers, so that rank 0's state_dict is complete
        (a checkpoint). Call on every rank before saving; drop_foreign_state() after."""
        works = []
        for _, chunks in self._chunks():
            for chunk in chunks:
                states = [self._state(p) for p, _ in chunk]
                works.append(self._gather(chunk, [st["momentum_buffer"] for st in states]))
                if "mantissa" in states[0]:  # as bf16: 16-bit payloads NCCL and gloo both carry (bits copied)
                    works.append(self._gather(chunk, [st["mantissa"].view(torch.bfloat16) for st in states]))
                if "smooth_buffer" in states[0]:
                    works.append(self._gather(chunk, [st["smooth_buffer"] for st in states]))
        for w in works:
            if w is not None:
                w.wait()

    def drop_foreign_state(self) -> None:
        """Keep the state of this rank's own matrices only."""
        own = {id(p) for p in self.owned()}
        for p in [p for p in self.state if id(p) not in own]:
            del self.state[p]


class Snoo:
    """Sparse Nesterov outer optimiser (medium record 12, records/track_2_medium/2025-09-16_Snoo), over every
    parameter. Every `every` steps (its first call too), after Adam and Muon have stepped: the outer gradient is
    outer - current (in the parameter's dtype), the weights go back to the outer copy, a fused SGD-Nesterov step
    (lr, momentum, no dampening) moves them, and the outer copy becomes the result. As upstream it writes the
    parameters themselves: a bf16 matrix's Muon mantissa buffer is left as it was, so Muon's next fp32 master is
    the new bf16 value over stale low bits (upstream's quirk, kept). The state (outer copy, momentum, the call
    count) is the same on every rank; state_dict/load_state_dict carry it through checkpoints and the warmup's
    save-and-restore. It never touches .grad: the SGD step is torch's fused functional one on explicit lists."""

    def __init__(self, params, lr: float, momentum: float, every: int):
        self.params = list(params)
        self.lr, self.momentum, self.every = lr, momentum, every
        self.calls = 0
        with torch.no_grad():
            self.outer = [p.detach().clone() for p in self.params]
        self.momentum_buffers: list[Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        if self.calls % self.every == 0:
            grads = []
            for p, o in zip(self.params, self.outer):
                grads.append(o - p)
                p.copy_(o)
            bufs = list(self.momentum_buffers)  # (the functional step fills Nones on its first call)
            functional_sgd(self.params, grads, bufs, fused=True, weight_decay=0.0, momentum=self.momentum,
                                lr=self.lr, dampening=0.0, nesterov=True, maximize=False)
            self.momentum_buffers = bufs
            for p, o in zip(self.params, self.outer):
                o.copy_(p)
        self.calls += 1

    def state_dict(self) -> dict:
        return dict(calls=self.calls, outer=[o.clone() for o in self.outer],
                    momentum=[None if b is None else b.clone() for b in self.momentum_buffers])

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        for o, saved in zip(self.outer, state["outer"]):
            o.copy_(saved)
        self.momentum_buffers = [None if b is None else b.to(device=p.device, dtype=p.dtype, copy=True)
                                 for p, b in zip(self.params, state["momentum"])]
        if any(b is None for b in self.momentum_buffers):  # before the first step: all None (as fresh)
            self.momentum_buffers = [None] * len(self.params)


def build_snoo(model, cfg: Config) -> Snoo | None:
    """Snoo over all of the model's parameters (upstream: model.parameters()), or None with snoo_every 0."""
    if not cfg.snoo_every:
        return None
    return Snoo(model.parameters(), cfg.snoo_lr, cfg.snoo_momentum, cfg.snoo_every)


# --- building the optimisers --------------------------------------------------------------------

def adam_groups(model, cfg: Config) -> list[dict]:
    """Upstream's Adam groups: LM head, embeddings (input, extra, value), scalars; then the other tables' groups
    (per-token lambdas, bigram hash: streams.tables names each table's group and lr) and the value-embedding gates."""
    by_group: dict[tuple[str, str], list] = {}
    for t in spec.tables(model.cfg):
        by_group.setdefault((t.group, t.lr), []).append(model.table(t.name).weight)
    tables = [dict(params=ps, lr=getattr(cfg, lr), name=group) for (group, lr), ps in by_group.items()]
    groups = [dict(params=[model.lm_head_w], lr=cfg.head_lr, name="head"), tables[0],  # the input table's group
              dict(params=[model.scalars], lr=cfg.scalar_lr, name="scalars"), *tables[1:]]
    gates = model.ve_gates()
    if gates:  # small, replicated matrices like the scalars (upstream's later records: Adam)
        groups.append(dict(params=gates, lr=cfg.scalar_lr, name="ve_gates"))
    return groups


def muon_groups(model, cfg: Config) -> list[dict]:
    attn = [b.attn.qkvo_w for b in model.blocks if b.attn is not None]
    mlp = [w for b in model.blocks for w in (b.mlp.fc_w, b.mlp.proj_w)]
    return [dict(params=attn, name="attn"), dict(params=mlp, wd_mul=2.0, name="mlp")]


def build_optimizers(model, cfg: Config, rank: int = 0, world_size: int = 1):
    # fused: one pass per tensor instead of a dozen foreach passes; on CPU the embedding tables (tens of millions of
    # values) made the Adam step a tenth of a tiny step
    adam_kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=0.0, fused=True)
    cuda = next(model.parameters()).is_cuda
    adam = torch.optim.AdamW(adam_groups(model, cfg), **adam_kw)
    # bf16 Newton-Schulz as upstream, on GPUs and under the bf16 policy; an fp32 run on a CPU keeps it in fp32 (CPUs
    # without bf16 matrix units run bf16 ~100x slower than fp32). The update is compiled on GPUs, as upstream's (on
    # a CPU its compile would cost more than the tiny steps it speeds up).
    ns_dtype = torch.bfloat16 if cuda or cfg.precision == "bf16" else torch.float32
    smoothing = dict(smoothing=muon_smoothing(0, cfg), nesterov_smoothing=cfg.muon_smoothing_mode == "nesterov") \
        if smoothing_on(cfg) else {}
    muon = Muon(muon_groups(model, cfg), lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                weight_decay=cfg.muon_weight_decay, ns_dtype=ns_dtype,
                rank=rank, world_size=world_size, compile=cfg.compile and cuda, **smoothing)
    covered = {id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert not missing, f"parameters in no optimizer: {missing}"
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return adam, muon


# --- schedules -----------------------------------------------------------------------------------

def lr_multiplier(step: int, cfg: Config) -> float:
    """1 until the cooldown starts, then linear to 0 at num_iterations (no warm-up), as upstream."""
    x = step / cfg.num_iterations
    if cfg.cooldown_frac == 0 or x < 1 - cfg.cooldown_frac:
        return 1.0
    if cfg.final_lr_frac:  # records 13-16: upstream's floor, (1 - x) / cooldown_frac * (1 - f) + f
        return max(0.0, (1 - x) / cfg.cooldown_frac * (1 - cfg.final_lr_frac) + cfg.final_lr_frac)
    return max(0.0, (1 - x) / cfg.cooldown_frac)


def smoothing_on(cfg: Config) -> bool:
    return cfg.muon_smoothing > 0 or (cfg.muon_smoothing_steps > 0 and cfg.muon_smoothing_start > 0)


def muon_smoothing(step: int, cfg: Config) -> float:
    """Record 13: frac = min(step / 3000, 1), s = (1 - frac) 0.5 + frac 0.2; records 14-16: s fixed at 0.2."""
    if not cfg.muon_smoothing_steps:
        return cfg.muon_smoothing
    frac = min(step / cfg.muon_smoothing_steps, 1)
    return (1 - frac) * cfg.muon_smoothing_start + frac * cfg.muon_smoothing


def muon_momentum(step: int, cfg: Config) -> float:
    frac = min(step / cfg.muon_momentum_warmup_steps, 1) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def apply_schedules(step: int, cfg: Config, adam, muon) -> None:
    mult = lr_multiplier(step, cfg)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult
    for g in muon.param_groups:
        g["momentum"] = muon_momentum(step, cfg)
        if "smoothing" in g:
            g["smoothing"] = muon_smoothing(step, cfg)
