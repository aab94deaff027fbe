"""Deterministic (DDIM) inversion of a clean latent along a run's noise levels, in pure torch.

Real-image editing in MasaCtrl (Cao et al., ICCV 2023, Sec. 4.3 and the official ``invert``)
runs the deterministic sampler backwards: from the clean latent x_0 up to the noise x_T that
the same sampler turns back into x_0, keeping the latent of every level on the way (the
"intermediate latents" that drive the source branch while the targets are edited).

The step is the official one. ``invert`` feeds the UNet the latent of the level it *leaves*, as
that latent is at that level (the VP latent x_t = x / sqrt(1 + sigma^2)), with the timestep of the
level it *reaches*, then takes ``next_step``: pred_x0 from the level left, the direction to the
next. In the host's sampler space (x = x0 + sigma * eps for EPS and V models) that is

    x_in   = x * c_in(sigma) / c_in(sigma_next)      # = x * sqrt(1 + sigma_next^2) / sqrt(1 + sigma^2)
    eps    = (x_in - D(x_in, sigma_next)) / sigma_next
    x_next = x + (sigma_next - sigma) * eps          # = x0_hat + sigma_next * eps, x0_hat = x - sigma * eps

where ``c_in`` is the model's input scaling (``input_scale``): the host's denoiser scales x_in by
c_in(sigma_next), so the network sees x * c_in(sigma), the VP latent of the level left. Flow models
(x = (1 - sigma) * x0 + sigma * eps) have no input scaling (c_in = 1): the move is Euler on the
velocity at (x, sigma_next), which is the same rule. The first move starts at the clean latent
itself (sigma 0, c_in = 1): x_1 = x_0 + sigma_1 * eps(x_0 as the network input, sigma_1), with no
small starting offset (the host's FlipSigmas replaces the 0 by 1e-4 instead).

Why this step: it is the paper's, and the most accurate of the candidates. Invert-then-sample on
the closed-form Gaussian model (EPS, SD1.5 sigmas, normal scheduler; tests/test_inversion_host.py)
reconstructs the latent with these relative errors:

    steps | official step (this one) | denoiser at the level left | denoiser at (x, sigma_next)
    10    | 0.178                    | 0.217                      | 0.374
    25    | 0.080                    | 0.104                      | 0.200
    50    | 0.041                    | 0.058                      | 0.113
    100   | 0.020                    | 0.031                      | 0.060

(the last column is the step this module took before: the network saw x * c_in(sigma_next), the
latent of the level left scaled as if it were already at the level reached).

Nothing here knows ComfyUI: ``denoise(x, sigma)`` is the host's denoiser (cfg included) in
sampler space and ``input_scale(sigma)`` its input scaling; the node supplies both.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma of shape (batch,)) -> x0_hat
InputScale = Callable[[torch.Tensor], torch.Tensor]  # sigma of shape (1,) -> the model's c_in(sigma)


def invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           input_scale: InputScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM inversion of ``x0`` (sampler space) along ascending ``sigmas`` (sigmas[0] = 0).

    ``input_scale`` is the model's input scaling c_in(sigma) (EPS and V: 1 / sqrt(1 + sigma^2));
    None means none (flow models). Returns ``(noise, path)``: the latent at the last level and
    ``path``, of shape ``(len(sigmas),) + x0.shape``, the latent at every level, ``path[0] = x0``.
    ``callback(i, x0_hat, x)`` is called after move i.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("inversion needs at least two noise levels")
    path = [x0]
    x = x0
    ones = x0.new_ones(x0.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. the latent of the level left, labelled with the level reached (official invert)
        x_in = x
        if input_scale is not None:
            x_in = x * (input_scale(sigma.reshape(1)) / input_scale(sigma_next.reshape(1))).reshape(()).to(x.dtype)
        eps = (x_in - denoise(x_in, sigma_next * ones)) / sigma_next
        # 2. next_step: x_next = x0_hat + sigma_next * eps, x0_hat = x - sigma * eps
        x0_hat = x - sigma * eps
        x = x + (sigma_next - sigma) * eps
        path.append(x)
        if callback is not None:
            callback(i, x0_hat, x)
    return x, torch.stack(path)


def start_noise(noise_scaling: Callable, sigma: torch.Tensor, start: torch.Tensor, latent_image: torch.Tensor,
                max_denoise: bool) -> torch.Tensor:
    """The noise that makes a sampler start at ``start``: ``noise_scaling(sigma, n, latent_image)`` equals
    ``start`` (up to rounding) for the returned ``n``.

    ``noise_scaling`` (the host's ``model_sampling.noise_scaling``) is affine in the noise,
    ``a * n + b(latent_image)``, so ``n = (start - b) / a``.
    """
    zero = torch.zeros_like(latent_image)
    offset = noise_scaling(sigma, zero, latent_image, max_denoise)
    gain = noise_scaling(sigma, torch.ones_like(latent_image), zero, max_denoise)
    return (start - offset) / gain


def path_latent(path: torch.Tensor, sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The path's latent at noise level ``sigma`` (a 1-element device tensor), without a host sync.

    At a level of ``sigmas`` (ascending) it is that level's latent, bit for bit; between two levels
    (samplers that evaluate at midpoints, e.g. dpmpp_2s) the two neighbours linearly interpolated
    in sigma; outside the range the nearest end. Returns ``path``'s entry shape.
    """
    n = sigmas.shape[0]
    sigma = sigma.reshape(1).to(sigmas.dtype)
    hi = torch.searchsorted(sigmas, sigma).clamp(1, n - 1)
    lo = hi - 1
    s_lo, s_hi = sigmas.index_select(0, lo), sigmas.index_select(0, hi)
    gap = s_hi - s_lo
    w = ((sigma - s_lo) / torch.where(gap > 0, gap, torch.ones_like(gap))).clamp(0, 1)
    w = w.reshape((1,) * path[0].ndim).to(path.dtype)
    return (path.index_select(0, lo)[0] * (1 - w) + path.index_select(0, hi)[0] * w)


def drive_rows(x: torch.Tensor, latent: torch.Tensor, batch: int, index: int = 0) -> torch.Tensor:
    """``x`` (chunk-major: each cond/uncond chunk holds the whole latent batch of ``batch`` rows in
    order) with row ``index`` of every chunk set to ``latent`` (one row). A new tensor."""
    chunks = x.shape[0] // batch
    out = x.clone()
    out.view((chunks, batch) + tuple(x.shape[1:]))[:, index] = latent.to(x.dtype)
    return out


def same_levels(run: torch.Tensor, ascending: torch.Tensor) -> bool:
    """Whether a run's sigmas (descending) are an inversion's ``ascending`` sigmas reversed (within
    float32 rounding). Reads the device once: call it once per run."""
    run = run.detach().float().cpu()
    expected = ascending.float().flip(0)
    return run.shape == expected.shape and torch.allclose(run, expected, rtol=1e-4, atol=1e-6)


def source_row(latent_image: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor) -> str:
    """What row 0 of a sampled latent batch is, for an inversion whose noise is ``noise`` and clean
    latent ``clean``: ``"inverted"`` (the noise), ``"reference"`` (the clean image), ``"other size"``
    (another channel count or size) or ``"other image"``. Compares values: once per run."""
    if latent_image.shape[1:] != noise.shape[1:]:
        return "other size"
    row = latent_image[:1].cpu()
    if torch.equal(row, noise.to(row.dtype)):
        return "inverted"
    if torch.equal(row, clean.to(row.dtype)):
        return "reference"
    return "other image"
