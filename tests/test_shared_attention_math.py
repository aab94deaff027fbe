"""Shared self-attention math (ConsiStory SDSA, StoryDiffusion) against transcriptions of the official code."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consistent_synthesis.attention import shared_attention as S
from sync_counter import HostSyncCounter, count_host_syncs

HEADS, DIM_HEAD, TOKENS = 4, 8, 64  # an 8x8 latent grid
INNER = HEADS * DIM_HEAD

try:
    from skimage.filters import threshold_otsu as _skimage_otsu
except ImportError:  # pragma: no cover - the reference below stands in
    _skimage_otsu = None


def qkv(rows, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, TOKENS, INNER, generator=gen, dtype=dtype) for _ in range(3)]


def random_masks(batch, seed=1, tokens=TOKENS, p=0.4):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, tokens, generator=gen) < p


def softmax_attention(q, k, v):
    """Plain multi-head attention of one image: ``q`` (n, heads*d), ``k, v`` (m, heads*d)."""
    qh, kh, vh = (t.reshape(t.shape[0], HEADS, DIM_HEAD).transpose(0, 1) for t in (q, k, v))
    weights = (qh @ kh.transpose(1, 2) / math.sqrt(DIM_HEAD)).softmax(dim=-1)
    return (weights @ vh).transpose(0, 1).reshape(q.shape[0], -1)


def official_sdsa(q, k, v, keep, anchors):
    """ConsiStory's processor loop (attention_processor.py) with ``get_extended_attn_mask_instance``:
    row b of chunk c takes the chunk's flattened K/V at a boolean mask (own block all True, block j
    of an anchor j != b the kept subject tokens) and runs plain attention over what is left."""
    batch = keep.shape[0]
    mapping = torch.eye(batch, dtype=torch.bool)
    mapping[:, :anchors] = True
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        chunk, i = divmod(row, batch)
        mask = torch.zeros(batch * TOKENS, dtype=torch.bool)
        for j in range(batch):
            if i == j:
                mask[j * TOKENS:(j + 1) * TOKENS] = True
            elif mapping[i, j]:
                mask[j * TOKENS:(j + 1) * TOKENS] = keep[j]
        rows = slice(chunk * batch, (chunk + 1) * batch)
        out[row] = softmax_attention(q[row], k[rows].flatten(0, 1)[mask], v[rows].flatten(0, 1)[mask])
    return out


def official_story(q, k, v, keep):
    """StoryDiffusion's low-VRAM ``write`` branch: image i over [sampled tokens of every other image
    of its half (their own subsets), all its own tokens]."""
    batch = keep.shape[0]
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        chunk, i = divmod(row, batch)
        base = chunk * batch
        others = [j for j in range(batch) if j != i]
        k_cat = torch.cat([k[base + j][keep[j]] for j in others] + [k[row]])
        v_cat = torch.cat([v[base + j][keep[j]] for j in others] + [v[row]])
        out[row] = softmax_attention(q[row], k_cat, v_cat)
    return out


def plain(q, k, v):
    return torch.stack([softmax_attention(q[r], k[r], v[r]) for r in range(q.shape[0])])


# -- SDSA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,anchors", [(4, 2), (5, 1), (4, 3), (3, 5), (1, 2)])
def test_sdsa_equals_the_official_boolean_index_computation(batch, anchors):
    chunks = 2
    q, k, v = qkv(chunks * batch, seed=batch + anchors)
    keep = random_masks(batch, seed=anchors)
    out = S.subject_driven_self_attention(q, k, v, HEADS, keep, anchors)
    expected = official_sdsa(q, k, v, keep, anchors)
    assert (out - expected).abs().max() < 1e-10
    if batch > 1:  # sharing changes every row that sees a foreign token
        assert (out - plain(q, k, v)).abs().max() > 1e-3


def test_sdsa_rows_use_their_own_chunk_and_anchors_see_each_other():
    batch, anchors = 4, 2
    q, k, v = qkv(2 * batch, seed=11)
    keep = torch.zeros(batch, TOKENS, dtype=torch.bool)
    keep[1, :8] = True  # only anchor 1 lends anything
    out = S.subject_driven_self_attention(q, k, v, HEADS, keep, anchors)
    for row in range(2 * batch):
        chunk, i = divmod(row, batch)
        lender = chunk * batch + 1
        if i == 1:  # anchor 1 sees nothing of anyone (anchor 0 keeps nothing)
            expected = softmax_attention(q[row], k[row], v[row])
        else:  # anchor 0 and the non-anchors see anchor 1's tokens, of the same chunk
            expected = softmax_attention(q[row], torch.cat([k[row], k[lender, :8]]), torch.cat([v[row], v[lender, :8]]))
        assert (out[row] - expected).abs().max() < 1e-10


def test_sdsa_with_no_subject_tokens_is_plain_self_attention():
    q, k, v = qkv(8, seed=2)
    keep = torch.zeros(4, TOKENS, dtype=torch.bool)
    out = S.subject_driven_self_attention(q, k, v, HEADS, keep, anchors=2)
    assert (out - plain(q, k, v)).abs().max() < 1e-12


def test_mask_dropout_one_keeps_nothing_and_gives_plain_self_attention():
    q, k, v = qkv(8, seed=3)
    masks = torch.ones(4, TOKENS, dtype=torch.bool)
    keep = S.keep_masks(masks, 1.0, torch.Generator().manual_seed(0))
    assert not keep.any()
    out = S.subject_driven_self_attention(q, k, v, HEADS, keep, anchors=2)
    assert (out - plain(q, k, v)).abs().max() < 1e-12


def test_mask_dropout_zero_keeps_every_subject_token():
    masks = random_masks(4, seed=4)
    keep = S.keep_masks(masks, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, masks)


def test_kept_fraction_is_one_minus_dropout_and_only_subject_tokens_are_kept():
    p, n = 0.3, 8 * 4096
    keep = S.keep_masks(torch.ones(8, 4096, dtype=torch.bool), p, torch.Generator().manual_seed(5))
    fraction = keep.float().mean().item()
    assert abs(fraction - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    masks = random_masks(8, seed=6, tokens=4096)
    kept = S.keep_masks(masks, p, torch.Generator().manual_seed(7))
    assert not (kept & ~masks).any()
    assert abs(kept.sum().item() / masks.sum().item() - (1 - p)) < 0.02


def test_keep_masks_follow_the_generator():
    masks = torch.ones(2, 256, dtype=torch.bool)
    gen = torch.Generator().manual_seed(9)
    first, second = S.keep_masks(masks, 0.5, gen), S.keep_masks(masks, 0.5, gen)
    assert not torch.equal(first, second)  # a fresh draw each call (each step)
    again = torch.Generator().manual_seed(9)
    assert torch.equal(S.keep_masks(masks, 0.5, again), first)
    # the official rule on the same stream: dropped where rand < p
    assert torch.equal(first, ~(torch.rand(2, 256, generator=torch.Generator().manual_seed(9)) < 0.5))


@pytest.mark.parametrize("batch,anchors,blocks", [(4, 2, 3), (6, 1, 2), (4, 3, 4), (3, 3, 3)])
def test_sdsa_is_one_attention_call_with_per_row_key_biases(batch, anchors, blocks):
    calls = []

    def spy(q, k, v, heads, mask=None):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(mask.shape)))
        return S.sdpa_attention(q, k, v, heads, mask=mask)

    q, k, v = qkv(2 * batch, seed=12, dtype=torch.float32)
    S.subject_driven_self_attention(q, k, v, HEADS, random_masks(batch), anchors, attention=spy)
    # keys: [own, anchors] when that is shorter than the whole chunk, else the chunk
    keys = blocks * TOKENS
    assert calls == [((2 * batch, TOKENS, INNER), (2 * batch, keys, INNER), (2 * batch, keys, INNER),
                      (2 * batch, 1, keys))]


def test_float16_bias_gives_the_same_result_as_removing_keys():
    q, k, v = qkv(8, seed=13, dtype=torch.float32)
    keep = random_masks(4, seed=14)
    out = S.subject_driven_self_attention(q.half(), k.half(), v.half(), HEADS, keep).double()
    expected = official_sdsa(q.double(), k.double(), v.double(), keep, 2)
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max() < 1e-2


def test_sdsa_rejects_a_mask_of_another_grid_or_batch():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="tokens"):
        S.subject_driven_self_attention(q, k, v, HEADS, torch.ones(4, TOKENS // 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunks of 3"):
        S.subject_driven_self_attention(q, k, v, HEADS, torch.ones(3, TOKENS, dtype=torch.bool))


def test_shared_attention_reads_nothing_on_the_host():
    q, k, v = qkv(8, seed=15, dtype=torch.float32)
    masks = random_masks(4)
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 2, 4, 4, generator=gen)
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    cpu = torch.device("cpu")
    assert count_host_syncs(lambda: S.subject_driven_self_attention(q, k, v, HEADS, masks), cpu) == 0
    assert count_host_syncs(lambda: S.keep_masks(masks, 0.5, gen), cpu) == 0
    assert count_host_syncs(lambda: S.subject_masks(maps, (8, 8), present), cpu) == 0
    keep = S.token_sharing_keep(4, TOKENS, 0.5, gen)
    assert count_host_syncs(lambda: S.consistent_self_attention(q, k, v, HEADS, keep), cpu) == 0
    # the counter does see the official formulation's boolean indexing
    with HostSyncCounter() as counter:
        official_sdsa(q, k, v, masks, 2)
    assert counter.total >= 8


# -- subject masks -----------------------------------------------------------------------------------

def reference_otsu(image):
    """skimage.filters.threshold_otsu when installed; else the same rule written out in numpy."""
    if _skimage_otsu is not None:
        return _skimage_otsu(image)
    flat = image.reshape(-1)
    if np.all(flat == flat[0]):
        return flat[0]
    counts, edges = np.histogram(flat, bins=256, range=(flat.min(), flat.max()))
    centres = (edges[:-1] + edges[1:]) / 2.0
    best, best_t = -1.0, 0
    for t in range(255):
        w1, w2 = counts[:t + 1].sum(), counts[t + 1:].sum()
        m1 = (counts[:t + 1] * centres[:t + 1]).sum() / w1
        m2 = (counts[t + 1:] * centres[t + 1:]).sum() / w2
        var = float(w1) * float(w2) * (m1 - m2) ** 2
        if var > best:
            best, best_t = var, t
    return centres[best_t]


def blob_maps(count, size, seed):
    """Attention-like maps: a few Gaussian blobs on a faint noisy floor."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    maps = []
    for _ in range(count):
        image = 0.002 * rng.random((size, size))
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
            image += rng.random() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        maps.append(image)
    return np.stack(maps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_otsu_threshold_equals_scikit_image(dtype):
    maps = blob_maps(48, 32, seed=0).astype(dtype)
    maps[5] = 0.25  # constant: skimage returns the value itself
    maps[6] = np.random.default_rng(1).random((32, 32))  # flat noise
    # integers 0..256: every value sits exactly on a bin edge (numpy puts it in the bin it opens)
    levels = np.concatenate([np.random.default_rng(2).normal(60, 25, 700),
                             np.random.default_rng(3).normal(190, 20, 322)])
    maps[7] = np.concatenate([[0, 256], np.clip(np.rint(levels), 0, 256)]).reshape(32, 32)
    thresholds = S.otsu_threshold(torch.from_numpy(maps.reshape(48, -1)))
    assert thresholds.dtype == torch.from_numpy(maps).dtype
    for i in range(48):
        expected = reference_otsu(maps[i])
        assert thresholds[i].item() == expected, i
        assert np.array_equal(maps[i].reshape(-1) > thresholds[i].numpy(), maps[i].reshape(-1) > expected)
    assert thresholds[5].item() == pytest.approx(0.25)
    assert not (torch.from_numpy(maps[5]) > thresholds[5]).any()


def test_subject_masks_resize_bilinearly_threshold_each_concept_and_or_them():
    maps = torch.from_numpy(blob_maps(6, 8, seed=2).astype(np.float32)).reshape(3, 2, 8, 8)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    masks = S.subject_masks(maps, (16, 12), present)
    assert masks.shape == (3, 16 * 12) and masks.dtype == torch.bool
    resized = F.interpolate(maps, size=(16, 12), mode="bilinear", align_corners=False).numpy()
    for b in range(3):
        expected = np.zeros(16 * 12, dtype=bool)
        for c in range(2):
            if present[b, c]:
                expected |= resized[b, c].reshape(-1) > reference_otsu(resized[b, c])
        assert np.array_equal(masks[b].numpy(), expected), b
    # a concept's blob survives into the union; an absent concept's does not
    blob = torch.zeros(1, 2, 8, 8)
    blob[0, 0, :3, :3] = 1.0
    blob[0, 1, 5:, 5:] = 1.0
    both = S.subject_masks(blob, (8, 8)).reshape(8, 8)
    assert both[0, 0] and both[7, 7] and not both[0, 7]
    only_first = S.subject_masks(blob, (8, 8), torch.tensor([[True, False]])).reshape(8, 8)
    assert only_first[0, 0] and not only_first[7, 7]
    assert not S.subject_masks(blob, (8, 8), torch.tensor([[False, False]])).any()


def test_map_window_equals_the_mean_of_the_last_20_steps():
    gen = torch.Generator().manual_seed(3)
    window = S.AttentionMapWindow()
    assert window.mean() is None
    history = []  # the official per-layer lists: one entry per layer and step
    for step in range(30):
        layer_maps = [torch.rand(2, 3, 4, 4, generator=gen) for _ in range(5)]
        for m in layer_maps:
            window.add(m)
        window.end_step()
        history.append(layer_maps)
        per_layer = [torch.stack([h[layer] for h in history][-20:]) for layer in range(5)]
        expected = torch.cat(per_layer).mean(dim=0)
        torch.testing.assert_close(window.mean(), expected, rtol=1e-6, atol=1e-6)
        assert len(window._steps) == min(step + 1, 20)
    window.end_step()  # a step that recorded nothing changes nothing
    torch.testing.assert_close(window.mean(), expected, rtol=1e-6, atol=1e-6)


# -- vanilla query mixing --------------------------------------------------------------------------------

def test_query_strength_for_50_steps_is_the_official_table():
    table = [S.query_strength(i, 50) for i in range(50)]
    for i in range(6):
        assert table[i] == pytest.approx(0.9 - 0.8 * i / 49, abs=1e-12)
    assert table[5] == pytest.approx(0.81836735, abs=1e-8)  # the official literal
    assert all(s is None for s in table[6:])


def test_query_strength_for_other_step_counts_keeps_the_official_end():
    assert [S.query_strength(i, 30) for i in range(5)] == pytest.approx(
        list(np.linspace(0.9, 0.9 - 4 / 49, 4)) + [None], abs=1e-12)
    assert S.query_strength(0, 8) == 0.9 and S.query_strength(1, 8) is None


def test_mix_queries_weights_the_vanilla_query_by_the_strength():
    q, q_vanilla = torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 3.0)
    assert torch.allclose(S.mix_queries(q, q_vanilla, 0.75), torch.full((1, 2, 4), 2.5))
    assert torch.equal(S.mix_queries(q, q_vanilla, 0.0), q)


# -- StoryDiffusion ------------------------------------------------------------------------------------

def test_consistent_self_attention_equals_the_storydiffusion_transcription():
    batch = 3
    q, k, v = qkv(2 * batch, seed=20)
    keep = S.token_sharing_keep(batch, TOKENS, 0.5, torch.Generator().manual_seed(21))
    out = S.consistent_self_attention(q, k, v, HEADS, keep)
    assert (out - official_story(q, k, v, keep)).abs().max() < 1e-10
    assert (out - plain(q, k, v)).abs().max() > 1e-3


def test_token_sharing_keep_is_rand_below_the_rate():
    gen = torch.Generator().manual_seed(22)
    keep = S.token_sharing_keep(8, 4096, 0.5, gen)
    assert abs(keep.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / (8 * 4096))
    assert torch.equal(keep, torch.rand(8, 4096, generator=torch.Generator().manual_seed(22)) < 0.5)
    assert not S.token_sharing_keep(2, 64, 0.0, gen).any()
    assert S.token_sharing_keep(2, 64, 1.0, gen).all()


def test_token_sharing_rate_by_grid():
    assert S.token_sharing_rate(32 * 32, 1024, 1024, sa32=0.3, sa64=0.7) == 0.3
    assert S.token_sharing_rate(64 * 64, 1024, 1024, sa32=0.3, sa64=0.7) == 0.7
    assert S.token_sharing_rate(24 * 42, 768, 1344, sa32=0.3, sa64=0.7) == 0.3
    assert S.token_sharing_rate(48 * 84, 768, 1344) == S.SA64 == 0.5


def test_consistent_attention_coin_is_the_apps_schedule():
    rng = random.Random(5)
    state = rng.getstate()
    assert S.consistent_attention_coin(0, rng) is False
    assert rng.getstate() == state  # step 0 draws nothing
    reference = random.Random(5)
    draws = [S.consistent_attention_coin(step, rng) for step in range(1, 40)]
    assert draws == [reference.random() > (0.3 if step < 20 else 0.1) for step in range(1, 40)]
    early = sum(S.consistent_attention_coin(5, rng) for _ in range(20000)) / 20000
    late = sum(S.consistent_attention_coin(25, rng) for _ in range(20000)) / 20000
    assert abs(early - 0.7) < 0.015 and abs(late - 0.9) < 0.01
