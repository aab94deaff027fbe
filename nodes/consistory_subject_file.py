"""The file of a saved ConsiStory subject (ConsiStory Save Subject / Load Subject,
``nodes/consistory_subject.py``): where it lives, what its metadata says, reading and writing it,
and whether it fits a run.

A subject is one safetensors file in ``models/consistory_subjects``: the tensors named in
``attention/anchor_cache.py`` (the first stage; the second stage too when it was saved with Feature
Injection) and one metadata entry, JSON, with the run's identity: model fingerprint, latent size,
sigmas, sampler, cfg, anchors, layers, sharing window, chunks, and ``injection`` (alpha, grid, DIFT
step, injection steps) when the file holds the second stage. Files without ``injection`` (saved
without Feature Injection) are the same format version: they serve SDSA only.
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

import folder_paths

from ..attention.consistory import ConsiStorySettings
from . import checks

SAVE_NODE = "ConsiStorySaveSubject"
LOAD_NODE = "ConsiStoryLoadSubject"
FOLDER = "consistory_subjects"
FORMAT = "consistory-subject"
VERSION = 1
METADATA_KEY = "consistory_subject"
INJECTION = "injection"  # the metadata entry of the second stage


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


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
    """A loaded file: its metadata and its tensors (on the CPU)."""

    name: str
    metadata: dict
    tensors: dict

    @property
    def has_injection(self) -> bool:
        """Whether the file holds the second stage (saved with ConsiStory Feature Injection)."""
        return bool(self.metadata.get(INJECTION))


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


def sampler_name(sampler) -> str:
    return getattr(getattr(sampler, "sampler_function", None), "__name__", type(sampler).__name__)


def write_subject(prefix: str, tensors: dict, metadata: dict) -> str:
    """Writes ``tensors`` (moved to the CPU) and ``metadata`` to the next free ``<prefix>_NNNNN.safetensors``."""
    path = _unique_path(prefix)
    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, path,
              metadata={METADATA_KEY: json.dumps(dict(format=FORMAT, version=VERSION) | metadata)})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    stage = " and Feature Injection's second stage" if metadata.get(INJECTION) else ""
    logging.info("%s: %d anchors' subject%s over %d steps, %d layers saved to %s (%.1f MB).", SAVE_NODE,
                 metadata["anchors"], stage, metadata["steps"], len(metadata["layers"]), path, size / 2**20)
    return path


def _load_error(message: str) -> ValueError:
    return checks.error(LOAD_NODE, "subject", message)


def check_injection_stage(subject: Subject) -> None:
    """Feature Injection with a subject needs its second stage: refused, naming input 'subject', without it."""
    if not subject.has_injection:
        raise _load_error(f"{subject.name!r} was saved without ConsiStory Feature Injection, so it holds no second "
                          "stage (the anchors' DIFT features, masks and injected outputs) for the Feature Injection "
                          "on this model. Save the subject again with Feature Injection on the saving model (before "
                          "or after Save Subject), or sample this one without Feature Injection.")


def check_cached_run(subject: Subject, settings: ConsiStorySettings, latent, sigmas, guider) -> None:
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
