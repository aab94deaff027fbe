"""MasaCtrlAttentionPatch: MasaCtrl mutual self-attention on a clone of the user's model."""

from __future__ import annotations

import logging

import torch

import comfy.patcher_extension
from comfy_api.latest import io

from ..attention import cross_attention, masactrl, masactrl_masks
from ..attention.layer_selection import LayerSelection, StepWindow
from ..samplers import run_context, step_clock
from . import checks, cross_attention_maps, host_compat, masactrl_dit
from .masactrl_batch import attach_prompts_to_batch
from . import run_context as run_context_nodes
from .unet_layers import LayerKey, attn1_module, self_attention_layers

NODE = "MasaCtrlAttentionPatch"
WRAPPER_KEY = "consistent_synthesis.masactrl"
DEFAULT_START_LAYER = 10  # the paper's SD setting (the decoder); on FLUX.1 the default is FreeFlux's set


def _as_masks(mask: torch.Tensor | None, input_name: str) -> torch.Tensor | None:
    """A MASK as float ``(batch, height, width)``; its shape checked for callers without the node."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or min(mask.shape[-2:]) < 1:
        raise checks.error(NODE, input_name, f"expected a MASK of shape (batch, height, width), got "
                           f"{tuple(mask.shape)}")
    return mask.float()


def _run_state(extra_options: dict, settings: masactrl.MasaCtrlSettings) -> masactrl_masks.MaskState:
    context = run_context.current(extra_options)
    if context is None:  # called outside a sampling run of the patched model: nothing to reuse
        return masactrl_masks.MaskState()
    return context.state((WRAPPER_KEY, settings), masactrl_masks.MaskState)


def _auto_masks(settings: masactrl.MasaCtrlSettings, state: masactrl_masks.MaskState, extra_options: dict, dtype):
    """``masactrl_masks.auto_masks`` at the layer and evaluation these ``extra_options`` describe."""
    return masactrl_masks.auto_masks(settings, state, extra_options.get("sigmas"),
                                     tuple(extra_options["activations_shape"][-2:]),
                                     tuple(extra_options["original_shape"][-2:]), dtype, NODE)


def _layer_patch(settings: masactrl.MasaCtrlSettings, previous=None, attention=None, preferred=None):
    """The attn1 replacement for one layer: MasaCtrl inside the step window, else the previous attention.
    A closure over immutable settings, so the host's deep copies of the model options share it."""
    s = settings

    def patch(q, k, v, extra_options):
        if not step_clock.in_window(extra_options, s.window):
            if previous is not None:
                return previous(q, k, v, extra_options)
            return host_compat.optimized_attention(extra_options, preferred)(q, k, v, extra_options["n_heads"])

        source_mask = target_mask = biases = None
        if s.source_mask is not None:
            h, w = extra_options["activations_shape"][-2:]
            source_mask, target_mask, biases = masactrl_masks.given_masks(s, _run_state(extra_options, s), h, w,
                                                                          q.device, q.dtype)
        elif s.auto_mask:
            masks = _auto_masks(s, _run_state(extra_options, s), extra_options, q.dtype)
            if masks is not None:
                source_mask, target_mask, biases = masks
        try:
            return masactrl.mutual_self_attention(
                q, k, v, extra_options["n_heads"], chunks=len(extra_options["cond_or_uncond"]),
                source_index=s.source_index, mode=s.mode,
                attention=attention or host_compat.optimized_attention(extra_options, preferred),
                source_mask=source_mask, target_mask=target_mask, biases=biases)
        except ValueError as e:
            raise ValueError(f"{NODE}: {e}") from e
    patch.settings = settings  # for a caller that inspects the patched model
    return patch


def _map_recorder(settings: masactrl.MasaCtrlSettings):
    """``on_maps`` for the attn2 recorders: keeps the conditional rows' maps of each evaluation."""
    def on_maps(maps: torch.Tensor, extra_options: dict) -> None:
        rows = cross_attention.conditional_rows(maps, extra_options["cond_or_uncond"])
        if rows is not None:  # an unconditional-only call uses the conditional maps of its evaluation
            _run_state(extra_options, settings).add_maps(rows, extra_options.get("sigmas"))
    return on_maps


def _layer_selection(start_layer: int, end_layer: int, text: str) -> LayerSelection:
    """The node's ``layers`` STRING: blank (start_layer to end_layer), a preset name or a list ("10, 12, 14")."""
    return LayerSelection.from_text(NODE, start_layer, end_layer, text,
                                    lambda t: checks.integer_list(NODE, "layers", t, "10, 12, 14"))


def _token_list(tokens, input_name: str) -> list[int]:
    """Token indices from the node's STRING ("1, 2") or from a list."""
    if isinstance(tokens, str):
        return checks.integer_list(NODE, input_name, tokens, "1, 2")
    return [int(t) for t in tokens]


def _check_run(settings: masactrl.MasaCtrlSettings, latent: torch.Tensor, conds: dict) -> None:
    """Reject a run MasaCtrl cannot use before any step is computed: the batch, the masks' aspect
    and count, and for automatic masks the latent's size and each token list against its own prompt."""
    batch = latent.shape[0]
    checks.masactrl_batch(NODE, batch, settings.source_index)
    lh, lw = latent.shape[-2:]
    for name in ("source_mask", "target_mask"):
        mask = getattr(settings, name)
        if mask is not None and not masactrl_masks.aspect_matches(tuple(mask.shape[-2:]), (lh, lw)):
            mh, mw = mask.shape[-2:]
            raise checks.error(NODE, name, f"its {mw}x{mh} aspect does not match the {lw * 8}x{lh * 8} image being "
                               "sampled; resize or crop the mask to the image.")
    targets = batch - 1
    if settings.target_mask is not None and settings.target_mask.shape[0] not in (1, targets):
        raise checks.error(NODE, "target_mask", f"holds {settings.target_mask.shape[0]} masks for {targets} "
                           "targets; give one mask for all targets or one for each.")
    if settings.auto_mask:
        if cross_attention.maps_too_small(lh, lw):
            raise checks.error(NODE, "auto_mask", cross_attention_maps.too_small_message(
                latent.shape, "where the tokens are") + " Or turn auto_mask off.")
        contexts = [entry.get("cross_attn") for entry in conds.get("positive") or [] if isinstance(entry, dict)]
        masactrl_masks.check_tokens_against_prompts(
            settings, batch, [c for c in contexts if isinstance(c, torch.Tensor) and c.ndim == 3], NODE)


def _outer_sample_wrapper(settings: masactrl.MasaCtrlSettings, layer_count: int):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        _check_run(settings, latent, getattr(getattr(executor, "class_obj", None), "conds", None) or {})
        steps = len(sigmas) - 1
        window, layers = settings.window, settings.layers
        end_step = window.end(steps)
        if window.start_step >= end_step or not layers:
            logging.warning("%s: nothing is patched in this run (steps %d-%d of %d, layers %s of %d).", NODE,
                            window.start_step, end_step, steps, settings.selection.describe(layers), layer_count)
        else:
            logging.info("%s: %s self-attention%s on steps %d-%d of %d, layers %s of %d.", NODE, settings.mode,
                         " with automatic masks" if settings.auto_mask else "", window.start_step,
                         end_step - 1, steps, settings.selection.describe(layers), layer_count)
        return executor(*args, **kwargs)
    return wrapper


def _selection(model, start_layer: int, end_layer: int, layers, preset: str) -> LayerSelection:
    """The layer selection asked for. Old API prompts keep their meaning: on FLUX.1 with layers blank and
    start_layer/end_layer at their defaults the patch has always acted in FreeFlux's blocks; it still does,
    and the log says how to ask for that explicitly."""
    selection = LayerSelection(start_layer, end_layer, tuple(layers or ()), preset)
    if not layers and not preset and start_layer == DEFAULT_START_LAYER and end_layer == -1 \
            and masactrl_dit.is_flux1(model):
        logging.info("%s: layers blank and start_layer 10 on FLUX.1 mean FreeFlux's non-rigid blocks, as in "
                     "earlier versions; write layers = 'freeflux' to ask for them explicitly, or set layers to "
                     "'10' (or start_layer 11 and back) for block 10 on.", NODE)
        selection = LayerSelection(start_layer, end_layer, (), "freeflux")
    return selection


def patch_model(model, *, start_step: int = 4, start_layer: int = DEFAULT_START_LAYER, end_step: int = -1,
                end_layer: int = -1, mode: str = "mutual", source_index: int = 0, source_mask=None,
                target_mask=None, auto_mask: bool = False, source_tokens=(1,), target_tokens=(1,),
                mask_threshold: float = 0.1, layers: list[int] | None = None, preset: str = "", attention=None):
    """A clone of ``model`` with MasaCtrl on the self-attention layers ``[start_layer, end_layer)``.

    ``layers``: an explicit list of layers instead of ``[start_layer, end_layer)``; ``preset``: a
    published block set by name (``layer_selection.PRESETS``). ``auto_mask``: masks from the prompts'
    cross-attention maps of ``source_tokens`` and ``target_tokens`` (official
    ``MutualSelfAttentionControlMaskAuto``), thresholded at ``mask_threshold``. ``attention(q, k, v,
    heads, mask=None)`` replaces ComfyUI's optimized attention inside MasaCtrl layers (benchmarks
    compare it with the official code's materialized attention matrix). The settings are built and
    validated here, once, into a frozen ``MasaCtrlSettings``: how the inputs combine, and (for callers
    without the node, such as the benchmarks) the mode, masks and threshold the node's schema checks.
    """
    # read even with auto_mask off: a malformed list is refused, not kept for a later run to trip on
    source_tokens = tuple(_token_list(source_tokens, "source_tokens"))
    target_tokens = tuple(_token_list(target_tokens, "target_tokens"))
    window = StepWindow.checked(NODE, start_step, end_step)
    selection = _selection(model, start_layer, end_layer, layers, preset)
    if masactrl_dit.is_dit(model):
        if source_mask is not None or target_mask is not None or auto_mask:
            raise checks.error(NODE, "source_mask" if source_mask is not None else "auto_mask",
                               "mask-guided MasaCtrl is built for UNets (SD1.x, SD2.x, SDXL); on Flux and SD3 "
                               "disconnect the masks and turn auto_mask off.")
        if attention is not None:
            raise ValueError("patch_model: an attention override is for UNet layers only")
        return masactrl_dit.patch_dit(model, window, selection, mode, source_index)
    all_layers: list[LayerKey] = self_attention_layers(model.get_model_object("diffusion_model"))
    count = len(all_layers)
    if count == 0:
        raise checks.error(NODE, "model", "this model has neither UNet transformer blocks nor MM-DiT blocks; "
                           "MasaCtrl supports SD1.x, SD2.x and SDXL UNets, Flux and SD3.")
    selected = selection.indices(count, NODE, "self-attention layer")
    if mode not in masactrl.MODES:
        raise checks.error(NODE, "mode", f"{mode!r} is not one of {masactrl.MODES}.")
    source_mask, target_mask = _as_masks(source_mask, "source_mask"), _as_masks(target_mask, "target_mask")
    if (source_mask is None) != (target_mask is None):
        raise checks.error(NODE, "target_mask" if target_mask is None else "source_mask", "mask-guided MasaCtrl "
                           "needs both source_mask and target_mask; connect both or neither.")
    if source_mask is not None:
        if mode != "mutual":
            raise checks.error(NODE, "mode", "mask-guided MasaCtrl is defined for mode 'mutual' (paper Sec. 4.2); "
                               "set mode to mutual or disconnect the masks.")
        if source_mask.shape[0] != 1:
            raise checks.error(NODE, "source_mask", f"holds {source_mask.shape[0]} masks; give the one mask of the "
                               "source.")
    if auto_mask:
        if source_mask is not None or target_mask is not None:
            raise checks.error(NODE, "auto_mask", "automatic masks and the given source_mask/target_mask exclude "
                               "each other; turn auto_mask off or disconnect source_mask and target_mask.")
        if mode != "mutual":
            raise checks.error(NODE, "mode", "automatic masks are defined for mode 'mutual' (paper Sec. 4.2); set "
                               "mode to mutual or turn auto_mask off.")
        if not 0.0 <= mask_threshold <= 1.0:
            raise checks.error(NODE, "mask_threshold", f"{mask_threshold} is outside 0 to 1 (the maps are "
                               "normalised to 0-1).")
        for name, tokens in (("source_tokens", source_tokens), ("target_tokens", target_tokens)):
            if not tokens:
                raise checks.error(NODE, name, "no token index given; write comma-separated token indices such as "
                                   "'1' or '1, 2' (index 0 is the prompt's start token), or turn auto_mask off.")

    settings = masactrl.MasaCtrlSettings(
        window=window, selection=selection, layers=selected, mode=mode, source_index=source_index,
        source_mask=source_mask, target_mask=target_mask, auto_mask=auto_mask, source_tokens=source_tokens,
        target_tokens=target_tokens, mask_threshold=mask_threshold)
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for key in [all_layers[i] for i in selected]:
        previous = existing.get(key, existing.get(key[:2]))
        preferred = getattr(attn1_module(diffusion_model, key), "comfy_attention", None)
        patched.set_model_attn1_replace(_layer_patch(settings, previous, attention, preferred), *key)
    if auto_mask:
        cross_attention_maps.record_maps_in_every_layer(patched, _map_recorder(settings))
    run_context_nodes.attach(patched)
    attach_prompts_to_batch(patched)  # one target prompt for every target
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                 _outer_sample_wrapper(settings, count))
    return patched


class MasaCtrlAttentionPatch(io.ComfyNode):
    """MasaCtrl (Cao et al., ICCV 2023): targets borrow the source's self-attention keys and values."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="MasaCtrl Attention Patch",
            category="consistent synthesis/MasaCtrl",
            description=("Mutual self-attention control: from start_step and start_layer on, each target image in "
                         "the batch queries the self-attention keys and values of the source image, so the "
                         "source's identity and texture carry over while the target prompts change pose or action."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, Flux or SD3) to patch; a "
                               "clone is patched, so the original stays as it is. LoRA and other patches are kept."),
                io.Int.Input("start_step", default=4, min=0, max=10000, tooltip=(
                    "First sampling step (0-based) with mutual self-attention. Earlier steps lay out the "
                    "target freely. Paper: 4 of 50.")),
                io.Int.Input("start_layer", default=DEFAULT_START_LAYER, min=0, max=1000, tooltip=(
                    "First self-attention layer, counted in execution order (down, mid, up): 16 in SD1.x/2.x, "
                    "70 in SDXL. Paper: 10 for SD (the decoder); 44, 54 or 64 for SDXL. Flux and SD3 count their "
                    "joint-attention blocks (FLUX.1: 19 double then 38 single = 57). For a published Flux block set "
                    "write its name in layers ('freeflux'). Saved prompts with start_layer 10 and layers blank "
                    "on FLUX.1 keep getting FreeFlux's set (the log says so).")),
                io.Int.Input("end_step", default=-1, min=-1, max=10000, tooltip=(
                    "Step at which mutual self-attention stops (exclusive); -1 runs it to the last step.")),
                io.Int.Input("end_layer", default=-1, min=-1, max=1000, tooltip=(
                    "Layer at which mutual self-attention stops (exclusive); -1 runs it to the last layer.")),
                io.Combo.Input("mode", options=list(masactrl.MODES), default="mutual", tooltip=(
                    "mutual: targets attend to the source's keys and values (paper). union: targets attend to "
                    "the source's and their own, which keeps more of the target's own content.")),
                io.Int.Input("source_index", default=0, min=0, max=4095, tooltip=(
                    "Position of the source image in the latent batch; every other image is a target.")),
                io.Mask.Input("source_mask", optional=True, tooltip=(
                    "Foreground of the source (1 = object). With target_mask: mask-guided MasaCtrl, where "
                    "the target's foreground draws only on the source's foreground and background on background.")),
                io.Mask.Input("target_mask", optional=True, tooltip=(
                    "Foreground of the target(s): one mask for all targets, or one per target in batch order.")),
                io.Boolean.Input("auto_mask", default=False, optional=True, tooltip=(
                    "Masks from the prompts' cross-attention maps instead of drawn ones (the paper's automatic "
                    "mask-guided variant): where source_tokens land in the source and target_tokens in each "
                    "target, the target's foreground draws on the source's foreground, background on background. "
                    "Not with source_mask/target_mask.")),
                io.String.Input("source_tokens", default="1", optional=True, tooltip=(
                    "Token indices of the source prompt whose maps make the source mask, comma-separated (1 = "
                    "the first word; the official default). Prompt Token Indices gives them from words.")),
                io.String.Input("target_tokens", default="1", optional=True, tooltip=(
                    "Token indices of the target prompt whose maps make each target's mask, comma-separated.")),
                io.Float.Input("mask_threshold", default=0.1, min=0.0, max=1.0, step=0.01, optional=True, tooltip=(
                    "Automatic masks: a token is foreground where its normalised map is at least this (paper: "
                    "0.1).")),
                io.String.Input("layers", default="", optional=True, tooltip=(
                    "Explicit layer list, comma-separated (e.g. \"10, 12, 14\"), for the non-contiguous sets some "
                    "papers use, or a published FLUX.1 block set by name: 'freeflux' (FreeFlux's non-rigid "
                    "blocks 0,7,8,9,10,18,25,28,37,42,45,50,56, from step 0, for pose changes) or 'stable_flow' "
                    "(Stable Flow's vital layers 0,1,17,18,25,28,53,54,56). Overrides start_layer and end_layer. "
                    "Empty: start_layer to end_layer.")),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, start_step, start_layer, end_step, end_layer, mode, source_index,
                source_mask=None, target_mask=None, auto_mask=False, source_tokens="1", target_tokens="1",
                mask_threshold=0.1, layers="") -> io.NodeOutput:
        checks.inputs(cls, locals())
        selection = _layer_selection(start_layer, end_layer, layers)
        return io.NodeOutput(patch_model(
            model, start_step=start_step, start_layer=start_layer, end_step=end_step, end_layer=end_layer,
            mode=mode, source_index=source_index, source_mask=source_mask, target_mask=target_mask,
            auto_mask=auto_mask, source_tokens=source_tokens, target_tokens=target_tokens,
            mask_threshold=mask_threshold, layers=list(selection.layers) or None, preset=selection.preset))
