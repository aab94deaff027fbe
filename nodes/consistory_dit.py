"""ConsiStoryAttentionPatch on MM-DiT models (Flux, SD3): subject-driven shared self-attention over the
joint attention of the chosen blocks, only image tokens shared, text tokens never lent.

The same two public hooks as MasaCtrl's DiT form (``masactrl_dit.py``), on a clone of the user's model
and chained with patches already there: ``patches_replace["dit"]`` block entries put an attention
override in the block's ``transformer_options``, and the override computes
``joint_shared_attention.joint_subject_driven_attention`` with the host's attention function. An
APPLY_MODEL wrapper starts each model call (the step, the latent's patch grid, the text length) and
makes the vanilla call whose image queries are mixed in the first tenth of the steps.

Blocks (the node's ``blocks`` input, read for a DiT; no official Flux setting exists):

* ``up`` (default), the decoder's analogue, the later part of the network: Flux's single-stream
  blocks (38 of 57 on FLUX.1), SD3's second half of joint blocks.
* ``mid+up``: Flux's second half of double blocks and the single blocks; SD3 from the first third on.
* ``down+mid+up``: every block.

Automatic masks: the conditional rows' image-to-subject-token probabilities of the plain joint
attention (own keys only, as the official cross-attention is never shared), mean over heads, in
every double-stream block (Flux's double blocks, every SD3 joint block: the blocks where text has
its own stream, the analogue of the UNet's cross-attention layers; the official rule takes every
cross-attention layer at its 32 x 32 grid), at every step; the mean of the last 20 steps' maps, Otsu
per subject word, OR over words, at the patch grid (one resolution per DiT). Recording costs about
half an attention call per double-stream block per step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

import comfy.patcher_extension

from ..attention import joint_shared_attention as joint
from ..attention import shared_attention
from ..attention.consistory import ConsiStorySettings
from ..samplers import run_context, step_clock
from . import checks, masactrl_dit
from . import run_context as run_context_nodes
from .consistory import check_run, copy_control

NODE = "ConsiStoryAttentionPatch"
KEY = "consistent_synthesis.consistory_dit"
LAYER_KEY = KEY + ".layer"  # the patched block running now (tests read it)
OVERRIDE = masactrl_dit.OVERRIDE

_error = functools.partial(checks.error, NODE)


def shared_blocks(keys: list[tuple[str, int]], blocks: str) -> tuple[int, ...]:
    """Block numbers (execution order) where sharing acts, for the node's ``blocks`` choice."""
    doubles = [i for i, (name, _) in enumerate(keys) if name == "double_block"]
    singles = [i for i, (name, _) in enumerate(keys) if name == "single_block"]
    n = len(keys)
    if blocks == "down+mid+up":
        return tuple(range(n))
    if singles:  # Flux
        return tuple(singles) if blocks == "up" else tuple(doubles[len(doubles) // 2:] + singles)
    return tuple(range(n // 2 if blocks == "up" else n // 3, n))


def map_blocks(keys: list[tuple[str, int]]) -> tuple[int, ...]:
    """Block numbers whose joint attention gives the subject maps: the double-stream blocks."""
    return tuple(i for i, (name, _) in enumerate(keys) if name == "double_block")


def _run(options: dict, settings: ConsiStorySettings, batch: int | None = None):
    context = run_context.current(options)
    if context is None:
        return None
    if batch is None:
        return context.peek((KEY, settings))
    return context.state((KEY, settings), lambda: joint.JointConsiStoryRun(settings, batch))


class _Override:
    """The attention override of one block call: maps, the vanilla queries, shared attention."""

    def __init__(self, run, layer: int, image_tokens: int, share: bool, record: bool, previous=None):
        self.run, self.layer, self.image_tokens = run, layer, image_tokens
        self.share, self.record, self.previous = share, record, previous

    def __call__(self, func, *args, **kwargs):
        q, k, v, heads, rest, call = masactrl_dit.attention_arguments(func, args, kwargs, self.previous)
        image_start = q.shape[2] - self.image_tokens
        if image_start < 0:  # not an attention over this block's tokens
            return call(q, k, v, heads, *rest, **kwargs)
        run = self.run
        grid_tokens = run.grid[0] * run.grid[1]
        if self.record and image_start > 0:
            self._record_maps(q, k, image_start, grid_tokens, kwargs["transformer_options"])
        place = (self.layer, image_start == 0)  # SD3's image-only second attention is a place of its own
        if run.caching:
            run.queries[place] = q[:, :, image_start:]  # the vanilla call (QueryStore 'cache'): plain attention
            return call(q, k, v, heads, *rest, **kwargs)
        if not self.share:
            return call(q, k, v, heads, *rest, **kwargs)
        if run.strength is not None and place in run.queries:  # the image queries only; text untouched
            mixed = shared_attention.mix_queries(q[:, :, image_start:], run.queries[place], run.strength)
            q = torch.cat([q[:, :, :image_start], mixed], dim=2)
        lent = run.lent(*run.grid, run.grid, q.device)
        mask = kwargs.pop("mask", None)
        if lent is None:
            return call(q, k, v, heads, *rest, mask=mask, **kwargs)
        if self.image_tokens > grid_tokens:  # tokens after the latent's (reference latents) are never lent
            lent = torch.cat([lent, lent.new_zeros(lent.shape[0], self.image_tokens - grid_tokens)], dim=1)

        def attention(q_, k_, v_, mask=None):
            return call(q_, k_, v_, heads, *rest, mask=mask, **kwargs)
        if run.settings.sharing == "storydiffusion":
            return joint.joint_consistent_attention(q, k, v, image_start=image_start, token_keep=lent,
                                                    attention=attention, mask=mask)
        return joint.joint_subject_driven_attention(q, k, v, image_start=image_start, subject_keep=lent,
                                                    anchors=run.settings.anchors, attention=attention, mask=mask)

    def _record_maps(self, q, k, image_start, grid_tokens, options):
        cond_or_uncond = options.get("cond_or_uncond", [0])
        if 0 not in cond_or_uncond:
            return
        run = self.run
        c = cond_or_uncond.index(0)
        rows = slice(c * run.batch, (c + 1) * run.batch)
        columns = run.subject_columns(q.device)
        maps = joint.subject_token_maps(q[rows], k[rows], image_start, columns)
        run.record_maps(maps[:, :, :grid_tokens])


def _block_patch(settings: ConsiStorySettings, layer: int, single: bool, shared: bool, maps: bool, previous=None):
    """The ``patches_replace["dit"]`` entry of one block: a closure over immutable settings."""
    def patch(args: dict, extra: dict) -> dict:
        block = extra["original_block"] if previous is None else (lambda a: previous(a, extra))
        options = args.get("transformer_options") or {}
        run = _run(options, settings)
        if run is None:
            return block(args)
        share = shared and step_clock.in_window(options, settings.window) and run.shares(layer)
        record = maps and not run.caching
        if not (share or record or (shared and run.caching)):
            return block(args)
        image_tokens = args["img"].shape[1] - (run.text_tokens if single else 0)
        patched = dict(options)
        patched[OVERRIDE] = _Override(run, layer, image_tokens, share, record, options.get(OVERRIDE))
        patched[LAYER_KEY] = layer
        return block(dict(args, transformer_options=patched))
    return patch


def _apply_model_wrapper(settings: ConsiStorySettings, patch_size: int):
    def wrapper(executor, x, t, *args, **kwargs):
        # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)
        args = list(args)
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        context = args[1] if len(args) > 1 else kwargs.get("c_crossattn")
        chunks = len(options.get("cond_or_uncond", [0])) or 1
        run = _run(options, settings, x.shape[0] // chunks)
        if run is None:
            return executor(x, t, *args, **kwargs)
        run.begin(step_clock.current_step(options))
        run.grid = (-(-x.shape[-2] // patch_size), -(-x.shape[-1] // patch_size))
        run.text_tokens = context.shape[1] if context is not None else 0
        sample_sigmas = options.get("sample_sigmas")
        steps = sample_sigmas.shape[-1] - 1 if sample_sigmas is not None else 0
        if run.wants_vanilla_call(steps):
            vanilla = list(args)
            if len(vanilla) > 2:
                vanilla[2] = copy_control(vanilla[2])
            run.caching = True
            try:
                executor(x, t, *vanilla, **kwargs)
            finally:
                run.caching = False
            run.vanilla_done(steps)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.call_done()
    return wrapper


def _outer_sample_wrapper(settings: ConsiStorySettings, count: int, maps: int):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        conds = getattr(getattr(executor, "class_obj", None), "conds", None) or {}
        check_run(settings, latent, conds.get("positive"))
        steps = len(sigmas) - 1
        logging.info("%s: %s shared joint attention (image tokens) on steps %d-%d of %d in %d of %d blocks%s%s.",
                     NODE, settings.sharing, settings.window.start_step, settings.window.end(steps) - 1, steps,
                     len(settings.layers), count, f", subject maps from {maps} blocks" if settings.automatic else "",
                     ", vanilla queries mixed" if settings.share_queries else "")
        return executor(*args, **kwargs)
    return wrapper


def _patch_size(diffusion_model) -> int:
    size = getattr(diffusion_model, "patch_size", None)
    if size is None:
        size = diffusion_model.x_embedder.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def patch_dit(model_patcher, settings: ConsiStorySettings, blocks: str):
    """A clone of ``model_patcher`` (Flux or SD3) with ConsiStory's shared attention in ``blocks``;
    ``settings`` come checked from ``consistory.patch_model`` (their UNet layers are replaced here)."""
    if not masactrl_dit.host_has_hooks():
        raise _error("model", f"this ComfyUI is too old for ConsiStory on Flux and SD3: it needs the DiT attention "
                     f"override (ComfyUI {masactrl_dit.HOST_VERSION} or newer). Update ComfyUI.")
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    keys = masactrl_dit.block_keys(diffusion_model)
    selected = shared_blocks(keys, blocks)
    settings = dataclasses.replace(settings, layers=selected)
    recorded = map_blocks(keys) if settings.automatic else ()
    patched = model_patcher.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for layer in sorted(set(selected) | set(recorded)):
        name, index = keys[layer]
        patched.set_model_patch_replace(_block_patch(settings, layer, name == "single_block", layer in selected,
                                                     layer in recorded, existing.get(keys[layer])),
                                        "dit", name, index)
    run_context_nodes.attach(patched)  # first: its APPLY_MODEL wrapper sets the step this one reads
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY,
                                 _apply_model_wrapper(settings, _patch_size(diffusion_model)))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY,
                                 _outer_sample_wrapper(settings, len(keys), len(recorded)))
    return patched
