"""CrossAttentionMask: the mask of where words of the prompt land, from one UNet call.

The seed project's "Cross Attention Map" method: noise the latent to a point of the schedule,
call the UNet once on the prompt, and read the words' cross-attention maps (latent/4 layers,
averaged over layers, the words' tokens summed, min-max normalised: the official MasaCtrl
aggregation). The mask is 1 where that map is above the threshold. The calls are recorded by
attn2 replacements on a clone; the user's model is unchanged and the UNet output unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from ..attention import cross_attention
from . import checks, cross_attention_maps, prompt_tokens

NODE = "CrossAttentionMask"
VAE_SCALE = 8  # latent -> image pixels for SD1.x, SD2.x and SDXL


def _error(input_name: str, message: str) -> ValueError:
    return ValueError(f"{NODE}: input '{input_name}': {message}")


def heatmap(values: torch.Tensor) -> torch.Tensor:
    """``(b, h, w)`` values in 0-1 -> ``(b, h, w, 3)`` RGB in 0-1, the "jet" colour map
    (0 blue, 0.5 green-yellow, 1 red)."""
    x = values.clamp(0, 1)[..., None]
    centres = torch.tensor([3.0, 2.0, 1.0], dtype=x.dtype, device=x.device)  # r, g, b
    return (1.5 - (4 * x - centres).abs()).clamp(0, 1)


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
        cond_or_uncond = extra_options["cond_or_uncond"]
        if 0 not in cond_or_uncond:
            return
        per_chunk = layer_maps.shape[0] // len(cond_or_uncond)
        c = cond_or_uncond.index(0)
        maps.append(layer_maps[c * per_chunk:(c + 1) * per_chunk])

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


def word_map(model, clip, text: str, words: str, latent: torch.Tensor, noise_level: float,
             seed: int) -> torch.Tensor:
    """The words' normalised map of each latent image, ``(b, ceil(h/4), ceil(w/4))``."""
    if not cross_attention_maps.cross_attention_layers(model.get_model_object("diffusion_model")):
        raise _error("model", "this model has no UNet cross-attention layers; use an SD1.x, SD2.x or SDXL "
                              "checkpoint.")
    map_h, map_w = cross_attention_maps.map_resolution({"original_shape": list(latent.shape)})
    if map_h * map_w < 2:
        h, w = latent.shape[-2:]
        raise _error("latent", f"a {w * VAE_SCALE}x{h * VAE_SCALE} px image ({w}x{h} latent) is too small: "
                               f"its cross-attention maps (latent/4) are {map_w}x{map_h}, one position, which "
                               f"cannot show where the words are. Use an image of at least {5 * VAE_SCALE} px on "
                               f"one side (a latent of 5, maps of 2 positions); 512 px gives the official code's "
                               f"16x16 maps.")
    indices = prompt_tokens.token_indices(clip, text, words, node=NODE)
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    maps = record_maps(model, conditioning, latent, noise_level, seed)
    if not maps:
        raise _error("latent", f"no cross-attention layer ran at latent/4 for a latent of "
                               f"{tuple(latent.shape[-2:])}; use a larger latent.")
    b, _, m = maps[0].shape
    cross_attention.check_token_indices(indices, m, NODE, "words")
    return cross_attention.token_map(maps, cross_attention.selection([indices] * b, m, maps[0].device),
                                     map_h, map_w)


def mask_and_heatmap(token_map: torch.Tensor, height: int, width: int, threshold: float,
                     image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear upsampling of the map to ``height x width``, then the threshold (``> threshold``);
    the heatmap is the upsampled map in colour, half over ``image`` when one is given."""
    upsampled = F.interpolate(token_map[:, None].float(), size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0].clamp(0, 1)
    mask = (upsampled > threshold).float()
    colours = heatmap(upsampled)
    if image is not None:
        picture = image[..., :3].float().to(colours.device)
        if picture.shape[1:3] != (height, width):
            picture = F.interpolate(picture.movedim(-1, 1), size=(height, width), mode="bilinear",
                                    align_corners=False).movedim(1, -1)
        if picture.shape[0] != colours.shape[0]:
            picture = picture[:1].expand(colours.shape[0], -1, -1, -1)
        colours = 0.5 * picture + 0.5 * colours
    return mask.cpu(), colours.cpu()


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
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
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
        checks.inputs(cls, locals())
        if not 0.0 < noise_level <= 1.0:
            raise _error("noise_level", f"{noise_level} is outside (0, 1]; use e.g. 0.5.")
        if not 0.0 <= threshold <= 1.0:
            raise _error("threshold", f"{threshold} is outside 0 to 1 (the map is normalised to 0-1).")
        checks.latent_for_model(NODE, "latent", latent, model)
        samples = latent["samples"]
        token_map = word_map(model, clip, text, words, samples, noise_level, seed)
        height, width = samples.shape[-2] * VAE_SCALE, samples.shape[-1] * VAE_SCALE
        mask, colours = mask_and_heatmap(token_map, height, width, threshold, image)
        return io.NodeOutput(mask, colours)
