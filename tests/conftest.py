"""Test setup: load this repository as the package ``consistent_synthesis`` and find the host.

Tests that need ComfyUI call ``require_host()`` at module level: it makes the host
importable, or skips the module with a loud reason (a failure when CS_REQUIRE_HOST=1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO / "testing"))  # helpers shared with benchmarks/

import host as _host  # noqa: E402


_host.load_pack()

HOST_PATH, HOST_HOW = _host.find_host()


def require_host() -> Path:
    """Make the real ComfyUI importable, or skip (or fail, under CS_REQUIRE_HOST=1) loudly."""
    if HOST_PATH is None:
        if os.environ.get("CS_REQUIRE_HOST") == "1":
            pytest.fail(f"CS_REQUIRE_HOST=1 but {HOST_HOW}", pytrace=False)
        pytest.skip(f"HOST TESTS SKIPPED: {HOST_HOW}", allow_module_level=True)
    _host.activate(HOST_PATH)
    return HOST_PATH


def pytest_report_header(config):
    if HOST_PATH is None:
        return f"ComfyUI host: NONE ({HOST_HOW})"
    return f"ComfyUI host: {HOST_PATH} (found by {HOST_HOW})"


_MEASURED: list[str] = []


@pytest.fixture
def measured(request):
    """``measured(text)``: a measurement the test made, printed in the run's summary."""
    def add(text: str) -> None:
        _MEASURED.append(f"{request.node.name}: {text}")
    return add


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if "HOST TESTS SKIPPED" in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.section("NO COMFYUI HOST", sep="!", red=True, bold=True)
        terminalreporter.write_line(
            f"{len(skipped)} test module(s) did not run because {HOST_HOW}. "
            "They prove nothing until a host is installed.", red=True, bold=True)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models, whose run time thread start-up would dominate
    on a shared machine (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A real ComfyUI server (``main.py --cpu`` on loopback) with the pack installed, for the session.

    Its checkpoints include ``SD15_CHECKPOINT``, the random-weight SD1.5 stand-in of
    ``runner.random_models`` (built once, then cached outside the repository).
    """
    from live_server import ComfyServer

    host = require_host()
    from consistent_synthesis.runner import random_models

    random_models.ensure("checkpoints", SD15_CHECKPOINT)
    server = ComfyServer(host, tmp_path_factory.mktemp("comfyui"), model_roots=[random_models.cache_dir()],
                         cpu=True).start()
    yield server
    server.stop()


# The browser fixtures live in one place so the session's Playwright and Chromium are shared by every
# browser test module (a second sync Playwright in the same process fails).
from browser import browser_fixture, browser_server_fixture, comfy_page_fixture  # noqa: E402,F401
