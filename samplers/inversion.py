"""Deterministic (DDIM) inversion of a clean latent along a run's noise levels, in pure torch.

Real-image editing in MasaCtrl (Cao et al., ICCV 2023, Sec. 4.3 and the official ``invert``)
runs the deterministic sampler backwards: from the clean latent x_0 up to the noise x_T that
the same sampler turns back into x_0, keeping the latent of every level on the way (the
"intermediate latents" that drive the source branch while the targets are edited).

In the host's sampler space (x = x0 + sigma * eps for EPS and V models, x = (1 - sigma) * x0 +
sigma * eps for flow models) with the denoiser D(x, sigma) = x0_hat, one move up from sigma to
sigma_next is

    d      = (x - D(x, s_eval)) / s_eval              # eps for EPS/V, the velocity for flow
    x_next = x + (sigma_next - sigma) * d

which for EPS and V is the DDIM step run upward, x_next = x0_hat + sigma_next * eps_hat with
x0_hat = x - sigma * eps_hat (the official ``next_step``: pred_x0 of the level left, then the
direction to the next), and for flow models Euler on the velocity. ``s_eval`` is the level the
move reaches (sigma_next), as the official code does (its ``invert`` evaluates the UNet at the
next, higher timestep): the first move then starts at the clean latent itself, x_1 = x_0 + sigma_1
* eps(x_0, sigma_1), with no evaluation at sigma 0 and no small starting offset (the host's
FlipSigmas replaces the 0 by 1e-4 instead). The model sees the latent of the level it leaves under
the label of the level it reaches; that is the DDIM-inversion approximation eps(x_i) ~ eps(x_i+1),
whose error falls with the step size, so invert-then-sample reconstructs x_0 better as the steps
grow.

Nothing here knows ComfyUI: ``denoise(x, sigma)`` is the host's denoiser (cfg included) in
sampler space; the node converts units.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma of shape (batch,)) -> x0_hat


def invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM inversion of ``x0`` (sampler space) along ascending ``sigmas`` (sigmas[0] = 0).

    Returns ``(noise, path)``: the latent at the last level and ``path``, of shape
    ``(len(sigmas),) + x0.shape``, the latent at every level, ``path[0] = x0``.
    ``callback(i, x0_hat, x)`` is called after move i.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("inversion needs at least two noise levels")
    path = [x0]
    x = x0
    ones = x0.new_ones(x0.shape[0])
    for i in range(len(sigmas) - 1):
        # 1. the denoiser at the level this move reaches (official next_step)
        sigma_next = sigmas[i + 1]
        x0_hat = denoise(x, sigma_next * ones)
        eps = (x - x0_hat) / sigma_next
        # 2. x_next = x0_hat + sigma_next * eps (DDIM upward; Euler on the velocity for flow)
        x = x + (sigma_next - sigmas[i]) * eps
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
