"""Attention masks: the keys each query attends to are upstream's, on every path.

Upstream (x01 record) keeps its sliding window only in the BlockMask's block lists: for query block i it lists
the key blocks that some query of block i can see (document-causal), splits them into 'full' (every pair visible)
and 'partial' ones, orders each nearest first, and keeps min(#full, W-1) full blocks and
min(#partial, max(W - #full, 1)) partial ones, the mask function (document-causal, no window) deciding inside
partial blocks. `upstream_keys` below builds that key set from those rules token by token, independently of
embxlib.model, and the tests hold embxlib's masks (the dense SDPA mask, the FlexAttention BlockMask and its
mask function) against it.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embxlib.config import EOT_TOKEN, medium, medium_x01, tiny
from embxlib.model import (GPT, attend, dense_mask, document_ids, flex_block_mask, short_window, window_blocks)

torch.set_num_threads(2)


def upstream_keys(tokens: np.ndarray, W: int, B: int) -> np.ndarray:
    """(T, T) bool: query q attends to key k under upstream's block semantics with a window of W blocks."""
    T = len(tokens)
    doc = np.cumsum(tokens == EOT_TOKEN)
    q, k = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    visible = (k <= q) & (doc[q] == doc[k])  # upstream's mask function
    n = T // B
    blocks = visible.reshape(n, B, n, B)
    keys = np.zeros((T, T), bool)
    for i in range(n):
        full = [j for j in range(i, -1, -1) if blocks[i, :, j, :].all()]
        partial = [j for j in range(i, -1, -1) if blocks[i, :, j, :].any() and not blocks[i, :, j, :].all()]
        keep_full = full[:max(0, min(len(full), W - 1))]  # a negative count keeps nothing
        keep_partial = partial[:min(len(partial), max(W - len(full), 1))]
        for j in keep_full:
            keys[i * B:(i + 1) * B, j * B:(j + 1) * B] = True
        for j in keep_partial:
            keys[i * B:(i + 1) * B, j * B:(j + 1) * B] = blocks[i, :, j, :]
    return keys


def expand(bm, tokens: np.ndarray, B: int) -> np.ndarray:
    """The keys a block-sparse kernel visits: full blocks whole, partial blocks through a document-causal mask
    function without any window, as upstream's (so the window must come from the block lists alone)."""
    T = len(tokens)
    doc = np.cumsum(tokens == EOT_TOKEN)
    q, k = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    visible = (k <= q) & (doc[q] == doc[k])
    keys = np.zeros((T, T), bool)
    for i in range(T // B):
        rows = slice(i * B, (i + 1) * B)
        for j in bm.full_kv_indices[0, 0, i, :max(0, int(bm.full_kv_num_blocks[0, 0, i]))].tolist():
            keys[rows, j * B:(j + 1) * B] = True
        for j in bm.kv_indices[0, 0, i, :int(bm.kv_num_blocks[0, 0, i])].tolist():
            keys[rows, j * B:(j + 1) * B] |= visible[rows, j * B:(j + 1) * B]
    return keys


def layouts(T: int, B: int, seed: int = 0):
    """Document layouts: one document, boundaries on and off block edges, many short documents, random ones."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 50000, T)
    out = {"one document": [0], "on block edges": [0, B, 3 * B], "off block edges": [0, B // 2 + 1, 2 * B + 3],
           "short documents": list(range(0, T, max(2, B // 3))), "no leading eot": [B + 5]}
    for r in range(3):
        out[f"random {r}"] = sorted(rng.choice(T, size=rng.integers(1, T // 8), replace=False).tolist())
    for name, starts in out.items():
        t = base.copy()
        t[[s for s in starts if s < T]] = EOT_TOKEN
        yield name, t


@pytest.mark.parametrize("T,B", [(256, 16), (192, 32), (512, 128)])
def test_attended_keys_equal_upstream_block_semantics(T, B):
    n = T // B
    for name, tokens in layouts(T, B, seed=T + B):
        docs = document_ids(torch.from_numpy(tokens))
        for W in sorted({0, 1, 2, 3, n // 2, n - 1, n, n + 1}):
            ref = upstream_keys(tokens, W, B)
            w = max(W, 1)  # upstream's 0-block window (half of 1) keeps the diagonal block, as 1 does
            sdpa = dense_mask(docs, torch.tensor(w), B).numpy()
            assert np.array_equal(sdpa, ref), f"SDPA mask, {name}, W={W}"
            bm = flex_block_mask(docs, torch.tensor(w), B)
            assert np.array_equal(expand(bm, tokens, B), ref), f"FlexAttention block lists, {name}, W={W}"
            q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
            assert np.array_equal(bm.mask_mod(None, None, q, k).numpy(), ref), f"mask function, {name}, W={W}"


def test_block_window_sees_between_w_minus_one_and_w_blocks():
    """One long document: query q sees the keys from the start of the block W-1 blocks before its own: between
    (W-1)*B+1 and W*B keys, where a token window of W*B would always give W*B."""
    B, T, W = 16, 256, 3
    docs = torch.zeros(T, dtype=torch.long)
    m = dense_mask(docs, W, B)
    counts = m.sum(1)
    assert counts[100].item() == (100 - (100 // B - W + 1) * B) + 1 == 37  # block 6 sees blocks 4..6
    assert counts[B * W:].min().item() == (W - 1) * B + 1 and counts[B * W:].max().item() == W * B


def test_window_rounds_up_from_the_float_as_upstream():
    """next_multiple_of_n(3456 * factor, n=128) takes the smallest multiple of 128 >= the float; truncating the
    float first (embxlib before) gave the long window one block short at 38 steps of the x01 record, e.g. step 229."""
    def upstream_blocks(step, N):
        x = step / N
        v = 3456 * (4 * x**3 - 6 * x**2 + 3 * x)
        return next(m for m in range(128, int(v) + 1 + 128, 128) if m >= v) // 128

    for cfg in (medium_x01(), medium()):
        N = cfg.num_iterations
        ours = [window_blocks(s, cfg) for s in range(N + 1)]
        assert ours == [upstream_blocks(s, N) for s in range(N + 1)], cfg.preset
        assert ours[0] == 1 and ours[-1] == 27 and short_window(ours[-1]) == 13
    x01 = medium_x01()
    truncated = [max(128, -(-int(3456 * f) // 128) * 128) // 128
                 for f in (4 * x**3 - 6 * x**2 + 3 * x for x in (s / 5690 for s in range(5691)))]
    ours = [window_blocks(s, x01) for s in range(5691)]
    assert sum(a != b for a, b in zip(truncated, ours)) == 38 and (truncated[229], ours[229]) == (3, 4)


def test_flex_and_sdpa_give_the_same_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64) for _ in range(3))
    for name, tokens in layouts(128, 16):
        docs = document_ids(torch.from_numpy(tokens))
        for w in (1, 3, 8):
            sdpa = attend(q, k, v, dense_mask(docs, w, 16), 0.17)
            flex = attend(q, k, v, flex_block_mask(docs, torch.tensor(w), 16), 0.17)  # eager: the mask function
            torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5, msg=f"{name}, window {w}")


def test_flex_and_sdpa_models_agree():
    idx = torch.from_numpy(dict(layouts(128, 64))["off block edges"])[None]
    torch.manual_seed(0)
    a = GPT(tiny(train_seq_len=128, val_seq_len=128, window_max=128, attention="sdpa", extra_embeds=1,
                 precision="fp32"))
    with torch.no_grad():  # the zero-init projections would hide attention entirely
        for b in a.blocks:
            if b.attn is not None:
                b.attn.qkvo_w[3].normal_(0, 0.05)
            b.mlp.proj_w.normal_(0, 0.05)
        a.lm_head_w.normal_(0, 0.05)
    b = GPT(tiny(train_seq_len=128, val_seq_len=128, window_max=128, attention="flex", extra_embeds=1,
                 precision="fp32"))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # FlexAttention has no CPU backward
        for w in (1, 2):
            torch.testing.assert_close(b(idx, window=w), a(idx, window=w), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_flex_kernel_attends_to_upstream_keys():
    """Compiled FlexAttention (unlike eager) skips the blocks its lists leave out, as the GPU kernel does. With
    upstream's window-free mask function, our block lists alone must give upstream's keys."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    B, T = 128, 768
    flex = torch.compile(flex_attention, dynamic=False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 64) for _ in range(3))
    for name, tokens in list(layouts(T, B))[:4]:
        t = torch.from_numpy(tokens)
        docs = document_ids(t)
        for w in (1, 3):
            bm = flex_block_mask(docs, torch.tensor(w), B)

            def document_causal(b, h, qi, kv):
                return (qi >= kv) & (docs[qi] == docs[kv])
            bare = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                            bm.full_kv_indices, BLOCK_SIZE=B, mask_mod=document_causal)
            ref = torch.from_numpy(upstream_keys(tokens, w, B))
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=ref, scale=0.12)
            torch.testing.assert_close(flex(q, k, v, block_mask=bare, scale=0.12), expected, atol=2e-5, rtol=2e-5,
                                       msg=f"{name}, window {w}")
