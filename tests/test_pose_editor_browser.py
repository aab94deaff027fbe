"""The pose editor (web/) in headless Chromium on the real ComfyUI frontend and server.

A graph LoadImage + CSTestPoseKeypoint (a known pose) -> PoseEditOutpaint -> PreviewImage is built in
the page and queued from the frontend; the editor then shows that run's padded image and pose.
Screenshots go to test-artifacts/browser/ (printed); CS_DOCS_SCREENSHOTS=1 also writes docs/pose-editor.png.
Over 400 lines on purpose: every editor interaction runs against one server and one browser page
set up once for the module.
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



# ---- several people, hands and faces ----

IMAGE2 = "cs_pose_editor_two_people.png"
WIDTH2, HEIGHT2 = 320, 256
SHIFT = 140  # person 2 stands 140 px right of person 1
L_WRIST = 7


def hand_points(wrist):
    """21 points of an open hand hanging below ``wrist``: the hand's wrist 3 px under it, then thumb,
    index, middle, ring and little finger from base to tip, fanned out."""
    import math

    wx, wy = wrist[0], wrist[1] + 3
    points = [(wx, wy)]
    for finger, (angle, reach) in enumerate(((-55, 0.75), (-22, 1.0), (-5, 1.05), (12, 1.0), (30, 0.85))):
        a = math.radians(90 + angle)
        for joint_ in range(4):
            r = reach * (7 + 5 * joint_)
            points.append((round(wx + r * math.cos(a), 2), round(wy + r * math.sin(a), 2)))
    return points


def face_points(nose):
    """68 landmarks (DWPose's face, as in iBUG 300-W) around the nose: jaw 0-16, brows 17-26, nose 27-35,
    eyes 36-47, mouth 48-67, for a face about 26 px wide."""
    import math

    nx, ny = nose

    def arc(cx, cy, rx, ry, start, stop, count):
        return [(round(cx + rx * math.cos(math.radians(start + (stop - start) * i / (count - 1))), 2),
                 round(cy + ry * math.sin(math.radians(start + (stop - start) * i / (count - 1))), 2))
                for i in range(count)]

    jaw = arc(nx, ny - 6, 13, 16, 180, 0, 17)  # from the face's right ear down round the chin (y points down)
    brows = arc(nx - 6, ny - 9, 4.5, 1.5, 180, 360, 5) + arc(nx + 6, ny - 9, 4.5, 1.5, 180, 360, 5)
    bridge = [(nx, ny - 6 + 1.5 * i) for i in range(4)]
    nostrils = [(nx - 3 + 1.5 * i, ny + 1.5) for i in range(5)]
    eyes = []
    for cx in (nx - 6, nx + 6):
        eyes += arc(cx, ny - 5.5, 2.5, 1.2, 180, 360, 4) + arc(cx, ny - 5.5, 2.5, 1.2, 60, 120, 2)[::-1]
    mouth = arc(nx, ny + 6, 5, 2.2, 180, 540, 13)[:12] + arc(nx, ny + 6, 3, 1, 180, 540, 9)[:8]
    points = [tuple(map(float, p)) for p in jaw + brows + bridge + nostrils + eyes + mouth]
    assert len(points) == 68
    return points


def flat(points):
    return [v for x, y in points for v in (x, y, 1.0)]


FULL_BODY = [p if p is not None else (112, 200) if i == L_KNEE else (112, 245) for i, p in enumerate(BODY)]
BODY2 = [(x + SHIFT, y) for x, y in FULL_BODY]
HAND2_LEFT = hand_points(BODY2[L_WRIST])
HAND2_RIGHT = hand_points(BODY2[R_WRIST])
FACE2 = face_points(BODY2[0])  # a DWPose face


def two_people_keypoint() -> list[dict]:
    """Person 1: a body with no hands and no face; person 2: body, both hands and a 68-point face (DWPose)."""
    first = {"pose_keypoints_2d": flat(FULL_BODY), "face_keypoints_2d": None, "hand_left_keypoints_2d": None,
             "hand_right_keypoints_2d": None}
    second = {"pose_keypoints_2d": flat(BODY2), "face_keypoints_2d": flat(FACE2),
              "hand_left_keypoints_2d": flat(HAND2_LEFT), "hand_right_keypoints_2d": flat(HAND2_RIGHT)}
    return [{"people": [first, second], "canvas_width": WIDTH2, "canvas_height": HEIGHT2}]


def two_people_image(path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH2, HEIGHT2), (176, 190, 205))
    draw = ImageDraw.Draw(image)
    for dx, shirt in ((0, (60, 90, 150)), (SHIFT, (150, 70, 60))):
        body = [(x + dx, y) for x, y in FULL_BODY]
        draw.rectangle((72 + dx, 68, 120 + dx, 155), fill=shirt)
        draw.ellipse((80 + dx, 18, 112 + dx, 60), fill=(225, 185, 160))
        for chain in ((2, 3, 4), (5, 6, 7)):
            draw.line([body[i] for i in chain], fill=(225, 185, 160), width=9)
        for chain in ((8, 9, 10), (11, 12, 13)):
            draw.line([body[i] for i in chain], fill=(50, 50, 60), width=12)
    image.save(path)


@pytest.fixture
def two_people(server, comfy_page):
    two_people_image(server.base / "input" / IMAGE2)
    node_id = comfy_page.js(BUILD_GRAPH, {"image": IMAGE2, "pose": json.dumps(two_people_keypoint()),
                                          "padRight": 0, "padBottom": 64})
    entry = comfy_page.queue()
    return comfy_page, node_id, entry


def focused(comfy):
    return comfy.js("() => document.activeElement?.dataset?.key ?? null")


def pressed_person(dialog) -> str:
    return dialog.locator('[data-person-button][aria-pressed="true"]').text_content()


def point_position(comfy, part, index, person):
    j = joint(comfy, part, index, person)
    return float(j.get_attribute("cx")), float(j.get_attribute("cy"))


def wheel_zoom_at(comfy, locator, clicks: int) -> None:
    box = locator.bounding_box()
    comfy.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(clicks):
        comfy.page.mouse.wheel(0, -100)
        comfy.page.wait_for_timeout(30)


def test_every_person_is_shown_and_selected_by_list_click_and_keyboard(two_people):
    comfy, node_id, entry = two_people
    base = json.loads(entry["outputs"][str(node_id)]["pose_base"][0])[0]["people"]
    assert len(base) == 2 and len(base[1]["face_keypoints_2d"]) == 3 * 68  # the DWPose face came through
    dialog = open_editor(comfy, node_id)
    assert dialog.locator("[data-person-button]").all_text_contents() == ["Person 1", "Person 2"]
    assert pressed_person(dialog) == "Person 1" and focused(comfy) == "0/body/0"
    # every point of person 2 is drawn: 18 body, 42 hand, 68 face
    assert dialog.locator('[data-person="1"]').count() == 18 + 42 + 68
    assert joint(comfy, "body", 0, 1).get_attribute("tabindex") == "-1"  # Tab stays within person 1

    comfy.page.keyboard.press("n")
    assert pressed_person(dialog) == "Person 2" and focused(comfy) == "1/body/0"
    assert joint(comfy, "body", 0, 1).get_attribute("tabindex") == "0"
    assert joint(comfy, "body", 0, 0).get_attribute("tabindex") == "-1"
    comfy.page.keyboard.press("Shift+N")
    assert pressed_person(dialog) == "Person 1"
    dialog.locator("[data-person-button]", has_text="Person 2").click()
    assert pressed_person(dialog) == "Person 2"
    dialog.locator("[data-person-button]", has_text="Person 1").click()
    joint(comfy, "body", NECK, 1).click()  # a click on another person's point selects that person
    assert pressed_person(dialog) == "Person 2"
    assert "Person 2, neck" in dialog.locator(".cs-pose-selection").text_content()
    assert dialog.get_by_role("status").text_content() == "Editing person 2 of 2."
    joint(comfy, "hand_left", 12, 1).click()  # the README's picture: person 2's middle fingertip selected
    shot = comfy.screenshot("pose-editor-two-people")
    print(f"\nscreenshot: {shot}")
    docs = copy_to_docs(shot, "pose-editor.png")
    if docs:
        print(f"docs screenshot: {docs}")
    comfy.assert_no_errors()


def test_zoomed_in_hand_and_face_points_of_the_second_person_drag_into_edits(two_people):
    comfy, node_id, _ = two_people
    dialog = open_editor(comfy, node_id)
    fit_scale = screen_scale(comfy)
    hand_tip = joint(comfy, "hand_left", 8, 1)
    wheel_zoom_at(comfy, hand_tip, 6)  # 1.25^6: about 3.8 times
    scale = screen_scale(comfy)
    assert scale > 3 * fit_scale
    assert "%" in dialog.locator("[data-zoom]").text_content()
    # points keep their size on screen, and the hand under the cursor stays in view
    assert 3 <= hand_tip.bounding_box()["width"] / 2 <= 8
    drag(comfy, hand_tip, 30, 15)
    (op,) = edits(comfy, node_id)
    x, y = HAND2_LEFT[8]
    assert op == {"op": "set", "person": 1, "part": "hand_left", "index": 8,
                  "x": pytest.approx(x + 30 / scale, abs=0.051), "y": pytest.approx(y + 15 / scale, abs=0.051)}
    assert pressed_person(dialog) == "Person 2"

    comfy.page.keyboard.press("0")  # fit
    assert screen_scale(comfy) == pytest.approx(fit_scale)
    comfy.page.keyboard.press("+")
    assert screen_scale(comfy) == pytest.approx(1.5 * fit_scale)
    view_box = "() => document.querySelector('.cs-pose-svg').getAttribute('viewBox').split(' ').map(Number)"
    x0 = comfy.js(view_box)[0]
    comfy.page.keyboard.press("Alt+ArrowRight")  # pans a tenth of the view
    assert comfy.js(view_box)[0] == pytest.approx(min(x0 + comfy.js(view_box)[2] / 10, WIDTH2 - comfy.js(view_box)[2]))
    assert comfy.js(view_box)[0] > x0
    comfy.page.keyboard.press("0")
    face_point = joint(comfy, "face", 17, 1)
    wheel_zoom_at(comfy, face_point, 8)
    scale = screen_scale(comfy)
    drag(comfy, face_point, -20, 10)
    face_op = edits(comfy, node_id)[-1]
    fx, fy = FACE2[17]
    assert face_op == {"op": "set", "person": 1, "part": "face", "index": 17,
                       "x": pytest.approx(fx - 20 / scale, abs=0.051), "y": pytest.approx(fy + 10 / scale, abs=0.051)}
    # panning: dragging the image moves the view, not the pose
    view = comfy.js("() => document.querySelector('.cs-pose-svg').getAttribute('viewBox')")
    stage = dialog.locator(".cs-pose-svg").bounding_box()
    comfy.page.mouse.move(stage["x"] + 20, stage["y"] + 20)
    comfy.page.mouse.down()
    comfy.page.mouse.move(stage["x"] + 80, stage["y"] + 60, steps=4)
    comfy.page.mouse.up()
    assert comfy.js("() => document.querySelector('.cs-pose-svg').getAttribute('viewBox')") != view
    assert len(edits(comfy, node_id)) == 2
    print(f"\nscreenshot: {comfy.screenshot('pose-editor-zoomed-hand')}")
    comfy.page.keyboard.press("Escape")

    entry = comfy.queue()  # the backend applies the hand and face edits to person 2
    person = json.loads(entry["outputs"][str(node_id)]["pose_edited"][0])[0]["people"][1]
    assert person["hand_left_keypoints_2d"][3 * 8:3 * 8 + 3] == [op["x"], op["y"], 1.0]
    assert person["face_keypoints_2d"][3 * 17:3 * 17 + 3] == [face_op["x"], face_op["y"], 1.0]
    assert len(person["face_keypoints_2d"]) == 3 * 68
    comfy.assert_no_errors()


def test_a_hand_is_added_at_a_wrist_deleted_and_restored_with_undo_and_the_keyboard(two_people):
    comfy, node_id, _ = two_people
    page = comfy.page
    dialog = open_editor(comfy, node_id)
    add = dialog.locator('[data-add-hand="hand_right"]')
    assert add.text_content() == "+ right hand at wrist"
    add.click()
    (op,) = edits(comfy, node_id)
    assert op["op"] == "set_part" and op["person"] == 0 and op["part"] == "hand_right" and len(op["points"]) == 21
    assert op["points"][0] == list(FULL_BODY[R_WRIST])  # the hand's wrist on the body's wrist
    tips = [op["points"][i] for i in (4, 8, 12, 16, 20)]
    assert all(y > FULL_BODY[R_WRIST][1] for _, y in tips)  # on from the forearm, which points down
    assert op["points"][4][0] < op["points"][20][0]  # thumb away from the body (image left for the right hand)
    assert dialog.locator('.cs-pose-hand_right[data-person="0"]').count() == 21
    assert focused(comfy) == "0/hand_right/0"  # ready for the arrow keys

    page.keyboard.press("ArrowDown")
    assert edits(comfy, node_id)[-1]["op"] == "set" and edits(comfy, node_id)[-1]["part"] == "hand_right"
    page.keyboard.press("p")  # arrows: whole person
    page.keyboard.press("p")  # arrows: the selected point's part (this hand)
    assert dialog.locator('[data-action="mode"]').text_content() == "Arrows move: part"
    page.keyboard.press("ArrowRight")
    assert edits(comfy, node_id)[-1] == {"op": "translate", "person": 0, "part": "hand_right", "dx": 1, "dy": 0}
    count = len(edits(comfy, node_id))
    page.keyboard.press("Shift+Delete")
    assert edits(comfy, node_id)[-1] == {"op": "remove_part", "person": 0, "part": "hand_right"}
    assert dialog.locator('.cs-pose-hand_right[data-person="0"]').count() == 0
    page.keyboard.press("Control+z")
    assert len(edits(comfy, node_id)) == count
    assert dialog.locator('.cs-pose-hand_right[data-person="0"]').count() == 21
    page.keyboard.press("Control+y")
    assert dialog.locator('.cs-pose-hand_right[data-person="0"]').count() == 0

    # A: a hand at the selected wrist, by keyboard only
    joint(comfy, "body", L_WRIST, 0).focus()
    page.keyboard.press("a")
    last = edits(comfy, node_id)[-1]
    assert last["op"] == "set_part" and last["part"] == "hand_left" and last["points"][0] == list(FULL_BODY[L_WRIST])
    # delete a part from the side panel: person 2's face
    page.keyboard.press("n")
    dialog.locator('[data-remove-part="face"]').click()
    assert edits(comfy, node_id)[-1] == {"op": "remove_part", "person": 1, "part": "face"}
    assert dialog.locator('.cs-pose-face[data-person="1"]').count() == 0
    # dragging a hand bone moves that hand only
    bone = dialog.locator('.cs-pose-hand-bone[data-bone-of="1"][data-bone-part="hand_right"]').nth(9)
    wheel_zoom_at(comfy, bone, 6)
    scale = screen_scale(comfy)
    drag(comfy, bone, 24, -12)
    moved = edits(comfy, node_id)[-1]
    assert moved == {"op": "translate", "person": 1, "part": "hand_right",
                     "dx": pytest.approx(24 / scale, abs=0.051), "dy": pytest.approx(-12 / scale, abs=0.051)}
    x, y = HAND2_RIGHT[12]
    assert point_position(comfy, "hand_right", 12, 1) == pytest.approx((x + moved["dx"], y + moved["dy"]))
    assert point_position(comfy, "body", R_WRIST, 1) == pytest.approx(BODY2[R_WRIST])
    print(f"\nscreenshot: {comfy.screenshot('pose-editor-hand-added')}")
    comfy.assert_no_errors()


def test_parts_are_shown_and_hidden_by_buttons_and_keys_without_edits(two_people):
    comfy, node_id, _ = two_people
    page = comfy.page
    dialog = open_editor(comfy, node_id)
    hands = dialog.locator(".cs-pose-hand_left, .cs-pose-hand_right")
    faces = dialog.locator(".cs-pose-face")
    assert hands.count() == 42 and faces.count() == 68
    page.keyboard.press("h")
    assert hands.count() == 0 and dialog.locator(".cs-pose-hand-bone").count() == 0
    assert dialog.locator('[data-action="show-hands"]').get_attribute("aria-pressed") == "false"
    dialog.locator('[data-action="show-face"]').click()
    assert faces.count() == 0
    page.keyboard.press("b")
    assert dialog.locator(".cs-pose-body").count() == 0
    page.keyboard.press("b")
    page.keyboard.press("h")
    page.keyboard.press("f")
    assert hands.count() == 42 and faces.count() == 68 and dialog.locator(".cs-pose-body").count() == 36
    assert edits_value(comfy, node_id) == ""  # showing and hiding is not an edit
    comfy.assert_no_errors()
