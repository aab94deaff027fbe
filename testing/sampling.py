"""What ComfyUI's KSampler node does with a MODEL and a LATENT, without the node, for tests and benchmarks.

One copy of ``nodes.common_ksampler``'s two calls (noise from the seed and the latent's ``batch_index``,
then ``comfy.sample.sample`` with the latent's ``noise_mask``), so every test samples the way a user's
KSampler does.
"""

from __future__ import annotations

import torch

import comfy.sample


def ksampler(model, latent, positive, negative, steps: int, cfg: float, sampler: str = "euler",
             scheduler: str = "normal", seed: int = 0, denoise: float = 1.0) -> torch.Tensor:
    """The sampled latent tensor. ``latent``: a LATENT dict or a bare tensor of samples."""
    if isinstance(latent, torch.Tensor):
        latent = {"samples": latent}
    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, samples,
                               denoise=denoise, noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)
