"""A Gaussian data distribution served as a real ComfyUI model whose denoiser is the exact E[x0 | x_t].

The latent is ``(4, 2, 2)`` (16 numbers) with x0 ~ N(mu, Sigma); ``diffusion_model`` is the closed-form
posterior mean, returned in the parameterisation of the model type (EPS, V or FLOW), so the host's
own sampling code (model_sampling, CFGGuider, samplers) runs unchanged around it.
"""

from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models

SHAPE = (4, 2, 2)
DIM = 16


def gaussian(seed: int = 0, correlation: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance with strong correlation between pixels (and channels)."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(DIM, generator=gen, dtype=torch.float64) * 0.5
    a = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    shared = torch.randn(DIM, 3, generator=gen, dtype=torch.float64)
    cov = (1 - correlation) * (a @ a.T) / DIM + correlation * (shared @ shared.T) / 3 + 0.02 * torch.eye(DIM)
    return mu, cov


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mu, cov) data in the host's sampler space."""

    def __init__(self, mu, cov, model_type):
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("cov", cov)
        self.model_type = model_type
        self.dtype = torch.float32

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        sigma = transformer_options["sigmas"].to(torch.float64).reshape(-1, 1)
        flat = xc.reshape(xc.shape[0], -1).to(torch.float64)
        eye = torch.eye(DIM, dtype=torch.float64)
        x = flat if self.model_type == comfy.model_base.ModelType.FLOW else flat * (sigma ** 2 + 1).sqrt()
        out = torch.empty_like(x)
        for value in sigma.unique():
            rows = (sigma == value).reshape(-1)
            s, c = value, (1 - value) if self.model_type == comfy.model_base.ModelType.FLOW else value * 0 + 1
            gain = c * self.cov @ torch.linalg.inv(c ** 2 * self.cov + s ** 2 * eye)
            x0 = self.mu + (x[rows] - c * self.mu) @ gain.T
            if self.model_type == comfy.model_base.ModelType.V_PREDICTION:
                out[rows] = (x[rows] / (s ** 2 + 1) - x0) * (s ** 2 + 1).sqrt() / s
            else:  # EPS and flow: denoised = x - out * sigma
                out[rows] = (x[rows] - x0) / s
        return out.reshape(xc.shape).to(xc.dtype)


def gaussian_model(model_type=comfy.model_base.ModelType.EPS, seed: int = 0):
    """(ModelPatcher, mu, cov): the analytic model, with an identity latent format."""
    mu, cov = gaussian(seed)
    config = comfy.supported_models.SD15({"disable_unet_model_creation": True, "in_channels": 4,
                                          "adm_in_channels": None})
    config.latent_format = comfy.latent_formats.LatentFormat()
    model = comfy.model_base.BaseModel(config, model_type=model_type)
    model.diffusion_model = GaussianDenoiser(mu, cov, model_type)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return patcher, mu, cov


def conditional(mu, cov, known_values, unknown):
    """Exact N(mean, cov) of the unknown coordinates given the known ones (boolean ``unknown``)."""
    k, u = ~unknown, unknown
    gain = cov[u][:, k] @ torch.linalg.inv(cov[k][:, k])
    mean = mu[u] + gain @ (known_values - mu[k])
    return mean, cov[u][:, u] - gain @ cov[k][:, u]


def w2_gaussian(m1, c1, m2, c2) -> float:
    """2-Wasserstein distance between two Gaussians."""
    def sqrtm(c):
        vals, vecs = torch.linalg.eigh(c)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    r = sqrtm(c2)
    cross = sqrtm(r @ c1 @ r)
    return float(((m1 - m2).square().sum() + torch.trace(c1 + c2 - 2 * cross)).clamp(min=0).sqrt())
