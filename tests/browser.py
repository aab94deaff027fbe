"""Browser tests: Debian's Chromium, driven by Playwright's Python package, on the real ComfyUI frontend.

A test module starts with::

    from conftest import require_host
    require_host()
    from browser import require_browser
    require_browser()

and uses the fixtures ``browser``, ``browser_server`` and ``comfy_page``, which conftest.py registers once
for the session (one Playwright per process).

``browser_server`` is ``main.py --cpu`` on loopback with the pack and a small test-only node pack
(``CSTestPoseKeypoint``: JSON text in, POSE_KEYPOINT out) installed in its scratch folder;
``comfy_page`` opens the frontend that server serves, waits until it is ready and records console
errors; :class:`ComfyPage` loads workflows, converts them to API prompts and queues them.
Playwright never downloads a browser here: it runs ``/usr/bin/chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, require_host

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "browser"  # gitignored; screenshots of the runs
EXTENSION_URL = "/extensions/comfyui-consistent-synthesis/"
OUR_ROUTES = ("/view?", "/history")  # what web/pose_editor*.js fetch
VIEWPORT = {"width": 1400, "height": 900}
TEST_NODES = "cs_browser_test_nodes"
TEST_NODES_SOURCE = '''\
"""Test-only nodes for the pack's browser tests (written into the test server's custom_nodes)."""
import json


class CSTestPoseKeypoint:
    """A POSE_KEYPOINT from JSON text, so a test can give PoseEditOutpaint a known pose."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pose_json": ("STRING", {"multiline": True, "default": "[]"})}}

    RETURN_TYPES = ("POSE_KEYPOINT",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, pose_json):
        return (json.loads(pose_json),)


NODE_CLASS_MAPPINGS = {"CSTestPoseKeypoint": CSTestPoseKeypoint}
'''
SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no template browser on the first visit
    "Comfy.Validation.Workflows": True,
}


def require_browser() -> None:
    """Skip the module loudly when Chromium or Playwright is missing (fail under CS_REQUIRE_HOST=1)."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -r requirements-dev.txt)")
    if missing:
        reason = "missing " + " and ".join(missing)
        if os.environ.get("CS_REQUIRE_HOST") == "1":
            pytest.fail(f"CS_REQUIRE_HOST=1 but the browser tests are {reason}", pytrace=False)
        pytest.skip(f"BROWSER TESTS SKIPPED: {reason}", allow_module_level=True)


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session", name="browser")
def browser_fixture():
    """Headless Debian Chromium (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


def install_test_nodes(base: Path) -> None:
    """The test-only node pack and the frontend settings, in a server's scratch ``--base-directory``."""
    folder = base / "custom_nodes" / TEST_NODES
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(TEST_NODES_SOURCE)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(SETTINGS))


@pytest.fixture(scope="session", name="browser_server")
def browser_server_fixture(tmp_path_factory):
    """A real ComfyUI (``main.py --cpu`` on loopback) with the pack and the test-only nodes."""
    from live_server import ComfyServer

    host = require_host()
    base = tmp_path_factory.mktemp("comfyui-browser")
    install_test_nodes(base)
    server = ComfyServer(host, base, cpu=True)
    server.start()
    yield server
    server.stop()


@dataclass
class ConsoleEntry:
    kind: str  # console type ("error", "warning") or "pageerror" or "http"
    text: str
    where: str = ""
    after_ready: bool = False


@dataclass
class ComfyPage:
    """A Playwright page on the ComfyUI frontend, with the helpers the browser tests share."""
    page: object
    server: object
    log: list[ConsoleEntry] = field(default_factory=list)
    ready: bool = False

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    # ---- errors ----

    def errors(self) -> list[ConsoleEntry]:
        """Console errors that are ours: script errors after the page was ready, anything pointing at
        this pack's files, and failed loads of what the pack's editor fetches (/view, /history). The
        frontend's own failed loads (missing user files in a fresh user folder, the release feed on the
        internet, which is not reachable here) are not ours."""
        def ours(e: ConsoleEntry) -> bool:
            if EXTENSION_URL in e.text or EXTENSION_URL in e.where:
                return True
            if e.text.startswith("Failed to load resource"):
                return any(route in e.where for route in OUR_ROUTES)
            return e.after_ready
        return [e for e in self.log if ours(e)]

    def assert_no_errors(self) -> None:
        errors = self.errors()
        assert not errors, "console errors:\n" + "\n".join(f"{e.kind}: {e.text} ({e.where})" for e in errors)

    # ---- graph ----

    def node_types(self) -> set[str]:
        return set(self.js("() => Object.keys(LiteGraph.registered_node_types)"))

    def load_workflow(self, workflow: dict, name: str = "test.json") -> LoadedWorkflow:
        """Load a UI workflow as the user would (app.loadGraphData); the node types the frontend does not
        know (also inside subgraphs) and the frontend's API prompt for it (app.graphToPrompt)."""
        result = self.js("""async ([workflow, name]) => {
            const types = new Set((workflow.nodes ?? []).map((n) => n.type));
            const subgraphs = workflow.definitions?.subgraphs ?? [];
            for (const s of subgraphs) for (const n of s.nodes ?? []) types.add(n.type);
            const local = new Set(subgraphs.map((s) => s.id));
            const missing = [...types].filter((t) => !local.has(t) && !LiteGraph.registered_node_types[t]);
            await app.loadGraphData(workflow, true, true, name, { showMissingNodesDialog: false,
                                                                   showMissingModelsDialog: false });
            const { output } = await app.graphToPrompt();
            return { missing, prompt: output };
        }""", [workflow, name])
        return LoadedWorkflow(sorted(result["missing"]), result["prompt"])

    def serialize(self) -> dict:
        """The workflow as the frontend saves it."""
        return self.js("() => JSON.parse(JSON.stringify(app.graph.serialize()))")

    def graph_to_prompt(self) -> dict:
        return self.js("async () => (await app.graphToPrompt()).output")

    def queue(self, timeout: float = 120.0) -> dict:
        """Queue the graph from the frontend (as the Run button does); the history entry once it is done."""
        before = set(self.server.get("/history"))
        self.js("async () => { await app.queuePrompt(0, 1); }")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.server.get("/history")
            new = [v for k, v in history.items() if k not in before]
            if new and new[0].get("status", {}).get("completed") is not None:
                entry = new[0]
                assert entry["status"].get("status_str") == "success", json.dumps(entry["status"], indent=1)
                return entry
            time.sleep(0.25)
        raise AssertionError(f"the queued prompt did not finish in {timeout:.0f} s:\n{self.server.log()[-3000:]}")

    def widget_screen_point(self, node_id: int, widget_name: str) -> tuple[float, float]:
        """Where a widget of a node is on the screen (page pixels), from the canvas's transform."""
        return tuple(self.js("""([id, name]) => {
            const node = app.graph.getNodeById(id);
            const widget = node.widgets.find((w) => w.name === name);
            const rect = app.canvas.canvas.getBoundingClientRect();
            const [ox, oy] = app.canvas.ds.offset, s = app.canvas.ds.scale;
            const x = node.pos[0] + node.size[0] / 2, y = node.pos[1] + widget.y + (widget.computedHeight ?? 20) / 2;
            return [rect.left + (x + ox) * s, rect.top + (y + oy) * s];
        }""", [node_id, widget_name]))

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@dataclass
class LoadedWorkflow:
    missing: list[str]
    prompt: dict


def open_comfy(browser, server, timeout_ms: int = 60_000) -> ComfyPage:
    """A new page on the server's frontend, once the app has set up and restored a workflow."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    comfy = ComfyPage(page, server)

    def on_console(message):
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            comfy.log.append(ConsoleEntry("error", message.text, where, comfy.ready))

    page.on("console", on_console)
    page.on("pageerror", lambda e: comfy.log.append(ConsoleEntry("pageerror", str(e), e.stack or "", comfy.ready)))
    page.on("response", lambda r: r.status >= 400 and EXTENSION_URL in r.url and comfy.log.append(
        ConsoleEntry("http", f"{r.status} {r.url}", r.url, comfy.ready)))
    page.goto(server.url)
    page.wait_for_function("""() => window.app?.graph && window.app.canvas && app.graph.nodes.length > 0
        && app.extensions.some((e) => e.name === 'consistent_synthesis.PoseEditor')""", timeout=timeout_ms)
    page.wait_for_load_state("networkidle")
    comfy.ready = True
    return comfy


@pytest.fixture(name="comfy_page")
def comfy_page_fixture(browser, browser_server):
    comfy = open_comfy(browser, browser_server)
    yield comfy
    comfy.page.context.close()


def copy_to_docs(screenshot: Path, name: str) -> Path | None:
    """With CS_DOCS_SCREENSHOTS=1, keep a copy of a screenshot in docs/ (for the README)."""
    if os.environ.get("CS_DOCS_SCREENSHOTS") != "1":
        return None
    target = REPO / "docs" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, target)
    return target
