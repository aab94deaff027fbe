"""MasaCtrl on MM-DiT models (Flux, SD3) through ComfyUI's public patching hooks.

Two hooks, both on a clone of the user's model, both chained with patches already there:

* ``patches_replace["dit"]`` block replacements, ``("double_block", i)`` and ``("single_block", i)``
  (Flux) or ``("double_block", i)`` (SD3's joint blocks): inside the step window a patched block
  runs the original block (or the replacement that was there before) with a copy of
  ``transformer_options`` that carries an attention override;
* ``transformer_options["optimized_attention_override"]``: the host's attention functions hand it
  the block's q, k, v (Flux: after RoPE, exactly as the model applies it) and it computes the joint
  MasaCtrl attention of ``attention/joint_attention.py`` with the host's own attention function.

Blocks are numbered in execution order: Flux's double blocks, then its single blocks (FLUX.1:
19 + 38 = 57); SD3's joint blocks (24 in SD3 Medium, 38 in SD3.5 Large). The step comes from the
run's StepClock, a host int, so the hot path reads nothing from the device.
"""

from __future__ import annotations

import inspect
import logging

import comfy.ldm.flux.layers
import comfy.ldm.flux.math
import comfy.ldm.flux.model
import comfy.ldm.modules.attention as host_attention
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.patcher_extension

from ..attention import joint_attention
from ..attention import layer_selection
from ..attention.layer_selection import LayerSelection, StepWindow
from ..attention.masactrl import MasaCtrlSettings
from ..samplers import step_clock
from . import checks
from .masactrl_batch import attach_prompts_to_batch
from . import run_context as run_context_nodes

NODE = "MasaCtrlAttentionPatch"
WRAPPER_KEY = "consistent_synthesis.masactrl_dit"
TEXT_TOKENS_KEY = "consistent_synthesis.masactrl_dit.text_tokens"
LAYER_KEY = "consistent_synthesis.masactrl_dit.layer"  # the patched block running now (tests read it)
OVERRIDE = "optimized_attention_override"
HOST_VERSION = "0.3.64"  # the first release these hooks were checked on (docs/compatibility.md)


def is_flux1(model_patcher) -> bool:
    """Whether the model is a FLUX.1-sized Flux (19 + 38 blocks), where the published block sets apply."""
    diffusion_model = _diffusion_model(model_patcher)
    return _kind(diffusion_model) == "flux" and len(block_keys(diffusion_model)) == layer_selection.PRESET_BLOCKS


def _diffusion_model(model_patcher):
    return model_patcher.get_model_object("diffusion_model")


def _kind(diffusion_model) -> str | None:
    if isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        return "flux"
    if isinstance(diffusion_model, mmdit.MMDiT) and hasattr(diffusion_model, "joint_blocks"):
        return "sd3"
    return None


def is_dit(model_patcher) -> bool:
    """Whether ``model_patcher`` holds a Flux or SD3 (MM-DiT) diffusion model."""
    return _kind(_diffusion_model(model_patcher)) is not None


def block_keys(diffusion_model) -> list[tuple[str, int]]:
    """The ``patches_replace["dit"]`` keys of the model's joint-attention blocks, in execution order."""
    kind = _kind(diffusion_model)
    if kind == "flux":
        return ([("double_block", i) for i in range(len(diffusion_model.double_blocks))]
                + [("single_block", i) for i in range(len(diffusion_model.single_blocks))])
    if kind == "sd3":
        return [("double_block", i) for i in range(len(diffusion_model.joint_blocks))]
    return []


def block_count(model_patcher) -> int:
    """Number of joint-attention blocks (Flux: double + single; SD3: joint blocks)."""
    return len(block_keys(_diffusion_model(model_patcher)))


def host_has_hooks() -> bool:
    """Whether the host's DiT blocks pass ``transformer_options`` on to an overridable attention."""
    def takes_options(fn):
        return "transformer_options" in inspect.signature(fn).parameters
    try:
        host_attention.wrap_attn  # the attention functions' wrapper that calls an override
    except AttributeError:
        return False
    return (takes_options(comfy.ldm.flux.layers.DoubleStreamBlock.forward)
            and takes_options(comfy.ldm.flux.layers.SingleStreamBlock.forward)
            and takes_options(comfy.ldm.flux.math.attention)
            and takes_options(mmdit._block_mixing))


def attention_arguments(func, args: tuple, kwargs: dict, previous=None):
    """An attention override's call, read the same way for Flux and SD3: ``(q, k, v, heads, rest, call)``
    with q, k, v as (b, heads, n, d) (Flux hands them so with ``skip_reshape``; SD3 hands q, k as
    (b, n, heads * d) and v as (b, n, heads, d): reshaped here, ``kwargs['skip_reshape']`` set), the other
    positional arguments, and the attention below this override (``previous`` around the host's ``func``).
    ``kwargs`` is updated in place (``heads`` taken out) for ``call``."""
    q, k, v = args[:3]
    rest = args[3:]
    heads = rest[0] if rest else kwargs.pop("heads")
    rest = rest[1:]
    call = func if previous is None else (lambda *a, **kw: previous(func, *a, **kw))
    if not kwargs.get("skip_reshape", False):
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        kwargs["skip_reshape"] = True
    return q, k, v, heads, rest, call


class _Override:
    """The attention override of one patched block call: joint MasaCtrl attention."""

    def __init__(self, settings: MasaCtrlSettings, image_tokens: int, chunks: int, previous=None):
        self.settings = settings
        self.image_tokens = image_tokens
        self.chunks = chunks
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        q, k, v, heads, rest, call = attention_arguments(func, args, kwargs, self.previous)
        image_start = q.shape[2] - self.image_tokens
        if image_start < 0:  # not an attention over this block's tokens: leave it alone
            return call(q, k, v, heads, *rest, **kwargs)
        s = self.settings  # the batch was checked once for the run (checks.masactrl_batch)
        if kwargs.get("mask") is not None and s.mode == "union":
            raise checks.error(NODE, "mode", "union cannot be combined with an attention mask on this model; use "
                               "mutual.")

        def attention(q_, k_, v_):
            return call(q_, k_, v_, heads, *rest, **kwargs)
        return joint_attention.joint_mutual_attention(
            q, k, v, image_start=image_start, chunks=self.chunks, source_index=s.source_index,
            mode=s.mode, attention=attention)


def _block_patch(settings: MasaCtrlSettings, layer: int, single: bool, previous=None):
    """The ``patches_replace["dit"]`` entry of one patched block: a closure over immutable settings,
    so the host's deep copies of the model options share it."""
    def patch(args: dict, extra: dict) -> dict:
        run = extra["original_block"] if previous is None else (lambda a: previous(a, extra))
        options = args.get("transformer_options") or {}
        if not step_clock.in_window(options, settings.window):
            return run(args)
        image_tokens = args["img"].shape[1]
        if single:  # Flux single blocks see [text; image] as one sequence
            image_tokens -= options[TEXT_TOKENS_KEY]
        patched = dict(options)
        patched[OVERRIDE] = _Override(settings, image_tokens, len(options.get("cond_or_uncond", [0])),
                                      options.get(OVERRIDE))
        patched[LAYER_KEY] = layer
        return run(dict(args, transformer_options=patched))
    return patch


def _record_text_tokens(executor, x, timestep, context, *args, **kwargs):
    """DIFFUSION_MODEL wrapper (Flux): how many text tokens precede the image in single blocks."""
    args = list(args)
    # Flux.forward passes (x, timestep, context, y, guidance, ref_latents, control, transformer_options)
    if len(args) >= 5:
        args[4] = dict(args[4], **{TEXT_TOKENS_KEY: context.shape[1]})
    else:
        kwargs["transformer_options"] = dict(kwargs.get("transformer_options", {}),
                                             **{TEXT_TOKENS_KEY: context.shape[1]})
    return executor(x, timestep, context, *args, **kwargs)


def _outer_sample_wrapper(settings: MasaCtrlSettings, count: int):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        checks.masactrl_batch(NODE, latent.shape[0], settings.source_index)
        steps = len(sigmas) - 1
        window, layers = settings.window, settings.layers
        end_step = window.end(steps)
        if window.start_step >= end_step or not layers:
            logging.warning("%s: nothing is patched in this run (steps %d-%d of %d, %d of %d blocks).", NODE,
                            window.start_step, end_step, steps, len(layers), count)
        else:
            logging.info("%s: %s joint attention on steps %d-%d of %d, blocks %s of %d%s.", NODE, settings.mode,
                         window.start_step, end_step - 1, steps, ",".join(map(str, layers)), count,
                         f" ({settings.selection.preset!r})" if settings.selection.preset else "")
        return executor(*args, **kwargs)
    return wrapper


def patch_dit_model(model_patcher, *, start_step: int = 0, start_layer: int = 0, end_step: int = -1,
                    end_layer: int = -1, layers: list[int] | None = None, preset: str = "", mode: str = "mutual",
                    source_index: int = 0):
    """A clone of ``model_patcher`` (Flux or SD3) with joint MasaCtrl attention in the chosen blocks.

    ``layers`` (block numbers in execution order) replaces ``start_layer``/``end_layer`` when given;
    ``preset`` names a published block set (``layer_selection.PRESETS``).
    """
    if layers is not None and not layers:
        raise checks.error(NODE, "layers", "the list is empty; give block numbers such as 0,1,17,18 or leave it "
                           "blank to use start_layer and end_layer.")
    return patch_dit(model_patcher, StepWindow.checked(NODE, start_step, end_step),
                     LayerSelection(start_layer, end_layer, tuple(layers or ()), preset), mode, source_index)


def patch_dit(model_patcher, window: StepWindow, selection: LayerSelection, mode: str, source_index: int):
    """``patch_dit_model`` from a checked step window and a layer selection (the node's path)."""
    diffusion_model = _diffusion_model(model_patcher)
    kind = _kind(diffusion_model)
    if kind is None:
        raise checks.error(NODE, "model", "this is not a Flux or SD3 model; the MM-DiT form of MasaCtrl supports "
                           "Flux (double and single blocks) and SD3 / SD3.5 (joint blocks).")
    if not host_has_hooks():
        raise checks.error(NODE, "model", f"this ComfyUI is too old for MasaCtrl on Flux and SD3: it needs the DiT "
                           f"attention override (ComfyUI {HOST_VERSION} or newer). Update ComfyUI.")
    if mode not in joint_attention.MODES:  # the node's schema checks it too; patch_dit_model's callers need it
        raise checks.error(NODE, "mode", f"{mode!r} is not one of {joint_attention.MODES}.")
    keys = block_keys(diffusion_model)
    chosen = selection.indices(len(keys), NODE, "block")
    settings = MasaCtrlSettings(window=window, selection=selection, layers=chosen, mode=mode,
                                source_index=source_index)
    patched = model_patcher.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for layer in chosen:
        name, index = keys[layer]
        patched.set_model_patch_replace(_block_patch(settings, layer, name == "single_block",
                                                     existing.get(keys[layer])), "dit", name, index)
    run_context_nodes.attach(patched)
    attach_prompts_to_batch(patched)  # one target prompt for every target
    if kind == "flux":
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     _record_text_tokens)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                 _outer_sample_wrapper(settings, len(keys)))
    return patched
