"""DDIM inversion (samplers/inversion.py), with no ComfyUI: the step, the path lookup, the row drive."""

import pytest
import torch

from consistent_synthesis.samplers import inversion as I
from sync_counter import HostSyncCounter


def linear_denoiser(mean=0.3, var=0.5):
    """The exact denoiser of N(mean, var) data per element: mean + var / (var + sigma^2) * (x - mean)."""
    return lambda x, sigma: mean + var / (var + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mean)


def test_each_move_is_ddim_upward_evaluated_at_the_level_it_reaches():
    denoise = linear_denoiser()
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([0.0, 0.3, 1.2, 5.0], dtype=torch.float64)
    noise, path = I.invert(denoise, x0, sigmas)
    assert path.shape == (4, 2, 4, 3, 3) and torch.equal(path[0], x0) and torch.equal(path[-1], noise)
    for i in range(3):
        s, s_next = sigmas[i], sigmas[i + 1]
        eps = (path[i] - denoise(path[i], s_next.expand(2))) / s_next  # eps_hat at the level reached
        x0_hat = path[i] - s * eps  # the official next_step's pred_x0, from the level left
        torch.testing.assert_close(path[i + 1], x0_hat + s_next * eps)  # DDIM: x0_hat + sigma_next * eps_hat
    # the first move starts at the clean latent, sigma 0: x1 = x0 + sigma1 * eps(x0, sigma1)
    eps0 = (x0 - denoise(x0, sigmas[1].expand(2))) / sigmas[1]
    torch.testing.assert_close(path[1], x0 + sigmas[1] * eps0)


def test_inversion_is_the_euler_sampler_run_backwards_to_first_order():
    """Sampling down with Euler from the inverted noise comes back to x0, better as the steps grow."""
    denoise = linear_denoiser()
    x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for steps in (10, 40, 160):
        sigmas = torch.linspace(0, 3, steps + 1, dtype=torch.float64)
        x, _ = I.invert(denoise, x0, sigmas)
        down = sigmas.flip(0)
        for i in range(steps):
            d = (x - denoise(x, down[i].expand(1))) / down[i]
            x = x + (down[i + 1] - down[i]) * d
        errors.append(float((x - x0).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < errors[0] / 8


def test_start_noise_makes_the_sampler_start_at_the_given_latent():
    start = torch.randn(3, 4, 2, 2)
    latent = torch.randn(3, 4, 2, 2)
    sigma = torch.tensor(7.0)

    def eps_scaling(sigma, noise, latent_image, max_denoise=False):
        return noise * ((1 + sigma ** 2) ** 0.5 if max_denoise else sigma) + latent_image

    def flow_scaling(sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1 - sigma) * latent_image

    for scaling, s in ((eps_scaling, sigma), (flow_scaling, torch.tensor(0.8))):
        for max_denoise in (False, True):
            n = I.start_noise(scaling, s, start, latent, max_denoise)
            torch.testing.assert_close(scaling(s, n, latent, max_denoise), start)


def test_path_latent_is_the_levels_latent_bit_for_bit_and_interpolates_between_levels():
    sigmas = torch.tensor([0.0, 0.5, 2.0, 9.0])
    path = torch.randn(4, 4, 3, 3)
    for i in range(4):
        assert torch.equal(I.path_latent(path, sigmas, sigmas[i:i + 1]), path[i])
    torch.testing.assert_close(I.path_latent(path, sigmas, torch.tensor([1.25])), (path[1] + path[2]) / 2)
    assert torch.equal(I.path_latent(path, sigmas, torch.tensor([20.0])), path[3])


def test_drive_rows_sets_the_source_row_of_every_chunk_only():
    x = torch.randn(6, 4, 2, 2)  # 2 chunks (cond, uncond) x 3 latents
    latent = torch.randn(4, 2, 2)
    out = I.drive_rows(x, latent, batch=3)
    assert torch.equal(out[0], latent) and torch.equal(out[3], latent)
    keep = [1, 2, 4, 5]
    assert torch.equal(out[keep], x[keep]) and not torch.equal(x[0], latent)


def test_path_lookup_and_row_drive_read_nothing_on_the_host():
    sigmas = torch.tensor([0.0, 0.5, 2.0, 9.0])
    path = torch.randn(4, 4, 8, 8)
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 2.0)
    with HostSyncCounter() as counter:
        I.drive_rows(x, I.path_latent(path, sigmas, t[:1]), batch=2)
    assert counter.total == 0, counter.where
