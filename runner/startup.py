"""What a plain run and a sweep share before the first prompt: the smoke sizes, the model files a
server lacks, and random-weight stand-ins for the files missing from a server the runner starts."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

from . import workflow

BANNER = "=" * 78

SMOKE_WIDTH, SMOKE_HEIGHT, SMOKE_STEPS = 128, 128, 2


def sizes(width: int | None, height: int | None, steps: int | None, smoke: bool) -> dict:
    """The width, height and steps overrides; a smoke run fills the ones not given with the smoke sizes."""
    if smoke:
        return dict(width=width or SMOKE_WIDTH, height=height or SMOKE_HEIGHT, steps=steps or SMOKE_STEPS)
    return dict(width=width, height=height, steps=steps)


def missing_locally(host: Path, refs: list[workflow.ModelRef]) -> list[workflow.ModelRef]:
    """Model files that are not in the host's models folders."""
    return [r for r in refs if not (host / "models" / r.folder / r.name).is_file()]


def missing_on_server(url: str, refs: list[workflow.ModelRef]) -> list[workflow.ModelRef]:
    """Model files that the server at ``url`` does not list in their models folder."""
    missing, listings = [], {}
    for r in refs:
        if r.folder not in listings:
            with urllib.request.urlopen(f"{url.rstrip('/')}/models/{r.folder}", timeout=30) as resp:
                listings[r.folder] = set(json.loads(resp.read()))
        if r.name not in listings[r.folder]:
            missing.append(r)
    return missing


def local_model_roots(host: Path, refs: list[workflow.ModelRef], no_random: bool,
                      error: type[Exception] = SystemExit) -> tuple[list[Path], list[workflow.ModelRef]]:
    """(extra model roots, refs given random stand-ins) for a server the runner starts on ``host``:
    files missing from its models folders get random-weight stand-ins, or ``error`` with ``no_random``."""
    missing = missing_locally(host, refs)
    if not missing:
        return [], []
    if no_random:
        raise error("missing model files: " + ", ".join(f"{r.folder}/{r.name}" for r in missing)
                    + f" (looked in {host / 'models'}); see the README for where to get them.")
    from . import random_models
    from .host import activate

    activate(host)
    logging.warning("%s\nRANDOM WEIGHTS: %s not found in the models folders; building random-weight stand-ins "
                    "of the real architecture. The images will be noise: this is a smoke test of the graph, "
                    "not a real result. Download the models (see the README) for real images.\n%s", BANNER,
                    ", ".join(f"{r.folder}/{r.name}" for r in missing), BANNER)
    for r in missing:
        random_models.ensure(r.folder, r.name)
    return [random_models.cache_dir()], missing
