"""Particle inpainting: SMCDiff (Trippe et al. 2022, Alg. 1) over a sigma schedule, with no ComfyUI import.

K particles per latent run the reverse chain together as one model batch (particle p of latent b is
row ``p * B + b``, so the host's per-item conditioning tiles onto them). The known region follows one
forward-noised trajectory ``y_0 .. y_N`` of the known latent, shared by a latent's particles; before
every step each particle's known region is set to ``y_i``, and its weight is multiplied by the density
the step's Gaussian kernel gives ``y_{i+1}`` (the known region's transition agreeing with the
trajectory). When the effective sample size falls under ``resample_threshold * K`` (and the next level
is under ``resample_below``), the particles are resampled systematically; the result is one particle
per latent drawn by the final weights, and every particle sorted by weight.

Noise levels, the forward process and the mask are as in ``samplers/repaint.py`` (its helpers build the
known trajectory): ``x = a(sigma) x0 + sigma s eps`` with ``a = 1`` (EPS, V) or ``1 - sigma`` (flow);
mask 1 = generate, 0 = known. Everything per step stays on the device: the weights, the effective
sample size, the decision to resample and the indices (no ``.item()``, no data-dependent shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import repaint

KERNELS = ("euler_ancestral", "ddpm")
MAX_PARTICLES = 64


@dataclass(frozen=True)
class Settings:
    """One run's particle settings, validated once where they enter (the node)."""

    particles: int = 8
    resample_threshold: float = 0.0  # ESS as a fraction of the particles; 0 = only the final weighted draw
    resample_below: float = float("inf")  # in-run resampling only at steps that end under this sigma
    kernel: str = "euler_ancestral"

    def __post_init__(self):
        if not 1 <= self.particles <= MAX_PARTICLES:
            raise ValueError(f"particles must be 1 to {MAX_PARTICLES}, got {self.particles}")
        if not 0.0 <= self.resample_threshold <= 1.0:  # also false for NaN
            raise ValueError(f"resample_threshold must be 0 to 1, got {self.resample_threshold}")
        if not self.resample_below >= 0.0:
            raise ValueError(f"resample_below must be a sigma of 0 or more, got {self.resample_below}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")


def _alpha(sigma: float, flow: bool) -> float:
    return 1.0 - sigma if flow else 1.0


def step_coefficients(sigma: float, sigma_next: float, flow: bool, noise_scale: float = 1.0,
                      kernel: str = "euler_ancestral") -> tuple[float, float, float]:
    """``(c_x, c_0, std)`` of the Gaussian step ``x' = c_x x + c_0 x0_hat + std z`` from ``sigma`` to ``sigma_next``.

    ``ddpm``: the posterior q(x' | x, x0) of the forward process (DDPM, Ho et al. 2020, Eq. 7) in
    sampler space: with ``r = a / a'``, ``v = b^2 - r^2 b'^2`` (b = sigma s), ``c_x = r b'^2 / b^2``,
    ``c_0 = a' v / b^2``, variance ``b'^2 v / b^2``. ``euler_ancestral``: k-diffusion's step with
    eta 1 as the host runs it (for EPS/V models the same as ``ddpm`` when s = 1; for flow models the
    host's ``sample_euler_ancestral_RF``). Host floats in, host floats out: no device read.
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next <= 0.0:
        return 0.0, 1.0, 0.0
    if kernel == "ddpm":
        a, a_next = _alpha(sigma, flow), _alpha(sigma_next, flow)
        b2, b2_next = (sigma * noise_scale) ** 2, (sigma_next * noise_scale) ** 2
        r = a / a_next
        v = max(b2 - r * r * b2_next, 0.0)
        return r * b2_next / b2, a_next * v / b2, (b2_next * v / b2) ** 0.5
    ratio = sigma_next / sigma
    sigma_down = sigma_next * ratio
    if not flow:
        return ratio * ratio, 1.0 - ratio * ratio, max(sigma_next ** 2 - sigma_down ** 2, 0.0) ** 0.5
    alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - sigma_down
    renoise = max(sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2, 0.0) ** 0.5
    scale = alpha_next / alpha_down
    return scale * sigma_down / sigma, scale * (1.0 - sigma_down / sigma), renoise


def weight_variance(sigma: float, std: float, flow: bool, noise_scale: float = 1.0) -> float:
    """Variance of the known region's transition density in the weight. The step's own variance; on the
    last step to sigma 0, which is deterministic, the x0 uncertainty of the level it leaves,
    ``(sigma s / a)^2`` (an upper bound on the posterior variance), so the last weight stays finite."""
    if std > 0.0:
        return std * std
    a = max(_alpha(sigma, flow), 1e-6)
    return max((sigma * noise_scale / a) ** 2, 1e-12)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """``1 / sum(w^2)`` of the normalised weights, per latent: ``(K, B) -> (B,)``, from K (equal) to 1."""
    w = torch.softmax(log_weights, dim=0)
    return 1.0 / w.square().sum(0)


def systematic_indices(log_weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Systematic resampling (Kitagawa 1996): ancestors ``(K, B)`` for positions ``(k + u_b) / K``.

    Particle j is picked ``floor(K w_j)`` or ``ceil(K w_j)`` times; found by a sorted search of the
    cumulative weights on the device.
    """
    count = log_weights.shape[0]
    cdf = torch.softmax(log_weights, dim=0).cumsum(0).T.contiguous()  # (B, K)
    steps = torch.arange(count, device=log_weights.device, dtype=cdf.dtype)
    positions = (steps[None, :] + uniform.to(cdf.dtype)[:, None]) / count  # (B, K)
    return torch.searchsorted(cdf, positions, right=True).clamp_(max=count - 1).T


def weighted_choice(log_weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One particle per latent, particle j with probability w_j: ``(K, B)`` and ``u (B,)`` -> ``(1, B)``."""
    cdf = torch.softmax(log_weights, dim=0).cumsum(0).T.contiguous()  # (B, K)
    chosen = torch.searchsorted(cdf, uniform.to(cdf.dtype)[:, None], right=True)
    return chosen.clamp_(max=log_weights.shape[0] - 1).T


def rows_of(ancestors: torch.Tensor) -> torch.Tensor:
    """Batch rows ``ancestor * B + b`` for ancestors ``(K, B)``, flattened in row order ``p * B + b``."""
    latents = ancestors.shape[1]
    return (ancestors * latents + torch.arange(latents, device=ancestors.device)).reshape(-1)


def known_trajectory(known: torch.Tensor, levels: list[float], noise: Callable[[], torch.Tensor], flow: bool,
                     noise_scale: float = 1.0) -> list[torch.Tensor]:
    """``y_i`` at every level ``levels[i]``: one Markov chain of the forward process from the known latent
    (y_N ~ q(y | x0), then each level up one exact forward transition), as SMCDiff draws it."""
    trajectory = [repaint.noised_known(known, levels[-1], noise(), flow, noise_scale)]
    for sigma_from, sigma_to in zip(levels[::-1], levels[-2::-1]):
        trajectory.append(repaint.forward_transition(trajectory[-1], sigma_from, sigma_to, noise(), flow,
                                                     noise_scale))
    return trajectory[::-1]


@dataclass
class Result:
    """``draw``: one particle per latent (B rows), drawn by the final weights. ``particles``: every
    particle, latent by latent, heaviest first (row ``b * K + rank``). ``log_weights``: theirs, (B, K),
    normalised. ``resampled``: how often each latent's particles were resampled during the run (B,)."""

    draw: torch.Tensor
    particles: torch.Tensor
    log_weights: torch.Tensor
    resampled: torch.Tensor


def particle_inpaint(denoise: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, known: torch.Tensor,
                     generate: torch.Tensor, sigmas: torch.Tensor, settings: Settings, flow: bool,
                     normal: Callable[[tuple], torch.Tensor], uniform: Callable[[tuple], torch.Tensor],
                     noise_scale: float = 1.0, callback: Callable | None = None,
                     trace: list | None = None) -> Result:
    """Run SMCDiff from ``x`` (K * B rows at ``sigmas[0]``) down to ``sigmas[-1]``.

    ``denoise(x, i)``: the model's x0 for all K * B rows at ``sigmas[i]``. ``known``: the known latent
    (B rows); ``generate``: 1 where the model generates, 0 where the latent is known (binary, B rows or
    broadcastable). ``normal(shape)`` / ``uniform(shape)``: the run's randomness on x's device.
    ``callback(i, x0_hat, x)`` after every evaluation; ``trace`` collects per step the device tensors
    ``(ess, resampled_now or None, log_weights)`` before any resampling, for diagnostics, without reading them.
    """
    count = settings.particles
    latents = known.shape[0]
    if x.shape[0] != count * latents:
        raise ValueError(f"x has {x.shape[0]} rows, expected particles * latents = {count * latents}")
    levels = sigmas.tolist()  # one copy per run: the step coefficients are host numbers
    steps = len(levels) - 1
    dims = tuple(range(1, x.ndim))
    trajectory = known_trajectory(known.to(x), levels, lambda: normal(known.shape), flow, noise_scale)
    log_weights = torch.zeros(count, latents, dtype=torch.float64, device=x.device)
    resampled = torch.zeros(latents, dtype=torch.int64, device=x.device)
    particles_first = torch.arange(count, device=x.device)[:, None].expand(count, latents)

    def tiled(t):  # a latent's tensor for each of its particles, rows p * B + b
        return t.repeat((count,) + (1,) * (t.ndim - 1))

    generate = generate.to(x)
    generate = tiled(generate) if generate.shape[0] > 1 else generate
    keep = 1.0 - generate

    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        # 1. the known region of every particle at this level of the shared trajectory (Alg. 1, line 4)
        x = x * generate + tiled(trajectory[i]) * keep
        x0 = denoise(x, i)
        c_x, c_0, std = step_coefficients(sigma, sigma_next, flow, noise_scale, settings.kernel)
        # 2. weight: the kernel's density of the trajectory's next known value (line 5)
        residual = (tiled(trajectory[i + 1] - c_x * trajectory[i]) - c_0 * x0) * keep
        increment = residual.square().sum(dims, dtype=torch.float64) / (-2.0 * weight_variance(
            sigma, std, flow, noise_scale))
        log_weights = log_weights + increment.reshape(count, latents)
        log_weights = log_weights - log_weights.max(0, keepdim=True).values
        # 3. resample where the ESS is low (line 6), decided per latent on the device
        if settings.resample_threshold > 0.0 and i < steps - 1 and sigma_next < settings.resample_below:
            ess = effective_sample_size(log_weights)
            before = log_weights
            now = ess < settings.resample_threshold * count
            ancestors = torch.where(now[None, :], systematic_indices(log_weights, uniform((latents,))),
                                    particles_first)
            rows = rows_of(ancestors)
            x, x0 = x.index_select(0, rows), x0.index_select(0, rows)
            log_weights = torch.where(now[None, :], torch.zeros_like(log_weights), log_weights)
            resampled = resampled + now.to(resampled.dtype)
            if trace is not None:
                trace.append((ess, now, before))
        elif trace is not None:
            trace.append((effective_sample_size(log_weights), None, log_weights))
        if callback is not None:
            callback(i, x0, x)
        # 4. propose the next level (line 7); the known region is replaced at the next step
        x = c_x * x + c_0 * x0
        if std > 0.0:
            x = x + std * normal(x.shape)
    x = x * generate + tiled(trajectory[-1]) * keep  # the known region at the last level, exact at sigma 0
    # 5. one particle per latent by the final weights, always drawn
    chosen = weighted_choice(log_weights, uniform((latents,)))
    draw = x.index_select(0, rows_of(chosen))
    order = torch.argsort(log_weights, dim=0, descending=True)  # (K, B)
    by_latent = (order * latents + torch.arange(latents, device=x.device)).T.reshape(-1)
    return Result(draw, x.index_select(0, by_latent), torch.gather(torch.log_softmax(log_weights, 0), 0, order).T,
                  resampled)
