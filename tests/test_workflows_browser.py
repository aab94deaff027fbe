"""Every shipped UI workflow in the real ComfyUI frontend (headless Chromium): no missing node type, and
the frontend's own conversion to an API prompt equals the shipped API workflow apart from ids."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, require_host

require_host()

from browser import require_browser  # noqa: E402

require_browser()

from workflow_pictures import fit_graph  # noqa: E402

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
    fit_graph(comfy_page)  # as the pictures in docs/ are taken (python -m tests.workflow_pictures)
    comfy_page.screenshot(f"workflow-{path.stem}")
    comfy_page.assert_no_errors()
