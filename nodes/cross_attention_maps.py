"""Recording cross-attention maps from a ComfyUI UNet through attn2 replacements.

The maps are kept at one resolution for every model, latent/4 (the official MasaCtrl code's
16 x 16 at 512 px on SD1.5; 32 x 32 on SDXL at 1024 px, where the official code finds no
16 x 16 layer). The recorder never changes what a cross-attention layer returns.
"""

from __future__ import annotations

from typing import Callable

import torch

import comfy.ldm.modules.attention as host_attention

from ..attention.cross_attention import SMALLEST_LATENT_SIDE, map_size, token_attention
from .unet_layers import LayerKey, self_attention_layers, transformer_block

OnMaps = Callable[[torch.Tensor, dict], None]
VAE_SCALE = 8  # latent -> image pixels for SD1.x, SD2.x and SDXL


def map_resolution(extra_options: dict) -> tuple[int, int]:
    """The ``(h, w)`` of the latent/4 maps for this UNet call, from ``extra_options["original_shape"]``
    (the latent, ``(b, c, h, w)``): ``cross_attention.map_size``."""
    h, w = extra_options["original_shape"][-2:]
    return map_size(h, w)


def too_small_message(latent_shape, what: str) -> str:
    """Why a latent this small has no usable map (``maps_too_small``); ``what`` is what the maps would show."""
    h, w = latent_shape[-2:]
    map_h, map_w = map_size(h, w)
    side = SMALLEST_LATENT_SIDE
    return (f"a {w * VAE_SCALE}x{h * VAE_SCALE} px image ({w}x{h} latent) is too small: its cross-attention maps "
            f"(latent/4) are {map_w}x{map_h}, one position, which cannot show {what}. Use an image of at least "
            f"{side * VAE_SCALE} px on one side (a latent of {side}, maps of 2 positions); 512 px gives the "
            "official code's 16x16 maps.")


def cross_attention_layers(diffusion_model) -> list[LayerKey]:
    """The ``(block_name, block_id, transformer_index)`` keys of every transformer block; the
    blocks that hold attn1 hold attn2, so these are ``self_attention_layers``' keys."""
    return self_attention_layers(diffusion_model)


def attn2_module(diffusion_model, key: LayerKey):
    """The cross-attention module of layer ``key`` (from ``cross_attention_layers``)."""
    return transformer_block(diffusion_model, key).attn2


class _RecordingAttn2:
    """attn2 replacement: hands the latent/4 layers' token maps to ``on_maps``, returns the
    layer's own output (the earlier replacement's, or the host's attention)."""

    def __init__(self, on_maps: OnMaps, previous=None, preferred=None):
        self.on_maps = on_maps
        self.previous = previous
        self.preferred = preferred  # newer hosts' per-layer attention backend choice

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; the closure is immutable

    def __call__(self, q, k, v, extra_options):
        if list(extra_options["activations_shape"][-2:]) == list(map_resolution(extra_options)):
            self.on_maps(token_attention(q, k, extra_options["n_heads"]), extra_options)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        kwargs = dict(attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        if self.preferred is not None:
            kwargs["preferred_attention"] = self.preferred
        return host_attention.optimized_attention(q, k, v, extra_options["n_heads"], **kwargs)


def recording_attn2(on_maps: OnMaps, previous=None, preferred=None) -> _RecordingAttn2:
    """An attn2 replacement for ``ModelPatcher.set_model_attn2_replace`` that calls
    ``on_maps(token_attention(q, k, heads), extra_options)`` in the latent/4 layers.

    ``previous``: the replacement already set for that layer, if any (chained, so the output is
    whatever it returns). ``preferred``: the module's ``comfy_attention`` on hosts that have it.
    """
    return _RecordingAttn2(on_maps, previous, preferred)


def record_maps_in_every_layer(model_patcher, on_maps: OnMaps) -> None:
    """Set a recorder (``recording_attn2``) on every cross-attention layer of ``model_patcher`` (a
    clone the caller owns), each chained to the replacement already set for that layer, if any."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    existing = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key in cross_attention_layers(diffusion_model):
        previous = existing.get(key, existing.get(key[:2]))
        preferred = getattr(attn2_module(diffusion_model, key), "comfy_attention", None)
        model_patcher.set_model_attn2_replace(recording_attn2(on_maps, previous, preferred), *key)
