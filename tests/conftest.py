"""Test setup: load this repository as the package ``consistent_synthesis``, find the host, mark the tiers.

Tests that need ComfyUI call ``require_host()`` at module level: it makes the host
importable, or skips the module with a loud reason (a failure when CS_REQUIRE_HOST=1).

Every test gets exactly one tier mark (registered in pyproject.toml), so ``-m`` picks what a run needs:

- ``pure``: needs no ComfyUI (the math rooms, pose data, the runner's offline parts);
- ``host``: imports the real ComfyUI in the test process (tiny random models);
- ``server``: starts a ComfyUI server process or talks to one over HTTP;
- ``browser``: drives headless Chromium on the ComfyUI frontend.

The rule, applied when the tests are collected: a tier mark on the test or its module wins; else a
test that uses a browser fixture is ``browser``, one that uses ``comfy_server`` is ``server``, one
whose module called ``require_host()`` is ``host``, and any other is ``pure``. Besides the tier,
``slow`` marks the tests that build or load the full-size random stand-in models (GBs; minutes
the first time) and the few that run half a minute or more. A test that starts a server without
``server`` (or ``browser``), or asks for a stand-in without ``slow`` (or ``server``), fails naming
the mark to add.

The fast loop (no server, no browser, no full-size model): ``python3 -m pytest -m "not server and not
browser and not slow"``; ``python3 -m pytest`` runs every tier.
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

TIERS = ("pure", "host", "server", "browser")
BROWSER_FIXTURES = {"browser", "browser_server", "comfy_page"}
SERVER_FIXTURES = {"comfy_server"}
_HOST_MODULES: set[str] = set()  # the test modules that called require_host()


def require_host() -> Path:
    """Make the real ComfyUI importable, or skip (or fail, under CS_REQUIRE_HOST=1) loudly.

    Called at a test module's top level, it also puts the module's tests in the ``host`` tier."""
    _HOST_MODULES.add(sys._getframe(1).f_globals.get("__name__"))
    if HOST_PATH is None:
        if os.environ.get("CS_REQUIRE_HOST") == "1":
            pytest.fail(f"CS_REQUIRE_HOST=1 but {HOST_HOW}", pytrace=False)
        pytest.skip(f"HOST TESTS SKIPPED: {HOST_HOW}", allow_module_level=True)
    _host.activate(HOST_PATH)
    return HOST_PATH


def tier_of(item) -> str:
    """The one tier of a collected test, by the rule in this module's docstring."""
    marked = {m.name for m in item.iter_markers() if m.name in TIERS}
    used = set(item.fixturenames)
    implied = "browser" if used & BROWSER_FIXTURES else "server" if used & SERVER_FIXTURES else None
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid} has the tier marks {sorted(marked)}: give it one")
    if marked and implied and marked != {implied}:
        raise pytest.UsageError(f"{item.nodeid} is marked {marked.pop()} but uses "
                                f"{sorted(used & (BROWSER_FIXTURES | SERVER_FIXTURES))}: mark it {implied}")
    if marked:
        return marked.pop()
    if implied:
        return implied
    return "host" if item.module.__name__ in _HOST_MODULES else "pure"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(tier)
    _guard_expensive_calls()


_RUNNING: list = [None]  # the test being run (its fixtures are set up inside its run)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING[0] = item
    yield
    _RUNNING[0] = None


def _guard_expensive_calls() -> None:
    """Starting a server needs ``server`` (or ``browser``); a full-size stand-in needs ``slow`` (or ``server``)."""
    from consistent_synthesis.runner import random_models, server

    def guarded(function, marks: tuple[str, ...], what: str):
        if getattr(function, "tier_guarded", False):
            return function

        def call(*args, **kwargs):
            item = _RUNNING[0]
            if item is not None and not any(item.get_closest_marker(m) for m in marks):
                pytest.fail(f"{item.nodeid} {what} but is not marked {' or '.join(marks)}: add "
                            f"@pytest.mark.{marks[0]} (see tests/conftest.py)", pytrace=False)
            return function(*args, **kwargs)
        call.tier_guarded = True
        return call

    server.LocalServer.start = guarded(server.LocalServer.start, ("server", "browser"),
                                       "starts a ComfyUI server")
    random_models.ensure = guarded(random_models.ensure, ("slow", "server"),
                                   "asks for a full-size random stand-in model")


def pytest_configure(config):
    # The tests' models are tiny: a second torch thread mostly waits (the fast loop took 741 s of CPU
    # with torch's two threads on 2 cores, 189 s with one). Server processes keep their own threads.
    import torch

    torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def sd15():
    """A tiny random SD1.5 UNet (testing/tiny_models.py), one per test module; host tier only."""
    import tiny_models

    return tiny_models.tiny_model("sd15")


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
