"""RePaint resampling (Lugmayr et al., CVPR 2022) over a sigma schedule, with no ComfyUI import.

Noise levels are sigmas in sampler space: ``x = x0 + sigma * s * eps`` for EPS and V-prediction
models, ``x = (1 - sigma) * x0 + sigma * s * eps`` for flow models, where ``s`` is the model's noise
scale (1 for all but a few newer flow models; ComfyUI's ``noise_scaling`` applies the same one).
``forward_process`` reads which of the two a model is, and its ``s``, off the host's own
``noise_scaling``. A run's schedule is the list of sigma indices the sampler visits, from 0
(``sigmas[0]``, the noisiest) to ``steps`` (``sigmas[-1]``). Mask convention as ComfyUI:
1 = generate, 0 = known.
"""

from __future__ import annotations

from typing import Callable

import torch

NoiseFn = Callable[[], torch.Tensor]


def jump_schedule(steps: int, jump_length: int = 10, jump_n_sample: int = 10,
                  start: float = 0.0, end: float = 1.0) -> list[int]:
    """The paper's resampling schedule (Alg. 1 with jumps, Sec. 4.2) as sigma indices.

    Every ``jump_length`` levels the sampler goes back up ``jump_length`` levels and down again,
    ``jump_n_sample - 1`` times; all moves are unit moves. With ``start=0, end=1`` this is the
    official ``get_schedule_jump(steps, 1, jump_length, jump_n_sample)`` with time ``t``
    mapped to index ``steps - 1 - t``. ``start``/``end`` (fractions of the run, 0 = the noisiest
    end) keep only the jumps whose span lies inside that window.
    """
    if steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError("steps, jump_length and jump_n_sample must be at least 1")
    low, high = start * steps, end * steps
    remaining = {t: jump_n_sample - 1 for t in range(0, steps - jump_length, jump_length)}
    t, times = steps, []
    while t >= 1:
        t -= 1
        times.append(t)
        index = steps - 1 - t
        if remaining.get(t, 0) > 0 and index - jump_length >= low and index <= high:
            remaining[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    times.append(-1)
    return [steps - 1 - t for t in times]


def model_steps(schedule: list[int]) -> int:
    """Denoising moves in a schedule: one sampler step, and one model evaluation for
    single-evaluation samplers, each."""
    return sum(1 for a, b in zip(schedule, schedule[1:]) if b > a)


def segments(schedule: list[int]) -> list[tuple[int, int]]:
    """Split a schedule into monotone runs ``(from, to)``: ``to > from`` denoises, ``to < from`` jumps back."""
    runs, begin = [], schedule[0]
    for prev, cur, nxt in zip(schedule, schedule[1:], schedule[2:] + [None]):
        if nxt is None or (nxt > cur) != (cur > prev):
            runs.append((begin, cur))
            begin = cur
    return runs


def mask_fits_latent(mask_size: tuple[int, int], latent_size: tuple[int, int]) -> bool:
    """Whether a noise mask of ``(h, w)`` has the aspect ratio of a latent of ``(h, w)``, at any scale
    (the latent's size, the image's size, ...), so the host's resize does not stretch it.

    Odd image sizes give a latent of floor(image / 8), so a mask drawn to the latent's height may miss
    its width by up to 7/8 of a latent pixel (and the other way round): one latent pixel of slack on
    each axis. An empty mask (a side of 0) is not this function's to refuse: it fits.
    """
    mask_h, mask_w = (int(n) for n in mask_size)
    latent_h, latent_w = (int(n) for n in latent_size)
    if mask_h < 1 or mask_w < 1:
        return True
    return abs(mask_w * latent_h / mask_h - latent_w) <= 1.0 and abs(mask_h * latent_w / mask_w - latent_h) <= 1.0


def forward_process(noise_scaling: Callable, probe: tuple[float, float] = (0.25, 0.5)) -> tuple[bool, float]:
    """``(flow, noise_scale)`` of the marginal ``q(x_sigma | x0) = N(alpha x0, (sigma s)^2)`` that
    ``noise_scaling(sigma, noise, x0)`` (ComfyUI's ``model_sampling.noise_scaling``) draws from.

    Read off the function itself at two sigmas, so the answer follows the model's actual
    parameterisation (its class hierarchy can mislead: newer image-to-image model types subclass
    the flow type but do not add noise at all) and its noise scale. ``alpha = 1`` is the EPS/V
    family, ``alpha = 1 - sigma`` the flow family; anything else raises ``ValueError``.
    """
    sigma = torch.tensor(probe, dtype=torch.float64)
    zeros, ones = torch.zeros_like(sigma), torch.ones_like(sigma)
    alpha = noise_scaling(sigma.clone(), zeros.clone(), ones.clone()).tolist()
    beta = noise_scaling(sigma.clone(), ones.clone(), zeros.clone()).tolist()
    scales = [b / p for b, p in zip(beta, probe)]
    noise_scale = scales[0]

    def close(a, b):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))

    described = ", ".join(f"x = {a:.4g}*x0 + {b:.4g}*eps at sigma {p}" for a, b, p in zip(alpha, beta, probe))
    if not (noise_scale > 0 and close(scales[1], noise_scale)):
        raise ValueError(f"its noising adds no noise proportional to sigma ({described})")
    if all(close(a, 1.0) for a in alpha):
        return False, noise_scale
    if all(close(a, 1.0 - p) for a, p in zip(alpha, probe)):
        return True, noise_scale
    raise ValueError(f"its noising is neither x0 + sigma*eps nor (1 - sigma)*x0 + sigma*eps ({described})")


def noised_known(x0: torch.Tensor, sigma, noise: torch.Tensor, flow: bool, noise_scale: float = 1.0) -> torch.Tensor:
    """A draw from q(x_sigma | x0) given standard normal ``noise`` (paper Eq. 8, known region),
    computed as ComfyUI's ``noise_scaling`` computes it (so equal noise gives equal bits)."""
    if noise_scale != 1.0:
        noise = noise_scale * noise
    if flow:
        return (1.0 - sigma) * x0 + sigma * noise
    return x0 + sigma * noise


def forward_transition(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor, flow: bool,
                       noise_scale: float = 1.0) -> torch.Tensor:
    """A draw from q(x_{sigma_to} | x_{sigma_from}) for ``sigma_to >= sigma_from``: the jump back.

    EPS/V: add independent noise of variance ``s^2 (sigma_to^2 - sigma_from^2)``. Flow: scale by
    ``a = (1 - sigma_to) / (1 - sigma_from)`` and add noise of variance
    ``s^2 (sigma_to^2 - a^2 sigma_from^2)``; both keep ``x = mean(x0) + sigma_to * s * eps`` exact.
    The sigmas are host numbers (Python floats), so a jump reads nothing back from the device.
    """
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if sigma_to < sigma_from:
        raise ValueError(f"a forward transition goes up in noise, not from {sigma_from} to {sigma_to}")
    if flow:
        if sigma_from >= 1.0:
            raise ValueError("a flow model has no forward transition from sigma 1 (pure noise)")
        a = (1.0 - sigma_to) / (1.0 - sigma_from)
        return a * x + noise_scale * max(sigma_to ** 2 - (a * sigma_from) ** 2, 0.0) ** 0.5 * noise
    return x + noise_scale * max(sigma_to ** 2 - sigma_from ** 2, 0.0) ** 0.5 * noise


def blend_known(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, sigma, noise: torch.Tensor,
                flow: bool, noise_scale: float = 1.0) -> torch.Tensor:
    """``x`` where the mask is 1, a fresh draw of the known latent at ``sigma`` where it is 0 (Eq. 8)."""
    return x * mask + noised_known(x0, sigma, noise, flow, noise_scale) * (1.0 - mask)


def repaint(denoise: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], x: torch.Tensor,
            sigmas: torch.Tensor, schedule: list[int], noise: NoiseFn, flow: bool,
            noise_scale: float = 1.0) -> torch.Tensor:
    """Run ``schedule`` from ``x`` at ``sigmas[schedule[0]]`` down to ``sigmas[schedule[-1]]``.

    ``denoise(x, segment_sigmas, segment_number)`` runs the inner sampler down a descending
    segment (``segments(schedule)[segment_number]``; it re-draws the known region before every
    model call, see ``blend_known``); each jump back is one exact forward transition with fresh
    ``noise()`` (composing the unit moves of the schedule, a Markov chain of Gaussians, gives the
    same distribution). The sigmas are copied to the host once per run for the jumps.
    """
    levels = sigmas.tolist()
    for number, (begin, stop) in enumerate(segments(schedule)):
        if stop > begin:
            x = denoise(x, sigmas[begin:stop + 1], number)
        else:
            x = forward_transition(x, levels[begin], levels[stop], noise(), flow, noise_scale)
    return x
