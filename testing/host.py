"""Find the real ComfyUI host that the tests and benchmarks run against, and load this pack.

1. ``COMFYUI_PATH``;
2. the ComfyUI that holds this pack when it sits in ``ComfyUI/custom_nodes/<any-name>/``;
3. ``comfyui-host path`` (on PATH, or in ``../shared/bin`` beside the repository).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PACKAGE = "consistent_synthesis"


def load_pack():
    """Import this repository as the package ``consistent_synthesis``, as ComfyUI's loader would.

    The pack's ``nodes/`` would collide with ComfyUI's top-level ``nodes`` module, so the pack
    is never put on sys.path itself.
    """
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


load_pack()
# One implementation of the discovery order, the runner's (which cannot import testing/).
from consistent_synthesis.runner.host import activate, find_host  # noqa: E402


def prepare(use_gpu: bool = False) -> Path:
    """Find and activate the host and load the pack, for scripts (benchmarks); exit when there is no host."""
    path, how = find_host()
    if path is None:
        raise SystemExit(f"no ComfyUI host: {how}")
    activate(path)
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            import comfy.cli_args

            comfy.cli_args.args.cpu = False
    load_pack()
    return path
