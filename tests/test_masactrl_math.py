"""MasaCtrl attention math against the paper's equations and the official code's formulation."""

import pytest
import torch

from consistent_synthesis.attention import masactrl as M
from consistent_synthesis.samplers import step_clock

HEADS, DIM_HEAD, TOKENS = 4, 8, 64  # 8x8 latent tokens


def qkv(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, TOKENS, HEADS * DIM_HEAD, generator=gen) for _ in range(3)]


def official_mutual(q, k, v, source):
    """The official ``attn_batch``: every query of the half-batch over the source's K/V, logits materialized."""
    b = q.shape[0]
    q_all = q.reshape(1, b * TOKENS, -1)
    return M.naive_attention(q_all, k[source:source + 1], v[source:source + 1], HEADS).reshape(q.shape)


def official_mask_target(q_t, k_s, v_s, source_mask, target_mask):
    """Official mask-guided target branch: additive -inf bias over excluded source keys, blended by M_t."""
    minimum = torch.finfo(q_t.dtype).min
    fg_bias = torch.where(source_mask == 1, 1.0, minimum)  # the official code adds the mask value (1) itself
    bg_bias = torch.where(source_mask == 0, 0.0, minimum)
    fg = M.naive_attention(q_t, k_s, v_s, HEADS, key_bias=fg_bias)
    bg = M.naive_attention(q_t, k_s, v_s, HEADS, key_bias=bg_bias)
    return fg * target_mask[:, None] + bg * (1 - target_mask[:, None])


def test_mutual_targets_attend_to_source_kv_and_source_keeps_self_attention():
    q, k, v = qkv(6)  # 2 chunks (uncond, cond) of 3 latents, source at index 1
    out = M.mutual_self_attention(q, k, v, HEADS, chunks=2, source_index=1)
    for chunk in range(2):
        s = chunk * 3 + 1
        torch.testing.assert_close(out[s], M.sdpa_attention(q[s:s + 1], k[s:s + 1], v[s:s + 1], HEADS)[0])
        for t in (chunk * 3, chunk * 3 + 2):
            expected = M.sdpa_attention(q[t:t + 1], k[s:s + 1], v[s:s + 1], HEADS)[0]
            torch.testing.assert_close(out[t], expected)
            assert not torch.allclose(out[t], M.sdpa_attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], HEADS)[0])


def test_mutual_equals_the_official_batched_formulation():
    q, k, v = qkv(4, seed=1)  # 2 chunks of 2, source first, as in the official code
    out = M.mutual_self_attention(q, k, v, HEADS, chunks=2, source_index=0)
    expected = torch.cat([official_mutual(q[:2], k[:2], v[:2], 0), official_mutual(q[2:], k[2:], v[2:], 0)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_union_targets_attend_over_source_and_own_kv():
    q, k, v = qkv(3, seed=2)
    out = M.mutual_self_attention(q, k, v, HEADS, chunks=1, source_index=0, mode="union")
    torch.testing.assert_close(out[0], M.sdpa_attention(q[:1], k[:1], v[:1], HEADS)[0])
    for t in (1, 2):
        k_u = torch.cat([k[0:1], k[t:t + 1]], dim=1)
        v_u = torch.cat([v[0:1], v[t:t + 1]], dim=1)
        torch.testing.assert_close(out[t], M.naive_attention(q[t:t + 1], k_u, v_u, HEADS)[0], rtol=1e-5, atol=1e-5)


def test_mask_guided_equals_official_additive_mask_formulation():
    q, k, v = qkv(3, seed=3)
    source_mask = torch.zeros(8, 8)
    source_mask[2:6, 1:5] = 1
    target_masks = torch.zeros(2, 8, 8)
    target_masks[0, 3:7, 3:7] = 1
    target_masks[1, :4] = 1
    out = M.mutual_self_attention(q, k, v, HEADS, chunks=1, source_index=0,
                                  source_mask=source_mask.flatten(), target_mask=target_masks.flatten(1))
    for i, t in enumerate((1, 2)):
        expected = official_mask_target(q[t:t + 1], k[:1], v[:1], source_mask.flatten(), target_masks[i].flatten())
        torch.testing.assert_close(out[t], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], M.sdpa_attention(q[:1], k[:1], v[:1], HEADS)[0])


def test_all_ones_masks_equal_plain_mutual_exactly():
    q, k, v = qkv(4, seed=4)
    plain = M.mutual_self_attention(q, k, v, HEADS, chunks=2)
    ones = torch.ones(TOKENS)
    masked = M.mutual_self_attention(q, k, v, HEADS, chunks=2, source_mask=ones, target_mask=ones[None])
    assert torch.equal(plain, masked)


def test_mask_guided_calls_attention_with_key_biases_not_key_subsets():
    calls = []

    def spy(q, k, v, heads, mask=None):
        calls.append((q.shape, k.shape, None if mask is None else mask.shape))
        return M.sdpa_attention(q, k, v, heads, mask=mask)

    q, k, v = qkv(3, seed=5)
    source_mask = torch.zeros(TOKENS)
    source_mask[:16] = 1
    M.mutual_self_attention(q, k, v, HEADS, chunks=1, attention=spy,
                            source_mask=source_mask, target_mask=torch.ones(1, TOKENS))
    # source alone, then both targets as one query sequence over all source keys, twice: the key
    # count of each region is never read on the host, the regions enter as (1, keys) biases
    assert calls == [(torch.Size([1, TOKENS, 32]), torch.Size([1, TOKENS, 32]), None),
                     (torch.Size([1, 2 * TOKENS, 32]), torch.Size([1, TOKENS, 32]), torch.Size([1, TOKENS])),
                     (torch.Size([1, 2 * TOKENS, 32]), torch.Size([1, TOKENS, 32]), torch.Size([1, TOKENS]))]


def test_empty_mask_region_attends_to_every_source_key():
    q, k, v = qkv(2, seed=6)
    plain = M.mutual_self_attention(q, k, v, HEADS, chunks=1)
    zeros = torch.zeros(TOKENS)
    # no source foreground: the target foreground attends to all source keys, as does its background
    masked = M.mutual_self_attention(q, k, v, HEADS, chunks=1, source_mask=zeros, target_mask=torch.ones(1, TOKENS))
    torch.testing.assert_close(masked, plain)


@pytest.mark.parametrize("source_index", [0, 1, 2])
@pytest.mark.parametrize("mode", ["mutual", "union"])
def test_rows_selected_by_views_agree_with_index_lists(source_index, mode):
    q, k, v = qkv(6, seed=7)  # 2 chunks of 3
    out = M.mutual_self_attention(q, k, v, HEADS, chunks=2, source_index=source_index, mode=mode)
    sources = [source_index, 3 + source_index]  # the source row of each chunk (cond, uncond)
    targets = [r for r in range(6) if r not in sources]
    for s in sources:
        torch.testing.assert_close(out[s], M.sdpa_attention(q[s:s + 1], k[s:s + 1], v[s:s + 1], HEADS)[0])
    for t in targets:
        s = sources[t // 3]
        k_t = k[s:s + 1] if mode == "mutual" else torch.cat([k[s:s + 1], k[t:t + 1]], dim=1)
        v_t = v[s:s + 1] if mode == "mutual" else torch.cat([v[s:s + 1], v[t:t + 1]], dim=1)
        torch.testing.assert_close(out[t], M.naive_attention(q[t:t + 1], k_t, v_t, HEADS)[0], rtol=1e-5, atol=1e-5)


def test_the_step_read_from_the_sigma_is_the_runs_sigma_interval():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [step_clock.step_from_sigma(sigmas, s) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.5)] == \
        [0, 0, 1, 1, 2, 2, 3, 3]
    assert step_clock.step_from_sigma(sigmas, 12.0) == 0


@pytest.mark.parametrize("batch,chunks,source,message", [
    (2, 2, 0, "only the source"),
    (4, 2, 2, "source_index 2"),
    (5, 2, 0, "cannot be split"),
])
def test_check_rows_rejects_batches_without_a_target(batch, chunks, source, message):
    with pytest.raises(ValueError, match=message):
        M.check_rows(batch, chunks, source)


def test_mask_guidance_is_only_defined_for_mutual_mode():
    q, k, v = qkv(2)
    ones = torch.ones(TOKENS)
    with pytest.raises(ValueError, match="mutual"):
        M.mutual_self_attention(q, k, v, HEADS, chunks=1, mode="union", source_mask=ones, target_mask=ones[None])


def test_resize_mask_is_nearest_neighbour():
    mask = torch.zeros(1, 16, 16)
    mask[0, :8, :] = 1
    small = M.resize_mask(mask, 4, 4).reshape(4, 4)
    assert torch.equal(small, torch.tensor([[1.0] * 4] * 2 + [[0.0] * 4] * 2))
