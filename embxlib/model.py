"""The GPT of the modded-nanogpt medium track (Record 8 / x01 record), with every embedding variant as a Config field.

One flat token sequence per micro-batch (B = 1), document-causal attention with upstream's block-granular sliding
window. On CUDA attention is FlexAttention with upstream's hand-built block mask; on CPU (FlexAttention has no CPU
backward) SDPA with a dense mask. Both come from one mask function that includes the block window, so every path
attends to the same keys as upstream (tests/test_masks.py). The precision policy is upstream's by default
(Config.precision): bf16 tables, block matrices and residual stream, fp32 head, scalars and logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import streams as spec
from .config import EOT_TOKEN, Config, next_multiple

try:  # FlexAttention: forward runs everywhere, backward only on CUDA
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - very old torch
    BlockMask = flex_attention = None


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Half-truncated RoPE: a quarter of the frequencies are 0, so half of each head's dims are not rotated."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freq)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, H, D)
        T = x.size(1)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1).type_as(x)


# --- attention masks --------------------------------------------------------------------------
# Upstream's sliding window is block-granular: a query in block i sees the keys of its own document in blocks
# i-W+1 .. i (block i causally), i.e. between (W-1)*B+1 and W*B keys, not the last W*B tokens. Upstream keeps the
# window only in the BlockMask's block lists; eager FlexAttention (and SDPA) apply only the mask function, so here
# the window is in the mask function too: one definition, the same keys on every path.

def window_blocks(step: int, cfg: Config) -> int:
    """The long window at `step` in attn_block_size blocks: window_max times 4x^3 - 6x^2 + 3x (x = step/N), rounded
    up to a whole block. The short window is half of it (`short_window`)."""
    x = step / cfg.num_iterations
    factor = 4 * x**3 - 6 * x**2 + 3 * x
    return next_multiple(cfg.window_max * factor, cfg.attn_block_size) // cfg.attn_block_size


def short_window(long_blocks):
    """Half the long window in blocks. Upstream's half of one block is 0 blocks, and its block lists then keep
    just the diagonal block: the same keys as a window of 1, which the mask function needs (0 would hide all)."""
    return (long_blocks // 2).clamp(min=1) if isinstance(long_blocks, Tensor) else max(1, long_blocks // 2)


def document_ids(idx: Tensor) -> Tensor:
    return (idx.reshape(-1) == EOT_TOKEN).cumsum(0)  # a document starts at its <|endoftext|>


def make_mask_mod(docs: Tensor, window: Tensor | int, block_size: int):
    """Key kv is visible to query q: causal, same document, kv's block at most window-1 blocks before q's.
    (window a tensor: a compiled FlexAttention then does not recompile as the window grows.)"""
    def mask_mod(b, h, q, kv):
        return (q >= kv) & (docs[q] == docs[kv]) & (q // block_size - kv // block_size < window)
    return mask_mod


def dense_mask(docs: Tensor, window, block_size: int) -> Tensor:
    """The (T, T) boolean mask of make_mask_mod, for SDPA."""
    pos = torch.arange(docs.numel(), device=docs.device)
    return make_mask_mod(docs, window, block_size)(None, None, pos[:, None], pos[None, :])


def _nearest_first(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Per query block: how many key blocks are set, and their indices, nearest (largest) first."""
    blk = torch.arange(dense.size(-1), device=dense.device, dtype=torch.int32)
    order = torch.where(dense, blk, -1).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return dense.sum(dim=-1, dtype=torch.int32)[None, None], order[None, None]


def flex_block_mask(docs: Tensor, window: Tensor | int, block_size: int) -> "BlockMask":
    """Upstream's BlockMask, built from block-level facts (cheap enough for every step of a 64k sequence).
    A key block is 'full' for a query block when both lie inside one document and it is strictly earlier (no
    mask needed), 'partial' when some but not all of its keys are visible (the diagonal block, a block where the
    document starts). Each query block keeps its nearest window-1 full blocks and as many of its nearest partial
    blocks as fill the window (at least one: the diagonal)."""
    n = docs.numel() // block_size
    if n * block_size != docs.numel():
        raise ValueError(f"sequence length {docs.numel()} is not a multiple of attn_block_size={block_size}")
    first, last = docs.view(n, block_size)[:, 0], docs.view(n, block_size)[:, -1]
    blk = torch.arange(n, device=docs.device)
    seen = (blk[:, None] >= blk[None, :]) & (first[:, None] <= last[None, :])  # documents overlap, causally
    full = (blk[:, None] > blk[None, :]) & (first[:, None] == last[None, :]) & (last[:, None] == first[None, :])
    p_num, p_idx = _nearest_first(seen & ~full)
    f_num, f_idx = _nearest_first(full)
    window = torch.as_tensor(window, dtype=torch.int32, device=docs.device)
    return BlockMask.from_kv_blocks(torch.minimum(p_num, (window - f_num).clamp(min=1)), p_idx,
                                    torch.minimum(f_num, window - 1), f_idx, BLOCK_SIZE=block_size,
                                    mask_mod=make_mask_mod(docs, window, block_size))


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """q, k, v: (B, T, H, D). mask: a BlockMask (FlexAttention), a (T, T) boolean tensor (SDPA), or None: causal
    only (memory.estimate's stand-in for FlexAttention)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif isinstance(mask, Tensor):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        y = _flex(q, k, v, block_mask=mask, scale=scale)
    return y.transpose(1, 2)


def flex_kernel(device: torch.device):
    """FlexAttention for tensors on `device`: on CUDA the compiled kernel (eager FlexAttention materialises the
    scores), elsewhere eager FlexAttention. Inside a compiled model dynamo inlines either."""
    return _compiled_flex if device.type == "cuda" else flex_attention


# built once at import, as upstream's module-level flex_attention: created lazily inside a compiled forward, dynamo
# guarded on the new global and retraced forward and backward once in warmup (tests/test_train.py counts graphs)
_compiled_flex = torch.compile(flex_attention, dynamic=False) if flex_attention is not None else None


def _flex(q, k, v, block_mask, scale):
    return flex_kernel(q.device)(q, k, v, block_mask=block_mask, scale=scale)


# --- blocks -------------------------------------------------------------------------------------

def init_linear(w: Tensor) -> Tensor:
    bound = 3**0.5 * 0.5 * w.size(-1) ** -0.5  # uniform with std 0.5 / sqrt(fan_in), as upstream
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class Attention(nn.Module):
    def __init__(self, cfg: Config, rotary: Rotary, gated: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, cfg.head_dim, cfg.attn_scale
        self.qkvo_w = nn.Parameter(torch.empty(4, cfg.model_dim, cfg.model_dim))  # q, k, v, out: one Muon tensor
        init_linear(self.qkvo_w[:3])
        with torch.no_grad():
            self.qkvo_w[3].zero_()
        self.rotary = rotary
        # value-embedding gate (upstream medium record 18, VeTuned): zero-init, so 2 sigmoid(0) = 1 at the start;
        # fp32 and cast to the activations' dtype, as upstream's CastedLinear
        self.gate_mode, self.gate_dim = (cfg.ve_gates, cfg.ve_gate_dim) if gated else ("off", 0)
        self.ve_gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.ve_gate_dim)) if gated else None

    def forward(self, x: Tensor, ve: Tensor | None, sa: Tensor, mask) -> Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.qkvo_w[:3].flatten(0, 1)).view(B, T, 3 * self.num_heads, self.head_dim)
        q, k, v = norm(qkv).chunk(3, dim=-2)  # QK(V) norm: the block input itself is not pre-normed
        q, k = self.rotary(q), self.rotary(k)
        if ve is None:
            v = sa[0] * v
        elif self.ve_gate_w is None:
            v = sa[0] * v + sa[1] * ve.view_as(v)
        else:  # the gate takes the place of the SA lambda sa[1], as in upstream's records
            v = sa[0] * v + self.ve_gate(x, ve) * ve.view_as(v)
        y = attend(q, k, v, mask, self.scale)
        return F.linear(y.reshape(B, T, D), self.qkvo_w[3])

    def ve_gate(self, x: Tensor, ve: Tensor) -> Tensor:
        """2 sigmoid(W g) per head, (B, T, H, 1). Upstream's attention reads norm(x) (its blocks pre-norm), so the
        gate does here too: g = norm(x)[..., :dim] ("x"), or norm(x)'s first dim/2 channels and ve's ("x_ve")."""
        xn = norm(x)
        g = xn[..., :self.gate_dim] if self.gate_mode == "x" else torch.cat(
            [xn[..., :self.gate_dim // 2], ve[..., :self.gate_dim // 2]], dim=-1)
        return 2 * torch.sigmoid(F.linear(g, self.ve_gate_w.type_as(g))).view(*x.shape[:2], self.num_heads, 1)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc_w = nn.Parameter(init_linear(torch.empty(cfg.mlp_dim, cfg.model_dim)))
        self.proj_w = nn.Parameter(torch.zeros(cfg.model_dim, cfg.mlp_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.fc_w)).square(), self.proj_w)


class Block(nn.Module):
    def __init__(self, cfg: Config, rotary: Rotary, has_attn: bool, gated: bool = False):
        super().__init__()
        self.attn = Attention(cfg, rotary, gated) if has_attn else None
        self.mlp = MLP(cfg)

    def forward(self, x, inputs, lam, ve, sa, mask, tl=None, tl_col=1):
        # x = λ_x·x + Σ_c λ_c·input_c over the input streams in column order, summed in upstream's order (in bf16
        # each product and sum rounds, as upstream); a per-token lambda tl scales the stream of column tl_col
        x = lam[0] * x
        for c, stream in enumerate(inputs, 1):
            x = x + lam[c] * stream
        if tl is not None:
            x = x + (lam[tl_col] * (tl - 1)) * inputs[tl_col - 1]
        if self.attn is not None:
            x = x + self.attn(x, ve, sa, mask)
        return x + self.mlp(norm(x))


# --- the model ----------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, D = cfg.num_layers, cfg.model_dim
        self.tables = spec.tables(cfg)  # the looked-up parameters, each an nn.Embedding named as its Table
        self.streams = spec.streams(cfg)
        self.inputs = [s for s in self.streams if s.kind == "input"]  # in lambda-column order
        self.K = 1 + cfg.extra_embeds  # x00..x0N, packed side by side in `embed`: one gather and one norm for all
        self.ve_map = cfg.ve_map()
        self.num_ve = cfg.num_ve_tables
        for t in self.tables:
            # a zero-init table is built without drawing from the RNG: adding it leaves every other parameter's
            # initialisation of a seed as it was (paired comparisons share them)
            table = nn.Embedding(t.rows, t.width, _weight=torch.zeros(t.rows, t.width)) if t.init == "zeros" \
                else nn.Embedding(t.rows, t.width)  # N(0, 1)
            if t.init == "ones":
                nn.init.ones_(table.weight)
            elif t.init.startswith("normal:") and float(t.init[7:]) != 1.0:
                nn.init.normal_(table.weight, std=float(t.init[7:]))
            setattr(self, t.name, table)
        self.tl_col = 1 + [s.name for s in self.inputs].index(cfg.token_lambdas) if cfg.token_lambdas else 1
        rotary = Rotary(cfg.head_dim, max(cfg.train_seq_len, cfg.val_seq_len))
        gated = cfg.ve_gates != "off"
        self.blocks = nn.ModuleList(Block(cfg, rotary, i not in cfg.no_attn_layers, gated and self.ve_map[i] is not None)
                                    for i in range(L))
        self.lm_head_w = nn.Parameter(torch.zeros(cfg.head_vocab, D))
        self.scalar_layout = spec.scalar_layout(cfg)
        self.scalars = nn.Parameter(torch.tensor([v for _, _, init in self.scalar_layout for v in init]))
        # the loss of a training step: HeadLoss (chunked head + cap + CE, measured to help on CPU) or the plain autograd
        # graph (what torch.compile fuses on CUDA, as upstream); None: HeadLoss on CPU, the graph on CUDA
        self.fused_loss: bool | None = {"auto": None, "on": True, "off": False}[cfg.fused_loss]
        # the tables' gradients: dense per micro-step (in the compiled graph, as upstream) or, once a table has a
        # .grad, only its rows looked up (False, True; None: the latter on CPU when training, see SparseRowsGrad)
        self.sparse_table_grads: bool | None = {"auto": None, "on": True, "off": False}[cfg.sparse_table_grads]
        self.loss_chunk = LOSS_CHUNK  # rows of logits at once wherever the loss is chunked (always in validation)
        if cfg.precision == "bf16":
            self.to_upstream_dtypes()

    def table(self, name: str) -> nn.Embedding | None:
        return getattr(self, name, None)

    def to_upstream_dtypes(self) -> None:
        """Upstream's precision policy: embedding tables and block matrices in bf16 (Muon keeps their fp32 master
        weights as a bf16 value plus a 16-bit mantissa buffer), LM head, scalars and gates in fp32, rotary tables
        in fp32. The residual stream is then bf16: fp32 0-dim lambdas times bf16 activations stay bf16."""
        for t in self.tables:
            self.table(t.name).bfloat16()
        for name, p in self.blocks.named_parameters():
            if not name.endswith("ve_gate_w"):
                p.data = p.data.bfloat16()

    # named views into the one scalar vector (upstream layout: skip weights, block lambdas, SA lambdas)
    def scalar_segment(self, name: str) -> Tensor:
        start = 0
        for seg, shape, init in self.scalar_layout:
            if seg == name:
                return self.scalars[start: start + len(init)].view(shape)
            start += len(init)
        raise KeyError(f"no scalar segment {name!r}; the layout has {[s for s, _, _ in self.scalar_layout]}")

    def skip_weights(self) -> Tensor:
        return self.scalar_segment("skip")

    def block_lambdas(self) -> Tensor:  # (L, spec.mixing_columns)
        return self.scalar_segment("lambdas")

    def sa_lambdas(self) -> Tensor:  # (L, 2): v, ve
        return self.scalar_segment("sa")

    def ve_gates(self) -> list[Tensor]:
        return [b.attn.ve_gate_w for b in self.blocks if b.attn is not None and b.attn.ve_gate_w is not None]

    def use_flex(self, device: torch.device) -> bool:
        a = self.cfg.attention
        return a == "flex" or (a == "auto" and device.type == "cuda")

    def masks(self, idx: Tensor, window=None) -> dict:
        """Masks of the long ('L') and short ('S') window layers for the flat sequence idx; window: the long window
        in blocks (an int or a 0-dim tensor), None: the final one."""
        cfg, bs = self.cfg, self.cfg.attn_block_size
        long = cfg.window_max // bs if window is None else window
        docs = document_ids(idx)
        make = flex_block_mask if self.use_flex(idx.device) else dense_mask
        return {"L": make(docs, long, bs), "S": make(docs, short_window(long), bs)}

    def forward(self, idx: Tensor, targets: Tensor | None = None, window=None, collect: dict | None = None):
        """idx, targets: (1, T). Returns the mean loss (targets given) or the soft-capped logits.
        window: the long attention window in attn_block_size blocks (None: the final one). The training loop
        passes a 0-dim tensor, so that a compiled forward does not recompile as the window grows; the masks are
        built inside, as upstream. `collect`: see trunk."""
        x = self.trunk(idx, window, collect, self.lookup(idx))  # looked up first: one graph break, before the graph
        if targets is None:
            return self.head(x)
        x, targets, c = x.flatten(0, 1), targets.flatten(), self.cfg.logit_softcap
        if not torch.is_grad_enabled():  # validation: at most loss_chunk rows of logits exist at once
            return head_loss(x, self.lm_head_w, targets, c, False, self.loss_chunk)[0]
        if self.fused_loss or (self.fused_loss is None and not x.is_cuda):
            return HeadLoss.apply(x, self.lm_head_w, targets, c, self.loss_chunk)
        return F.cross_entropy(self.head(x), targets)

    def trunk(self, idx: Tensor, window=None, collect: dict | None = None, rows: dict | None = None) -> Tensor:
        """The normed final residual (B, T, D). `collect`, if a dict, receives detached activations for analysis:
        x-i (residual entering block i), x-out (normed final residual), and each stream by name (x00.., bigram:
        as mixed in; ve0..: as added to v): what the logit lens and the norm metrics read.
        `rows`: self.lookup(idx), if already done."""
        cfg = self.cfg
        B, T = idx.shape
        masks = self.masks(idx, window)
        rows = self.lookup(idx) if rows is None else rows
        slices = {}  # table name -> (B, T, slots, D), normed where its streams are
        for s in self.streams:
            if s.table not in slices:
                r = rows[s.table].view(B, T, -1, cfg.model_dim)
                slices[s.table] = norm(r) if s.normed else r
        inputs = [slices[s.table][:, :, s.slot] for s in self.inputs]
        ves = slices.get("value_embed")
        tls = rows.get("token_lambda")  # (B, T, L)
        skip_w, lams, sas = self.skip_weights(), self.block_lambdas(), self.sa_lambdas()
        skips_into: dict[int, list[int]] = {}
        for d, s in cfg.skip_pairs:
            skips_into.setdefault(d, []).append(s)
        sources = {s for _, s in cfg.skip_pairs} | ({cfg.backout_layer} if cfg.backout_layer >= 0 else set())
        outs: dict[int, Tensor] = {}
        if collect is not None:
            collect.update({s.name: v.detach() for s, v in zip(self.inputs, inputs)})
            collect.update({s.name: ves[:, :, s.slot].detach() for s in self.streams if s.kind == "value"})
        x = inputs[0]
        for i, block in enumerate(self.blocks):
            for s in skips_into.get(i, ()):
                x = x + skip_w[s] * outs[s]
            if collect is not None:
                collect[f"x-{i}"] = x.detach()
            t = self.ve_map[i]
            x = block(x, inputs, lams[i], None if t is None else ves[:, :, t], sas[i], masks[cfg.window_pattern[i]],
                      None if tls is None else tls[..., i:i + 1], self.tl_col)
            if i in sources:
                outs[i] = x
        x = norm(x)
        if cfg.backout_layer >= 0:  # medium record 15: x = norm(x) l0 + norm(output of layer 11) l1
            lb = self.scalar_segment("backout")
            x = x * lb[0] + norm(outs[cfg.backout_layer]) * lb[1]
        if cfg.smear:  # medium record 16 (Smear-MTP): each position gets l times the one before it
            x = torch.cat([x[:, :1], x[:, 1:] + self.scalar_segment("smear")[0] * x[:, :-1]], dim=1)
        if collect is not None:
            collect["x-out"] = x.detach()
        return x

    def lookup(self, idx: Tensor) -> dict[str, Tensor]:
        """The rows of idx in each table, by table name (the bigram table at the hashed pairs of idx)."""
        weights = [self.table(t.name).weight for t in self.tables]
        indices = list(self.table_indices(idx).values())
        sparse = self.sparse_table_grads
        if sparse or (sparse is None and not idx.is_cuda and torch.is_grad_enabled()):
            rows = _sparse_grad_lookup(weights, indices)
        else:
            rows = [F.embedding(i, w) for w, i in zip(weights, indices)]
        return {t.name: r for t, r in zip(self.tables, rows)}

    def table_indices(self, idx: Tensor) -> dict[str, Tensor]:
        """The rows of each table that idx looks up, by table name."""
        hashes = dict(bigram_hash=spec.bigram_hash, position_hash=spec.position_hash)
        return {t.name: idx if t.lookup == "token" else hashes[t.lookup](idx, t.rows) for t in self.tables}

    def head(self, x: Tensor) -> Tensor:
        """LM head and ISRU soft-cap; the matmul in the activations' dtype (bf16 under upstream's policy, as its
        lm_head_w.bfloat16()), the logits in fp32."""
        return SoftCap.apply(F.linear(x, self.lm_head_w.type_as(x)).float(), self.cfg.logit_softcap)


@torch.compiler.disable  # sparse gradients cannot pass through a compiled graph; this runs eagerly before it
def _sparse_grad_lookup(weights: list[Tensor], indices: list[Tensor]) -> list[Tensor]:
    return [SparseRowsGrad.apply(w, i) for w, i in zip(weights, indices)]


class SparseRowsGrad(torch.autograd.Function):
    """F.embedding(idx, weight) whose weight gradient touches only the looked-up rows once the weight has a .grad.

    A dense embedding backward zero-fills an fp32 table, adds the rows in and rounds the whole table to bf16, then
    gradient accumulation adds that table to .grad: per micro-step three passes over every table for the 512 of
    50,257 rows a tiny CPU micro-step touches (bench: 25 ms of a 520 ms compiled step). Here the rows are summed
    per distinct token in fp32 and rounded once, as in upstream's compiled backward, and added to .grad as a sparse
    tensor: from the same incoming gradient, the .grad of that backward bit for bit (tests/test_model.py; eager
    PyTorch's CPU kernel sums otherwise). Here the lookup sits outside the compiled graph, so its incoming gradient
    is rounded to bf16 where a fused kernel may keep it in fp32: training losses agree with the in-graph backward
    to within two runs' own float noise (2e-4 over 20 steps). The first micro-step, with no .grad yet, returns the
    rows scattered into a dense table (the optimisers need a dense .grad). All shapes are static (sort, not
    unique), so fake tensors trace it (memory.estimate)."""

    @staticmethod
    def forward(ctx, weight: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.weight = weight
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        w = ctx.weight
        flat = idx.reshape(-1).long()
        rows, order = flat.sort(stable=True)
        new = torch.ones_like(rows, dtype=torch.bool)
        new[1:] = rows[1:] != rows[:-1]
        run = new.cumsum(0) - 1  # slot of each sorted entry: its distinct row; slots past the last row stay 0
        g = grad.reshape(-1, w.size(1))[order].float()
        sums = torch.zeros_like(g).index_add_(0, run, g).to(w.dtype)
        slots = torch.zeros_like(rows).scatter_(0, run, rows)  # the row of each slot (unused slots: row 0, sum 0)
        if w.grad is None:  # AccumulateGrad keeps this as .grad; adding zero sums to row 0 changes nothing
            return torch.zeros_like(w).index_put_((slots,), sums, accumulate=True), None
        return torch.sparse_coo_tensor(slots[None], sums, w.shape, check_invariants=False), None  # valid: built so


class SoftCap(torch.autograd.Function):
    """c z / sqrt(z^2 + c^2) with a hand-written backward, d/dz = (c r)^3 with r = rsqrt(z^2 + c^2). The logits
    are the largest tensor of a small model's step; autograd through five elementwise ops made about a dozen
    passes over them (bench: most of a tiny CPU step), this makes five."""

    @staticmethod
    def forward(ctx, z: Tensor, c: float) -> Tensor:
        r = torch.rsqrt(torch.addcmul(torch.full_like(z, c * c), z, z))
        ctx.save_for_backward(r)
        ctx.c = c
        return z.mul(r).mul_(c)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (r,) = ctx.saved_tensors
        return grad * r.mul(ctx.c).pow_(3), None


LOSS_CHUNK = 8192  # rows of logits at once in the chunked head + loss (a medium validation batch has 262,144 rows)


def head_loss(x: Tensor, w: Tensor, targets: Tensor, c: float, grads: bool, chunk: int = LOSS_CHUNK):
    """Mean cross-entropy of the soft-capped LM head c z / sqrt(z^2 + c^2), z = x W^T, over the rows of x, computed
    `chunk` rows at a time; with `grads` also its gradients d/dx and d/dW (fp32), in the same pass.
    Returns (loss, dx, dw) (dx, dw None without grads). The matmuls run in x's dtype, as F.linear would.
    The capped logits lie in [-c, c], so their exponentials need no max subtracted: one exp per logit gives both
    the log-sum-exp and the softmax of the gradient (and torch.compile fuses a chunk into two passes)."""
    n = x.size(0)
    wm = w.to(x.dtype)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if grads else None
    dw = torch.zeros_like(w, dtype=torch.float32) if grads else None
    cc = torch.tensor(c * c, dtype=torch.float32, device=x.device)
    for i in range(0, n, chunk):
        xs, ys = x[i:i + chunk], targets[i:i + chunk, None]
        z = (xs @ wm.mT).float()
        cr = torch.addcmul(cc, z, z).rsqrt_().mul_(c)  # c / sqrt(z^2 + c^2)
        z.mul_(cr)  # the capped logits
        target_logit = z.gather(1, ys)
        e = z.exp_()  # (in place: eager PyTorch makes one pass per op and tensor, so fewer is faster there)
        s = e.sum(dim=1, keepdim=True)
        loss += (torch.log(s) - target_logit).sum()
        if not grads:
            continue
        # d loss / d z_capped = softmax - onehot; times d cap / d z = (c r)^3; the mean's 1/n is applied to the
        # small matmul outputs below, not to this big tensor
        p = e.div_(s).scatter_add_(1, ys, torch.full_like(ys, -1, dtype=e.dtype)).mul_(cr.pow_(3)).to(x.dtype)
        dx[i:i + chunk] = (p @ wm).div_(n)
        if p.dtype == dw.dtype:
            dw.addmm_(p.mT, xs, alpha=1 / n)
        else:
            dw.add_(p.mT @ xs, alpha=1 / n)
    return loss / n, dx, dw


class HeadLoss(torch.autograd.Function):
    """head_loss as an autograd function: the same value as F.cross_entropy(head(x), targets).

    Autograd through matmul, cap and cross-entropy keeps the logits, the cap's rsqrt and the log-softmax, and walks
    over each several times more in backward; here each chunk of rows is multiplied, capped, soft-maxed and
    multiplied back in place, and only the gradients of x and W are kept (the loss ends the graph, so backward just
    scales them). At most `chunk` rows of logits exist at once (a medium micro-batch of 65,536 tokens would
    otherwise hold 13 GB of fp32 logits). On a tiny CPU step it is a few percent faster than the autograd graph
    once freed memory stays in the process (train.keep_freed_memory); without that it was about 1.3x."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, targets: Tensor, c: float, chunk: int = LOSS_CHUNK) -> Tensor:
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, dx, dw = head_loss(x, w, targets, c, grads, chunk)
        if grads:
            ctx.save_for_backward(dx, dw.to(w.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):  # (in place: the saved gradients serve this backward only)
        dx, dw = ctx.saved_tensors
        return dx.mul_(grad.to(dx.dtype)), dw.mul_(grad.to(dw.dtype)), None, None, None


def count_params(cfg: Config) -> int:
    """Parameter count without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())
