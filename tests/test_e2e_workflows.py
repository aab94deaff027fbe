"""End-to-end: every shipped API workflow runs on a real ComfyUI server and returns its images.

The server is the host's ``main.py --cpu`` on a free loopback port with this pack installed and
the models found through an extra model paths YAML that points at random-weight full-size
checkpoints (real SD1.5 / SDXL / ControlNet architectures), built once and cached outside the
repository by ``runner.random_models``. Each workflow is shrunk to a small size and 2 steps.
New files in ``workflows/api/`` are picked up without editing this file; a workflow whose images
do not come from one Empty Latent Image size is checked for completion and image count only.

SDXL workflows need about 20 GB of RAM on the CPU; set CS_E2E_SKIP_SDXL=1 where there is less.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, require_host

HOST = require_host()

from consistent_synthesis.runner import client, random_models, workflow  # noqa: E402
from consistent_synthesis.runner.server import LocalServer  # noqa: E402

API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))
WIDTH, HEIGHT, STEPS = 128, 64, 2  # non-square, so a swapped width and height is caught
TIMINGS: dict[str, float] = {}
SAVED = "ConsiStorySaveSubject: 2 anchors' subject and Feature Injection's second stage over"  # its log line


def _build_module():
    """workflows/build.py, the one description of the shipped workflows."""
    name = "consistent_synthesis_workflows_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "workflows" / "build.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _output_size(prompt: dict) -> tuple[int, int] | None:
    """(width, height) of the images when every generated latent starts from one empty-latent size."""
    sizes = {(n["inputs"]["width"], n["inputs"]["height"]) for n in prompt.values()
             if n.get("class_type") in ("EmptyLatentImage", "EmptySD3LatentImage")
             and all(isinstance(n["inputs"].get(k), int) for k in ("width", "height"))}
    return sizes.pop() if len(sizes) == 1 else None


def _is_sdxl(prompt: dict) -> bool:
    return any(random_models.guess_kind(r.folder, r.name) == "sdxl" for r in workflow.model_refs(prompt))


@pytest.fixture(scope="module")
def models():
    """Random stand-ins for every model file the shipped workflows name (built once, then cached)."""
    started = time.monotonic()
    for path in API_FILES:
        prompt = workflow.load(path)
        if _is_sdxl(prompt) and os.environ.get("CS_E2E_SKIP_SDXL") == "1":
            continue
        for ref in workflow.model_refs(prompt):
            random_models.ensure(ref.folder, ref.name)
    TIMINGS["random models (cached after the first run)"] = time.monotonic() - started
    return random_models.cache_dir()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    started = time.monotonic()
    srv = LocalServer(HOST, base=tmp_path_factory.mktemp("e2e"), model_roots=[models], cpu=True).start()
    TIMINGS["server start"] = time.monotonic() - started
    yield srv
    srv.stop()
    print("\nend-to-end timings: " + ", ".join(f"{k}: {v:.1f} s" for k, v in TIMINGS.items()))


def _free(server) -> None:
    """Unload models between workflows, so a 24 GB machine never holds SD1.5 and SDXL at once."""
    import urllib.request

    request = urllib.request.Request(server.url + "/free", data=json.dumps(
        {"unload_models": True, "free_memory": True}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def test_every_workflow_has_an_api_and_a_ui_file_built_from_one_description():
    build = _build_module()
    assert API_FILES, "no API workflows shipped"
    ui_files = {p.stem for p in (REPO / "workflows").glob("*.json")}
    assert {p.stem for p in API_FILES} == ui_files
    assert build.main(["--check"]) == 0, "workflows/*.json differ from workflows/build.py; run it"


@pytest.mark.server
def test_node_specs_of_the_workflow_builder_match_the_servers_object_info(server):
    """The UI files lay out sockets and widgets as the frontend will: same names, types and order."""
    build = _build_module()
    used = {node["class_type"] for path in API_FILES for node in workflow.load(path).values()}
    for name in sorted(used):
        info = client_get(server, f"/object_info/{name}")[name]
        order = info.get("input_order", {})
        expected = []
        for group in ("required", "optional"):
            for input_name in order.get(group, info["input"].get(group, {})):
                spec = info["input"][group][input_name]
                kind = "COMBO" if isinstance(spec[0], list) or spec[0] == "COMBO" else spec[0]
                expected.append((input_name, kind))
        assert list(build.NODE_SPECS[name].inputs) == expected, name
        outputs = list(zip(info.get("output_name", info["output"]), info["output"]))
        assert list(build.NODE_SPECS[name].outputs) == [(n, t) for n, t in outputs], name
        seeds = tuple(n for n, t in expected if t == "INT" and
                      (info["input"].get("required", {}).get(n) or info["input"]["optional"][n])[1]
                      .get("control_after_generate"))
        assert build.NODE_SPECS[name].seed_widgets == seeds, name


def client_get(server, path: str):
    import urllib.request

    with urllib.request.urlopen(server.url + path, timeout=60) as r:
        return json.loads(r.read())


def _ui_to_api(ui: dict, build) -> dict:
    """The frontend's graph-to-prompt conversion in short: widgets by position, links by slot."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        spec = build.NODE_SPECS[node["type"]]
        values = iter(node["widgets_values"])
        sockets = {i["name"]: i["link"] for i in node["inputs"]}
        inputs = {}
        for name, kind in spec.inputs:
            if kind in build.WIDGET_TYPES:
                inputs[name] = next(values)
                if name in spec.seed_widgets:
                    next(values)
                for after, _ in spec.extra_widgets:
                    if after == name:
                        next(values)
            if sockets.get(name) is not None:  # a socket, or a widget fed by a link
                link = links[sockets[name]]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node["title"]}}
    return prompt


@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_ui_workflow_converts_to_the_shipped_api_workflow(path):
    build = _build_module()
    ui = json.loads((REPO / "workflows" / path.name).read_text())
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        origin_node = next(n for n in ui["nodes"] if n["id"] == origin)
        target_node = next(n for n in ui["nodes"] if n["id"] == target)
        assert link_id in origin_node["outputs"][origin_slot]["links"]
        assert target_node["inputs"][target_slot]["link"] == link_id
        assert origin_node["outputs"][origin_slot]["type"] == target_node["inputs"][target_slot]["type"] == kind
    assert _ui_to_api(ui, build) == workflow.load(path)


@pytest.mark.server
@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_workflow_runs_and_returns_images_of_the_requested_size(path, server, tmp_path):
    from PIL import Image

    prompt = _small(workflow.load(path))
    if _is_sdxl(prompt) and os.environ.get("CS_E2E_SKIP_SDXL") == "1":
        pytest.skip("SDXL end-to-end skipped by CS_E2E_SKIP_SDXL=1 (needs about 20 GB of RAM on the CPU)")
    if any(n["class_type"] == "ConsiStoryLoadSubject" for n in prompt.values()):
        _save_the_subject(server, tmp_path)  # the file this workflow names comes from consistory_subject_save
    log_start = len(server.log())
    result = _run(server, prompt, tmp_path)
    TIMINGS[path.stem] = result.seconds
    savers = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert savers and all(result.outputs.get(i, {}).get("images") for i in savers), result.outputs
    saved = {item["filename"] for i in savers for item in result.outputs[i]["images"]}
    images = [Image.open(io.BytesIO(p.read_bytes())) for p in result.files if p.name in saved]
    assert images
    expected = _output_size(prompt)
    if expected is not None:
        assert {im.size for im in images} == {expected}
    batch = [n["inputs"]["targets"] + 1 for n in prompt.values() if n["class_type"] == "MasaCtrlLatentBatch"]
    batch += [sum(1 for line in n["inputs"]["settings"].splitlines() if line.strip())
              for n in prompt.values() if n["class_type"] == "StoryPrompts"]  # one image per setting line
    if batch:
        assert len(images) == batch[0] * len(savers)
    if any(n["class_type"] == "ConsiStoryAttentionPatch" for n in prompt.values()):
        log = server.log()[log_start:]
        flux = any(random_models.guess_kind(r.folder, r.name) == "flux_reduced" for r in workflow.model_refs(prompt))
        blocks = sum(random_models.FLUX_STAND_IN_DEPTH.values())
        shared = (f"shared joint attention (image tokens) on steps 1-1 of {STEPS} in "  # 'up': the single blocks
                  f"{random_models.FLUX_STAND_IN_DEPTH['depth_single_blocks']} of {blocks} blocks" if flux
                  else f"shared self-attention on steps 1-1 of {STEPS}")
        if not any(n["class_type"] == "ConsiStoryLoadSubject" for n in prompt.values()):  # it takes the run over
            assert f"ConsiStoryAttentionPatch: consistory {shared}" in log, log[-3000:]
        said = {"ConsiStorySaveSubject": SAVED,
                "ConsiStoryLoadSubject": "ConsiStoryLoadSubject: 2 new images attend to the 2 cached anchors",
                "ConsiStoryFeatureInjection": "ConsiStoryFeatureInjection: "}
        for kind in {n["class_type"] for n in prompt.values()} & set(said):
            assert said[kind] in log, log[-3000:]
    patches = [n["inputs"] for n in prompt.values() if n["class_type"] == "MasaCtrlAttentionPatch"]
    if patches:  # the patch said what it patched in this run (UNet layers, or Flux blocks by number)
        log = server.log()[log_start:]
        assert "MasaCtrlAttentionPatch: mutual" in log and "nothing is patched" not in log, log[-3000:]
        if any(random_models.guess_kind(r.folder, r.name) == "flux_reduced" for r in workflow.model_refs(prompt)):
            blocks = sum(random_models.FLUX_STAND_IN_DEPTH.values())
            assert f"joint attention on steps 0-1 of {STEPS}, blocks {patches[0]['layers']} of {blocks}." in log, log[-3000:]


def _small(prompt: dict) -> dict:
    """The prompt at the test's size and steps, on the random stand-ins."""
    prompt = workflow.override(prompt, width=WIDTH, height=HEIGHT, steps=STEPS)
    # every model here is a random stand-in; FLUX.1's block list is moved onto the reduced-depth one
    prompt = random_models.fit_to_stand_ins(prompt, workflow.model_refs(prompt))
    for node in prompt.values():  # 2 steps: MasaCtrl starts at the last one instead of after the run
        if node["class_type"] == "MasaCtrlAttentionPatch":
            node["inputs"]["start_step"] = min(node["inputs"]["start_step"], STEPS - 1)
        if node["class_type"] == "ParticleInpaintKSampler":  # 2 particles: the full UNet on a CPU, x particles
            node["inputs"]["particles"] = min(node["inputs"]["particles"], 2)
    return prompt


def _run(server, prompt: dict, folder: Path):
    try:
        return client.run_prompt(server.url, prompt, folder, timeout=900)
    except (client.PromptFailed, client.PromptRejected) as e:
        pytest.fail(f"{e}\n--- server log ---\n{server.log()[-6000:]}", pytrace=False)
    finally:
        _free(server)


def _save_the_subject(server, tmp_path: Path) -> None:
    """Runs consistory_subject_save once on this server, so the subject file of the reuse workflow exists."""
    if "consistory_subject_save (for the reuse workflow)" in TIMINGS:
        return
    saving = _small(workflow.load(REPO / "workflows" / "api" / "consistory_subject_save.json"))
    folder = tmp_path / "saving"
    folder.mkdir()
    log_start = len(server.log())
    TIMINGS["consistory_subject_save (for the reuse workflow)"] = _run(server, saving, folder).seconds
    assert SAVED in server.log()[log_start:], server.log()[-3000:]


def _masactrl_prompt() -> tuple[dict, str]:
    path = next(p for p in API_FILES if any(n["class_type"] == "MasaCtrlAttentionPatch"
                                            for n in workflow.load(p).values()))
    prompt = workflow.override(workflow.load(path), width=WIDTH, height=HEIGHT, steps=STEPS)
    return prompt, next(i for i, n in prompt.items() if n["class_type"] == "MasaCtrlAttentionPatch")


@pytest.mark.server
def test_a_bad_value_for_our_node_gets_the_validation_error_naming_node_and_input(server):
    prompt, node_id = _masactrl_prompt()
    prompt[node_id]["inputs"]["start_layer"] = -1  # below the input's minimum
    with pytest.raises(client.PromptRejected) as caught:
        client.run_prompt(server.url, prompt)
    errors = caught.value.body["node_errors"][node_id]
    assert errors["class_type"] == "MasaCtrlAttentionPatch"
    assert [e["extra_info"]["input_name"] for e in errors["errors"]] == ["start_layer"]
    assert "MasaCtrlAttentionPatch" in str(caught.value) and "'start_layer'" in str(caught.value)


@pytest.mark.server
def test_a_bad_option_fails_the_prompt_with_our_message_naming_node_and_input(server):
    """ComfyUI 0.3.64 does not check a V3 combo's value before running; our node's own check does."""
    prompt, node_id = _masactrl_prompt()
    prompt[node_id]["inputs"]["mode"] = "sideways"
    with pytest.raises((client.PromptRejected, client.PromptFailed)) as caught:
        client.run_prompt(server.url, prompt)
    assert "MasaCtrlAttentionPatch" in str(caught.value) and "'mode'" in str(caught.value)
