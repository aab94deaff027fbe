"""Reusable ConsiStory subjects: save the anchors of a batch run, and let a later prompt generate new
settings that attend to them (the official cached mode: ``run_anchor_generation`` then
``run_extra_generation``). The math is in ``attention/anchor_cache.py``.

Both nodes are MODEL -> MODEL and sit after ConsiStoryAttentionPatch, as ConsiStoryFeatureInjection
does, so any sampler node runs them:

* ``ConsiStorySaveSubject`` wraps each shared layer's replacement: after the layer has run, the keys
  and values of the anchors' lent tokens are kept per step, evaluation, layer and chunk; when the
  sampling ends they go to ``models/consistory_subjects/<prefix>_<n>.safetensors`` with the run's
  identity (model fingerprint, latent size, sigmas, layers, window, anchors) in the metadata.
* ``ConsiStoryLoadSubject`` wraps the same replacements so that, inside the sharing window, every
  image of the batch attends to its own tokens and the cached anchors' (the batch holds only new
  images; the patch's ``anchors`` input is then unused). A file made with another model, layers or
  window is refused when the node runs; another latent size, sigmas or a missing unconditional
  chunk when the sampling starts, before any step.

Which model evaluation of a step a layer call belongs to is counted per cond/uncond chunk by a
DIFFUSION_MODEL wrapper, so samplers with several evaluations a step and hosts that split the cond
and uncond rows into separate calls find the right entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
from .unet_layers import attn1_module

SAVE_NODE = "ConsiStorySaveSubject"
LOAD_NODE = "ConsiStoryLoadSubject"
SAVE_KEY = "consistent_synthesis.consistory_subject_save"
LOAD_KEY = "consistent_synthesis.consistory_subject_load"
FOLDER = "consistory_subjects"
FORMAT = "consistory-subject"
VERSION = 1
METADATA_KEY = "consistory_subject"


def subjects_folder() -> list[str]:
    """The folders of saved subjects (``models/consistory_subjects`` unless extra_model_paths adds some)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                       {".safetensors"})
    return folder_paths.get_folder_paths(FOLDER)


def subject_files() -> list[str]:
    subjects_folder()
    return folder_paths.get_filename_list(FOLDER)


def model_fingerprint(model) -> str:
    """A cheap, stable identity of the UNet a cache belongs to: the class and prediction type, every
    parameter's name and shape, the |w| and w^2 sums of a few weights (4 digits, so fp16 and fp32
    copies of one checkpoint agree), and the strengths of the patches (LoRA) on the patcher."""
    diffusion_model = model.get_model_object("diffusion_model")
    digest = hashlib.sha256()
    base = getattr(model, "model", None)
    digest.update(f"{type(base).__name__}:{getattr(getattr(base, 'model_type', None), 'name', '')};".encode())
    params = list(diffusion_model.named_parameters())
    for name, p in params:
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    probes = [params[i] for i in sorted({0, len(params) // 3, len(params) // 2, len(params) - 1})] if params else []
    with torch.no_grad():
        for name, p in probes:
            w = p.detach().to(torch.float64)
            digest.update(f"{name}={w.abs().sum().item():.4g},{w.square().sum().item():.4g};".encode())
    for key in sorted(getattr(model, "patches", {}) or {}):
        for patch in model.patches[key]:
            strengths = [x for x in (patch[0], patch[2] if len(patch) > 2 else None) if isinstance(x, (int, float))]
            digest.update(f"{key}:{','.join(f'{x:.6g}' for x in strengths)};".encode())
    return digest.hexdigest()[:20]


def _consistory(node: str, model) -> ConsiStorySettings:
    settings = consistory_settings(model)
    if settings is None:
        raise checks.error(node, "model", "it carries no ConsiStory Attention Patch (or more than one); connect this "
                           "node after ConsiStory Attention Patch.")
    if settings.sharing != "consistory":
        raise checks.error(node, "model", f"its ConsiStory Attention Patch uses token_sharing {settings.sharing!r}; "
                           "reusable subjects are ConsiStory's anchors: set token_sharing to 'consistory'.")
    return settings


def _refuse_injection(node: str, model) -> None:
    """Feature injection with a saved subject (the official second-stage cache, the anchors' DIFT features
    and injected outputs) is not built: refused rather than run with the batch's first images as anchors."""
    if consistory_injection.KEY in model.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {}):
        raise checks.error(node, "model", "it carries ConsiStory Feature Injection, which does not yet work with "
                           "saved subjects; sample without Feature Injection.")


def _shared_layers(model, settings: ConsiStorySettings) -> dict:
    """The attn1 replacements of ``settings``' patch on ``model``, by host layer key."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return {key: patch for key, patch in replace.items() if getattr(patch, "settings", None) is settings}


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
class Capture:
    """One saving run: the anchors' lent K/V by entry name, the lent-token index per step and grid."""

    anchors: int
    batch: int
    counter: EvaluationCounter = dataclasses.field(default_factory=EvaluationCounter)
    tensors: dict = dataclasses.field(default_factory=dict)
    index: dict = dataclasses.field(default_factory=dict)


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
        if index is None:  # the one host read of the saving run, once per step and grid
            index = capture.index[(step, grid)] = ac.lent_token_index(keep, capture.anchors)
            capture.tensors[ac.keep_name(step, *grid)] = keep[:capture.anchors].contiguous()
        for c, chunk in enumerate(extra_options["cond_or_uncond"]):
            evaluation = capture.counter.current.get(chunk, 0)
            for kind, x in (("k", k), ("v", v)):
                capture.tensors[ac.entry_name(kind, step, evaluation, name, chunk)] = \
                    ac.anchor_tokens(x, capture.batch, capture.anchors, c, index)
        return out
    patch.settings = settings
    return patch


def _unique_path(prefix: str) -> str:
    folder = subjects_folder()[0]
    stem = os.path.normpath(os.path.join(folder, prefix))
    if not stem.startswith(os.path.normpath(folder) + os.sep):
        raise checks.error(SAVE_NODE, "filename_prefix", f"{prefix!r} leaves the {FOLDER} folder; use a plain name "
                           "or a subfolder like 'dogs/brown_dog'.")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    taken = {int(m.group(1)) for f in os.listdir(os.path.dirname(stem))
             for m in [re.fullmatch(re.escape(os.path.basename(stem)) + r"_(\d+)\.safetensors", f)] if m}
    return f"{stem}_{max(taken, default=0) + 1:05d}.safetensors"


def _sampler_name(sampler) -> str:
    return getattr(getattr(sampler, "sampler_function", None), "__name__", type(sampler).__name__)


def _save_wrapper(settings: ConsiStorySettings, fingerprint: str, prefix: str, layers: list[str]):
    def wrapper(executor, *args, **kwargs):
        noise, latent, sampler, sigmas = args[:4]
        guider = executor.class_obj
        _refuse_injection(SAVE_NODE, guider.model_patcher)
        options = guider.model_options.setdefault("transformer_options", {})
        steps = len(sigmas) - 1
        anchors = min(settings.anchors, latent.shape[0])
        with run_context_nodes.opened(options) as context:
            capture = context.state((SAVE_KEY, settings), lambda: Capture(anchors, latent.shape[0]))
            out = executor(*args, **kwargs)
        chunks = sorted({int(n.split(ac.KEY_SEPARATOR)[-1]) for n in capture.tensors if n.startswith("k/")})
        metadata = dict(format=FORMAT, version=VERSION, model=fingerprint, latent=list(latent.shape[1:]),
                        sigmas=[float(s) for s in sigmas.tolist()], steps=steps, sampler=_sampler_name(sampler),
                        cfg=float(getattr(guider, "cfg", 0.0) or 0.0), anchors=anchors, layers=layers,
                        window=[settings.window.start_step, settings.window.end(steps)], chunks=chunks,
                        mask_dropout=settings.mask_dropout, seed=settings.seed, share_queries=settings.share_queries,
                        given_masks=settings.subject_masks is not None)
        path = _unique_path(prefix)
        save_file({n: t.detach().to("cpu").contiguous() for n, t in capture.tensors.items()}, path,
                  metadata={METADATA_KEY: json.dumps(metadata)})
        size = sum(t.numel() * t.element_size() for t in capture.tensors.values())
        logging.info("%s: %d anchors' subject over %d steps, %d layers saved to %s (%.1f MB).", SAVE_NODE, anchors,
                     steps, len(layers), path, size / 2**20)
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
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SAVE_KEY,
                                 _save_wrapper(settings, model_fingerprint(model), filename_prefix.strip(),
                                               sorted(ac.layer_name(k) for k in layers)))
    return patched


# -- loading ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
    """A loaded file: its metadata and its tensors (on the CPU)."""

    name: str
    metadata: dict
    tensors: dict


@dataclasses.dataclass(eq=False)
class Cached:
    """One cached run: the subject's K/V on the run's device, and the evaluation counter."""

    tensors: dict
    counter: EvaluationCounter = dataclasses.field(default_factory=EvaluationCounter)


def read_subject(path: str, name: str | None = None) -> Subject:
    """A saved subject file; a file of another kind or version is refused naming input 'subject'."""
    with safe_open(path, framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        metadata = json.loads(raw) if raw else {}
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise checks.error(LOAD_NODE, "subject", f"{name or path!r} is not a ConsiStory subject of format version "
                               f"{VERSION}; save it again with ConsiStory Save Subject.")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return Subject(name or os.path.basename(path), metadata, tensors)


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
        chunks = extra_options["cond_or_uncond"]
        names = [ac.entry_name("k", step, cached.counter.current.get(c, 0), name, c) for c in chunks]
        if any(n not in cached.tensors for n in names):
            return attention(q, k, v, heads)  # the anchors lent nothing at this step (no map filed yet)
        return ac.attention_over_cached_anchors(
            q, k, v, heads, [cached.tensors[n] for n in names],
            [cached.tensors["v" + n[1:]] for n in names], attention=attention)
    patch.settings = settings
    return patch


def _load_error(message: str) -> ValueError:
    return checks.error(LOAD_NODE, "subject", message)


def _check_cached_run(subject: Subject, settings: ConsiStorySettings, latent, sigmas, guider) -> None:
    """Refuse, before any step, a run the cache was not made for."""
    meta = subject.metadata
    shape = list(latent.shape[1:])
    if shape != meta["latent"]:
        saved, now = meta["latent"], shape
        raise _load_error(f"{subject.name!r} was saved at {saved[-1] * 8}x{saved[-2] * 8} px ({saved[0]} latent "
                          f"channels), this run samples {now[-1] * 8}x{now[-2] * 8} px ({now[0]}); use the saved "
                          "size.")
    saved = torch.tensor(meta["sigmas"], dtype=torch.float64)
    now = sigmas.detach().to("cpu", torch.float64)
    if now.shape != saved.shape or not torch.allclose(now, saved, rtol=1e-5, atol=1e-6):
        raise _load_error(f"{subject.name!r} was saved with {meta['steps']} steps (sigmas {meta['sigmas'][0]:.4g} .. "
                          f"{meta['sigmas'][-2]:.4g}); this run has {len(now) - 1} steps and other sigmas. Use the "
                          f"saved steps, scheduler and denoise (the saving run used sampler {meta['sampler']}).")
    window = [settings.window.start_step, settings.window.end(len(now) - 1)]
    if window != meta["window"]:
        raise checks.error(LOAD_NODE, "model", f"its ConsiStory Attention Patch shares on steps {window[0]}-"
                           f"{window[1] - 1}; {subject.name!r} was saved sharing on steps {meta['window'][0]}-"
                           f"{meta['window'][1] - 1}: set start_step and end_step as when it was saved.")
    cfg = float(getattr(guider, "cfg", 1.0) or 1.0)
    if cfg != 1.0 and 1 not in meta["chunks"]:
        raise _load_error(f"{subject.name!r} was saved with cfg 1 (no unconditional rows to attend to); sample with "
                          "cfg 1, or save the subject again with the cfg you use.")


def _load_wrapper(settings: ConsiStorySettings, subject: Subject, layer_count: int):
    def wrapper(executor, *args, **kwargs):
        latent, sigmas = args[1], args[3]
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        _refuse_injection(LOAD_NODE, guider.model_patcher)
        _check_cached_run(subject, settings, latent, sigmas, guider)
        # the patch's own checks (masks, tokens) for a batch of new images only: no anchor is in it
        conds = getattr(guider, "conds", None) or {}
        consistory.check_run(dataclasses.replace(settings, anchors=1), latent, conds.get("positive"))
        device = guider.model_patcher.load_device
        meta = subject.metadata
        logging.info("%s: %d new images attend to the %d cached anchors of %r on steps %d-%d in %d of %d "
                     "self-attention layers.", LOAD_NODE, latent.shape[0], meta["anchors"], subject.name,
                     meta["window"][0], meta["window"][1] - 1, len(meta["layers"]), layer_count)
        with run_context_nodes.opened(options) as context:
            context.state((LOAD_KEY, settings), lambda: Cached({n: t.to(device) for n, t in subject.tensors.items()
                                                                if not n.startswith("keep/")}))
            return executor(*args, **kwargs)
    return wrapper


def load_subject(model, subject: Subject):
    """A clone of ``model`` (patched by ConsiStoryAttentionPatch) whose batch attends to ``subject``'s anchors."""
    settings = _consistory(LOAD_NODE, model)
    meta = subject.metadata
    fingerprint = model_fingerprint(model)
    if fingerprint != meta["model"]:
        raise _load_error(f"{subject.name!r} was saved from another model (fingerprint {meta['model']}, this model "
                          f"{fingerprint}: another checkpoint, LoRA or strength); load it with the model it was "
                          "saved with.")
    layers = _shared_layers(model, settings)
    names = sorted(ac.layer_name(k) for k in layers)
    if names != meta["layers"]:
        raise checks.error(LOAD_NODE, "model", f"its ConsiStory Attention Patch shares in {len(names)} layers; "
                           f"{subject.name!r} was saved from {len(meta['layers'])} ({meta['layers'][:3]}...): set "
                           "blocks as when it was saved.")
    diffusion_model = model.get_model_object("diffusion_model")
    all_layers = len(model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {}))
    patched = model.clone()
    for key, inner in layers.items():
        preferred = getattr(attn1_module(diffusion_model, key), "comfy_attention", None)
        patched.set_model_attn1_replace(_loading_layer(settings, key, inner, preferred), *key)
    # the patch's run check counts anchors in the batch; this run's anchors are in the file
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, consistory.KEY)
    run_context_nodes.attach(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, LOAD_KEY,
                                 _counting_wrapper(settings, LOAD_KEY))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, LOAD_KEY,
                                 _load_wrapper(settings, subject, max(all_layers, len(layers))))
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
                         "to draw the same subject in new settings without generating the anchors again."),
            inputs=[
                io.Model.Input("model", tooltip="The model from ConsiStory Attention Patch (token_sharing "
                               "'consistory'); its first 'anchors' images are saved."),
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
                         "generated again. Sample at the saved size with the saved steps and scheduler."),
            inputs=[
                io.Model.Input("model", tooltip="The same model, behind a ConsiStory Attention Patch with the saved "
                               "blocks and steps (its anchors, mask_dropout and seed are unused here)."),
                io.Combo.Input("subject", options=subject_files(), tooltip=(
                    f"A file saved by ConsiStory Save Subject (models/{FOLDER}).")),
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
