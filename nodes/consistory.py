"""ConsiStoryAttentionPatch: one subject kept across a batch of prompts by shared self-attention
(ConsiStory's SDSA, or StoryDiffusion's token sharing) on a clone of the user's UNet.

The math is in ``attention/shared_attention.py`` and ``attention/consistory.py``; here it is wired
into the host: attn1 replacements in the chosen blocks, attn2 recorders for the automatic masks, an
OUTER_SAMPLE check of the run's batch and prompts, and a DIFFUSION_MODEL wrapper that makes the
vanilla call whose queries are mixed in the first tenth of the steps.
"""

from __future__ import annotations

import functools
import logging

import torch

import comfy.patcher_extension
from comfy_api.latest import io

from ..attention import cross_attention, shared_attention
from ..attention.consistory import SHARING, UNET_PARTS, ConsiStoryRun, ConsiStorySettings
from ..attention.layer_selection import StepWindow
from ..samplers import run_context, step_clock
from ..samplers.repaint import mask_fits_latent
from . import checks, cross_attention_maps, host_compat, masactrl_dit
from . import run_context as run_context_nodes
from .unet_layers import attn1_module, self_attention_layers

NODE = "ConsiStoryAttentionPatch"
KEY = "consistent_synthesis.consistory"
TOKENS_EXAMPLE = "2, 5 | 3 | 4"


_error = functools.partial(checks.error, NODE)


def subject_token_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``"2, 5 | 3 | 4"`` (or one line per image) -> ``((2, 5), (3,), (4,))``; one group serves every image."""
    groups = text.replace("\n", "|").split("|")
    if len(groups) > 1 and not groups[-1].strip():
        groups = groups[:-1]  # a trailing separator
    return tuple(tuple(checks.integer_list(NODE, "subject_tokens", g, TOKENS_EXAMPLE)) for g in groups)


def _run(options: dict, settings: ConsiStorySettings, batch: int | None = None) -> ConsiStoryRun | None:
    """This run's state (made on first use with the call's ``batch``); None outside a wrapped run."""
    context = run_context.current(options)
    if context is None:
        return None
    if batch is None:
        return context.peek((KEY, settings))
    return context.state((KEY, settings), lambda: ConsiStoryRun(settings, batch))


def _layer_patch(settings: ConsiStorySettings, layer, previous=None, preferred=None):
    """attn1 replacement of one layer: shared attention inside the step window, else the previous one."""
    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attention = host_compat.optimized_attention(extra_options, preferred)
        run = _run(extra_options, settings)
        if run is not None and run.caching:
            run.queries[layer] = q  # the vanilla call (QueryStore 'cache'): plain attention
            run = None
        if run is None or not step_clock.in_window(extra_options, settings.window) or not run.shares(layer):
            return previous(q, k, v, extra_options) if previous is not None else attention(q, k, v, heads)
        if run.strength is not None and layer in run.queries:
            q = shared_attention.mix_queries(q, run.queries[layer], run.strength)
        h, w = extra_options["activations_shape"][-2:]
        lent = run.lent(h, w, cross_attention_maps.map_resolution(extra_options), q.device)
        if lent is None:
            return attention(q, k, v, heads)
        if settings.sharing == "storydiffusion":
            return shared_attention.consistent_self_attention(q, k, v, heads, lent, attention=attention)
        return shared_attention.subject_driven_self_attention(q, k, v, heads, lent, settings.anchors,
                                                              attention=attention)
    patch.settings = settings
    return patch


def _map_recorder(settings: ConsiStorySettings):
    """``on_maps`` of the attn2 recorders: the conditional rows' maps of the real (not vanilla) calls."""
    def on_maps(maps: torch.Tensor, extra_options: dict) -> None:
        run = _run(extra_options, settings)
        cond_or_uncond = extra_options["cond_or_uncond"]
        if run is None or 0 not in cond_or_uncond:
            return
        c = cond_or_uncond.index(0)
        run.record(maps[c * run.batch:(c + 1) * run.batch])
    return on_maps


def copy_control(control):
    """The host's UNet pops ControlNet residuals as it uses them: the vanilla call gets its own lists."""
    if not isinstance(control, dict):
        return control
    return {k: list(v) if isinstance(v, list) else v for k, v in control.items()}


def _diffusion_model_wrapper(settings: ConsiStorySettings):
    def wrapper(executor, x, timesteps, context, y=None, control=None, transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        chunks = len(options.get("cond_or_uncond", [0])) or 1
        run = _run(options, settings, x.shape[0] // chunks)
        if run is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        run.begin(step_clock.current_step(options))
        sample_sigmas = options.get("sample_sigmas")
        steps = sample_sigmas.shape[-1] - 1 if sample_sigmas is not None else 0
        if run.wants_vanilla_call(steps):
            run.caching = True
            try:
                executor(x, timesteps, context, y, copy_control(control), transformer_options, **kwargs)
            finally:
                run.caching = False
            run.vanilla_done(steps)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            run.call_done()
    return wrapper


def check_run(settings: ConsiStorySettings, latent: torch.Tensor, positive) -> None:
    """Refuse, before any step, what the batch or the prompts make impossible."""
    batch = latent.shape[0]
    if settings.sharing == "consistory" and settings.anchors > batch:
        raise _error("anchors", f"{settings.anchors} anchors for a batch of {batch} images; the anchors are the "
                     f"first images of the batch, so use at most {batch} (the official setting: 2).")
    masks = settings.subject_masks
    if masks is not None:
        if masks.shape[0] not in (1, batch):
            raise _error("subject_masks", f"holds {masks.shape[0]} masks for a batch of {batch} images; give one "
                         "mask for every image or one per image in batch order.")
        (mh, mw), (lh, lw) = masks.shape[-2:], latent.shape[-2:]
        if not mask_fits_latent((mh, mw), (lh, lw)):
            raise _error("subject_masks", f"its {mw}x{mh} aspect does not match the {lw * 8}x{lh * 8} image being "
                         "sampled; resize or crop the masks to the image.")
    if not settings.automatic:
        return
    groups = settings.subject_tokens
    if len(groups) not in (1, batch):
        raise _error("subject_tokens", f"gives {len(groups)} token groups for a batch of {batch} images; give one "
                     f"group for every image or one per image, separated by '|' (e.g. {TOKENS_EXAMPLE!r}).")
    for entry in positive or []:
        context = entry.get("cross_attn") if isinstance(entry, dict) else None
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] not in (1, batch):
            continue
        checked = set()
        for row in range(batch):
            prompt, group = row if context.shape[0] == batch else 0, row if len(groups) == batch else 0
            if (prompt, group) in checked:
                continue  # the same prompt and tokens as an earlier row: compared once
            checked.add((prompt, group))
            own = cross_attention.own_token_count(context[prompt])
            group = groups[group]
            which = f"the prompt of batch row {row}"
            if own < context.shape[1]:
                which += f" (repeated to {context.shape[1]} tokens in the batch)"
            cross_attention.check_token_indices(list(group), own, NODE, "subject_tokens", which)


def _outer_sample_wrapper(settings: ConsiStorySettings, layer_count: int):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        conds = getattr(getattr(executor, "class_obj", None), "conds", None) or {}
        check_run(settings, latent, conds.get("positive"))
        steps = len(sigmas) - 1
        end = settings.window.end(steps)
        logging.info("%s: %s shared self-attention on steps %d-%d of %d in %d of %d self-attention layers%s.",
                     NODE, settings.sharing, settings.window.start_step, end - 1, steps, len(settings.layers),
                     layer_count, ", vanilla queries mixed" if settings.share_queries else "")
        return executor(*args, **kwargs)
    return wrapper


def patch_model(model, *, anchors: int = 2, mask_dropout: float = 0.5, seed: int = 0, start_step: int = 1,
                end_step: int = -1, blocks: str = "up", share_queries: bool = True, subject_tokens: str = "",
                subject_masks: torch.Tensor | None = None, token_sharing: str = "consistory"):
    """A clone of ``model`` with shared self-attention in ``blocks`` (see ``ConsiStoryAttentionPatch``)."""
    diffusion_model = model.get_model_object("diffusion_model")
    all_layers = self_attention_layers(diffusion_model)
    if not all_layers and not masactrl_dit.is_dit(model):
        raise _error("model", "this model has neither UNet transformer blocks nor joint-attention blocks; ConsiStory "
                     "is built here for SD1.x, SD2.x and SDXL UNets and for Flux and SD3.")
    if blocks not in UNET_PARTS:
        raise _error("blocks", f"{blocks!r} is not one of {list(UNET_PARTS)}.")
    if token_sharing not in SHARING:
        raise _error("token_sharing", f"{token_sharing!r} is not one of {list(SHARING)}.")
    if not 0.0 <= mask_dropout <= 1.0:  # NaN fails too
        raise _error("mask_dropout", f"{mask_dropout} is not a number from 0 to 1.")
    if anchors < 1:
        raise _error("anchors", f"{anchors}: at least one image must lend its subject; use 1 or more (official: 2).")
    groups = subject_token_groups(subject_tokens)
    if subject_masks is not None:
        if subject_masks.ndim == 2:
            subject_masks = subject_masks[None]
        if subject_masks.ndim != 3 or min(subject_masks.shape) < 1:
            raise _error("subject_masks", f"expected a MASK of shape (batch, height, width), got "
                         f"{tuple(subject_masks.shape)}.")
        subject_masks = subject_masks.float()
    elif token_sharing == "consistory" and not any(groups):
        raise _error("subject_tokens", "no token index given; connect Story Prompts' subject_tokens (or write the "
                     f"subject word's token index per image, e.g. {TOKENS_EXAMPLE!r}), or connect subject_masks.")
    window = StepWindow.checked(NODE, start_step, end_step)
    parts = UNET_PARTS[blocks]
    selected = tuple(i for i, key in enumerate(all_layers) if key[0] in parts)
    settings = ConsiStorySettings(window=window, layers=selected, anchors=anchors, mask_dropout=float(mask_dropout),
                                  seed=seed, share_queries=share_queries, subject_tokens=groups,
                                  subject_masks=subject_masks, sharing=token_sharing)
    if not all_layers:  # Flux, SD3: shared joint attention (nodes/consistory_dit.py)
        from . import consistory_dit
        return consistory_dit.patch_dit(model, settings, blocks)
    patched = model.clone()
    options = patched.model_options.get("transformer_options", {}).get("patches_replace", {})
    existing = options.get("attn1", {})
    for i in selected:
        key = all_layers[i]
        previous = existing.get(key, existing.get(key[:2]))
        preferred = getattr(attn1_module(diffusion_model, key), "comfy_attention", None)
        patched.set_model_attn1_replace(_layer_patch(settings, key, previous, preferred), *key)
    if settings.automatic:
        cross_attention_maps.record_maps_in_every_layer(patched, _map_recorder(settings))
    run_context_nodes.attach(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY,
                                 _outer_sample_wrapper(settings, len(all_layers)))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY,
                                 _diffusion_model_wrapper(settings))
    return patched


class ConsiStoryAttentionPatch(io.ComfyNode):
    """ConsiStory (Tewel et al., SIGGRAPH 2024): one subject across a batch of prompts, from text alone."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="ConsiStory Attention Patch",
            category="consistent synthesis/ConsiStory",
            description=("Subject-driven shared self-attention: every image of the batch also attends to the "
                         "subject (found by its words' cross-attention maps) in the anchor images, so one "
                         "character or object stays the same across prompts. Batch the prompts with Story Prompts."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch: SD1.x, SD2.x, SDXL, or Flux / SD3 (image tokens "
                               "shared in their joint attention, text tokens untouched); a clone is patched, so the "
                               "original stays as it is. LoRA, ControlNet and other patches are kept."),
                io.Int.Input("anchors", default=2, min=1, max=64, tooltip=(
                    "The first images of the batch lend their subject to every image (official: 2). More anchors "
                    "cost more memory; at most the batch size.")),
                io.Float.Input("mask_dropout", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Share of the anchors' subject tokens hidden from each image at each step (official: 0.5): "
                    "higher gives more varied poses and layouts, lower a closer identity. 1 shares nothing.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
                    "Seed of the dropout (and of StoryDiffusion's token draws): the same seed gives the same "
                    "images.")),
                io.Int.Input("start_step", default=1, min=0, max=10000, tooltip=(
                    "First step (0-based) with shared attention; official: 1 (step 0 lays out freely and gives "
                    "the first subject masks).")),
                io.Int.Input("end_step", default=-1, min=-1, max=10000, tooltip=(
                    "Step at which sharing stops (exclusive); -1: to the last step (official).")),
                io.Combo.Input("blocks", options=list(UNET_PARTS), default="up", tooltip=(
                    "Where sharing acts: 'up' is the decoder (ComfyUI's output blocks, official), 'mid+up' adds "
                    "the middle block, 'down+mid+up' every self-attention layer. Flux: 'up' = the single-stream "
                    "blocks, 'mid+up' adds the second half of the double blocks; SD3: 'up' = the second half of "
                    "the joint blocks, 'mid+up' from the first third on.")),
                io.Boolean.Input("share_queries", default=True, tooltip=(
                    "Vanilla-query mixing (official, for layout diversity): in the first tenth of the steps the "
                    "queries are blended with those of a plain model call (0.9 down to 0.82), one extra model "
                    "call per step there. ConsiStory mode only.")),
                io.String.Input("subject_tokens", default="", tooltip=(
                    "Prompt-token indices of the subject word(s) in each image's prompt, one group per image "
                    f"separated by '|' ({TOKENS_EXAMPLE!r}) or one group for all; connect Story Prompts' "
                    "subject_tokens. Ignored when subject_masks is connected.")),
                io.Combo.Input("token_sharing", options=list(SHARING), default="consistory", tooltip=(
                    "consistory: images attend to the anchors' subject tokens (ConsiStory SDSA). storydiffusion: "
                    "every image attends to a random half of every other image's tokens (StoryDiffusion's "
                    "consistent self-attention; anchors, masks and mask_dropout unused).")),
                io.Mask.Input("subject_masks", optional=True, tooltip=(
                    "Subject masks (1 = subject) that replace the automatic ones: one for every image or one per "
                    "image in batch order.")),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, anchors, mask_dropout, seed, start_step, end_step, blocks, share_queries,
                subject_tokens, token_sharing, subject_masks=None) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(patch_model(
            model, anchors=anchors, mask_dropout=mask_dropout, seed=seed, start_step=start_step, end_step=end_step,
            blocks=blocks, share_queries=share_queries, subject_tokens=subject_tokens, subject_masks=subject_masks,
            token_sharing=token_sharing))
