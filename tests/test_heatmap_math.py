"""Token maps as masks and pictures (attention/heatmap.py) and the map arithmetic the nodes share
(attention/cross_attention.py: map sizes, conditional rows, prompts repeated to one length)."""

import pytest
import torch

from consistent_synthesis.attention import cross_attention as X
from consistent_synthesis.attention import heatmap as H


@pytest.mark.parametrize("value, rgb", [(0.0, (0.0, 0.0, 0.5)), (0.5, (0.5, 1.0, 0.5)), (1.0, (0.5, 0.0, 0.0)),
                                        (-3.0, (0.0, 0.0, 0.5)), (7.0, (0.5, 0.0, 0.0))])
def test_heatmap_is_the_jet_colour_map_clamped_to_0_1(value, rgb):
    assert H.heatmap(torch.full((1, 1, 1), value))[0, 0, 0].tolist() == list(rgb)


def test_the_mask_is_the_bilinear_upsampled_map_strictly_above_the_threshold():
    token_map = torch.tensor([[[0.0, 1.0], [0.25, 0.75]]])
    mask, colours = H.mask_and_heatmap(token_map, 4, 4, 0.5)
    up = torch.nn.functional.interpolate(token_map[:, None], size=(4, 4), mode="bilinear")[:, 0]
    assert torch.equal(mask, (up > 0.5).float())
    assert 0 < mask.mean() < 1
    assert torch.equal(colours, H.heatmap(up))
    constant = torch.full((1, 2, 2), 0.7)
    assert H.mask_and_heatmap(constant, 4, 4, 0.5)[0].eq(1).all()
    assert H.mask_and_heatmap(constant, 4, 4, 0.7)[0].eq(0).all()  # "above", not "at least"


def test_an_image_of_another_size_and_batch_is_resized_and_shared_under_the_heatmap():
    token_map = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(0))
    _, alone = H.mask_and_heatmap(token_map, 8, 8, 0.5)
    _, over = H.mask_and_heatmap(token_map, 8, 8, 0.5, image=torch.ones(1, 4, 4, 4))  # RGBA, half size, batch 1
    assert over.shape == (3, 8, 8, 3)
    torch.testing.assert_close(over, 0.5 + 0.5 * alone)


@pytest.mark.parametrize("latent, maps", [((4, 4), (1, 1)), ((5, 4), (2, 1)), ((64, 64), (16, 16)),
                                          ((127, 75), (32, 19)), ((128, 128), (32, 32))])
def test_maps_are_the_latent_over_4_rounded_up(latent, maps):
    assert X.map_size(*latent) == maps


@pytest.mark.parametrize("latent, too_small", [((1, 1), True), ((4, 4), True), ((5, 4), False), ((4, 5), False),
                                               ((2, 64), False)])
def test_a_latent_is_too_small_for_maps_exactly_when_they_are_one_position(latent, too_small):
    assert X.maps_too_small(*latent) is too_small
    assert X.SMALLEST_LATENT_SIDE == 5 and not X.maps_too_small(X.SMALLEST_LATENT_SIDE, 1)


def test_conditional_rows_are_the_chunk_marked_0():
    maps = torch.arange(6.0).reshape(6, 1, 1)
    assert X.conditional_rows(maps, [1, 0]).flatten().tolist() == [3.0, 4.0, 5.0]
    assert X.conditional_rows(maps, [0, 1]).flatten().tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(X.conditional_rows(maps, [0]), maps)
    assert X.conditional_rows(maps, [1]) is None


def test_prompts_are_repeated_whole_to_their_least_common_length():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 77, 8, generator=gen), torch.randn(1, 154, 8, generator=gen)
    ra, rb = X.repeat_to_common_length([a, b])
    assert torch.equal(ra, torch.cat([a, a], dim=1)) and torch.equal(rb, b)
    c = torch.randn(1, 6, 8, generator=gen)
    assert [t.shape[1] for t in X.repeat_to_common_length([c, torch.randn(1, 4, 8, generator=gen)])] == [12, 12]
