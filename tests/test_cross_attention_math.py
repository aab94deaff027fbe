"""Cross-attention map math (attention/cross_attention.py) against its definition and the official aggregation."""

import pytest
import torch

from consistent_synthesis.attention import cross_attention as X

HEADS, DIM_HEAD = 4, 8


def qk(b=2, n=16, m=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, HEADS * DIM_HEAD, generator=gen),
            torch.randn(b, m, HEADS * DIM_HEAD, generator=gen))


def reference_attention(q, k, heads):
    """Per head softmax(q k^T / sqrt(d)) over the tokens, averaged over heads, one head at a time."""
    b, n, inner = q.shape
    d = inner // heads
    per_head = []
    for h in range(heads):
        qh = q[..., h * d:(h + 1) * d].double()
        kh = k[..., h * d:(h + 1) * d].double()
        per_head.append(torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1))
    return torch.stack(per_head).mean(0)


def official_aggregate(cross_attns, idx):
    """TencentARC/MasaCtrl ``aggregate_cross_attn_map`` (restated): stack, mean over layers, pick and
    sum the tokens, min-max per image."""
    attn_map = torch.stack(cross_attns, dim=1).mean(1)
    res = int(attn_map.shape[-2] ** 0.5)
    attn_map = attn_map.reshape(-1, res, res, attn_map.shape[-1])
    image = attn_map[..., idx]
    if isinstance(idx, list):
        image = image.sum(-1)
    image_min = image.min(dim=1, keepdim=True)[0].min(dim=2, keepdim=True)[0]
    image_max = image.max(dim=1, keepdim=True)[0].max(dim=2, keepdim=True)[0]
    return (image - image_min) / (image_max - image_min)


def test_maps_are_distributions_over_the_prompt_tokens():
    q, k = qk(m=77)
    maps = X.token_attention(q, k, HEADS)
    assert maps.shape == (2, 16, 77) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 16), rtol=0, atol=1e-6)
    assert (maps >= 0).all()


def test_maps_equal_the_per_head_softmax_averaged_over_heads():
    q, k = qk()
    torch.testing.assert_close(X.token_attention(q, k, HEADS).double(), reference_attention(q, k, HEADS),
                               rtol=1e-6, atol=1e-7)


def test_head_chunks_give_the_same_maps(monkeypatch):
    q, k = qk(n=64)
    whole = X.token_attention(q, k, HEADS)
    monkeypatch.setattr(X, "_SCORE_BUDGET", 2 * 64 * 7)  # one head at a time
    torch.testing.assert_close(X.token_attention(q, k, HEADS), whole, rtol=1e-6, atol=1e-7)


def test_half_precision_inputs_give_float32_maps():
    q, k = qk()
    maps = X.token_attention(q.half(), k.half(), HEADS)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, X.token_attention(q.half().float(), k.half().float(), HEADS))


def test_a_token_whose_key_is_a_direction_is_highest_where_queries_align_with_it():
    # Keys: token 3 is 4 * e0 in every head, the others are 0. Queries: a column of the 4 x 4 image
    # points along e0, the rest against it. Token 3's map is then highest exactly on that column.
    n, m, h, w = 16, 6, 4, 4
    direction = torch.zeros(DIM_HEAD)
    direction[0] = 4.0
    k = torch.zeros(1, m, HEADS * DIM_HEAD)
    k[0, 3] = direction.repeat(HEADS)
    q = -direction.repeat(HEADS).expand(1, n, -1).clone()
    column = torch.zeros(h, w, dtype=torch.bool)
    column[:, 2] = True
    q[0, column.flatten()] = direction.repeat(HEADS)
    maps = X.token_attention(q, k, HEADS)
    image = X.token_map([maps], X.selection([[3]], m), h, w)[0]
    assert torch.equal(image == 1, column)
    assert torch.equal(image == 0, ~column)
    assert maps[0, column.flatten()].argmax(-1).eq(3).all()


def test_token_map_equals_the_official_aggregation():
    layers = [X.token_attention(*qk(b=3, n=16, m=9, seed=s), HEADS) for s in range(3)]
    for idx in ([1], [2, 5], [1, 2, 3]):
        ours = X.token_map(layers, X.selection([idx] * 3, 9), 4, 4)
        torch.testing.assert_close(ours, official_aggregate(layers, idx), rtol=1e-6, atol=1e-7)
    # one index, as the official code's default (an int, no sum): exactly equal
    assert torch.equal(X.token_map(layers, X.selection([[1]] * 3, 9), 4, 4), official_aggregate(layers, 1))


def test_each_row_sums_its_own_tokens():
    layers = [X.token_attention(*qk(b=2, n=16, m=9, seed=s), HEADS) for s in range(2)]
    both = X.token_map(layers, X.selection([[1, 2], [4]], 9), 4, 4)
    torch.testing.assert_close(both[0], official_aggregate([l[:1] for l in layers], [1, 2])[0])
    assert torch.equal(both[1], official_aggregate([l[1:] for l in layers], 4)[0])


def test_token_map_is_normalised_per_image():
    layers = [X.token_attention(*qk(b=3, n=16, m=9), HEADS)]
    image = X.token_map(layers, X.selection([[1, 2]] * 3, 9), 4, 4)
    assert torch.equal(image.amin(dim=(1, 2)), torch.zeros(3))
    torch.testing.assert_close(image.amax(dim=(1, 2)), torch.ones(3))


def test_a_constant_map_gives_zeros_where_the_official_code_gives_nan():
    uniform = torch.full((2, 16, 5), 0.2)
    ours = X.token_map([uniform], X.selection([[1], [2]], 5), 4, 4)
    assert torch.equal(ours, torch.zeros(2, 4, 4))
    official = official_aggregate([uniform], 1)
    assert official.isnan().all()
    assert torch.equal(official > 0.1, ours > 0.1)  # the official threshold reads both as background


def test_token_map_checks_the_resolution():
    with pytest.raises(ValueError, match="16 positions, not 3 x 5"):
        X.token_map([torch.rand(1, 16, 5)], X.selection([[1]], 5), 3, 5)


def test_non_square_maps_keep_rows_and_columns():
    maps = torch.zeros(1, 6, 3)
    maps[0, :, 1] = torch.arange(6.0)
    image = X.token_map([maps], X.selection([[1]], 3), 2, 3)
    torch.testing.assert_close(image[0], torch.arange(6.0).reshape(2, 3) / 5)


def test_selection_is_zero_one_per_row():
    s = X.selection([[0, 2], [1]], 4)
    assert torch.equal(s, torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]]))
    with pytest.raises(ValueError, match="outside 0..3"):
        X.selection([[4]], 4)


def test_indices_past_the_prompt_name_the_input_and_the_valid_range():
    X.check_token_indices([0, 76], 77, "Node", "target_tokens")
    with pytest.raises(ValueError, match=r"^Node: input 'target_tokens': token indices \[77\] .*0 to 76"):
        X.check_token_indices([1, 77], 77, "Node", "target_tokens")


def test_a_rows_own_token_count_is_the_period_of_its_repetition():
    gen = torch.Generator().manual_seed(0)
    chunk, two_chunks = torch.randn(77, 8, generator=gen), torch.randn(154, 8, generator=gen)
    assert X.own_token_count(two_chunks) == 154  # a long prompt is its own length
    assert X.own_token_count(chunk.repeat(2, 1)) == 77  # a short prompt repeated to the batch's length
    assert X.own_token_count(chunk.repeat(6, 1)) == 77
    assert X.own_token_count(two_chunks.repeat(3, 1)) == 154
    almost = chunk.repeat(2, 1)
    almost[100, 3] += 1e-3  # one value differs: not a repetition
    assert X.own_token_count(almost) == 154


def test_the_error_names_which_prompt_the_indices_are_past():
    with pytest.raises(ValueError, match=r"^Node: input 'target_tokens': token indices \[80\] are past the target "
                                         r"prompt of batch row 2, which has 77 tokens"):
        X.check_token_indices([1, 80], 77, "Node", "target_tokens", "the target prompt of batch row 2")
