"""Optimisers against independent references: torch.optim.Muon and torch.optim.AdamW; schedules by hand."""
import pytest
import torch

from embxlib.config import tiny
from embxlib.model import GPT
from embxlib.optim import (NS_COEFFICIENTS, Muon, apply_schedules, build_optimizers, join_master, lr_multiplier,
                           muon_momentum, orthogonalize)

TORCH_NS = ((3.4445, -4.7750, 2.0315),) * 5  # torch.optim.Muon's fixed coefficients, 5 steps


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_matches_torch_muon(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref = torch.optim.Muon([a], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01,
                           ns_coefficients=TORCH_NS[0], ns_steps=5, eps=1e-7, adjust_lr_fn="original")
    ours = Muon([b], lr=0.02, momentum=0.95, weight_decay=0.01, coefficients=TORCH_NS, eps=1e-7,
                ns_dtype=torch.bfloat16)
    for step in range(4):
        g = torch.randn(shape)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        # torch's Newton-Schulz fuses b A + c A^2 into one addmm (one bf16 rounding), upstream's (and ours, see
        # the next test) rounds each product and sum: the same step up to bf16 roundings of the update
        moved_ref, moved = a.data - w0, b.data - w0
        assert (moved - moved_ref).norm() < 0.06 * moved_ref.norm()  # (3.6% after 4 steps)
    assert not torch.allclose(b.data, w0, atol=1e-3)


def upstream_update(acc_bf16_view_u16, mantissa, momentum_buffer, grad, momentum, eff_lr, eff_weight_decay):
    """Transcribed from the x01 record's train_gpt_medium.py (34f5696a). Upstream runs it compiled; eager CPU
    PyTorch has no uint32 shifts, so the 32 bits are assembled in int64 and narrowed (the same bits)."""
    grad = grad.float()
    momentum_buffer.copy_(momentum * momentum_buffer + (1 - momentum) * grad)
    v = upstream_newtonschulz5(momentum * momentum_buffer + (1 - momentum) * grad)
    acc_m_u32 = ((acc_bf16_view_u16.to(torch.int64) << 16) | mantissa.to(torch.int64)).to(torch.int32)
    acc_m_u32.view(torch.float32).mul_(1 - eff_weight_decay)
    acc_m_u32.view(torch.float32).add_(other=v, alpha=-eff_lr)
    bits = acc_m_u32.to(torch.int64) & 0xFFFFFFFF
    acc_bf16_view_u16.copy_((bits >> 16).to(torch.uint16))
    mantissa.copy_((bits & 0xFFFF).to(torch.uint16))


def upstream_update_smoothed(acc_bf16_view_u16, mantissa, momentum_buffer, smoothing_buffer, grad, momentum,
                             update_smoothing, eff_lr, eff_weight_decay, nesterov):
    """Medium records 13 (nesterov: `v = update_smoothing * smoothed_update_buffer + (1-update_smoothing) * v`) and
    14-16 (`v = update_smoothing_buffer`) transcribed (2025-09-17_UpdateSmoothing, 2025-09-30_SmoothedSnooMedium);
    smoothing_buffer None: x01's update. The 32 bits as in upstream_update."""
    grad = grad.float()
    momentum_buffer.copy_(momentum * momentum_buffer + (1 - momentum) * grad)
    v = upstream_newtonschulz5(momentum * momentum_buffer + (1 - momentum) * grad)
    if smoothing_buffer is not None:
        smoothing_buffer.copy_(update_smoothing * smoothing_buffer + (1 - update_smoothing) * v)
        if nesterov:
            v = update_smoothing * smoothing_buffer + (1 - update_smoothing) * v
        else:
            v = smoothing_buffer
    acc_m_u32 = ((acc_bf16_view_u16.to(torch.int64) << 16) | mantissa.to(torch.int64)).to(torch.int32)
    acc_m_u32.view(torch.float32).mul_(1 - eff_weight_decay)
    acc_m_u32.view(torch.float32).add_(other=v, alpha=-eff_lr)
    bits = acc_m_u32.to(torch.int64) & 0xFFFFFFFF
    acc_bf16_view_u16.copy_((bits >> 16).to(torch.uint16))
    mantissa.copy_((bits & 0xFFFF).to(torch.uint16))


def upstream_newtonschulz5(G):
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in NS_COEFFICIENTS:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_muon_step_equals_the_upstream_update(compiled):
    """Our Muon (all of a rank's matrices of one shape in one batched update) against upstream's per-matrix update,
    transcribed: the same masters and momenta over 3 steps with momentum and lr changing, bit for bit. Compiled
    (as on CUDA, one graph per matrix shape) against upstream's update compiled as upstream compiles it."""
    torch.manual_seed(0)
    shapes = [(4, 48, 32)] if compiled else [(4, 48, 32)] * 3 + [(64, 32)] * 2 + [(32, 64)] * 2
    w0 = [torch.randn(s).bfloat16() for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    theirs = [w.clone() for w in w0]
    state = [(torch.zeros_like(w, dtype=torch.uint16), torch.zeros_like(w, dtype=torch.float32)) for w in w0]
    opt = Muon([dict(params=ours[:5]), dict(params=ours[5:], wd_mul=2.0)], lr=0.02, weight_decay=0.1,
               compile=compiled)
    reference = torch.compile(upstream_update) if compiled else upstream_update
    for step in range(3):
        m, lr = 0.85 + 0.05 * step, 0.02 * (1 - 0.2 * step)
        for g in opt.param_groups:
            g["momentum"], g["lr"] = m, lr
        grads = [torch.randn(s).bfloat16() for s in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for i, (w, g, (mant, buf)) in enumerate(zip(theirs, grads, state)):
            wd_mul = 2.0 if i >= 5 else 1.0
            scale = max(1, w.size(-2) / w.size(-1)) ** 0.5
            full = torch._as_tensor_fullprec
            reference(w.view(torch.uint16), mant, buf, g, full(m), full(lr * scale), full(lr * 0.1 * wd_mul))
    tol = dict(atol=0, rtol=0)
    for p, w, (mant, buf) in zip(ours, theirs, state):
        st = opt.state[p]
        torch.testing.assert_close(st["momentum_buffer"], buf, **tol)
        torch.testing.assert_close(join_master(p.data, st["mantissa"]), join_master(w, mant), **tol)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["ema", "nesterov"])
def test_smoothed_muon_step_equals_the_records_update(compiled, mode):
    """Update smoothing (medium records 13: nesterov, 14-16: ema) against the records' update, transcribed, over 3
    steps with s moving: weights, mantissas, momenta and the bf16 smoothing buffer bit for bit. Compiled, the
    smoothing is inside the compiled update on both sides: inductor computes s buf + (1 - s) v in fp32 and rounds
    once on the store, eager rounds each product and sum to bf16; each side matches upstream run the same way."""
    torch.manual_seed(0)
    shapes = [(4, 48, 32)] if compiled else [(4, 48, 32)] * 3 + [(64, 32)] * 2 + [(32, 64)] * 2
    w0 = [torch.randn(s).bfloat16() for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    theirs = [w.clone() for w in w0]
    state = [(torch.zeros_like(w, dtype=torch.uint16), torch.zeros_like(w, dtype=torch.float32),
              torch.zeros_like(w, dtype=torch.bfloat16)) for w in w0]
    opt = Muon([dict(params=ours[:5]), dict(params=ours[5:], wd_mul=2.0)], lr=0.02, weight_decay=0.1,
               compile=compiled, smoothing=0.5, nesterov_smoothing=mode == "nesterov")
    reference = torch.compile(upstream_update_smoothed) if compiled else upstream_update_smoothed
    for step in range(3):
        m, lr, s = 0.85 + 0.05 * step, 0.02 * (1 - 0.2 * step), 0.5 - 0.1 * step
        for g in opt.param_groups:
            g["momentum"], g["lr"], g["smoothing"] = m, lr, s
        grads = [torch.randn(sh).bfloat16() for sh in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for i, (w, g, (mant, buf, sbuf)) in enumerate(zip(theirs, grads, state)):
            wd_mul = 2.0 if i >= 5 else 1.0
            scale = max(1, w.size(-2) / w.size(-1)) ** 0.5
            full = torch._as_tensor_fullprec
            reference(w.view(torch.uint16), mant, buf, sbuf, g, full(m), full(s), full(lr * scale),
                      full(lr * 0.1 * wd_mul), mode == "nesterov")
    for p, w, (mant, buf, sbuf) in zip(ours, theirs, state):
        st = opt.state[p]
        assert torch.equal(st["momentum_buffer"], buf) and torch.equal(st["smooth_buffer"], sbuf)
        assert st["smooth_buffer"].dtype == torch.bfloat16 and sbuf.abs().sum() > 0
        assert torch.equal(join_master(p.data, st["mantissa"]), join_master(w, mant))


def test_bf16_muon_keeps_an_exact_fp32_master_weight():
    """Upstream's mixed precision: a bf16 matrix plus a uint16 mantissa buffer is an fp32 master weight. Stepping
    it must give exactly what fp32 Muon gives on an fp32 copy (same gradients), and the bf16 weight the forward
    pass sees is that master truncated, its top 16 bits."""
    torch.manual_seed(0)
    w0 = torch.randn(3, 48, 32).bfloat16()  # a batch of matrices, like qkvo_w
    half = torch.nn.Parameter(w0.clone())
    full = torch.nn.Parameter(w0.float())  # the master starts at the bf16 value (mantissa 0), as upstream
    opts = [Muon([p], lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32) for p in (half, full)]
    for o in opts:
        o.param_groups[0]["wd_mul"] = 2.0
    for _ in range(5):
        g = torch.randn(3, 48, 32).bfloat16()
        half.grad, full.grad = g.clone(), g.float()
        for o in opts:
            o.step()
        master = join_master(half.data, opts[0].state[half]["mantissa"])
        assert torch.equal(master, full.data)  # bit for bit
        truncated = (full.data.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
        assert torch.equal(half.data, truncated)
    assert opts[0].state[half]["momentum_buffer"].dtype == torch.float32
    assert not torch.equal(half.data, full.data.bfloat16())  # truncation is not rounding: the test can tell


def test_muon_state_survives_a_checkpoint_bit_for_bit(tmp_path):
    """torch's Optimizer.load_state_dict casts state to the parameter's dtype; ours keeps fp32 momentum and uint16
    mantissas of bf16 matrices as saved."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8).bfloat16())
    opt = Muon([p], ns_dtype=torch.float32)
    p.grad = torch.randn(16, 8).bfloat16()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "m.pt")
    q = torch.nn.Parameter(p.data.clone())
    again = Muon([q], ns_dtype=torch.float32)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for k, v in opt.state[p].items():
        assert again.state[q][k].dtype == v.dtype and torch.equal(again.state[q][k], v), k


def test_orthogonalize_makes_singular_values_near_one():
    torch.manual_seed(0)
    G = torch.randn(3, 128, 64)  # batched, as the q/k/v/o tensor is
    X = orthogonalize(G, NS_COEFFICIENTS, dtype=torch.float32)
    s = torch.linalg.svdvals(X)
    assert X.shape == G.shape and s.min() > 0.5 and s.max() < 1.3  # upstream's quintic trades accuracy for speed


def test_adam_groups_match_hand_built_adamw():
    """Our groups (names, lrs, betas, eps) and the lr schedule reproduce a hand-built AdamW with upstream numbers
    (in fp32: fused and foreach AdamW round bf16 parameters differently)."""
    cfg = tiny(num_iterations=10, extra_embeds=1, token_lambdas="x01", precision="fp32")
    torch.manual_seed(0)
    model = GPT(cfg)
    adam, _ = build_optimizers(model, cfg)
    names = {g["name"]: g for g in adam.param_groups}
    assert names["head"]["lr"] == 1 / 320 and names["embed"]["lr"] == 0.3 and names["scalars"]["lr"] == 0.015
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    clones = {n: torch.nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    ref = torch.optim.AdamW([
        dict(params=[clones["lm_head_w"]], lr=1 / 320),
        dict(params=[clones["embed.weight"], clones["value_embed.weight"]], lr=0.3),
        dict(params=[clones["scalars"]], lr=0.015),
        dict(params=[clones["token_lambda.weight"]], lr=0.3)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0)
    adam_params = {id(p) for g in adam.param_groups for p in g["params"]}
    for step in range(6):  # steps 3.. are in the cooldown
        for n, p in model.named_parameters():
            if id(p) in adam_params:
                g = torch.randn_like(p)
                p.grad, clones[n].grad = g, g.clone()
        apply_schedules(step, cfg, adam, _)
        for group in ref.param_groups:
            group["lr"] = group.setdefault("base", group["lr"]) * (1.0 if step < 3 else (10 - step) / 10 / 0.7)
        adam.step()
        ref.step()
    for n, p in model.named_parameters():
        if id(p) in adam_params:
            torch.testing.assert_close(p.data, clones[n].data, msg=n)


def test_every_parameter_has_exactly_one_optimizer():
    model = GPT(tiny(extra_embeds=2, token_lambdas="x00"))
    adam, muon = build_optimizers(model, model.cfg)
    ids = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for g in muon.param_groups for p in g["params"])
    assert {g["name"]: g["wd_mul"] for g in muon.param_groups} == {"attn": 1.0, "mlp": 2.0}


def test_schedules_by_hand():
    cfg = tiny(num_iterations=1000, cooldown_frac=0.7, muon_momentum_warmup_steps=300)
    assert lr_multiplier(0, cfg) == 1.0 and lr_multiplier(299, cfg) == 1.0
    assert lr_multiplier(300, cfg) == pytest.approx(1.0)
    assert lr_multiplier(650, cfg) == pytest.approx(0.35 / 0.7)
    assert lr_multiplier(1000, cfg) == 0.0
    assert muon_momentum(0, cfg) == 0.85 and muon_momentum(150, cfg) == pytest.approx(0.90)
    assert muon_momentum(300, cfg) == muon_momentum(5000, cfg) == 0.95
