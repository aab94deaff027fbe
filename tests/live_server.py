"""The runner's LocalServer with small JSON helpers for tests: a real ComfyUI on loopback with the pack."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from consistent_synthesis.runner.server import LocalServer


class ComfyServer(LocalServer):
    """``main.py`` (``--cpu`` without a GPU) in a scratch folder with a copy of the pack."""

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
