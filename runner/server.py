"""Start the host's ``main.py`` on a free loopback port, with this pack installed in a scratch folder.

The scratch ``--base-directory`` holds a ``custom_nodes`` folder with a copy of this pack (hard
links where the file system allows; not a symlink, which newer hosts refuse under a custom-node
policy; only this pack is loaded, so the start is quick and other packs cannot interfere), an
``input`` folder with
the images in ``workflows/input/`` (what shipped workflows load), and the server finds
models through an extra model paths YAML: the host's own ``models`` folders, then, for a smoke run,
the random-weight cache.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .host import REPO

PACK_FOLDER = "comfyui-consistent-synthesis"

# What a pack install does not need (and a host that digests packs refuses: bytecode, symlinks).
_NOT_INSTALLED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".venv",
                                        "test-artifacts", "node_modules", ".gpu-host", ".whl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models_yaml(path: Path, host: Path, extra_roots: list[Path] = ()) -> Path:
    """An extra model paths YAML: every folder of the host's ``models``, then each extra root's."""
    lines = []
    models = host / "models"
    if models.is_dir():
        lines += ["host_models:", f"    base_path: {json.dumps(str(models))}"]
        lines += [f"    {d.name}: {d.name}" for d in sorted(models.iterdir()) if d.is_dir()]
    for i, root in enumerate(extra_roots):
        lines += [f"random_models_{i}:", f"    base_path: {json.dumps(str(root))}"]
        lines += [f"    {d.name}: {d.name}" for d in sorted(Path(root).iterdir()) if d.is_dir()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)
    return dst


def install_pack(repo: Path, custom_nodes: Path) -> Path:
    """Put this pack into ``custom_nodes`` as a real folder (a fresh copy; files hard-linked where possible).

    A symlink would do for older hosts, but newer ones refuse a pack that is, or contains, a
    symlink (or bytecode) when a custom-node policy is active, so a test on a symlink would not
    show what users get.
    """
    target = custom_nodes / PACK_FOLDER
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    shutil.copytree(repo, target, ignore=_NOT_INSTALLED, copy_function=_link_or_copy,
                    ignore_dangling_symlinks=True)
    return target


@functools.lru_cache(maxsize=None)
def host_options(main_py: str) -> frozenset[str]:
    """The command-line options the host's ``main.py --help`` lists (asked once per host and process)."""
    try:
        done = subprocess.run([sys.executable, main_py, "--help"], cwd=os.path.dirname(main_py),
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        logging.warning("Could not list ComfyUI's options (%s); starting it with the common ones only.", e)
        return frozenset()
    return frozenset(word.strip("[],") for word in done.stdout.split() if word.startswith(("--", "[--")))


class LocalServer:
    """``main.py`` on 127.0.0.1:<free port>, ``--cpu`` where torch sees no GPU; a context manager."""

    def __init__(self, host: Path, base: Path | None = None, model_roots: list[Path] = (), cpu: bool | None = None,
                 extra_args: list[str] = (), repo: Path = REPO):
        self.host = host
        self._scratch = None
        if base is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="consistent-synthesis-server-")
            base = Path(self._scratch.name)
        self.base = base
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.pack = install_pack(repo, base / "custom_nodes")
        for image in sorted((repo / "workflows" / "input").glob("*")):  # images the shipped workflows load
            if image.is_file() and not (base / "input" / image.name).exists():
                shutil.copy2(image, base / "input" / image.name)
        self.yaml = models_yaml(base / "extra_model_paths.yaml", host, list(model_roots))
        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    def command(self) -> list[str]:
        main = str(self.host / "main.py")
        # newer hosts exit at start-up when the assets system's packages are missing, unless told not to use it
        assets = ["--disable-assets"] if "--disable-assets" in host_options(main) else []
        return [sys.executable, main, "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--extra-model-paths-config", str(self.yaml),
                "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--log-stdout", *assets,
                *(["--cpu"] if self.cpu else []), *self.extra_args]

    def start(self, timeout: float = 300.0) -> "LocalServer":
        started = time.monotonic()
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=self.host, stdout=log, stderr=subprocess.STDOUT,
                                        env=os.environ | {"PYTHONUNBUFFERED": "1"})
        log.close()
        logging.info("Starting ComfyUI at %s (log: %s)", self.url, self.log_path)
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5):
                    self.start_seconds = time.monotonic() - started
                    logging.info("ComfyUI is up after %.1f s.", self.start_seconds)
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-5000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
