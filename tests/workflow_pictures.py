"""Pictures of the shipped workflows, taken in the real ComfyUI frontend, and the record of what they show.

``python -m tests.workflow_pictures [NAME ...]`` (from the repository root) starts ComfyUI's
``main.py --cpu`` with the pack, loads each ``workflows/<name>.json`` in headless Chromium as a user
would, fits the graph into a 2400 x 1300 view and saves ``docs/workflow-<name>.png``; then it writes
``docs/workflow-pictures.json``: for each picture, the workflow file it was taken from and that
file's SHA-256. ``tests/test_workflow_pictures.py`` fails when a workflow's hash differs from the
recorded one, so a changed workflow cannot keep a stale picture. Needs the host (found as the tests
find it), ``/usr/bin/chromium`` and the ``playwright`` package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
DOCS = REPO / "docs"
RECORD = DOCS / "workflow-pictures.json"
VIEW = {"width": 2400, "height": 1300}  # the whole graph, legible

FIT_GRAPH = """() => {
    const nodes = app.graph.nodes;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - 30));
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40], { zoom: 0.92 });
    app.canvas.setDirty(true, true);
}"""


def shipped_workflows() -> list[Path]:
    """The UI workflows a user drags onto the canvas (the API copies in workflows/api/ are not pictured)."""
    return sorted(WORKFLOWS.glob("*.json"))


def picture_of(workflow: Path) -> Path:
    return DOCS / f"workflow-{workflow.stem}.png"


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def workflow_hash(workflow: Path) -> str:
    """SHA-256 of the workflow file with line endings as committed (CRLF read as LF), so a Windows
    checkout hashes the same."""
    return hashlib.sha256(workflow.read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def read_record() -> dict:
    """``{picture path: {"workflow": workflow path, "sha256": hash}}``, paths relative to the repository."""
    return json.loads(RECORD.read_text()) if RECORD.is_file() else {}


def write_record(workflows: list[Path]) -> None:
    """Record ``workflows`` as pictured now; the other entries stay as they were."""
    record = read_record()
    for workflow in workflows:
        record[relative(picture_of(workflow))] = {"workflow": relative(workflow), "sha256": workflow_hash(workflow)}
    RECORD.write_text(json.dumps(dict(sorted(record.items())), indent=2) + "\n")


def fit_graph(comfy_page) -> None:
    """Size the page and zoom the canvas so the whole graph fills it."""
    comfy_page.page.set_viewport_size(VIEW)
    # the frontend resizes its canvas on the window's resize event; fit only once it has
    comfy_page.page.wait_for_function("(w) => app.canvas.canvas.clientWidth >= w", arg=VIEW["width"] - 200)
    comfy_page.page.wait_for_timeout(300)
    comfy_page.js(FIT_GRAPH)
    comfy_page.page.wait_for_timeout(300)


def take(browser, server, workflow: Path) -> Path:
    """Load ``workflow`` on a fresh page (one tab, as a user opening it) and save its picture in docs/."""
    from browser import open_comfy

    comfy = open_comfy(browser, server)
    try:
        loaded = comfy.load_workflow(json.loads(workflow.read_text()), workflow.name)
        if loaded.missing:
            raise SystemExit(f"{relative(workflow)}: the frontend does not know the node types {loaded.missing}")
        fit_graph(comfy)
        picture = picture_of(workflow)
        comfy.page.screenshot(path=str(picture))
        comfy.assert_no_errors()
        return picture
    finally:
        comfy.page.context.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.workflow_pictures", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every file in workflows/)")
    args = parser.parse_args(argv)
    workflows = shipped_workflows()
    if args.names:
        unknown = sorted(set(args.names) - {w.stem for w in workflows})
        if unknown:
            parser.error(f"no workflows/{unknown[0]}.json; shipped: {', '.join(w.stem for w in workflows)}")
        workflows = [w for w in workflows if w.stem in args.names]

    # The test helpers, as pytest would load them (conftest first: browser.py imports from it).
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    if conftest.HOST_PATH is None:
        raise SystemExit(f"no ComfyUI: {conftest.HOST_HOW}")
    from browser import CHROMIUM, install_test_nodes
    from live_server import ComfyServer
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise SystemExit(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="cs-pictures-") as scratch:
        base = Path(scratch)
        install_test_nodes(base)
        with ComfyServer(conftest.HOST_PATH, base, cpu=True) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            for workflow in workflows:
                print(f"{relative(workflow)} -> {relative(take(browser, server, workflow))}", flush=True)
            browser.close()
    write_record(workflows)
    print(f"recorded in {relative(RECORD)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
