"""Reusable ConsiStory subjects: save the anchors of a batch run, and let a later prompt generate new
settings that attend to them (the official cached mode: ``run_anchor_generation`` then
``run_extra_generation``). Math: ``attention/anchor_cache.py``; the file (folder, metadata, reading,
writing, whether it fits a run): ``nodes/consistory_subject_file.py``.

Both nodes are MODEL -> MODEL after ConsiStoryAttentionPatch, so any sampler node runs them:

* ``ConsiStorySaveSubject`` wraps each shared layer's replacement: after the layer has run, the keys
  and values of the anchors' lent tokens are kept per step, evaluation, layer and chunk, and written
  to ``models/consistory_subjects/<prefix>_<n>.safetensors`` when the sampling ends.
* ``ConsiStoryLoadSubject`` wraps the same replacements so that, inside the sharing window, every
  image of the batch (new images only; the patch's ``anchors`` is unused) attends to its own tokens
  and the cached anchors'. Another model, layers or window is refused when the node runs; another
  latent size, sigmas or a missing unconditional chunk before the first step.

With ConsiStoryFeatureInjection on the same model (before or after either node), both passes take
part, as the official ``anchor_cache_first_stage`` and ``anchor_cache_second_stage``: Save writes
one file with both stages (also the second pass's keys and values and the anchors' DIFT features,
masks and injected outputs; metadata ``injection``); Load makes the first pass attend to the first
stage, maps the new images to the saved anchors, and makes the second pass attend to the second
stage and inject from the anchors' saved outputs. Either node puts its sampler wrapper outside
Feature Injection's, so its state spans both passes. A file without the second stage is refused
with Feature Injection; one with it serves shared attention alone (its first stage) without it.

Which model evaluation of a step a layer call belongs to is counted per cond/uncond chunk by a
DIFFUSION_MODEL wrapper (samplers with several evaluations a step, hosts that split cond and uncond).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.patcher_extension
import folder_paths
from comfy_api.latest import io

from ..attention import anchor_cache as ac
from ..attention import shared_attention
from ..attention.consistory import ConsiStorySettings
from ..samplers import run_context, step_clock
from . import checks, consistory, consistory_injection, host_compat
from . import run_context as run_context_nodes
from .consistory_injection import consistory_settings
from . import consistory_subject_file as subject_file
# the file's names, kept importable from here (tests, benchmarks)
from .consistory_subject_file import (FOLDER, LOAD_NODE, METADATA_KEY, SAVE_NODE, Subject,  # noqa: F401
                                      model_fingerprint, read_subject, subject_files)
from .unet_layers import attn1_module

SAVE_KEY = "consistent_synthesis.consistory_subject_save"
LOAD_KEY = "consistent_synthesis.consistory_subject_load"
OUTER_SAMPLE = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def _consistory(node: str, model) -> ConsiStorySettings:
    settings = consistory_settings(model)
    if settings is None:
        raise checks.error(node, "model", "it carries no ConsiStory Attention Patch (or more than one); connect this "
                           "node after ConsiStory Attention Patch.")
    if settings.sharing != "consistory":
        raise checks.error(node, "model", f"its ConsiStory Attention Patch uses token_sharing {settings.sharing!r}; "
                           "reusable subjects are ConsiStory's anchors: set token_sharing to 'consistory'.")
    return settings


def _shared_layers(model, settings: ConsiStorySettings) -> dict:
    """The attn1 replacements of ``settings``' patch on ``model``, by host layer key."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return {key: patch for key, patch in replace.items() if getattr(patch, "settings", None) is settings}


def _join_injection(node: str, context, settings: ConsiStorySettings, stages, model) -> None:
    """Hands ``stages`` to Feature Injection's two passes when the model carries it."""
    if consistory_injection.carried_by(model) and \
            consistory_injection.join(context, settings, stages) is not stages:
        raise checks.error(node, "model", "it carries both ConsiStory Save Subject and Load Subject with Feature "
                           "Injection; save a subject and load one on separate models.")


def _layer_name(options: dict) -> str:
    """The host layer key of the attention call ``options`` belong to, as text."""
    return ac.layer_name((*options["block"], options["block_index"]))


class EvaluationCounter:
    """Which evaluation of the current step each chunk (0 cond, 1 uncond) is in, counted on the host."""

    def __init__(self):
        self.step = None
        self._counts: dict[int, int] = {}
        self.current: dict[int, int] = {}

    def started(self, step, chunks) -> None:
        if step != self.step:
            self.step, self._counts = step, {}
        self.current = {}
        for chunk in chunks:
            self.current[chunk] = self._counts.get(chunk, 0)
            self._counts[chunk] = self.current[chunk] + 1


def _counting_wrapper(settings: ConsiStorySettings, key: str):
    """DIFFUSION_MODEL wrapper (inside ConsiStory's): counts the real evaluations, not the vanilla call."""
    def wrapper(executor, x, timesteps, context, y=None, control=None, transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        state = _peek(options, key, settings)
        run = consistory._run(options, settings)
        if state is not None and not (run is not None and run.caching):
            state.counter.started(step_clock.current_step(options), list(options.get("cond_or_uncond") or [0]))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    return wrapper


def _peek(options: dict, key: str, settings):
    context = run_context.current(options)
    return None if context is None else context.peek((key, settings))


# -- saving -------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Capture(consistory_injection.SavingAnchors):
    """One saving run: the anchors' lent K/V by entry name and the lent-token index per step and grid
    of the stage being saved; with Feature Injection, what its second stage needs too."""

    settings: ConsiStorySettings
    anchors: int
    batch: int
    counter: EvaluationCounter = dataclasses.field(default_factory=EvaluationCounter)
    tensors: dict = dataclasses.field(default_factory=dict)
    index: dict = dataclasses.field(default_factory=dict)
    stage: str = ""  # the entry names' prefix: "" the first stage, ac.SECOND_STAGE the second
    injection: dict | None = None  # the second stage's metadata, once the first pass is done
    output_index: torch.Tensor | None = None  # the anchors' mask tokens, for their injected outputs

    def second_pass(self, context) -> None:
        self.stage, self.index, self.counter = ac.SECOND_STAGE, {}, EvaluationCounter()
        context.state((SAVE_KEY, self.settings), lambda: self)

    def first_pass_done(self, features, masks, description) -> None:
        self.tensors[ac.DIFT_NAME], self.tensors[ac.MASK_NAME] = features, masks
        self.output_index = ac.lent_token_index(masks, self.anchors)  # one host read, once a run
        self.injection = description

    def injected(self, rows, options) -> None:
        name = ac.output_name(step_clock.current_step(options), self.counter.current.get(0, 0), _layer_name(options))
        self.tensors[name] = ac.anchor_tokens(rows, self.batch, self.anchors, 0, self.output_index)


def _saving_layer(settings: ConsiStorySettings, key, inner):
    name = ac.layer_name(key)

    def patch(q, k, v, extra_options):
        out = inner(q, k, v, extra_options)
        capture = _peek(extra_options, SAVE_KEY, settings)
        run = consistory._run(extra_options, settings)
        if capture is None or run is None or run.caching or not step_clock.in_window(extra_options, settings.window):
            return out
        grid = tuple(extra_options["activations_shape"][-2:])
        keep = run.keep.get(grid)
        if keep is None:
            return out  # nothing lent at this step (no map filed yet): the cached run shares nothing either
        step = step_clock.current_step(extra_options)
        index = capture.index.get((step, grid))
        if index is None:  # the one host read of the saving run, once per step, grid and pass
            index = capture.index[(step, grid)] = ac.lent_token_index(keep, capture.anchors)
            capture.tensors[capture.stage + ac.keep_name(step, *grid)] = keep[:capture.anchors].contiguous()
        for c, chunk in enumerate(extra_options["cond_or_uncond"]):
            evaluation = capture.counter.current.get(chunk, 0)
            for kind, x in (("k", k), ("v", v)):
                capture.tensors[capture.stage + ac.entry_name(kind, step, evaluation, name, chunk)] = \
                    ac.anchor_tokens(x, capture.batch, capture.anchors, c, index)
        return out
    patch.settings = settings
    return patch


def _save_wrapper(settings: ConsiStorySettings, fingerprint: str, prefix: str, layers: list[str]):
    def wrapper(executor, *args, **kwargs):
        noise, latent, sampler, sigmas = args[:4]
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        steps = len(sigmas) - 1
        anchors = min(settings.anchors, latent.shape[0])
        with run_context_nodes.opened(options) as context:
            capture = context.state((SAVE_KEY, settings), lambda: Capture(settings, anchors, latent.shape[0]))
            _join_injection(SAVE_NODE, context, settings, capture, guider.model_patcher)
            out = executor(*args, **kwargs)
        chunks = sorted({int(n.split(ac.KEY_SEPARATOR)[-1]) for n in capture.tensors if n.startswith("k/")})
        metadata = dict(model=fingerprint, latent=list(latent.shape[1:]), sigmas=[float(s) for s in sigmas.tolist()],
                        steps=steps, sampler=subject_file.sampler_name(sampler),
                        cfg=float(getattr(guider, "cfg", 0.0) or 0.0), anchors=anchors, layers=layers,
                        window=[settings.window.start_step, settings.window.end(steps)], chunks=chunks,
                        mask_dropout=settings.mask_dropout, seed=settings.seed, share_queries=settings.share_queries,
                        given_masks=settings.subject_masks is not None)
        if capture.injection is not None:
            metadata[subject_file.INJECTION] = capture.injection
        subject_file.write_subject(prefix, capture.tensors, metadata)
        return out
    return wrapper


def save_subject(model, *, filename_prefix: str = "subject"):
    """A clone of ``model`` (patched by ConsiStoryAttentionPatch) whose sampling also saves its anchors."""
    settings = _consistory(SAVE_NODE, model)
    if not filename_prefix.strip():
        raise checks.error(SAVE_NODE, "filename_prefix", "is empty; give the subject a name, e.g. 'brown_dog'.")
    layers = _shared_layers(model, settings)
    patched = model.clone()
    for key, inner in layers.items():
        patched.set_model_attn1_replace(_saving_layer(settings, key, inner), *key)
    run_context_nodes.attach(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, SAVE_KEY,
                                 _counting_wrapper(settings, SAVE_KEY))
    patched.add_wrapper_with_key(OUTER_SAMPLE, SAVE_KEY, _save_wrapper(
        settings, model_fingerprint(model), filename_prefix.strip(), sorted(ac.layer_name(k) for k in layers)))
    consistory_injection.run_inside(patched)
    return patched


# -- loading ------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Cached(consistory_injection.CachedAnchors):
    """One cached run: the subject's tensors on the run's device, the evaluation counter, the stage read."""

    settings: ConsiStorySettings
    tensors: dict
    counter: EvaluationCounter = dataclasses.field(default_factory=EvaluationCounter)
    stage: str = ""  # "" the first stage (the first pass, or SDSA alone), ac.SECOND_STAGE the second

    def second_pass(self, context) -> None:
        self.stage, self.counter = ac.SECOND_STAGE, EvaluationCounter()
        context.state((LOAD_KEY, self.settings), lambda: self)

    def anchor_features(self, device):
        return self.tensors[ac.DIFT_NAME].to(device), self.tensors[ac.MASK_NAME].to(device)

    def anchor_outputs(self, options):
        return self.tensors.get(ac.output_name(step_clock.current_step(options), self.counter.current.get(0, 0),
                                               _layer_name(options)))


def _on_device(name: str, injection: bool) -> bool:
    """Whether a cached run needs entry ``name`` (the keep masks are a record; the second stage serves
    Feature Injection only)."""
    if name.startswith(ac.SECOND_STAGE):
        return injection and not name.startswith(ac.SECOND_STAGE + "keep" + ac.KEY_SEPARATOR)
    return not name.startswith("keep" + ac.KEY_SEPARATOR)


def _loading_layer(settings: ConsiStorySettings, key, inner, preferred):
    name = ac.layer_name(key)

    def patch(q, k, v, extra_options):
        cached = _peek(extra_options, LOAD_KEY, settings)
        run = consistory._run(extra_options, settings)
        if cached is None or run is None or run.caching or not step_clock.in_window(extra_options, settings.window):
            return inner(q, k, v, extra_options)  # plain attention, or the vanilla call's query store
        heads = extra_options["n_heads"]
        attention = host_compat.optimized_attention(extra_options, preferred)
        if run.strength is not None and key in run.queries:
            q = shared_attention.mix_queries(q, run.queries[key], run.strength)
        step = step_clock.current_step(extra_options)
        names = [[cached.stage + ac.entry_name(kind, step, cached.counter.current.get(c, 0), name, c)
                  for kind in ("k", "v")] for c in extra_options["cond_or_uncond"]]
        if any(k_name not in cached.tensors for k_name, _ in names):
            return attention(q, k, v, heads)  # the anchors lent nothing at this step (no map filed yet)
        return ac.attention_over_cached_anchors(
            q, k, v, heads, [cached.tensors[k_name] for k_name, _ in names],
            [cached.tensors[v_name] for _, v_name in names], attention=attention)
    patch.settings = settings
    return patch


def _load_wrapper(settings: ConsiStorySettings, subject: Subject, layer_count: int):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        injection = consistory_injection.carried_by(guider.model_patcher)
        if injection:
            subject_file.check_injection_stage(subject)
        subject_file.check_cached_run(subject, settings, latent, sigmas, guider)
        # the patch's own checks (masks, tokens) for a batch of new images only: no anchor is in it
        conds = getattr(guider, "conds", None) or {}
        consistory.check_run(dataclasses.replace(settings, anchors=1), latent, conds.get("positive"))
        device = guider.model_patcher.load_device
        meta = subject.metadata
        logging.info("%s: %d new images attend to the %d cached anchors of %r on steps %d-%d in %d of %d "
                     "self-attention layers%s.", LOAD_NODE, latent.shape[0], meta["anchors"], subject.name,
                     meta["window"][0], meta["window"][1] - 1, len(meta["layers"]), layer_count,
                     "; Feature Injection's second pass from its second stage" if injection else "")
        tensors = {n: t.to(device) for n, t in subject.tensors.items() if _on_device(n, injection)}
        with run_context_nodes.opened(options) as context:
            cached = context.state((LOAD_KEY, settings), lambda: Cached(settings, tensors))
            _join_injection(LOAD_NODE, context, settings, cached, guider.model_patcher)
            return executor(*args, **kwargs)
    return wrapper


def load_subject(model, subject: Subject):
    """A clone of ``model`` (patched by ConsiStoryAttentionPatch) whose batch attends to ``subject``'s anchors."""
    settings = _consistory(LOAD_NODE, model)
    meta = subject.metadata
    fingerprint = model_fingerprint(model)
    if fingerprint != meta["model"]:
        raise checks.error(LOAD_NODE, "subject", f"{subject.name!r} was saved from another model (fingerprint "
                           f"{meta['model']}, this model {fingerprint}: another checkpoint, LoRA or strength); load "
                           "it with the model it was saved with.")
    layers = _shared_layers(model, settings)
    names = sorted(ac.layer_name(k) for k in layers)
    if names != meta["layers"]:
        raise checks.error(LOAD_NODE, "model", f"its ConsiStory Attention Patch shares in {len(names)} layers; "
                           f"{subject.name!r} was saved from {len(meta['layers'])} ({meta['layers'][:3]}...): set "
                           "blocks as when it was saved.")
    if consistory_injection.carried_by(model):
        subject_file.check_injection_stage(subject)
    diffusion_model = model.get_model_object("diffusion_model")
    all_layers = len(model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {}))
    patched = model.clone()
    for key, inner in layers.items():
        preferred = getattr(attn1_module(diffusion_model, key), "comfy_attention", None)
        patched.set_model_attn1_replace(_loading_layer(settings, key, inner, preferred), *key)
    # the patch's run check counts anchors in the batch; this run's anchors are in the file
    patched.remove_wrappers_with_key(OUTER_SAMPLE, consistory.KEY)
    run_context_nodes.attach(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, LOAD_KEY,
                                 _counting_wrapper(settings, LOAD_KEY))
    patched.add_wrapper_with_key(OUTER_SAMPLE, LOAD_KEY, _load_wrapper(settings, subject, max(all_layers, len(layers))))
    consistory_injection.run_inside(patched)
    return patched


class ConsiStorySaveSubject(io.ComfyNode):
    """Saves the anchors of a ConsiStory run, so later prompts can reuse the subject."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=SAVE_NODE,
            display_name="ConsiStory Save Subject",
            category="consistent synthesis/ConsiStory",
            description=("Keeps what the anchor images lend to the others (their subject's attention keys and values "
                         "at every step and shared layer) and writes it, when the sampler ends, to "
                         f"models/{FOLDER}/<filename_prefix>_00001.safetensors. Load it with ConsiStory Load Subject "
                         "to draw the same subject in new settings without generating the anchors again. With "
                         "ConsiStory Feature Injection on the same model (before or after this node) the file holds "
                         "both passes, for Load Subject with Feature Injection."),
            inputs=[
                io.Model.Input("model", tooltip="The model from ConsiStory Attention Patch (token_sharing "
                               "'consistory'), with or without ConsiStory Feature Injection; its first 'anchors' "
                               "images are saved."),
                io.String.Input("filename_prefix", default="consistory_subject", tooltip=(
                    f"Name of the file in models/{FOLDER} (a number is appended); may hold a subfolder.")),
            ],
            outputs=[io.Model.Output(tooltip="The model whose sampling also saves the anchors.")],
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(save_subject(model, filename_prefix=filename_prefix))


class ConsiStoryLoadSubject(io.ComfyNode):
    """New settings of a saved subject: the batch attends to the cached anchors."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=LOAD_NODE,
            display_name="ConsiStory Load Subject",
            category="consistent synthesis/ConsiStory",
            description=("Every image of the batch attends to the anchors saved by ConsiStory Save Subject (the "
                         "official cached mode), so new prompts show the same subject; the anchors are not "
                         "generated again. Sample at the saved size with the saved steps and scheduler. With "
                         "ConsiStory Feature Injection on this model (before or after this node) the new images also "
                         "take the anchors' fine detail; that needs a subject saved with Feature Injection."),
            inputs=[
                io.Model.Input("model", tooltip="The same model, behind a ConsiStory Attention Patch with the saved "
                               "blocks and steps (its anchors, mask_dropout and seed are unused here)."),
                io.Combo.Input("subject", options=subject_files(), tooltip=(
                    f"A file saved by ConsiStory Save Subject (models/{FOLDER}). One saved with Feature Injection "
                    "also serves a model without it (shared attention only).")),
            ],
            outputs=[io.Model.Output(tooltip="The model whose batch attends to the saved anchors.")],
        )

    @classmethod
    def execute(cls, model, subject) -> io.NodeOutput:
        checks.model(LOAD_NODE, "model", model)
        path = folder_paths.get_full_path(FOLDER, subject) if subject else None
        if path is None:
            raise checks.error(LOAD_NODE, "subject", f"{subject!r} is not in models/{FOLDER}; save a subject with "
                               "ConsiStory Save Subject, then refresh the page.")
        return io.NodeOutput(load_subject(model, read_subject(path, subject)))
