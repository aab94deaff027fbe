"""Find the ComfyUI host the runner talks to, in the order the tests use (testing/host.py).

1. ``COMFYUI_PATH``;
2. the ComfyUI whose ``custom_nodes`` holds this pack (a user's clone);
3. ``comfyui-host path`` (on PATH, or in ``../shared/bin`` beside the repository).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def is_host(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "main.py").is_file()


def find_host() -> tuple[Path | None, str]:
    """Return (host path or None, how it was found or why none was)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if is_host(Path(env)):
            return Path(env).resolve(), "COMFYUI_PATH"
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py)"
    if REPO.parent.name == "custom_nodes" and is_host(REPO.parent.parent):
        return REPO.parent.parent, "the ComfyUI whose custom_nodes holds this pack"
    tool = shutil.which("comfyui-host") or str(REPO.parent / "shared" / "bin" / "comfyui-host")
    if os.path.isfile(tool):
        out = subprocess.run(["bash", tool, "path"], capture_output=True, text=True)
        path = Path(out.stdout.strip()) if out.returncode == 0 else None
        if path and is_host(path):
            return path.resolve(), "comfyui-host path"
    return None, ("no ComfyUI found: set COMFYUI_PATH, put this pack in ComfyUI/custom_nodes/, "
                  "or give the runner --server URL of a running ComfyUI")


def activate(path: Path) -> None:
    """Make the host's ``comfy`` package importable in this process, on the CPU, without its CLI."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
