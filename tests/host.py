"""Find the real ComfyUI host that the tests run against, as DEVELOPERS.md orders it.

1. ``COMFYUI_PATH``;
2. the ComfyUI that holds this pack when it sits in ``ComfyUI/custom_nodes/<any-name>/``;
3. ``comfyui-host path`` (on PATH, or in ``../shared/bin`` beside the repository).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _is_host(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "main.py").is_file()


def find_host() -> tuple[Path | None, str]:
    """Return (host path or None, how it was found or why none was)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if _is_host(Path(env)):
            return Path(env).resolve(), "COMFYUI_PATH"
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py)"
    if REPO.parent.name == "custom_nodes" and _is_host(REPO.parent.parent):
        return REPO.parent.parent, "the ComfyUI whose custom_nodes holds this pack"
    tool = shutil.which("comfyui-host") or str(REPO.parent / "shared" / "bin" / "comfyui-host")
    if os.path.isfile(tool):
        out = subprocess.run(["bash", tool, "path"], capture_output=True, text=True)
        path = Path(out.stdout.strip()) if out.returncode == 0 else None
        if path and _is_host(path):
            return path.resolve(), "comfyui-host path"
    return None, ("no ComfyUI host found: set COMFYUI_PATH, put this pack in ComfyUI/custom_nodes/, "
                  "or run 'comfyui-host install GIT_DIR'")


def activate(path: Path) -> None:
    """Make the host importable in this test process, as ``main.py --cpu`` would."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


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
