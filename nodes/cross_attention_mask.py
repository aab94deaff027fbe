"""CrossAttentionMask: the mask of where words of the prompt land, from one UNet call.

The seed project's "Cross Attention Map" method: noise the latent to a point of the schedule,
call the UNet once on the prompt, and read the words' cross-attention maps (latent/4 layers,
averaged over layers, the words' tokens summed, min-max normalised: the official MasaCtrl
aggregation). The mask is 1 where that map is above the threshold. The calls are recorded by
attn2 replacements on a clone; the user's model is unchanged and the UNet output unused.
"""

from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from ..attention import cross_attention, heatmap
from . import checks, cross_attention_maps, host_compat, prompt_tokens

NODE = "CrossAttentionMask"


def _one_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A "sampler" that evaluates the denoiser once at ``sigmas[0]`` and returns its x0."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def _sigma(model, noise_level: float) -> float:
    model_sampling = model.get_model_object("model_sampling")
    if noise_level >= 1.0:
        return float(model_sampling.sigma_max)
    return float(model_sampling.percent_to_sigma(1.0 - noise_level))


def record_maps(model, conditioning, latent: torch.Tensor, noise_level: float, seed: int) -> list[torch.Tensor]:
    """The conditional rows' latent/4 token maps ``(b, n, m)`` of each layer, from one UNet call
    on ``latent`` noised to ``noise_level`` of the schedule (cfg 1: no unconditional pass)."""
    maps: list[torch.Tensor] = []

    def on_maps(layer_maps: torch.Tensor, extra_options: dict) -> None:
        rows = cross_attention.conditional_rows(layer_maps, extra_options["cond_or_uncond"])
        if rows is not None:
            maps.append(rows)

    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    diffusion_model = patched.get_model_object("diffusion_model")
    for key in cross_attention_maps.cross_attention_layers(diffusion_model):
        previous = existing.get(key, existing.get(key[:2]))
        preferred = getattr(cross_attention_maps.attn2_module(diffusion_model, key), "comfy_attention", None)
        patched.set_model_attn2_replace(cross_attention_maps.recording_attn2(on_maps, previous, preferred), *key)

    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = torch.tensor([_sigma(model, noise_level), 0.0])
    with torch.no_grad():  # the server runs nodes without autograd; direct callers get the same
        comfy.sample.sample_custom(patched, noise, 1.0, comfy.samplers.KSAMPLER(_one_call), sigmas,
                                   conditioning, conditioning, latent, disable_pbar=True, seed=seed)
    return maps


def check_model_and_latent(model, latent: dict) -> None:
    """The node's checks of ``model`` and ``latent`` beyond their types: a latent of this model, a UNet
    with cross-attention, maps of more than one position."""
    checks.latent_for_model(NODE, "latent", latent, model)
    if not cross_attention_maps.cross_attention_layers(model.get_model_object("diffusion_model")):
        raise checks.error(NODE, "model", "this model has no UNet cross-attention layers; use an SD1.x, SD2.x or "
                           "SDXL checkpoint.")
    if cross_attention.maps_too_small(*latent["samples"].shape[-2:]):
        raise checks.error(NODE, "latent", cross_attention_maps.too_small_message(latent["samples"].shape,
                                                                                 "where the words are"))


def word_map(model, clip, text: str, words: str, latent: dict, noise_level: float, seed: int) -> torch.Tensor:
    """The words' normalised map of each image of the LATENT ``latent``, ``(b, ceil(h/4), ceil(w/4))``
    (inputs checked by ``check_model_and_latent``)."""
    map_h, map_w = cross_attention.map_size(*latent["samples"].shape[-2:])
    indices = prompt_tokens.token_indices(clip, text, words, node=NODE)
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    samples = host_compat.fix_empty_latent_channels(model, latent)
    maps = record_maps(model, conditioning, samples, noise_level, seed)
    if not maps:
        raise checks.error(NODE, "latent", f"no cross-attention layer ran at latent/4 for a latent of "
                           f"{tuple(samples.shape[-2:])}; use a larger latent.")
    b, _, m = maps[0].shape
    cross_attention.check_token_indices(indices, m, NODE, "words")
    return cross_attention.token_map(maps, cross_attention.selection([indices] * b, m, maps[0].device),
                                     map_h, map_w)


class CrossAttentionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Cross Attention Mask",
            category="consistent synthesis/cross-attention",
            description=("Where words of the prompt are in an image: the latent is noised to noise_level, "
                         "the UNet called once on the prompt, and the words' cross-attention maps (latent/4 "
                         "layers, averaged, min-max normalised) thresholded. The mask is at image size, "
                         "upsampled bilinearly before the threshold. The model itself is not changed."),
            inputs=[
                io.Model.Input("model", tooltip="The UNet model (SD1.x, SD2.x, SDXL) whose cross-attention is read."),
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint; encodes the prompt and finds the words."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt that describes the image (it should name the words)."),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words of the prompt whose region to mask, e.g. 'hand'."),
                io.Latent.Input("latent", tooltip="The image as a latent: a generated latent or a VAE-encoded "
                                "image."),
                io.Float.Input("noise_level", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="How far into the noise schedule the latent is noised before the UNet "
                                       "call (1 = pure noise, small = almost the clean image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise added to the latent."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="The mask is 1 where the normalised map is above this (0-1)."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional: the decoded image, to draw the heatmap over it."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="1 where the words attend above the threshold, "
                               "at image size (latent x 8)."),
                io.Image.Output(display_name="heatmap", tooltip="The words' map in colour (blue low, red high), "
                                "over the image when one is connected."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, text, words, latent, noise_level, seed, threshold, image=None) -> io.NodeOutput:
        checks.inputs(cls, locals())  # noise_level and threshold: within their 0-1 ranges
        check_model_and_latent(model, latent)
        token_map = word_map(model, clip, text, words, latent, noise_level, seed)
        height, width = (side * cross_attention_maps.VAE_SCALE for side in latent["samples"].shape[-2:])
        mask, colours = heatmap.mask_and_heatmap(token_map, height, width, threshold, image)
        return io.NodeOutput(mask.cpu(), colours.cpu())
