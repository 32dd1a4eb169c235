"""The GPU check's kernel checks as tests (CUDA only; `python -m embxlib.gpucheck` runs them without pytest on the
GPU machine) and on the CPU what can be proven of its CUDA plan: every configuration it runs there fits
FlexAttention's kernel tiles on sm80/sm90/sm100 (read from the installed torch's own heuristics) and traces through
the CUDA attention branch in one graph. The staged check itself, run and stopped on the CPU: tests/test_gpucheck.py."""
import pytest
import torch

from unittest import mock

from embxlib import gpucheck
from embxlib import model as M
from embxlib.config import tiny

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run `python -m embxlib.gpucheck` there)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("check", [gpucheck.check_flex_attention, gpucheck.check_compiled_model,
                                   gpucheck.check_head_loss, gpucheck.check_compiled_autograd],
                         ids=lambda c: c.__name__)
def test_kernel_against_its_reference_on_cuda(check):
    result = check("cuda")
    assert result.pop("ok", True), result


CAPABILITIES = [(8, 0), (8, 6), (9, 0), (10, 0)]  # A100, A10/3090, H100/H200, B200


def flex_tiles(capability, head_dim: int, dtype) -> list[int]:
    """Every block size of the FlexAttention kernels inductor picks by default on a GPU of this capability."""
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic
    with mock.patch("torch.cuda.get_device_capability", return_value=capability):
        h = CUDAConfigHeuristic()
        fwd, bwd = h.get_flex_attn_fwd_configs(head_dim, dtype), h.get_flex_attn_bwd_configs(head_dim, dtype)
    return [b for c in fwd for b in (c.block_m, c.block_n)] + \
        [b for c in bwd for b in (c.block_m1, c.block_n1, c.block_m2, c.block_n2)]


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c[0]}{c[1]}")
def test_every_planned_cuda_config_fits_the_flex_kernel_tiles(capability):
    for name, cfg in gpucheck.plan("cuda").items():
        cfg.validate()
        assert cfg.flex_on_cuda()
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        tiles = flex_tiles(capability, cfg.head_dim, dtype)
        assert all(cfg.attn_block_size % t == 0 for t in tiles), (name, cfg.attn_block_size, tiles)


def test_a_block_the_kernels_do_not_divide_is_refused_before_anything_runs():
    """The tiny preset's 64-token blocks fail on an H100 ('Q and KV block size must be divisible by BLOCK_M and
    BLOCK_N'): the tiles say so, and validate() refuses them on CUDA, naming the field and the allowed values."""
    assert any(64 % t for t in flex_tiles((9, 0), 64, torch.bfloat16))
    with pytest.raises(ValueError, match=r"attn_block_size=64: FlexAttention on CUDA needs a multiple of 128.*"
                                         r"attention='sdpa'"):
        tiny(device="cuda").validate()
    tiny(device="cuda", attention="sdpa").validate()
    tiny(device="cpu").validate()  # (the CPU attends with SDPA)


@pytest.mark.parametrize("name", ["compiled_model", "compiled_autograd"])
def test_planned_configs_trace_the_cuda_attention_branch_once(name, monkeypatch):
    """The small configs of the plan, compiled with the CUDA branch of attention forced on (the block masks and
    the compiled FlexAttention kernel object built at import) on CPU with aot_eager: the window changes every step
    and nothing recompiles. (Before, the kernel object was made lazily inside the compiled forward: dynamo guarded
    on the new global and retraced once, a second full compile in the warmup of every GPU run.)"""
    cfg = gpucheck.plan("cuda")[name]
    cfg = type(cfg)(**{**cfg.to_dict(), "device": "cpu", "attention": "flex", "train_seq_len": 256})
    monkeypatch.setattr(M, "flex_kernel", lambda device: M._compiled_flex)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = M.GPT(cfg).requires_grad_(False)  # (FlexAttention has no CPU backward)
    fwd = torch.compile(model, dynamic=False, backend=backend)
    for w in (1, 2, 2):
        tok = torch.randint(0, cfg.vocab_size, (1, cfg.train_seq_len + 1))
        assert torch.isfinite(fwd(tok[:, :-1].int(), tok[:, 1:].long(), torch.tensor(w, dtype=torch.int32)))
    assert len(graphs) == 1
    torch._dynamo.reset()
