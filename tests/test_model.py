"""Model: FlexAttention and SDPA agree, the mask is document-causal with a window, variants behave as specified."""
import pytest
import torch
import torch.nn.functional as F

from embxlib.config import EOT_TOKEN, tiny
from embxlib.model import GPT, attend, build_masks, norm, window_schedule

torch.set_num_threads(2)


def small(**kw):
    return tiny(train_seq_len=128, val_seq_len=128, window_max=128, **kw)


def tokens(T=128, seed=0, docs_at=(40, 90)):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50000, (1, T), generator=g)
    for p in docs_at:
        idx[0, p] = EOT_TOKEN
    return idx


def test_mask_is_document_causal_with_window():
    idx = tokens(docs_at=(40,))
    m = build_masks(idx, (16, 8), use_flex=False)["L"]
    q, k = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    doc = (torch.arange(128) >= 40).long()
    expected = (k <= q) & (q - k < 16) & (doc[q] == doc[k])
    assert torch.equal(m, expected)
    assert not m[41, 39] and m[41, 40] and m[39, 24] and not m[39, 23]  # hand-picked corners


def test_flex_and_sdpa_give_the_same_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64) for _ in range(3))
    idx = tokens()
    for windows in [(128, 64), (64, 64)]:
        sdpa = attend(q, k, v, build_masks(idx, windows, use_flex=False)["S"], 0.17)
        flex = attend(q, k, v, build_masks(idx, windows, use_flex=True)["S"], 0.17)
        torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_flex_and_sdpa_models_agree():
    idx = tokens()
    torch.manual_seed(0)
    a = GPT(small(attention="sdpa", extra_embeds=1))
    with torch.no_grad():  # the zero-init projections would hide attention entirely
        for b in a.blocks:
            if b.attn is not None:
                b.attn.qkvo_w[3].normal_(0, 0.05)
            b.mlp.proj_w.normal_(0, 0.05)
        a.lm_head_w.normal_(0, 0.05)
    b = GPT(small(attention="flex", extra_embeds=1))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # FlexAttention has no CPU backward
        torch.testing.assert_close(b(idx), a(idx), atol=1e-4, rtol=1e-4)


def test_window_schedule_grows_to_window_max():
    cfg = tiny(num_iterations=100)
    longs = [window_schedule(s, cfg)[0] for s in range(101)]
    assert longs[0] == cfg.attn_block_size and longs[-1] == cfg.window_max
    assert all(a <= b for a, b in zip(longs, longs[1:]))
    assert all(window_schedule(s, cfg)[1] == max(1, l // cfg.attn_block_size // 2) * cfg.attn_block_size
               for s, l in enumerate(longs))


def test_initial_model_is_a_unigram_model_of_x00():
    """With zero-init projections and x0k lambdas at 0, the first forward pass only sees x00."""
    torch.manual_seed(0)
    m = GPT(small(extra_embeds=2))
    with torch.no_grad():
        m.lm_head_w.normal_()
    idx = tokens()
    x00 = norm(m.embed(idx)[..., :128])
    expected = m.head(norm(x00))
    torch.testing.assert_close(m(idx), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(extra_embeds=3), dict(value_embeds=1), dict(value_embeds=3),
                                dict(ve_layout="mirrored"), dict(ve_remove=(0, 4)), dict(token_lambdas="x00"),
                                dict(extra_embeds=2, token_lambdas="x02", ve_layout="adjacent", ve_span=1)])
def test_variants_forward_backward(kw):
    torch.manual_seed(0)
    m = GPT(small(**kw))
    idx = tokens()
    loss = m(idx, idx.roll(-1).long())
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 10.826) < 0.01  # zero head: uniform over 50304 rows
    used = [p for n, p in m.named_parameters() if p.grad is not None]
    assert m.scalars.grad is not None and m.embed.weight.grad is not None and len(used) > 0


def test_extra_embeddings_and_tables_change_parameter_count():
    base = sum(p.numel() for p in GPT(small()).parameters())
    x03 = sum(p.numel() for p in GPT(small(extra_embeds=3)).parameters())
    assert x03 - base == 3 * 50257 * 128 + 3 * 6  # three tables and one more lambda per layer
    no_ve = sum(p.numel() for p in GPT(small(ve_remove=(0, 4))).parameters())
    assert base - no_ve == 50257 * 128  # removing both layers of table 0 drops the table


def test_token_lambdas_at_init_change_nothing():
    """tl = 1 at init: the model equals the one without token lambdas (same other weights)."""
    torch.manual_seed(0)
    a = GPT(small(extra_embeds=1))
    b = GPT(small(extra_embeds=1, token_lambdas="x01"))
    state = {k: v for k, v in b.state_dict().items() if not k.startswith("token_lambda")}
    a.load_state_dict(state)
    with torch.no_grad():
        for m in (a, b):
            m.block_lambdas()[:, 1:] = 0.3  # let x00/x01 contribute
        b.lm_head_w.copy_(a.lm_head_w.normal_())
    idx = tokens()
    torch.testing.assert_close(a(idx), b(idx))
    with torch.no_grad():
        b.token_lambda.weight[idx[0, 5], 2] = 3.0  # one token, one layer
    assert not torch.allclose(a(idx), b(idx))


def test_softcap_bounds_logits():
    m = GPT(small())
    with torch.no_grad():
        m.lm_head_w.normal_(0, 100)
    z = m(tokens())
    assert z.abs().max() <= 15.0 and z.abs().max() > 14.0


def test_softcap_backward_matches_autograd():
    from embxlib.model import SoftCap
    z = (torch.randn(64, 50, dtype=torch.float64) * 20).requires_grad_()
    torch.autograd.gradcheck(lambda t: SoftCap.apply(t, 15.0), (z,))
    ref = 15.0 * z * torch.rsqrt(z.square() + 225.0)
    torch.testing.assert_close(SoftCap.apply(z, 15.0), ref)


def _reference_loss(x, w, y, c=15.0):
    """The unfused graph: LM head, soft-cap and mean cross-entropy through autograd."""
    z = F.linear(x, w).float()
    return F.cross_entropy(c * z * torch.rsqrt(z.square() + c * c), y)


@pytest.mark.parametrize("chunk", [7, 64, 8192])
def test_fused_head_loss_matches_autograd(chunk):
    from embxlib.model import HeadLoss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(300, 16, generator=g, dtype=torch.float64) * 3).requires_grad_()  # large logits: the cap bites
    y = torch.randint(0, 300, (50,), generator=g)
    ref = _reference_loss(x, w, y)
    gx, gw = torch.autograd.grad(2.5 * ref, (x, w))  # a non-unit incoming gradient, as under grad accumulation
    out = HeadLoss.apply(x, w, y, 15.0, True, chunk)
    fx, fw = torch.autograd.grad(2.5 * out, (x, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fx, gx)
    torch.testing.assert_close(fw, gw)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(HeadLoss.apply(x, w, y, 15.0, False, chunk), ref.detach())


def test_model_loss_is_the_same_fused_or_not():
    torch.manual_seed(0)
    m = GPT(small(extra_embeds=1))
    with torch.no_grad():
        m.lm_head_w.normal_(0, 0.5)
    idx, y = tokens(), tokens(seed=1)
    losses, grads = [], []
    for fused in (True, False):
        m.fused_loss = fused  # (None, the default, is True on CPU)
        loss = m(idx, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
