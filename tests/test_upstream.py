"""embxlib's medium_x01 model against an independent transcription of the upstream x01 record's forward pass.

`X01Reference` is written from the description of modded-nanogpt 34f5696a in the project's reference notes
(section 1a): separate embed1/embed2 and five value-embedding tables, the 0..4 / 11..15 value-embedding layout,
no attention in block 7, skips 9<-6, 10<-4, 11<-2, three lambdas per block, q/k/v norm, half-truncated rotary,
scale 0.12, ReLU^2 MLP, the ISRU soft-cap at 15, the 4-chunk validation loss, and upstream's dtypes (bf16 tables
and block matrices, the LM head cast to bf16 for its matmul). Attention uses the key sets of test_masks'
`upstream_keys`. The widths are cut (one head of 128, model_dim 128) so it runs on a CPU; everything else is the
preset's. Same weights and tokens: the residual stream must agree bit for bit in bf16, the loss and every
gradient to float rounding.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embxlib.config import EOT_TOKEN, medium_x01
from embxlib.model import GPT
from test_masks import upstream_keys

torch.set_num_threads(2)
T, W = 512, 3  # four blocks of 128 tokens; a 3-block long window (short: 1)
D, H, MLP = 128, 1, 512  # one head of 128, model_dim 128: small enough for a CPU test


def rms(x):
    return F.rms_norm(x, (x.size(-1),))


class X01Reference(nn.Module):
    VOCAB = 50257  # (tests/test_upstream_records.py's optimiser test narrows it)

    def __init__(self, bf16=True):
        V, hd, L, mlp = self.VOCAB, 128, 16, MLP
        super().__init__()
        dt = torch.bfloat16 if bf16 else torch.float32
        self.H, self.hd, self.bf16 = H, hd, bf16
        self.embed1, self.embed2 = nn.Embedding(V, D, dtype=dt), nn.Embedding(V, D, dtype=dt)
        self.value_embeds = nn.ModuleList(nn.Embedding(V, D, dtype=dt) for _ in range(5))
        self.qkvo_w = nn.ParameterList(nn.Parameter(torch.zeros(4, H * hd, D, dtype=dt)) for i in range(L) if i != 7)
        self.fc_w = nn.ParameterList(nn.Parameter(torch.zeros(mlp, D, dtype=dt)) for _ in range(L))
        self.proj_w = nn.ParameterList(nn.Parameter(torch.zeros(D, mlp, dtype=dt)) for _ in range(L))
        self.lm_head_w = nn.Parameter(torch.zeros(-(-V // 128) * 128, D))  # 50,304 rows at the full vocabulary
        self.scalars = nn.Parameter(torch.zeros(6 * L))
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=hd // 4)
        theta = torch.outer(torch.arange(T, dtype=torch.float32), torch.cat([freq, torch.zeros(hd // 4)]))
        self.cos, self.sin = theta.cos(), theta.sin()

    def rotary(self, x):  # (1, T, H, hd), in fp32, cast back
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = self.cos[None, :, None, :], self.sin[None, :, None, :]
        return torch.cat((x1 * c + x2 * s, x1 * (-s) + x2 * c), dim=3).type_as(x)

    def trunk(self, tokens, masks):
        ve = [t(tokens) for t in self.value_embeds]
        ve = ve + [None] * 6 + ve
        layout = "LSSSLSSSSSSLSSSL"
        x = x00 = rms(self.embed1(tokens)[None])
        x01 = rms(self.embed2(tokens)[None])
        skip_w, lam, sa = self.scalars[:16], self.scalars[16:64].view(16, 3), self.scalars[64:96].view(16, 2)
        outs, attn = [], iter(self.qkvo_w)
        for i in range(16):
            if i in (9, 10, 11):
                j = {9: 6, 10: 4, 11: 2}[i]
                x = x + skip_w[j] * outs[j]
            x = self.mix(i, lam[i][0] * x + lam[i][1] * x00 + lam[i][2] * x01, tokens)
            if i != 7:
                w = next(attn)
                q, k, v = F.linear(x, w[:3].flatten(end_dim=1)).view(1, T, 3 * self.H, self.hd).chunk(3, dim=-2)
                q, k = self.rotary(rms(q)), self.rotary(rms(k))
                v = self.value(i, x, rms(v), sa[i], ve[i])
                y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=masks[layout[i]], scale=0.12).transpose(1, 2)
                x = x + F.linear(y.reshape(1, T, self.H * self.hd), w[3])
            h = F.relu(F.linear(rms(x), self.fc_w[i])).square()
            x = x + F.linear(h, self.proj_w[i])
            outs.append(x)
        return self.final(x, outs)

    def final(self, x, outs):  # the residual into the head (tests/test_upstream_records.py adds backout and smear)
        return rms(x)

    def mix(self, i, x, tokens):  # the mixed block input (tests/test_upstream_streams.py adds streams here)
        return x

    def value(self, i, x, v, sa, ve):  # the attention values (tests/test_upstream_streams.py gates ve here)
        return sa[0] * v + sa[1] * ve.view_as(v) if ve is not None else sa[0] * v

    def loss(self, x, targets, chunks=1):  # training: one chunk; validation: the mean of 4 chunk means
        w = self.lm_head_w.bfloat16() if self.bf16 else self.lm_head_w
        total = 0
        for xs, ys in zip(x.flatten(end_dim=1).chunk(chunks), targets.chunk(chunks)):
            z = F.linear(xs, w).float()
            total = total + F.cross_entropy(15 * z * torch.rsqrt(z.square() + 225), ys) / chunks
        return total


def models(bf16: bool, ref_class=None, **cfg_kw):
    """Our medium_x01 (narrowed) with every weight given a value that matters, and the reference (X01Reference, or
    ref_class(bf16)) holding the same weights."""
    cfg = medium_x01(model_dim=D, num_heads=H, mlp_dim=MLP, train_seq_len=T, val_seq_len=T,
                     precision="bf16" if bf16 else "fp32", device="cpu", **cfg_kw)
    torch.manual_seed(0)
    ours = GPT(cfg)
    with torch.no_grad():  # give the zero-initialised projections, the head and the lambdas values that matter
        for p in ours.parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.02)
        ours.scalars.copy_(ours.scalars + 0.3 * torch.randn_like(ours.scalars))
    ref = (ref_class or X01Reference)(bf16=bf16)
    lam = ours.block_lambdas()
    with torch.no_grad():
        ref.embed1.weight.copy_(ours.embed.weight[:, :D])
        ref.embed2.weight.copy_(ours.embed.weight[:, D:])
        for t in range(5):
            ref.value_embeds[t].weight.copy_(ours.value_embed.weight[:, t * D:(t + 1) * D])
        for w, b in zip(ref.qkvo_w, [b for b in ours.blocks if b.attn is not None]):
            w.copy_(b.attn.qkvo_w)
        for i, b in enumerate(ours.blocks):
            ref.fc_w[i].copy_(b.mlp.fc_w)
            ref.proj_w[i].copy_(b.mlp.proj_w)
        ref.lm_head_w.copy_(ours.lm_head_w)  # upstream's scalars: skip weights, x/x00/x01 lambdas, SA lambdas
        ref.scalars[:96].copy_(torch.cat([ours.skip_weights(), lam[:, :3].flatten(), ours.sa_lambdas().flatten()]))
    return ours, ref


def data():
    g = np.random.default_rng(0)
    tokens = g.integers(0, 50000, T + 1)
    tokens[[0, 70, 130, 300]] = EOT_TOKEN  # documents across block edges
    masks = {"L": torch.from_numpy(upstream_keys(tokens[:-1], W, 128)),
             "S": torch.from_numpy(upstream_keys(tokens[:-1], W // 2, 128))}  # upstream: window // 2
    t = torch.from_numpy(tokens)
    return t[:-1], t[1:], masks


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_medium_x01_equals_the_upstream_forward_and_gradients(bf16):
    ours, ref = models(bf16)
    x, y, masks = data()
    h_ours = ours.trunk(x[None].int(), window=W)
    h_ref = ref.trunk(x, masks)
    if bf16:
        assert h_ours.dtype == torch.bfloat16 and torch.equal(h_ours, h_ref)  # the residual stream, bit for bit
    else:
        torch.testing.assert_close(h_ours, h_ref, atol=1e-5, rtol=1e-5)
    l_ours = ours(x[None].int(), y[None], window=W)  # the training loss (the chunked head on CPU)
    l_ref = ref.loss(ref.trunk(x, masks), y)
    torch.testing.assert_close(l_ours, l_ref, atol=2e-5, rtol=2e-5)
    l_ours.backward()
    l_ref.backward()
    pairs = [(ours.embed.weight.grad[:, :D], ref.embed1.weight.grad), (ours.embed.weight.grad[:, D:],
             ref.embed2.weight.grad), (ours.lm_head_w.grad, ref.lm_head_w.grad), (ours.scalars.grad, ref.scalars.grad)]
    pairs += [(ours.value_embed.weight.grad[:, t * D:(t + 1) * D], ref.value_embeds[t].weight.grad) for t in range(5)]
    pairs += [(b.mlp.fc_w.grad, ref.fc_w[i].grad) for i, b in enumerate(ours.blocks)]
    pairs += [(a.attn.qkvo_w.grad, w.grad) for a, w in zip([b for b in ours.blocks if b.attn], ref.qkvo_w)]
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    for i, (a, b) in enumerate(pairs):  # bf16 gradients differ by a rounding step where the head differs by one
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=f"gradient pair {i}")
    with torch.no_grad():  # validation: upstream's 4-chunk mean, ours in loss_chunk rows
        ours.eval()
        ours.loss_chunk = 100  # not a divisor of T: the mean is over rows, whatever the chunks
        torch.testing.assert_close(ours(x[None].int(), y[None], window=W), ref.loss(ref.trunk(x, masks), y, 4),
                                   atol=2e-5, rtol=2e-5)
