"""Model: FlexAttention and SDPA agree, the mask is document-causal with a window, variants behave as specified."""
import pytest
import torch
import torch.nn.functional as F

from embxlib.config import EOT_TOKEN, tiny
from embxlib.model import GPT, norm

torch.set_num_threads(2)


def small(**kw):  # fp32 unless a test asks for bf16: these tests compare numbers tightly
    return tiny(**{"train_seq_len": 128, "val_seq_len": 128, "window_max": 128, "precision": "fp32", **kw})


def tokens(T=128, seed=0, docs_at=(40, 90)):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50000, (1, T), generator=g)
    for p in docs_at:
        idx[0, p] = EOT_TOKEN
    return idx


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
    from embxlib.model import HeadLoss, head_loss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(300, 16, generator=g, dtype=torch.float64) * 3).requires_grad_()  # large logits: the cap bites
    y = torch.randint(0, 300, (50,), generator=g)
    ref = _reference_loss(x, w, y)
    gx, gw = torch.autograd.grad(2.5 * ref, (x, w))  # a non-unit incoming gradient, as under grad accumulation
    out = HeadLoss.apply(x, w, y, 15.0, chunk)
    fx, fw = torch.autograd.grad(2.5 * out, (x, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fx, gx)
    torch.testing.assert_close(fw, gw)
    loss, dx, dw = head_loss(x.detach(), w.detach(), y, 15.0, False, chunk)  # evaluation: no gradient work
    torch.testing.assert_close(loss, ref.detach())
    assert dx is None and dw is None


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


def test_sparse_table_gradients_are_upstreams_dense_ones():
    """From the same incoming gradient, SparseRowsGrad (the CPU path's table gradient) gives .grad bit for bit what
    upstream's compiled graph gives: per micro-step the rows summed per token in fp32 and rounded once (inductor's
    decomposition of the embedding backward, run here compiled), accumulated over micro-steps in bf16; .grad stays
    dense. Tokens repeat (20 distinct in 128), so rows are summed. (Eager PyTorch's CPU kernel sums otherwise.)"""
    from embxlib.model import SparseRowsGrad
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 16, generator=g).bfloat16().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    upstream = torch.compile(lambda w, idx: F.embedding(idx, w), dynamic=False)
    for micro in range(3):
        idx = torch.randint(0, 20, (1, 128), generator=g)
        grad = torch.randn(1, 128, 16, generator=g).bfloat16()
        SparseRowsGrad.apply(w, idx).backward(grad)
        upstream(w_ref, idx).backward(grad)
        assert w.grad.layout == torch.strided
        by_hand = torch.zeros(300, 16).index_add_(0, idx[0], grad[0].float()).bfloat16()
        expected = by_hand if micro == 0 else expected + by_hand
        assert torch.equal(w.grad, expected), micro
        assert torch.equal(w.grad, w_ref.grad), micro
    torch._dynamo.reset()


def test_sparse_table_gradients_only_where_the_cpu_trains():
    m = GPT(small())
    idx = tokens()
    assert m.lookup(idx)["embed"].grad_fn.name() == "SparseRowsGradBackward"  # CPU, training: None means sparse
    with torch.no_grad():
        assert m.lookup(idx)["embed"].grad_fn is None
    m.sparse_table_grads = False
    assert m.lookup(idx)["embed"].grad_fn.name() == "EmbeddingBackward0"


def test_precision_policy_dtypes_per_tensor():
    """Upstream's policy (precision=bf16): bf16 tables and block matrices, fp32 LM head, scalars and rotary tables;
    a bf16 residual stream; fp32 logits and loss; gradients and Adam state in their parameter's dtype; Muon's
    momentum fp32 with a uint16 mantissa per bf16 matrix. precision=fp32 is fp32 throughout, and named so."""
    from embxlib.optim import build_optimizers
    cfg = small(extra_embeds=1, token_lambdas="x01", precision="bf16")
    torch.manual_seed(0)
    m = GPT(cfg)
    dtypes = {n: p.dtype for n, p in m.named_parameters()}
    fp32 = {"lm_head_w", "scalars"}
    assert {n for n, d in dtypes.items() if d == torch.float32} == fp32
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in fp32)
    assert {b.dtype for b in m.buffers()} == {torch.float32}  # rotary cos/sin
    with torch.no_grad():
        m.lm_head_w.normal_()
    acts = {}
    idx = tokens()
    assert m(idx, collect=acts).dtype == torch.float32  # logits
    assert all(a.dtype == torch.bfloat16 for a in acts.values())  # x-i, x-out, x00.., ve..
    loss = m(idx, tokens(seed=1))
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == p.dtype for p in m.parameters())
    adam, muon = build_optimizers(m, cfg)
    adam.step()
    muon.step()
    assert adam.state[m.embed.weight]["exp_avg"].dtype == torch.bfloat16
    assert adam.state[m.lm_head_w]["exp_avg"].dtype == torch.float32
    st = muon.state[m.blocks[0].attn.qkvo_w]
    assert st["momentum_buffer"].dtype == torch.float32 and st["mantissa"].dtype == torch.uint16
    f = GPT(small(extra_embeds=1, precision="fp32"))
    assert {p.dtype for p in f.parameters()} == {torch.float32} and f.cfg.name == "x01-ve2-fp32"
    assert cfg.name == "x01-ve2-tlx01"


def test_bf16_and_fp32_give_the_same_loss_within_bf16_error():
    """The same weights under both policies: bf16 rounds activations to 8 bits of mantissa, so the losses differ by
    a little (stated bound 0.5%), and the gradients point the same way."""
    torch.manual_seed(0)
    f = GPT(small(extra_embeds=1))
    with torch.no_grad():
        for p in f.parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.normal_(0, 0.02)  # the zero-init projections and head would make the comparison trivial
    h = GPT(small(extra_embeds=1, precision="bf16"))
    h.load_state_dict(f.state_dict())  # cast to each parameter's dtype
    idx, y = tokens(), tokens(seed=1)
    lf, lh = f(idx, y), h(idx, y)
    assert abs(lh.item() - lf.item()) < 0.005 * lf.item()
    lf.backward()
    lh.backward()
    g32, g16 = f.blocks[0].mlp.fc_w.grad, h.blocks[0].mlp.fc_w.grad.float()
    assert F.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99
