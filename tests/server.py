"""A real ComfyUI server on a free loopback port, with this pack in its custom_nodes folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_FOLDER = "comfyui-consistent-synthesis"  # a hyphenated folder name, as users clone it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py --cpu`` with ``--base-directory`` in a scratch folder that links the pack in."""

    def __init__(self, host: Path, repo: Path, base: Path):
        self.host, self.base = host, base
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        for sub in ("models", "input", "output", "temp", "user"):
            (base / sub).mkdir(exist_ok=True)
        link = base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(repo, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(self.host / "main.py"), "--cpu", "--listen", "127.0.0.1",
             "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
             "--database-url", "sqlite:///:memory:", "--log-stdout"],
            cwd=self.host, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
