"""Gaussian-mixture data with a closed-form denoiser and closed-form inpainting answer, for particle samplers.

Four components ``N(m_c, tau^2 I)`` on a ``(4, 8, 8)`` latent (256 numbers); the left half of the
width (columns 0-3) is known. Components 0 and 1 have the same known half, so given a known half drawn
from either the exact conditional component weights are their priors renormalised: ``1/3, 2/3, 0, 0``.

- ``mixture``: components 2 and 3 differ from 0/1 in the known half by as much as in the generated half
  (norm 10): the known region tells them apart at the same noise levels as the generated half commits.
- ``mixture-hard``: components 2 and 3 differ from 0/1 in the known half by a norm of 2.5 only: the
  generated half commits to a component between sigma ~5 and ~1, the known half tells 0/1 from 2/3 only
  under ~1. Masked sampling and RePaint keep the priors' 2/3 on 0/1 and land at TV ~0.5.

The pure functions need torch only; ``mixture_model`` serves a problem as a real ComfyUI model (EPS, V or
flow), as ``analytic.gaussian_model`` does for the Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPE = (4, 8, 8)
DIM = 256
PRIORS = (1 / 6, 1 / 3, 1 / 4, 1 / 4)
EXACT_WEIGHTS = (1 / 3, 2 / 3, 0.0, 0.0)
TAU = 0.1


def known_mask() -> torch.Tensor:
    """Boolean (DIM,): True where the latent is known (the left half of every row of every channel)."""
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[..., : SHAPE[-1] // 2] = True
    return mask.reshape(-1)


def noise_mask(batch: int) -> torch.Tensor:
    """The LATENT's noise_mask, ComfyUI polarity (1 = generate): ``(batch, 1, 8, 8)``."""
    mask = torch.zeros(batch, 1, *SHAPE[1:])
    mask[..., SHAPE[-1] // 2:] = 1.0
    return mask


@dataclass(frozen=True)
class Mixture:
    priors: torch.Tensor  # (C,)
    means: torch.Tensor  # (C, DIM)
    tau: float


def mixture(hard: bool = True, seed: int = 0) -> Mixture:
    gen = torch.Generator().manual_seed(seed)
    known = known_mask()
    base = torch.randn(DIM, generator=gen, dtype=torch.float64) * 0.5
    means = base.repeat(4, 1)
    for c in range(4):  # the generated half: four well separated means (pairwise distance ~10)
        direction = torch.randn(int((~known).sum()), generator=gen, dtype=torch.float64)
        means[c, ~known] += 7.0 * direction / direction.norm()
    separation = 2.5 if hard else 10.0
    for c in (2, 3):  # the known half: 0 and 1 equal, 2 and 3 apart by `separation`
        direction = torch.randn(int(known.sum()), generator=gen, dtype=torch.float64)
        means[c, known] += separation * direction / direction.norm()
    return Mixture(torch.tensor(PRIORS, dtype=torch.float64), means, TAU)


def posterior_mean(mix: Mixture, x: torch.Tensor, sigma: float, flow: bool) -> torch.Tensor:
    """E[x0 | x] for ``x = a x0 + sigma eps`` (a = 1, or 1 - sigma for flow): rows ``(N, DIM)``, float64;
    ``sigma`` a number or one per row."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
    a = 1.0 - sigma if flow else torch.ones_like(sigma)
    var = a * a * mix.tau ** 2 + sigma ** 2  # (N or 1, 1, 1)
    centred = x[:, None, :] - a * mix.means[None]  # (N, C, DIM)
    logits = mix.priors.log()[None] - centred.square().sum(-1) / (2 * var[..., 0])
    resp = torch.softmax(logits, dim=1)
    per_component = mix.means[None] + (a * mix.tau ** 2 / var) * centred
    return (resp[..., None] * per_component).sum(1)


def exact_weights(mix: Mixture, known_values: torch.Tensor) -> torch.Tensor:
    """The conditional component weights given the known half (closed form)."""
    known = known_mask()
    logits = mix.priors.log() - (known_values[None] - mix.means[:, known]).square().sum(-1) / (2 * mix.tau ** 2)
    return torch.softmax(logits, dim=0)


def known_sample(mix: Mixture, component: int = 0, seed: int = 0) -> torch.Tensor:
    """A full latent (DIM,) drawn from ``component``; its known half is what the tests inpaint from."""
    gen = torch.Generator().manual_seed(seed)
    return mix.means[component] + mix.tau * torch.randn(DIM, generator=gen, dtype=torch.float64)


def components_of(mix: Mixture, samples: torch.Tensor) -> torch.Tensor:
    """The component each sample's generated half belongs to (nearest mean; the means are ~70 tau apart)."""
    generated = ~known_mask()
    distances = torch.cdist(samples.reshape(samples.shape[0], -1)[:, generated].double(), mix.means[:, generated])
    return distances.argmin(1)


def total_variation(mix: Mixture, samples: torch.Tensor, known_values: torch.Tensor) -> float:
    """TV between the samples' component frequencies and the exact conditional weights."""
    counts = torch.bincount(components_of(mix, samples), minlength=len(mix.priors)).double()
    return 0.5 * float((counts / counts.sum() - exact_weights(mix, known_values)).abs().sum())


def mixture_model(model_type=None, hard: bool = True, seed: int = 0):
    """(ModelPatcher, Mixture): the problem as a ComfyUI model with an identity latent format."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    model_type = comfy.model_base.ModelType.EPS if model_type is None else model_type
    mix = mixture(hard, seed)
    config = comfy.supported_models.SD15({"disable_unet_model_creation": True, "in_channels": 4,
                                          "adm_in_channels": None})
    config.latent_format = comfy.latent_formats.LatentFormat()
    model = comfy.model_base.BaseModel(config, model_type=model_type)
    model.diffusion_model = MixtureDenoiser(mix, model_type)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return patcher, mix


class MixtureDenoiser(torch.nn.Module):
    """Exact denoiser of the mixture in the host's sampler space, in the model type's parameterisation."""

    def __init__(self, mix: Mixture, model_type):
        super().__init__()
        self.mix = mix
        self.model_type = model_type
        self.dtype = torch.float32

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        import comfy.model_base

        types = comfy.model_base.ModelType
        flow = self.model_type == types.FLOW
        s = transformer_options["sigmas"].to(torch.float64).reshape(-1, 1)
        flat = xc.reshape(xc.shape[0], -1).to(torch.float64)
        s = s.repeat(flat.shape[0] // s.shape[0], 1)  # cond and uncond chunks in one call share the sigmas
        x = flat if flow else flat * (s * s + 1).sqrt()
        x0 = posterior_mean(self.mix, x, s.expand(x.shape[0], 1), flow)
        if self.model_type == types.V_PREDICTION:
            out = (x / (s * s + 1) - x0) * (s * s + 1).sqrt() / s
        else:  # EPS and flow: denoised = x - out * sigma
            out = (x - x0) / s
        return out.reshape(xc.shape).to(xc.dtype)
