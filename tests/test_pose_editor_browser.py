"""The pose editor (web/) in headless Chromium on the real ComfyUI frontend and server.

A graph LoadImage + CSTestPoseKeypoint (a known pose) -> PoseEditOutpaint -> PreviewImage is built in
the page and queued from the frontend; the editor then shows that run's padded image and pose.
Screenshots go to test-artifacts/browser/ (printed); CS_DOCS_SCREENSHOTS=1 also writes docs/pose-editor.png.
"""

from __future__ import annotations

import json

import pytest
from conftest import require_host

require_host()

from browser import require_browser

require_browser()

from browser import copy_to_docs  # noqa: E402

IMAGE = "cs_pose_editor_person.png"
WIDTH, HEIGHT, PAD_RIGHT, PAD_BOTTOM = 192, 256, 64, 64
# A standing person in pixels of the 192 x 256 image; the left knee and ankle are missing.
BODY = [(96, 40), (96, 70), (70, 72), (60, 110), (56, 145), (122, 72), (132, 110), (136, 145), (82, 150),
        (80, 200), (80, 245), (110, 150), None, None, (90, 34), (102, 34), (84, 38), (108, 38)]
R_WRIST, NECK, L_SHOULDER, R_SHOULDER, L_KNEE, L_HIP = 4, 1, 5, 2, 12, 11


def pose_keypoint() -> list[dict]:
    flat = []
    for point in BODY:
        flat += [0, 0, 0] if point is None else [point[0], point[1], 1.0]
    person = {"pose_keypoints_2d": flat, "face_keypoints_2d": None, "hand_left_keypoints_2d": None,
              "hand_right_keypoints_2d": None}
    return [{"people": [person], "canvas_width": WIDTH, "canvas_height": HEIGHT}]


def person_image(path) -> None:
    """A plain drawing of the person in BODY, so the screenshots show a skeleton over a figure."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), (176, 190, 205))
    draw = ImageDraw.Draw(image)
    draw.rectangle((72, 68, 120, 155), fill=(60, 90, 150))  # shirt
    draw.ellipse((80, 18, 112, 60), fill=(225, 185, 160))  # head
    draw.line([BODY[2], BODY[3], BODY[4]], fill=(225, 185, 160), width=9)
    draw.line([BODY[5], BODY[6], BODY[7]], fill=(225, 185, 160), width=9)
    draw.line([BODY[8], BODY[9], BODY[10]], fill=(50, 50, 60), width=12)
    draw.line([BODY[11], (112, 200), (112, 245)], fill=(50, 50, 60), width=12)
    image.save(path)


@pytest.fixture(scope="module")
def server(browser_server):
    person_image(browser_server.base / "input" / IMAGE)
    return browser_server


BUILD_GRAPH = """async ({image, pose, padRight, padBottom}) => {
    await app.loadGraphData({nodes: [], links: [], groups: [], version: 0.4, last_node_id: 0, last_link_id: 0},
                            true, false, "pose editor test");
    const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
    const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
    const load = add("LoadImage", [20, 20]);
    set(load, "image", image);
    const source = add("CSTestPoseKeypoint", [20, 420]);
    set(source, "pose_json", pose);
    const edit = add("PoseEditOutpaint", [360, 20]);
    for (const [name, value] of [["pad_left", 0], ["pad_top", 0], ["pad_right", padRight],
                                 ["pad_bottom", padBottom], ["feathering", 8], ["completion", "none"]]) {
        set(edit, name, value);
    }
    const preview = add("PreviewImage", [820, 20]);
    load.connect(0, edit, edit.findInputSlot("image"));
    source.connect(0, edit, edit.findInputSlot("pose"));
    edit.connect(edit.findOutputSlot("pose_image"), preview, 0);
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    app.graph.setDirtyCanvas(true, true);
    return edit.id;
}"""


def build_graph(comfy) -> int:
    return comfy.js(BUILD_GRAPH, {"image": IMAGE, "pose": json.dumps(pose_keypoint()), "padRight": PAD_RIGHT,
                                  "padBottom": PAD_BOTTOM})


def edits_value(comfy, node_id: int) -> str:
    return comfy.js("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'edits').value", node_id)


def edits(comfy, node_id: int) -> list:
    text = edits_value(comfy, node_id)
    return json.loads(text) if text else []


def open_editor(comfy, node_id: int):
    """Click the node's "Edit pose…" button on the canvas, as a user does; the dialog's locator."""
    comfy.page.wait_for_function("""(id) => { app.graph.setDirtyCanvas(true, true);
        return typeof app.graph.getNodeById(id).widgets.find((w) => w.name === 'edit pose').y === 'number'; }""",
                                 arg=node_id)
    dialog = comfy.page.locator(".cs-pose-editor")
    for attempt in range(3):  # a toast or a late redraw after a queued run can take the first click
        x, y = comfy.widget_screen_point(node_id, "edit pose")
        comfy.page.mouse.click(x, y)
        try:
            dialog.wait_for(state="visible", timeout=10_000)
            return dialog
        except Exception:
            if attempt == 2:
                raise
            comfy.page.wait_for_timeout(500)


def joint(comfy, part: str, index: int, person: int = 0):
    return comfy.page.locator(f'.cs-pose-editor [data-key="{person}/{part}/{index}"]')


def joint_position(comfy, index: int) -> tuple[float, float]:
    """The drawn joint's centre in canvas pixels."""
    j = joint(comfy, "body", index)
    return float(j.get_attribute("cx")), float(j.get_attribute("cy"))


def screen_scale(comfy) -> float:
    """Screen pixels per canvas pixel in the editor."""
    return comfy.js("() => document.querySelector('.cs-pose-svg').getScreenCTM().a")


def drag(comfy, locator, dx: float, dy: float) -> None:
    box = locator.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    mouse = comfy.page.mouse
    mouse.move(x, y)
    mouse.down()
    mouse.move(x + dx / 2, y + dy / 2, steps=4)
    mouse.move(x + dx, y + dy, steps=4)
    mouse.up()


@pytest.fixture
def run_graph(server, comfy_page):
    """The page with the test graph built and queued once: (page, PoseEditOutpaint's node id, history entry)."""
    node_id = build_graph(comfy_page)
    entry = comfy_page.queue()  # after the first test the server answers from its cache: the editor
    return comfy_page, node_id, entry  # then finds the run in the history


def test_the_node_is_found_in_the_node_search_and_gets_the_edit_button(server, comfy_page):
    page = comfy_page.page
    before = comfy_page.js("() => app.graph.nodes.length")
    page.mouse.move(700, 780)  # empty canvas below the default graph
    for _ in range(2):  # a double click, at the pace the canvas reads as one
        page.mouse.down()
        page.mouse.up()
        page.wait_for_timeout(100)
    search = page.get_by_role("combobox")
    search.wait_for(state="visible")
    page.keyboard.type("Pose Edit Outpaint")
    option = page.locator("[role=option]", has_text="Pose Edit Outpaint").first
    option.wait_for(state="visible")
    assert "consistent synthesis" in option.text_content()
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => app.graph.nodes.length === {before + 1}")
    added = comfy_page.js("""() => { const n = app.graph.nodes.at(-1);
        return [n.type, n.widgets.map((w) => [w.name, w.type, w.label ?? null])]; }""")
    assert added[0] == "PoseEditOutpaint"
    assert ["edit pose", "button", "Edit pose…"] in added[1]
    print(f"\nscreenshot: {comfy_page.screenshot('node-search-added')}")
    comfy_page.assert_no_errors()


def test_the_editor_opens_on_the_image_and_pose_of_the_last_run(run_graph):
    comfy, node_id, entry = run_graph
    ui = entry["outputs"][str(node_id)]
    base = json.loads(ui["pose_base"][0])[0]
    assert (base["canvas_width"], base["canvas_height"]) == (WIDTH + PAD_RIGHT, HEIGHT + PAD_BOTTOM)
    print(f"\nscreenshot: {comfy.screenshot('pose-node-on-canvas')}")
    dialog = open_editor(comfy, node_id)

    image = dialog.locator("svg image")
    href = image.get_attribute("href")
    assert ui["images"][0]["filename"] in href
    response = comfy.page.request.get(href if href.startswith("http") else comfy.server.url + href)
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    present = [i for i, p in enumerate(BODY) if p is not None]
    drawn = dialog.locator(".cs-pose-body")
    assert drawn.count() == len(present)
    for i in present:  # at the pose's pixels (no left/top padding)
        assert joint_position(comfy, i) == pytest.approx(BODY[i])
    assert dialog.locator("[data-add]").all_text_contents() == ["+ left knee", "+ left ankle"]
    # readable at any canvas zoom: joints keep their size on screen
    comfy.js("() => { app.canvas.ds.scale = 0.3; app.graph.setDirtyCanvas(true, true); }")
    radius = joint(comfy, "body", NECK).bounding_box()["width"] / 2
    assert 5 <= radius <= 10

    shot = comfy.screenshot("pose-editor-open")
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    docs = copy_to_docs(shot, "pose-editor.png")
    if docs:
        print(f"docs screenshot: {docs}")
    comfy.assert_no_errors()


def test_dragging_a_joint_writes_the_offset_into_edits(run_graph):
    comfy, node_id, _ = run_graph
    assert edits_value(comfy, node_id) == ""
    open_editor(comfy, node_id)
    scale = screen_scale(comfy)
    drag(comfy, joint(comfy, "body", R_WRIST), 50, -40)

    (op,) = edits(comfy, node_id)
    x, y = BODY[R_WRIST]
    assert op == {"op": "set", "person": 0, "part": "body", "index": R_WRIST,
                  "x": pytest.approx(x + 50 / scale, abs=0.051), "y": pytest.approx(y - 40 / scale, abs=0.051)}
    assert joint_position(comfy, R_WRIST) == (op["x"], op["y"])
    # the API prompt the frontend sends carries it, and no value for the button
    inputs = comfy.graph_to_prompt()[str(node_id)]["inputs"]
    assert json.loads(inputs["edits"]) == [op] and "edit pose" not in inputs
    print(f"\nscreenshot: {comfy.screenshot('pose-editor-dragged')}")
    comfy.assert_no_errors()


def test_dragging_a_bone_moves_the_whole_person(run_graph):
    comfy, node_id, _ = run_graph
    open_editor(comfy, node_id)
    scale = screen_scale(comfy)
    bone = comfy.page.locator(".cs-pose-editor line.cs-pose-bone").nth(6)  # neck - right hip
    drag(comfy, bone, -30, 20)
    (op,) = edits(comfy, node_id)
    assert op["op"] == "translate" and op["person"] == 0
    assert (op["dx"], op["dy"]) == (pytest.approx(-30 / scale, abs=0.051), pytest.approx(20 / scale, abs=0.051))
    for i in (0, NECK, R_WRIST, 17):
        assert joint_position(comfy, i) == pytest.approx((BODY[i][0] + op["dx"], BODY[i][1] + op["dy"]))
    comfy.assert_no_errors()


def test_keyboard_moves_deletes_undoes_redoes_mirrors_adds_and_resets(run_graph):
    comfy, node_id, _ = run_graph
    page = comfy.page
    nodes_before = comfy.js("() => app.graph.nodes.length")
    dialog = open_editor(comfy, node_id)
    focused = "() => document.activeElement?.dataset?.key ?? null"
    assert comfy.js(focused) == "0/body/0"  # the editor opens with a joint focused
    page.keyboard.press("Tab")
    assert comfy.js(focused) == f"0/body/{NECK}"
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    moved = {"op": "set", "person": 0, "part": "body", "index": NECK, "x": 99, "y": 80}
    assert edits(comfy, node_id) == [moved]  # one operation, however many key presses

    page.keyboard.press("Delete")
    removed = {"op": "remove", "person": 0, "part": "body", "index": NECK}
    assert edits(comfy, node_id) == [moved, removed]
    assert joint(comfy, "body", NECK).count() == 0
    page.keyboard.press("Control+z")
    assert edits(comfy, node_id) == [moved]
    page.keyboard.press("Control+y")
    assert edits(comfy, node_id) == [moved, removed]
    page.keyboard.press("Control+Shift+z")  # nothing left to redo
    page.keyboard.press("Control+z")

    dialog.focus()
    page.keyboard.press("m")
    assert edits(comfy, node_id)[-1] == {"op": "mirror", "person": 0}
    # labels swap, positions stay: the right shoulder is drawn where the left one was
    assert joint_position(comfy, R_SHOULDER) == BODY[L_SHOULDER]
    assert joint_position(comfy, L_SHOULDER) == BODY[R_SHOULDER]

    dialog.locator("button", has_text="Reset to detected pose").click()
    assert edits_value(comfy, node_id) == ""
    dialog.locator("[data-add]", has_text="left knee").click()
    (added,) = edits(comfy, node_id)
    assert added["op"] == "set" and added["index"] == L_KNEE and added["x"] == BODY[L_HIP][0]
    assert added["y"] > BODY[L_HIP][1]
    assert comfy.js(focused) == f"0/body/{L_KNEE}"  # the added joint is ready for the arrow keys
    page.keyboard.press("p")  # arrows now move the whole person
    page.keyboard.press("ArrowLeft")
    assert edits(comfy, node_id)[-1] == {"op": "translate", "person": 0, "dx": -1, "dy": 0}
    print(f"\nscreenshot: {comfy.screenshot('pose-editor-keyboard')}")

    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    # the graph behind the dialog took none of those keys (Delete, Ctrl+Z)
    assert comfy.js("() => app.graph.nodes.length") == nodes_before
    assert len(edits(comfy, node_id)) == 2
    comfy.assert_no_errors()


def test_the_edits_survive_saving_and_loading_the_workflow(run_graph):
    comfy, node_id, _ = run_graph
    open_editor(comfy, node_id)
    drag(comfy, joint(comfy, "body", R_WRIST), 30, 30)
    comfy.page.keyboard.press("Escape")
    text = edits_value(comfy, node_id)
    assert text

    saved = json.loads(json.dumps(comfy.serialize()))  # as written to a .json file
    (node,) = [n for n in saved["nodes"] if n["type"] == "PoseEditOutpaint"]
    assert text in node["widgets_values"]
    comfy.js("async () => { app.graph.clear(); }")
    loaded = comfy.load_workflow(saved, "reloaded.json")
    assert loaded.missing == []
    assert edits_value(comfy, node_id) == text
    assert loaded.prompt[str(node_id)]["inputs"]["edits"] == text
    comfy.assert_no_errors()


def test_a_queued_prompt_carries_the_edit_to_the_backend(run_graph):
    comfy, node_id, first = run_graph
    assert json.loads(first["outputs"][str(node_id)]["pose_edited"][0]) == \
        json.loads(first["outputs"][str(node_id)]["pose_base"][0])
    open_editor(comfy, node_id)
    drag(comfy, joint(comfy, "body", R_WRIST), -40, 60)
    comfy.page.keyboard.press("Escape")
    (op,) = edits(comfy, node_id)

    entry = comfy.queue()
    assert json.loads(entry["prompt"][2][str(node_id)]["inputs"]["edits"]) == [op]
    ui = entry["outputs"][str(node_id)]
    body = json.loads(ui["pose_edited"][0])[0]["people"][0]["pose_keypoints_2d"]
    assert body[3 * R_WRIST:3 * R_WRIST + 3] == [op["x"], op["y"], 1.0]
    base = json.loads(ui["pose_base"][0])[0]["people"][0]["pose_keypoints_2d"]
    assert base[3 * R_WRIST:3 * R_WRIST + 2] == list(BODY[R_WRIST])
    # the editor reopened on the new run shows the edited pose over the new run's image
    open_editor(comfy, node_id)
    assert joint_position(comfy, R_WRIST) == (op["x"], op["y"])
    assert ui["images"][0]["filename"] in comfy.page.locator(".cs-pose-editor svg image").get_attribute("href")
    comfy.assert_no_errors()


def test_unreadable_edits_are_reported_and_reset_starts_over(run_graph):
    comfy, node_id, _ = run_graph
    comfy.js("(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'edits').value = '[{oops'; }",
             node_id)
    dialog = open_editor(comfy, node_id)
    alert = dialog.get_by_role("alert")
    assert "The edits cannot be read" in alert.text_content()
    dialog.locator("button", has_text="Reset to detected pose").click()
    assert edits_value(comfy, node_id) == ""
    assert alert.is_hidden() and joint(comfy, "body", NECK).is_visible()
    comfy.assert_no_errors()

