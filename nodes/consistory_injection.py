"""ConsiStoryFeatureInjection: ConsiStory's second pass (feature injection) on a model that carries
ConsiStoryAttentionPatch, so that any sampler node runs both passes.

The math is in ``attention/feature_injection.py``. Here, one OUTER_SAMPLE wrapper runs the sampling
twice with the same noise, sigmas and sampler, as the official run script calls its pipeline twice
with the same latents:

1. the first pass is the ConsiStory run as it is; an ``output_block_patch`` records the conditional
   rows of the first decoder stage's output (``up_blocks[0]``, the input of the output block after the
   first upsampler) at the step of timestep 261 (the DIFT features), and the run's subject masks
   before dropout are read at its end;
2. the nearest-neighbour maps are built once, on the device, at the latent/2 grid (the official 64 at
   1024 px); the second pass starts from a fresh run context (a fresh ConsiStory run: the same dropout
   draws, as the official ``torch.manual_seed(0)``), and an ``attn1_output_patch`` blends, at steps
   ``steps // 10 .. steps // 3``, the conditional rows of every input- and output-block
   self-attention layer at that grid.

The wrapper is the one place that knows which pass runs; what a pass needs lives in that pass's run
context, so nothing survives the prompt.

With a saved subject (the official cached mode, ``run_anchor_generation`` / ``run_extra_generation``),
ConsiStory Save or Load Subject's wrapper runs outside this one (those nodes order the two wrappers
so, whichever node comes first) and files its state in the first pass's context under
``SUBJECT_KEY``; this wrapper hands it to the second pass (``SubjectStages.second_pass``: the second
stage of the file). Saving (``SavingAnchors``): the anchors' smoothed DIFT features and masks are
kept after the first pass, their injected outputs in the second. Loading (``CachedAnchors``): the
new images are mapped to the file's anchors (``anchor_nn_map``) and blend in the anchors' saved
outputs (``inject_anchors``); the batch holds only new images.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample
from comfy_api.latest import io

from ..attention import anchor_cache, feature_injection as fi
from ..attention.consistory import ConsiStorySettings
from ..attention.cross_attention import map_size
from ..attention.layer_selection import StepWindow
from ..samplers import run_context, step_clock
from . import checks, consistory
from . import run_context as run_context_nodes

NODE = "ConsiStoryFeatureInjection"
KEY = "consistent_synthesis.consistory_injection"
SUBJECT_KEY = "consistent_synthesis.consistory_injection_subject"
INJECTION_BLOCKS = ("input", "output")  # the official inject_unet_parts=['up', 'down']

_error = functools.partial(checks.error, NODE)


@dataclass(frozen=True, eq=False)
class InjectionSettings:
    """The node's settings: the ConsiStory patch it extends, the blend weight, where DIFT is read."""

    consistory: ConsiStorySettings
    alpha: float
    dift_block: int  # the output block whose input is the first decoder stage's output


@dataclass(eq=False)
class Recording:
    """The first pass: the step whose DIFT features are kept, and those features once seen."""

    dift_step: int
    batch: int
    features: torch.Tensor | None = None


class SubjectStages:
    """A saved subject taking part in both passes (ConsiStory Save / Load Subject): filed in the first
    pass's context under ``(SUBJECT_KEY, consistory settings)`` by ``join``."""

    def second_pass(self, context) -> None:
        """The second pass begins in ``context`` (a fresh one): file there what its layers read, and
        switch to the file's second stage."""
        raise NotImplementedError


class SavingAnchors(SubjectStages):
    """Save Subject: keeps what the cached mode's second stage needs of the batch's anchors."""

    def first_pass_done(self, features: torch.Tensor, masks: torch.Tensor, description: dict) -> None:
        """The anchors' smoothed DIFT features ``(anchors, c, h, w)`` and masks before dropout
        ``(anchors, tokens)`` at the injection grid; ``description``: the stage's settings, for the file."""
        raise NotImplementedError

    def injected(self, rows: torch.Tensor, options: dict) -> None:
        """One injected layer call's conditional rows after injection (the anchors first)."""
        raise NotImplementedError


class CachedAnchors(SubjectStages):
    """Load Subject: the anchors are in a file; the batch holds only new images."""

    def anchor_features(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchors' smoothed DIFT features and masks, as ``SavingAnchors.first_pass_done`` got them."""
        raise NotImplementedError

    def anchor_outputs(self, options: dict) -> torch.Tensor | None:
        """The anchors' injected outputs of this layer call, at their mask tokens only (the rows of
        ``anchor_cache.on_lent_outputs``); None where the saving run made no such call."""
        raise NotImplementedError


def carried_by(model) -> bool:
    """Whether ``model`` carries this node's two passes (alpha 0 adds nothing: one pass)."""
    return KEY in model.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})


def run_inside(patched) -> None:
    """Moves this node's sampler wrapper after the others on ``patched`` (wrappers run in the order of
    their keys): a saved subject's wrapper, added after it, must run outside both passes."""
    outer_sample = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    wrappers = list(patched.get_wrappers(outer_sample, KEY))
    if wrappers:
        patched.remove_wrappers_with_key(outer_sample, KEY)
        for wrapper in wrappers:
            patched.add_wrapper_with_key(outer_sample, KEY, wrapper)


def join(context, settings: ConsiStorySettings, stages: SubjectStages) -> SubjectStages:
    """Files ``stages`` for this run's feature injection; returns what is filed (another subject's
    stages when one was filed first)."""
    return context.state((SUBJECT_KEY, settings), lambda: stages)


@dataclass(eq=False)
class Injecting:
    """The second pass: one ``FeatureInjector`` per grid it acts at, its steps, and the saved subject."""

    window: StepWindow
    injectors: dict = field(default_factory=dict)
    subject: SubjectStages | None = None


def _state(options: dict, settings: InjectionSettings):
    context = run_context.current(options)
    return None if context is None else context.peek((KEY, settings))


def _in_vanilla_call(options: dict, settings: InjectionSettings) -> bool:
    """Inside ConsiStory's extra vanilla-query call, which neither records nor injects (official)."""
    context = run_context.current(options)
    run = None if context is None else context.peek((consistory.KEY, settings.consistory))
    return run is not None and run.caching


def _cond_rows(options: dict, batch: int, rows: int) -> slice | None:
    chunks = options.get("cond_or_uncond") or [0]
    if 0 not in chunks or rows != len(chunks) * batch:
        return None
    c = chunks.index(0)
    return slice(c * batch, (c + 1) * batch)


def _dift_recorder(settings: InjectionSettings):
    """``output_block_patch``: the conditional rows of ``h`` entering the DIFT block at the DIFT step."""
    def record(h, hsp, transformer_options):
        if transformer_options.get("block") != ("output", settings.dift_block):
            return h, hsp
        state = _state(transformer_options, settings)
        if not isinstance(state, Recording) or state.features is not None or \
                _in_vanilla_call(transformer_options, settings):
            return h, hsp
        if step_clock.current_step(transformer_options) != state.dift_step:
            return h, hsp
        rows = _cond_rows(transformer_options, state.batch, h.shape[0])
        if rows is not None:
            state.features = h[rows].detach().clone()  # a later patch (FreeU) may scale h in place
        return h, hsp
    return record


def _output_patch(settings: InjectionSettings):
    """``attn1_output_patch``: the second pass's blend in the layers at an injection grid."""
    def inject(n, extra_options):
        state = _state(extra_options, settings)
        if not isinstance(state, Injecting):
            return n
        block = extra_options.get("block")
        if block is None or block[0] not in INJECTION_BLOCKS:
            return n
        injector = state.injectors.get(tuple(extra_options["activations_shape"][-2:]))
        if injector is None or _in_vanilla_call(extra_options, settings):
            return n
        if not step_clock.in_window(extra_options, state.window):
            return n
        rows = _cond_rows(extra_options, injector.batch, n.shape[0])
        if rows is None:
            return n
        if isinstance(state.subject, CachedAnchors):
            anchor_outputs = state.subject.anchor_outputs(extra_options)
            if anchor_outputs is None:
                return n
            injected = injector.inject_anchors(n[rows], anchor_outputs.to(n.dtype), settings.alpha)
        else:
            injected = injector.inject_outputs(n[rows], settings.alpha)
            if isinstance(state.subject, SavingAnchors):
                state.subject.injected(injected, extra_options)
        out = n.clone()
        out[rows] = injected
        return out
    inject.settings = settings
    return inject


def injection_grid(height: int, width: int) -> tuple[int, int]:
    """The latent/2 grid (one stride-2 downsampling: ``ceil(s / 2)``), the official 64 at 1024 px."""
    return -(-height // 2), -(-width // 2)


def _injectors(context, settings: InjectionSettings, recording: Recording, latent_shape, subject,
               description: dict) -> dict:
    """The injectors of the second pass from the first pass's context; empty when nothing was recorded."""
    run = context.peek((consistory.KEY, settings.consistory))
    if recording.features is None or run is None:
        return {}
    height, width = latent_shape[-2:]
    grid = injection_grid(height, width)
    masks = run.last_mask(*grid, map_size(height, width), recording.features.device)
    if masks is None:
        return {}
    features = fi.gaussian_smooth(recording.features)
    if isinstance(subject, CachedAnchors):  # run_extra_generation: to the saved anchors only
        anchor_features, anchor_masks = subject.anchor_features(features.device)
        nn_map, nn_distances = fi.anchor_nn_map(features, anchor_features, anchor_masks, grid)
        injector = fi.FeatureInjector.from_anchor_nn_map(nn_map, nn_distances, masks)
        return {grid: anchor_cache.on_lent_outputs(injector, anchor_masks)}
    anchors = min(settings.consistory.anchors, recording.batch)
    nn_map, nn_distances = fi.cyclic_nn_map(features, masks, grid, sources=anchors)
    if isinstance(subject, SavingAnchors):  # run_anchor_generation's dift_cache and anchors_last_mask
        subject.first_pass_done(features[:anchors], masks[:anchors], description | dict(grid=list(grid)))
    return {grid: fi.FeatureInjector.from_nn_map(nn_map, nn_distances, masks, anchors)}


def _conds_copy(conds: dict) -> dict:
    return {k: [c.copy() for c in v] for k, v in conds.items()}


def _outer_sample_wrapper(settings: InjectionSettings):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        steps = len(sigmas) - 1
        if steps < 1:
            return executor(*args, **kwargs)
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        dift_sigma = model_sampling.percent_to_sigma(1.0 - fi.DIFT_TIMESTEP / 999.0)  # sigma(t=261), once a run
        dift_step = fi.dift_step(sigmas.tolist(), dift_sigma)
        first, last = fi.injection_steps(steps)
        conds = _conds_copy(getattr(guider, "conds", None) or {})
        description = dict(alpha=settings.alpha, dift_step=dift_step, steps=[first, last])
        with run_context_nodes.opened(options) as first_context:
            recording = first_context.state((KEY, settings), lambda: Recording(dift_step, latent.shape[0]))
            subject = first_context.peek((SUBJECT_KEY, settings.consistory))
            first_pass = executor(*args, **kwargs)
            injectors = _injectors(first_context, settings, recording, latent.shape, subject, description)
        if not injectors:
            logging.warning("%s: no DIFT features or subject masks were recorded in the first pass (step %d of %d); "
                            "the images are those of ConsiStory without feature injection.", NODE, dift_step, steps)
            return first_pass
        logging.info("%s: DIFT features at step %d of %d; second pass injecting at steps %d-%d, alpha %.2f, grid %s.",
                     NODE, dift_step, steps, first, last, settings.alpha, next(iter(injectors)))
        guider.conds = _conds_copy(conds)  # the first pass consumed its processed copies
        previous = options.get(run_context.KEY)
        second_context = options[run_context.KEY] = run_context.RunContext()
        if subject is not None:
            subject.second_pass(second_context)
        second_context.state((KEY, settings), lambda: Injecting(StepWindow(first, last + 1), injectors, subject))
        try:
            return executor(*args, **kwargs)
        finally:
            if previous is None:
                options.pop(run_context.KEY, None)
            else:
                options[run_context.KEY] = previous
    return wrapper


def consistory_settings(model) -> ConsiStorySettings | None:
    """The settings of the ConsiStoryAttentionPatch on ``model`` (its attn1 replacements carry them)."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    found = {getattr(p, "settings", None) for p in replace.values()}
    found = [s for s in found if isinstance(s, ConsiStorySettings)]
    return found[0] if len(found) == 1 else None


def dift_block(diffusion_model) -> int | None:
    """The output block after the first one that upsamples: its input is ``up_blocks[0]``'s output."""
    for index, block in enumerate(getattr(diffusion_model, "output_blocks", None) or []):
        if any(isinstance(m, Upsample) for m in block.modules()):
            return index + 1
    return None


def patch_model(model, *, alpha: float = fi.INJECTION_ALPHA):
    """A clone of ``model`` (patched by ConsiStoryAttentionPatch) whose sampling runs ConsiStory's two passes."""
    cs = consistory_settings(model)
    if cs is None:
        raise _error("model", "it carries no ConsiStory Attention Patch (or more than one); connect this node "
                     "after ConsiStory Attention Patch.")
    if cs.sharing != "consistory":
        raise _error("model", f"its ConsiStory Attention Patch uses token_sharing {cs.sharing!r}; feature "
                     "injection needs ConsiStory's subject masks: set token_sharing to 'consistory'.")
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise _error("alpha", f"{alpha} is not a number from 0 to 1 (official: 0.8).")
    block = dift_block(model.get_model_object("diffusion_model"))
    if block is None:
        raise _error("model", "this model's decoder has no upsampling block to read DIFT features from; feature "
                     "injection is built for SD1.x, SD2.x and SDXL UNets.")
    settings = InjectionSettings(consistory=cs, alpha=float(alpha), dift_block=block)
    patched = model.clone()
    if not settings.alpha:
        return patched  # the official `if alpha:`: nothing to inject, one pass
    patches = patched.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    # first in the list: the features as the decoder stage made them, before FreeU's scaling
    patches["output_block_patch"] = [_dift_recorder(settings)] + list(patches.get("output_block_patch", []))
    patched.set_model_attn1_output_patch(_output_patch(settings))
    run_context_nodes.attach(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample_wrapper(settings))
    return patched


class ConsiStoryFeatureInjection(io.ComfyNode):
    """ConsiStory's feature injection: a second pass that copies the anchors' fine detail onto each subject."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="ConsiStory Feature Injection",
            category="consistent synthesis/ConsiStory",
            description=("ConsiStory's second pass: the sampler runs twice with the same noise. The first run finds, "
                         "from the decoder's features (DIFT), which anchor pixel matches each subject pixel; the "
                         "second blends those matches into each image's self-attention output, so textures and "
                         "small parts stay the same across the story. Costs a second sampling run. With ConsiStory "
                         "Save Subject on the model the subject file keeps both passes; with Load Subject the new "
                         "images take the detail of the saved anchors (a subject saved with Feature Injection)."),
            inputs=[
                io.Model.Input("model", tooltip="The model from ConsiStory Attention Patch (token_sharing "
                               "'consistory'); a clone is patched."),
                io.Float.Input("alpha", default=fi.INJECTION_ALPHA, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Weight of the matched anchor feature in the blend (official: 0.8); 0 turns injection off "
                    "(one pass).")),
            ],
            outputs=[io.Model.Output(tooltip="The model whose sampling runs both ConsiStory passes.")],
        )

    @classmethod
    def execute(cls, model, alpha) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(patch_model(model, alpha=alpha))
