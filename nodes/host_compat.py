"""Calls of host functions whose signature differs between the ComfyUI versions we support.

Each helper calls the host the way the installed version expects, so the same pack runs on
ComfyUI 0.3.x and on the newest releases (docs/compatibility.md lists what was checked).
"""

from __future__ import annotations

import inspect

import comfy.ldm.modules.attention as host_attention
import comfy.sample

# Keys a newer host puts in a LATENT to say how its pixels map to latent cells; they describe the
# input latent and are dropped from a sampler's output, as the host's own KSampler does.
DOWNSCALE_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def fix_empty_latent_channels(model, latent: dict):
    """``comfy.sample.fix_empty_latent_channels`` for the LATENT dict ``latent``.

    ComfyUI 0.3.x takes ``(model, latent_image)``; newer hosts also take the latent's
    ``downscale_ratio_spacial`` (and ``downscale_ratio_temporal``), which their KSampler passes on.
    We pass those the installed function accepts.
    """
    fix = comfy.sample.fix_empty_latent_channels
    parameters = inspect.signature(fix).parameters
    extra = {key: latent.get(key) for key in DOWNSCALE_KEYS if key in parameters}
    return fix(model, latent["samples"], **extra)


def sampled_latent(latent: dict, samples) -> dict:
    """The output LATENT of a sampler: the input's keys with new samples, less the downscale keys."""
    out = {k: v for k, v in latent.items() if k not in DOWNSCALE_KEYS}
    out["samples"] = samples
    return out


def optimized_attention(extra_options: dict, preferred=None):
    """ComfyUI's optimized attention (SDPA, xformers, ...) for one patched layer, as
    ``attention(q, k, v, heads, mask=None)``.

    Newer hosts give each attention module a per-layer backend choice (``comfy_attention``, passed
    as ``preferred_attention``); 0.3.x has none. It is forwarded where given, so the user's choice
    holds in patched layers too; a bias goes to the host's masked variant.
    """
    kwargs = dict(attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
    if preferred is not None:
        kwargs["preferred_attention"] = preferred

    def attention(q, k, v, heads, mask=None):
        if mask is None:
            return host_attention.optimized_attention(q, k, v, heads, **kwargs)
        return host_attention.optimized_attention_masked(q, k, v, heads, mask, **kwargs)
    return attention
