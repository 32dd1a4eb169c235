"""The GPT of the modded-nanogpt medium track (Record 8 / x01 record), with every embedding variant as a Config field.

One flat token sequence per micro-batch (B = 1), document-causal sliding-window attention. On CUDA attention is
FlexAttention with a block mask; on CPU (FlexAttention has no CPU backward) it is SDPA with the same mask as a
dense boolean matrix. Both are built from one `mask_mod`, so the two paths attend to exactly the same keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EOT_TOKEN, Config, next_multiple

try:  # FlexAttention: forward runs everywhere, backward only on CUDA
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - very old torch
    BlockMask = create_block_mask = flex_attention = None


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

def window_schedule(step: int, cfg: Config) -> tuple[int, int]:
    """(long, short) window in tokens at `step`: grows as 4x^3 - 6x^2 + 3x of window_max, in attn_block_size units.
    Short is half the long window in blocks, at least one block (a zero window would attend to nothing)."""
    x = step / cfg.num_iterations
    factor = 4 * x**3 - 6 * x**2 + 3 * x
    long_blocks = next_multiple(cfg.window_max * factor, cfg.attn_block_size) // cfg.attn_block_size
    return long_blocks * cfg.attn_block_size, max(1, long_blocks // 2) * cfg.attn_block_size


def make_mask_mod(docs: Tensor, window: Tensor):
    # window is a tensor, not an int: a compiled FlexAttention then does not recompile as the window grows
    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv < window) & (docs[q] == docs[kv])
    return mask_mod


def build_masks(idx: Tensor, windows: tuple[int, int], use_flex: bool) -> dict[str, object]:
    """Masks for the long ('L') and short ('S') window layers of one flat sequence idx (1, T)."""
    docs = (idx[0] == EOT_TOKEN).cumsum(0)  # a document starts at its <|endoftext|>
    T = idx.size(1)
    out = {}
    for key, w in zip("LS", windows):
        mod = make_mask_mod(docs, torch.tensor(w, device=idx.device))
        if use_flex:
            out[key] = create_block_mask(mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=idx.device,
                                         _compile=idx.is_cuda)
        else:
            pos = torch.arange(T, device=idx.device)
            out[key] = mod(None, None, pos[:, None], pos[None, :])
    return out


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """q, k, v: (B, T, H, D). mask: a BlockMask (FlexAttention) or a (T, T) boolean tensor (SDPA)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, Tensor):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        y = _flex(q, k, v, block_mask=mask, scale=scale)
    return y.transpose(1, 2)


_compiled_flex = None


def _flex(q, k, v, block_mask, scale):
    global _compiled_flex
    if q.is_cuda:  # eager FlexAttention materialises the scores; compiled it is a fused kernel
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


# --- blocks -------------------------------------------------------------------------------------

def init_linear(w: Tensor) -> Tensor:
    bound = 3**0.5 * 0.5 * w.size(-1) ** -0.5  # uniform with std 0.5 / sqrt(fan_in), as upstream
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class Attention(nn.Module):
    def __init__(self, cfg: Config, rotary: Rotary):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, cfg.head_dim, cfg.attn_scale
        self.qkvo_w = nn.Parameter(torch.empty(4, cfg.model_dim, cfg.model_dim))  # q, k, v, out: one Muon tensor
        init_linear(self.qkvo_w[:3])
        with torch.no_grad():
            self.qkvo_w[3].zero_()
        self.rotary = rotary

    def forward(self, x: Tensor, ve: Tensor | None, sa: Tensor, mask) -> Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.qkvo_w[:3].flatten(0, 1)).view(B, T, 3 * self.num_heads, self.head_dim)
        q, k, v = norm(qkv).chunk(3, dim=-2)  # QK(V) norm: the block input itself is not pre-normed
        q, k = self.rotary(q), self.rotary(k)
        v = sa[0] * v + sa[1] * ve.view_as(v) if ve is not None else sa[0] * v
        y = attend(q, k, v, mask, self.scale)
        return F.linear(y.reshape(B, T, D), self.qkvo_w[3])


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc_w = nn.Parameter(init_linear(torch.empty(cfg.mlp_dim, cfg.model_dim)))
        self.proj_w = nn.Parameter(torch.zeros(cfg.model_dim, cfg.mlp_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.fc_w)).square(), self.proj_w)


class Block(nn.Module):
    def __init__(self, cfg: Config, rotary: Rotary, has_attn: bool):
        super().__init__()
        self.attn = Attention(cfg, rotary) if has_attn else None
        self.mlp = MLP(cfg)

    def forward(self, x, x0s, lam, ve, sa, mask, tl=None, tl_stream=0):
        # x = λ_x·x + Σ_k λ_k·x0k ; a per-token lambda tl scales stream tl_stream before its λ
        mix = torch.tensordot(lam[1:].type_as(x0s), x0s, dims=1)
        if tl is not None:
            mix = mix + (lam[1 + tl_stream] * (tl - 1)).type_as(x0s) * x0s[tl_stream]
        x = lam[0] * x + mix
        if self.attn is not None:
            x = x + self.attn(x, ve, sa, mask)
        return x + self.mlp(norm(x))


# --- the model ----------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, D, V = cfg.num_layers, cfg.model_dim, cfg.vocab_size
        self.K = 1 + cfg.extra_embeds  # input embedding streams x00..x0N
        self.ve_map = cfg.ve_map()
        self.num_ve = cfg.num_ve_tables
        # x00..x0N live side by side in one table: one gather and one norm per step instead of N+1
        self.embed = nn.Embedding(V, self.K * D)
        self.value_embed = nn.Embedding(V, self.num_ve * D) if self.num_ve else None
        self.token_lambda = None
        self.tl_stream = int(cfg.token_lambdas[2:]) if cfg.token_lambdas else 0
        if cfg.token_lambdas:  # one (vocab, 1) embedding per layer, stored as one (vocab, L) table; init 1
            self.token_lambda = nn.Embedding(V, L)
            nn.init.ones_(self.token_lambda.weight)
        rotary = Rotary(cfg.head_dim, max(cfg.train_seq_len, cfg.val_seq_len))
        self.blocks = nn.ModuleList(Block(cfg, rotary, i not in cfg.no_attn_layers) for i in range(L))
        self.lm_head_w = nn.Parameter(torch.zeros(cfg.head_vocab, D))
        lam = torch.zeros(L, cfg.num_lambdas)
        lam[:, 0] = 1.0  # x passes through; x00..x0N start at 0 (1 would let the model route around the blocks)
        self.scalars = nn.Parameter(torch.cat([torch.ones(L), lam.flatten(), torch.full((2 * L,), 0.5)]))
        # HeadLoss (chunked head + cap + CE) or the plain autograd graph; None: HeadLoss on CPU, where it is measured
        # to help; on CUDA the graph that torch.compile fuses, as upstream
        self.fused_loss: bool | None = None

    # views into the one scalar vector (upstream layout: skip weights, block lambdas, SA lambdas)
    def skip_weights(self) -> Tensor:
        return self.scalars[: self.cfg.num_layers]

    def block_lambdas(self) -> Tensor:
        L = self.cfg.num_layers
        return self.scalars[L: L + L * self.cfg.num_lambdas].view(L, self.cfg.num_lambdas)

    def sa_lambdas(self) -> Tensor:
        return self.scalars[-2 * self.cfg.num_layers:].view(self.cfg.num_layers, 2)

    def use_flex(self, device: torch.device) -> bool:
        a = self.cfg.attention
        return a == "flex" or (a == "auto" and device.type == "cuda")

    def masks(self, idx: Tensor, windows: tuple[int, int] | None = None) -> dict:
        cfg = self.cfg
        return build_masks(idx, windows or (cfg.window_max, cfg.window_max // 2), self.use_flex(idx.device))

    def forward(self, idx: Tensor, targets: Tensor | None = None, windows: tuple[int, int] | None = None,
                collect: dict | None = None, masks: dict | None = None):
        """idx, targets: (1, T). Returns the mean loss (targets given) or the soft-capped logits.
        Attention masks come from `windows` (long, short) in tokens, or ready-made in `masks` (what the training
        loop passes, so that a compiled forward sees tensors rather than window sizes).
        `collect`, if a dict, receives detached activations for analysis: x-i (residual entering block i),
        x-out (normed final residual), x00..x0N and ve0..: what the logit lens and the norm metrics read."""
        cfg = self.cfg
        B, T = idx.shape
        masks = masks if masks is not None else self.masks(idx, windows)
        x0s = norm(self.embed(idx).view(B, T, self.K, cfg.model_dim)).permute(2, 0, 1, 3)  # (K, B, T, D)
        ves = self.value_embed(idx).view(B, T, self.num_ve, cfg.model_dim) if self.value_embed is not None else None
        tls = self.token_lambda(idx) if self.token_lambda is not None else None  # (B, T, L)
        skip_w, lams, sas = self.skip_weights(), self.block_lambdas(), self.sa_lambdas()
        skips_into: dict[int, list[int]] = {}
        for d, s in cfg.skip_pairs:
            skips_into.setdefault(d, []).append(s)
        sources = {s for _, s in cfg.skip_pairs}
        outs: dict[int, Tensor] = {}
        if collect is not None:
            collect.update({f"x0{k}": x0s[k].detach() for k in range(self.K)})
            collect.update({f"ve{t}": ves[:, :, t].detach() for t in range(self.num_ve)} if ves is not None else {})
        x = x0s[0]
        for i, block in enumerate(self.blocks):
            for s in skips_into.get(i, ()):
                x = x + skip_w[s] * outs[s]
            if collect is not None:
                collect[f"x-{i}"] = x.detach()
            t = self.ve_map[i]
            x = block(x, x0s, lams[i], None if t is None else ves[:, :, t], sas[i], masks[cfg.window_pattern[i]],
                      None if tls is None else tls[..., i:i + 1], self.tl_stream)
            if i in sources:
                outs[i] = x
        x = norm(x)
        if collect is not None:
            collect["x-out"] = x.detach()
        if targets is None:
            return self.head(x)
        if self.fused_loss or (self.fused_loss is None and not x.is_cuda):
            return HeadLoss.apply(x.flatten(0, 1), self.lm_head_w, targets.flatten(), self.cfg.logit_softcap,
                                  torch.is_grad_enabled())
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def head(self, x: Tensor) -> Tensor:
        """LM head and ISRU soft-cap, in fp32 (under autocast the matmul itself runs in bf16)."""
        return SoftCap.apply(F.linear(x, self.lm_head_w).float(), self.cfg.logit_softcap)


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


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the soft-capped LM head, computed in row chunks with its gradient in the same pass.

    The same function as F.cross_entropy(head(x), targets). Autograd through matmul, cap and cross-entropy keeps
    the logits, the cap's rsqrt and the log-softmax, and walks over each several times more in backward; here each
    chunk of rows is multiplied, capped, soft-maxed and multiplied back in place, and only the gradients of x and W
    are kept (the loss ends the graph, so backward just scales them). At most `chunk` rows of logits exist at once
    (a medium micro-batch of 65,536 tokens would otherwise hold 13 GB of fp32 logits). On a tiny CPU step it is a
    few percent faster than the autograd graph once freed memory stays in the process (train.keep_freed_memory);
    without that it was about 1.3x, most of it fewer fresh allocations."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, targets: Tensor, c: float, grad_enabled: bool = True,
                chunk: int = 8192) -> Tensor:
        n = x.size(0)
        # (grad mode is off inside forward and needs_input_grad ignores it: the caller says whether it is on)
        grads = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        wm, xm = w.to(dtype), x.to(dtype)  # the matmuls in the autocast dtype, as F.linear would run them
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if grads else None
        dw = torch.zeros_like(w, dtype=torch.float32) if grads else None
        cc = torch.tensor(c * c, dtype=torch.float32, device=x.device)
        for i in range(0, n, chunk):
            xs, ys = xm[i:i + chunk], targets[i:i + chunk, None]
            z = (xs @ wm.mT).float()
            cr = torch.addcmul(cc, z, z).rsqrt_().mul_(c)  # c / sqrt(z^2 + c^2)
            z.mul_(cr)  # z is now the capped logits
            logp = torch.log_softmax(z, dim=1)
            loss -= logp.gather(1, ys).sum()
            if grads:  # d loss / d z_capped = softmax - onehot; times d cap / d z = (c r)^3; the mean's 1/n
                p = logp.exp_()  # is applied to the small matmul outputs below, not to this big tensor
                p.scatter_add_(1, ys, torch.full_like(ys, -1, dtype=p.dtype))
                p = p.mul_(cr.pow_(3)).to(dtype)
                dx[i:i + chunk] = (p @ wm).div_(n)
                if p.dtype == dw.dtype:
                    dw.addmm_(p.mT, xs, alpha=1 / n)
                else:
                    dw.add_(p.mT @ xs, alpha=1 / n)
        if grads:
            ctx.save_for_backward(dx, dw.to(w.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad: Tensor):
        dx, dw = ctx.saved_tensors
        return dx * grad.to(dx.dtype), dw * grad.to(dw.dtype), None, None, None, None


def count_params(cfg: Config) -> int:
    """Parameter count without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())
