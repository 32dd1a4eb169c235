"""The newer embedding streams against transcriptions of the upstream records that introduced them.

- bigram hash embedding: records/track_1_short/2026-01-19_BigramHashEmbedding (get_bigram_hash, the zero-init
  `bigram_embed`, `x = resid_lambdas[i] * x + x0_lambdas[i] * x0 + bigram_lambdas[i] * x0_bigram`, lambdas from 0.1);
- value-embedding gates: records/track_2_medium/2025-12-31_BulkSmallTrackTransfer (medium record 18:
  `ve_gate_out = 2 * sigmoid(value_embed_gate(x[..., :16]))`, `v = v + ve_gate_out * ve.view_as(v)`, the gate a
  zero-init CastedLinear(16, num_heads)) and records/track_1_short/2026-02-03_VeTuned (the gate reads
  `cat([x[..., :6], ve[..., :6]])`; tables N(0, 0.01); the layout `.01...234`).
The references are X01Reference (tests/test_upstream.py, the x01 record) with these lines written into its
trunk. In those records the attention's input is norm(x) (their blocks pre-norm); in the x01 architecture it is x,
so the gates read rms(x), as upstream's gate reads its attention input.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embxlib.config import tiny
from embxlib.model import GPT
from embxlib.streams import bigram_rows
from test_upstream import X01Reference, D, H, W, data, rms
from test_upstream import models as x01_models

torch.set_num_threads(2)


def get_bigram_hash(x, bigram_vocab_size):  # upstream's, for one sequence (args.bigram_vocab_size passed in)
    rand_int_1 = 36313
    rand_int_2 = 27191
    mod = bigram_vocab_size - 1
    x = x.to(torch.int32).clone()
    x[0] = mod
    x[1:] = torch.bitwise_xor(rand_int_1 * x[1:], rand_int_2 * x[:-1]) % mod
    return x


class StreamsReference(X01Reference):
    def __init__(self, bf16, bigram, gates):
        super().__init__(bf16)
        dt = torch.bfloat16 if bf16 else torch.float32
        self.bigram_vocab_size, self.gates = 50304 * 5, gates
        self.bigram_embed = nn.Embedding(self.bigram_vocab_size, D, dtype=dt) if bigram else None
        self.bigram_lambdas = nn.Parameter(0.1 * torch.ones(16)) if bigram else None
        width = {"x": 16, "x_ve": 12}.get(gates)
        self.ve_gates = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(H, width)) for i in (0, 1, 2, 3, 4, 11, 12,
                                          13, 14, 15)}) if gates else None

    def mix(self, i, x, tokens):  # record 2026-01-19: x = resid * x + x0_lambdas * x0 + bigram_lambdas * x0_bigram
        if self.bigram_embed is None:
            return x
        x0_bigram = self.bigram_embed(get_bigram_hash(tokens, self.bigram_vocab_size))[None]
        return x + self.bigram_lambdas[i] * x0_bigram

    def value(self, i, x, v, sa, ve):
        if ve is None or not self.gates:
            return super().value(i, x, v, sa, ve)
        g = self.ve_gates[str(i)].type_as(x)  # CastedLinear: the weight in the input's dtype
        B, T, H = 1, x.size(1), self.H
        if self.gates == "x":  # medium record 18 (its attention input is norm(x))
            ve_gate_out = 2 * torch.sigmoid(F.linear(rms(x)[..., :16], g)).view(B, T, H, 1)
        else:  # VeTuned
            ve_gate_out = 2 * torch.sigmoid(F.linear(torch.cat([rms(x)[..., :6], ve[None, ..., :6]], dim=-1),
                                                     g)).view(B, T, H, 1)
        v = sa[0] * v  # (upstream folds sa_lambdas[0] into the qkv weights)
        return v + ve_gate_out * ve.view_as(v)


def models(bf16, bigram, gates):
    ours, ref = x01_models(bf16, lambda bf16: StreamsReference(bf16, bigram, gates), bigram_embeds=int(bigram),
                           ve_gates=gates or "off", ve_gate_dim=12 if gates == "x_ve" else 16)
    with torch.no_grad():  # the new parameters' values (the zero-init ones were given values by x01_models)
        if bigram:
            ref.bigram_embed.weight.copy_(ours.bigram_embed.weight)
            ref.bigram_lambdas.copy_(ours.block_lambdas()[:, 3])
        for i, b in enumerate(ours.blocks):
            if gates and b.attn is not None and b.attn.ve_gate_w is not None:
                ref.ve_gates[str(i)].copy_(b.attn.ve_gate_w)
    assert ours.scalars.numel() == 16 * (1 + ours.block_lambdas().size(1) + 2)
    return ours, ref


CASES = [(True, None), (False, "x"), (False, "x_ve"), (True, "x")]


@pytest.mark.parametrize("bigram,gates", CASES, ids=["bigram", "gates-x", "gates-x_ve", "bigram+gates-x"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_streams_equal_the_upstream_records(bf16, bigram, gates):
    ours, ref = models(bf16, bigram, gates)
    x, y, masks = data()
    h_ours, h_ref = ours.trunk(x[None].int(), window=W), ref.trunk(x, masks)
    if bf16:
        assert torch.equal(h_ours, h_ref)  # the residual stream, bit for bit
    else:
        torch.testing.assert_close(h_ours, h_ref, atol=1e-5, rtol=1e-5)
    l_ours = ours(x[None].int(), y[None], window=W)
    l_ref = ref.loss(ref.trunk(x, masks), y)
    torch.testing.assert_close(l_ours, l_ref, atol=2e-5, rtol=2e-5)
    l_ours.backward()
    l_ref.backward()
    C = ours.block_lambdas().size(1)
    lam_grad = ours.scalars.grad[16:16 + 16 * C].view(16, C)
    pairs = {"embed": (ours.embed.weight.grad[:, :D], ref.embed1.weight.grad),
             "x01 lambdas": (lam_grad[:, 2], ref.scalars.grad[16:64].view(16, 3)[:, 2]),
             "sa lambdas": (ours.scalars.grad[-32:], ref.scalars.grad[64:])}
    if bigram:
        pairs["bigram table"] = (ours.bigram_embed.weight.grad, ref.bigram_embed.weight.grad)
        pairs["bigram lambdas"] = (lam_grad[:, 3], ref.bigram_lambdas.grad)
    if gates:
        pairs.update({f"gate {i}": (b.attn.ve_gate_w.grad, ref.ve_gates[str(i)].grad) for i, b in
                      enumerate(ours.blocks) if b.attn is not None and b.attn.ve_gate_w is not None})
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    for name, (a, b) in pairs.items():
        assert a is not None and b is not None, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


def test_bigram_hash_equals_upstreams():
    from embxlib.streams import bigram_hash
    g = np.random.default_rng(1)
    rows = bigram_rows(tiny())
    assert rows == 50304 * 5  # upstream's bigram_vocab_size
    for seq in (g.integers(0, 50257, 4096), np.array([50256, 50256, 0, 1, 50255]), np.array([7])):
        t = torch.from_numpy(seq)
        ours = bigram_hash(t[None], rows)[0]
        assert ours.dtype == torch.int32 and torch.equal(ours, get_bigram_hash(t, rows))
        assert int(ours.min()) >= 0 and int(ours.max()) < rows


def test_new_tables_start_as_upstreams_and_leave_the_other_initialisation_alone():
    torch.manual_seed(3)
    base = GPT(tiny(precision="fp32"))
    torch.manual_seed(3)
    m = GPT(tiny(precision="fp32", bigram_embeds=1, ve_gates="x"))
    assert not m.bigram_embed.weight.any() and all(not g.any() for g in m.ve_gates())  # zero-init: gates give 1
    assert m.bigram_embed.weight.shape == (50304 * 5, 128)
    assert torch.equal(m.block_lambdas()[:, -1], torch.full((6,), 0.1))  # bigram lambdas from 0.1
    shared = dict(base.named_parameters())
    for name, p in m.named_parameters():  # the zero tables draw nothing: a seed's shared weights are the same
        if name in shared and name != "scalars":
            assert torch.equal(p, shared[name]), name
    std = GPT(tiny(precision="fp32", ve_init_std=0.01)).value_embed.weight.std().item()
    assert 0.0095 < std < 0.0105  # VeTuned: N(0, 0.01)


def test_the_2026_value_embedding_layouts_are_expressible():
    """UntieValueEmbeddings' .01...345 and VeTuned's .01...234 on their 11 layers (layer 6 without attention),
    transcribed from the records' `ve = [None] + [ve[0], ve[1]] + [None] * (num_layers - 6) + [ve[2], ve[3], ve[4]]`."""
    L = 11
    vetuned = [None] + [0, 1] + [None] * (L - 6) + [2, 3, 4]
    untied = [None] + [0, 1] + [None] * (L - 7) + [2, 3, 4, 5]
    for layout, n in ((vetuned, 5), (untied, 6)):
        cfg = tiny(num_layers=L, window_pattern="S" * L, no_attn_layers=(6,), skip_map=(), value_embeds=n,
                   ve_layers=tuple(-1 if t is None else t for t in layout))
        assert cfg.ve_map() == layout
        assert cfg.validate().num_ve_tables == n
    assert tiny(num_layers=L, window_pattern="S" * L, no_attn_layers=(6,), skip_map=(), value_embeds=5,
                ve_layers=tuple(-1 if t is None else t for t in vetuned)).name.startswith("x00-ve5-velayersx01")
