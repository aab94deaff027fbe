"""Every shipped UI workflow in the real ComfyUI frontend (headless Chromium): no missing node type, and
the frontend's own conversion to an API prompt equals the shipped API workflow apart from ids."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, require_host

require_host()

from browser import require_browser  # noqa: E402

require_browser()

from browser import copy_to_docs  # noqa: E402

UI_FILES = sorted((REPO / "workflows").glob("*.json"))


def _normalised(prompt: dict) -> dict:
    """A prompt keyed by (class_type, title) with links pointing at those keys: ids do not matter."""
    names = {node_id: (node["class_type"], node.get("_meta", {}).get("title", "")) for node_id, node in prompt.items()}
    out = {}
    for node_id, node in prompt.items():
        inputs = {k: ([names[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in names else v)
                  for k, v in node["inputs"].items()}
        out[json.dumps(names[node_id])] = inputs
    return out


def test_every_shipped_workflow_has_a_ui_file():
    assert {p.stem for p in UI_FILES} == {p.stem for p in (REPO / "workflows" / "api").glob("*.json")}


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_loads_with_no_missing_node_and_converts_to_the_api_workflow(path, comfy_page):
    loaded = comfy_page.load_workflow(json.loads(path.read_text()), path.name)
    assert loaded.missing == []
    shipped = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    assert _normalised(loaded.prompt) == _normalised(shipped)
    comfy_page.page.set_viewport_size({"width": 2400, "height": 1300})  # the whole graph, legible
    comfy_page.page.wait_for_timeout(300)
    comfy_page.js("""() => {
        const nodes = app.graph.nodes;
        const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - 30));
        const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
        const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
        app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40]);
        app.canvas.setDirty(true, true);
    }""")
    comfy_page.page.wait_for_timeout(300)
    copy_to_docs(comfy_page.screenshot(f"workflow-{path.stem}"), f"workflow-{path.stem}.png")
    comfy_page.assert_no_errors()
