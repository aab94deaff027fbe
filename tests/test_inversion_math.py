"""DDIM inversion (samplers/inversion.py), with no ComfyUI: the step, the path lookup, the row drive."""

import pytest
import torch

from consistent_synthesis.samplers import inversion as I
from sync_counter import HostSyncCounter


def linear_denoiser(mean=0.3, var=0.5):
    """The exact denoiser of N(mean, var) data per element: mean + var / (var + sigma^2) * (x - mean)."""
    return lambda x, sigma: mean + var / (var + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mean)


def vp_input_scale(sigma):
    """c_in of EPS and V models: the network sees x / sqrt(1 + sigma^2)."""
    return 1 / (1 + sigma ** 2).sqrt()


def official_next_step(denoise, x, sigma, sigma_next):
    """MasaCtrl's ``invert`` move written in VP units: the network gets the VP latent of the level
    left with the timestep of the level reached, then ``next_step`` (alphas_cumprod = 1 / (1 + sigma^2))."""
    a_t, a_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    x_vp = x * a_t.sqrt()
    x_in = x_vp / a_next.sqrt()  # the sampler-space input whose VP latent at sigma_next is x_vp
    eps = (x_in - denoise(x_in, sigma_next.expand(x.shape[0]))) / sigma_next
    pred_x0 = (x_vp - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x_next_vp = a_next.sqrt() * pred_x0 + (1 - a_next).sqrt() * eps
    return x_next_vp / a_next.sqrt()


def test_each_move_is_the_official_step_the_latent_of_the_level_left_at_the_timestep_reached():
    denoise = linear_denoiser()
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([0.0, 0.3, 1.2, 5.0], dtype=torch.float64)
    noise, path = I.invert(denoise, x0, sigmas, input_scale=vp_input_scale)
    assert path.shape == (4, 2, 4, 3, 3) and torch.equal(path[0], x0) and torch.equal(path[-1], noise)
    for i in range(3):
        torch.testing.assert_close(path[i + 1], official_next_step(denoise, path[i], sigmas[i], sigmas[i + 1]))
    # the first move starts at the clean latent: the network sees x0 itself, labelled sigma_1
    x_in = x0 * (1 + sigmas[1] ** 2).sqrt()
    eps0 = (x_in - denoise(x_in, sigmas[1].expand(2))) / sigmas[1]
    torch.testing.assert_close(path[1], x0 + sigmas[1] * eps0)
    # and it is not the denoiser at (x, sigma_next), the step this module took before
    eps_old = (x0 - denoise(x0, sigmas[1].expand(2))) / sigmas[1]
    assert not torch.allclose(path[1], x0 + sigmas[1] * eps_old, rtol=1e-3, atol=1e-3)


def test_without_input_scaling_each_move_is_euler_on_the_velocity_at_the_level_reached():
    """Flow models: no input scaling, x_next = x + (sigma_next - sigma) * v(x, sigma_next)."""
    denoise = linear_denoiser()
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=torch.float64)
    _, path = I.invert(denoise, x0, sigmas)
    for i in range(3):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = (path[i] - denoise(path[i], s_next.expand(2))) / s_next
        torch.testing.assert_close(path[i + 1], path[i] + (s_next - s) * v)


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
