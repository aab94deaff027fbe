"""The run checks in the sampler room: an inversion's levels and source row (samplers/inversion.py),
a noise mask's aspect against the latent (samplers/repaint.py)."""

import pytest
import torch

from consistent_synthesis.samplers import inversion, repaint


def test_a_run_matches_an_inversion_when_its_sigmas_are_the_inversions_reversed():
    ascending = torch.tensor([0.0, 0.5, 2.0, 14.6])
    assert inversion.same_levels(ascending.flip(0), ascending)
    assert inversion.same_levels(ascending.flip(0) * (1 + 1e-5), ascending)  # float32 rounding
    assert not inversion.same_levels(ascending.flip(0) * (1 + 1e-3), ascending)
    assert not inversion.same_levels(ascending[1:].flip(0), ascending)  # a level dropped


def test_the_source_row_is_the_inverted_noise_the_clean_image_or_neither():
    gen = torch.Generator().manual_seed(0)
    noise, clean = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    other = torch.randn(1, 4, 8, 8, generator=gen)
    assert inversion.source_row(torch.cat([noise, other]), noise, clean) == "inverted"
    assert inversion.source_row(torch.cat([clean, noise]), noise, clean) == "reference"
    assert inversion.source_row(torch.cat([other, noise]), noise, clean) == "other image"
    assert inversion.source_row(torch.zeros(2, 4, 8, 6), noise, clean) == "other size"
    assert inversion.source_row(torch.zeros(2, 16, 8, 8), noise, clean) == "other size"


@pytest.mark.parametrize("mask, latent, fits", [
    ((64, 64), (64, 64), True), ((512, 512), (64, 64), True), ((513, 512), (64, 64), True),
    ((519, 512), (64, 64), True), ((1016, 600), (127, 75), True), ((0, 5), (64, 64), True),
    ((512, 584), (64, 64), False), ((64, 66), (64, 64), False), ((128, 512), (64, 64), False),
])
def test_a_noise_mask_fits_a_latent_of_its_aspect_with_one_latent_pixel_of_slack(mask, latent, fits):
    assert repaint.mask_fits_latent(mask, latent) is fits
