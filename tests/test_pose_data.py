"""Pose data (pose/): the POSE_KEYPOINT format, rendering, completion and edits, with no ComfyUI."""

import json
import time

import numpy as np
import pytest

from consistent_synthesis.pose import complete, edits, openpose, render
from consistent_synthesis.pose.openpose import PoseError

# A standing person facing the camera on a 256 x 384 canvas (pixels); the person's right is image-left.
STANDING = {
    0: (128, 60), 1: (128, 100), 2: (98, 100), 3: (90, 150), 4: (86, 195), 5: (158, 100), 6: (166, 150),
    7: (170, 195), 8: (110, 200), 9: (108, 270), 10: (106, 340), 11: (146, 200), 12: (148, 270), 13: (150, 340),
    14: (120, 52), 15: (136, 52), 16: (112, 56), 17: (144, 56)}


def body_array(points=STANDING, drop=()):
    body = np.zeros((18, 3))
    for i, (x, y) in points.items():
        if i not in drop:
            body[i] = (x, y, 0.9)
    return body


def aux_frame(normalised=False, face=True, hands=True, width=256, height=384):
    """A frame as comfyui_controlnet_aux writes it (OpenPose: 0-1, DWPose: pixels)."""
    sx, sy = (1 / width, 1 / height) if normalised else (1, 1)
    body = []
    for i in range(18):
        x, y = STANDING[i]
        body += [x * sx, y * sy, 0.9]
    body[3 * 16:3 * 17] = [0, 0, 0]  # a missing point
    rng = np.random.default_rng(0)
    person = {"pose_keypoints_2d": body,
              "face_keypoints_2d": [float(v) for p in rng.uniform(50, 70, (70, 2)) for v in (p[0] * sx, p[1] * sy, 1.0)]
              if face else None,
              "hand_left_keypoints_2d": [float(v) for p in rng.uniform(160, 200, (21, 2))
                                         for v in (p[0] * sx, p[1] * sy, 1.0)] if hands else None,
              "hand_right_keypoints_2d": None}
    return {"people": [person], "canvas_width": width, "canvas_height": height}


def test_pixel_pose_from_controlnet_aux_round_trips_unchanged():
    data = [aux_frame()]
    assert openpose.to_pose_keypoint(openpose.from_pose_keypoint(data)) == data


def test_normalised_pose_is_read_in_pixels_and_written_back_normalised():
    frames = openpose.from_pose_keypoint([aux_frame(normalised=True)])
    np.testing.assert_allclose(frames[0].people[0].body[1, :2], STANDING[1])
    back = openpose.to_pose_keypoint(frames, normalised=True)[0]
    np.testing.assert_allclose(back["people"][0]["pose_keypoints_2d"],
                               aux_frame(normalised=True)["people"][0]["pose_keypoints_2d"], atol=1e-12)
    assert back["people"][0]["hand_right_keypoints_2d"] is None


def test_missing_points_and_parts_keep_their_encoding():
    frame = openpose.from_pose_keypoint(aux_frame(face=False, hands=False))[0]
    assert frame.people[0].face is None and frame.people[0].hand_left is None
    assert not openpose.present(frame.people[0].body)[16]
    out = openpose.to_pose_keypoint([frame])[0]["people"][0]
    assert out["pose_keypoints_2d"][48:51] == [0.0, 0.0, 0.0] and out["face_keypoints_2d"] is None


@pytest.mark.parametrize("bad,message", [
    ("[{\"people\": [{\"pose_keypoints_2d\": [1, 2]}], \"canvas_width\": 8, \"canvas_height\": 8}]", "54 numbers"),
    ("[{\"people\": [], \"canvas_width\": -3, \"canvas_height\": 8}]", "canvas_width"),
    ("[{\"people\": [{\"pose_keypoints_2d\": [NaN" + ", 1" * 53 + "]}], \"canvas_width\": 8, \"canvas_height\": 8}]",
     "NaN"),
    ("[{\"people\": [{\"pose_keypoints_2d\": [1e300" + ", 1" * 53 + "]}], \"canvas_width\": 8, \"canvas_height\": 8}]",
     "beyond"),
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("[" + "1," * 600_000 + "1]", "characters"),
    ("{\"people\": [", "not valid JSON"),
    ("[]", "non-empty"),
    ("[{\"people\": [{\"pose_keypoints_2d\": [\"a\"" + ", 1" * 53 + "]}], \"canvas_width\": 8, \"canvas_height\": 8}]",
     "not a number"),
    ("[{\"people\": [{\"pose_keypoints_2d\": [" + "9" * 5000 + ", 1" * 53 + "]}], \"canvas_width\": 8, "
     "\"canvas_height\": 8}]", "digits"),
    ("[{\"people\": [{\"pose_keypoints_2d\": [1" + "0" * 19 + ", 1" * 53 + "]}], \"canvas_width\": 8, "
     "\"canvas_height\": 8}]", "beyond"),
    ("[{\"people\": [], \"canvas_width\": 1" + "0" * 19 + ", \"canvas_height\": 8}]", "canvas_width"),
    ("[{\"people\": [], \"canvas_width\": 1e999, \"canvas_height\": 8}]", "canvas_width"),
    ("\"" + "\u00e9" * 600_000 + "\"", "bytes"),  # 600,000 characters, 1.2 MB of UTF-8
    ("[{\"people\": [{\"face_keypoints_2d\": [1" + ", 1" * 206 + "]}], \"canvas_width\": 8, \"canvas_height\": 8}]",
     r"210 numbers \(70 points of x, y, confidence\) or 204 numbers \(68 points\), or null, got 207"),
    ("[{\"people\": 7, \"canvas_width\": 8, \"canvas_height\": 8}]", "people"),
])
def test_hostile_pose_json_fails_fast_with_a_clear_message(bad, message):
    assert issubclass(PoseError, ValueError)
    start = time.perf_counter()
    with pytest.raises(PoseError, match=message):
        openpose.from_pose_keypoint(bad)
    assert time.perf_counter() - start < 2.0


def test_translation_moves_present_points_exactly_and_leaves_missing_ones():
    frame = openpose.from_pose_keypoint(aux_frame())[0]
    moved = openpose.place(frame, 384, 392, offset=(64, 8))
    p, q = frame.people[0], moved.people[0]
    ok = openpose.present(p.body)
    np.testing.assert_array_equal(q.body[ok, :2], p.body[ok, :2] + [64, 8])
    np.testing.assert_array_equal(q.body[~ok], 0)
    np.testing.assert_array_equal(q.hand_left[:, :2], p.hand_left[:, :2] + [64, 8])
    assert (moved.width, moved.height) == (384, 392)


def test_render_uses_the_openpose_palette_and_limb_order():
    frame = openpose.Frame(256, 384, [openpose.Person(body_array())])
    image = render.render(frame)
    assert image.shape == (384, 256, 3) and image.dtype == np.uint8
    for i, (a, b) in enumerate(render.LIMBS):
        if {a, b} & {0, 14, 15, 16, 17}:
            continue  # head limbs are short and covered by joint dots
        (xa, ya), (xb, yb) = STANDING[a], STANDING[b]
        x, y = round((xa + xb) / 2), round((ya + yb) / 2)
        assert tuple(image[y, x]) == render.limb_color(i), (i, a, b)
    for i in (1, 4, 10, 13):
        x, y = STANDING[i]
        assert tuple(image[y, x]) == render.COLORS[i]
    assert render.limb_color(0) == (153, 0, 0) and render.COLORS[1] == (255, 85, 0)


def test_render_scales_the_stick_width_with_the_canvas():
    def width_at(size):
        s = size / 256
        pts = {i: (x * s, y * s) for i, (x, y) in STANDING.items()}
        image = render.render(openpose.Frame(size, round(384 * s), [openpose.Person(body_array(pts))]))
        row = image[round(235 * s)]  # across the right thigh
        return int((row == render.limb_color(7)).all(axis=1).sum())
    assert width_at(1024) >= 3 * width_at(256) > 0


def test_hands_and_face_are_drawn_in_their_colours():
    frame = openpose.from_pose_keypoint(aux_frame())[0]
    image = render.render(frame)
    hand = frame.people[0].hand_left
    x, y = np.round(hand[5, :2]).astype(int)
    assert tuple(image[y, x]) == (0, 0, 255)
    x, y = np.round(frame.people[0].face[3, :2]).astype(int)
    assert tuple(image[y, x]) in ((255, 255, 255), (0, 0, 255))


def test_auto_completion_places_cut_off_legs_below_the_waist_with_body_proportions():
    # the image (y < 210) shows the person down to the hips; the canvas adds 256 px below
    cropped = body_array(drop=(9, 10, 12, 13))
    frame = openpose.Frame(256, 466, [openpose.Person(cropped)])
    done = complete.complete(frame, (0, 0, 256, 210)).people[0].body
    ok = openpose.present(done)
    assert ok[[9, 10, 12, 13]].all()
    torso = np.hypot(*(done[[8, 11], :2].mean(0) - done[1, :2]))
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        assert done[knee, 1] > done[hip, 1] + 0.3 * torso and done[ankle, 1] > done[knee, 1] + 0.3 * torso
        thigh = np.hypot(*(done[knee, :2] - done[hip, :2]))
        assert 0.35 * torso < thigh < 0.65 * torso
    assert (done[ok, 0] >= 0).all() and (done[ok, 0] < 256).all() and (done[ok, 1] < 466).all()
    np.testing.assert_array_equal(done[~np.isin(np.arange(18), [9, 10, 12, 13])], cropped[~np.isin(
        np.arange(18), [9, 10, 12, 13])])


def test_auto_completion_extends_an_arm_beyond_a_cropped_shoulder_and_clamps_to_the_canvas():
    # the image's right edge cuts the person's left arm after the shoulder; 64 px are padded on the right
    cropped = body_array(drop=(6, 7))
    frame = openpose.Frame(224, 384, [openpose.Person(cropped)])
    done = complete.complete(frame, (0, 0, 160, 384)).people[0].body
    assert openpose.present(done)[[6, 7]].all()
    assert done[6, 1] > done[5, 1] and done[7, 1] > done[6, 1]
    assert (done[[6, 7], 0] <= 223).all()


def test_points_missing_inside_the_image_stay_missing():
    cropped = body_array(drop=(4,))  # the right wrist would be inside the image: occluded, not cut off
    frame = openpose.Frame(256, 384, [openpose.Person(cropped)])
    done = complete.complete(frame, (0, 0, 256, 384)).people[0].body
    assert not openpose.present(done)[4]


def test_edits_set_remove_translate_and_mirror():
    frame = openpose.Frame(256, 384, [openpose.Person(body_array())])
    ops = edits.parse(json.dumps([
        {"op": "set", "person": 0, "part": "body", "index": 4, "x": 60.5, "y": 120},
        {"op": "remove", "person": 0, "part": "body", "index": 17},
        {"op": "set", "person": 0, "part": "hand_left", "index": 0, "x": 10, "y": 11},
        {"op": "translate", "person": 0, "dx": 5, "dy": -5},
        {"op": "mirror", "person": 0}]))
    out = edits.apply(frame, ops).people[0]
    assert tuple(out.body[7]) == (65.5, 115, 1.0)  # the right wrist, moved, then relabelled left
    assert tuple(out.body[16]) == (0, 0, 0)  # the removed left ear, relabelled right
    assert tuple(out.hand_right[0]) == (15, 6, 1.0) and out.hand_left is None
    assert tuple(frame.people[0].body[4, :2]) == STANDING[4]  # the input is untouched


@pytest.mark.parametrize("text,message", [
    ("{\"op\": \"set\"}", "list"),
    ("[{\"op\": \"fly\", \"person\": 0}]", "one of"),
    ("[{\"op\": \"set\", \"person\": 0, \"part\": \"body\", \"index\": 1, \"x\": 1}]", "missing"),
    ("[{\"op\": \"translate\", \"person\": 0, \"dx\": Infinity, \"dy\": 0}]", "Infinity"),
    ("[{\"op\": \"set\", \"person\": -1, \"part\": \"body\", \"index\": 1, \"x\": 1, \"y\": 1}]", "person"),
    ("[{\"op\": \"set\", \"person\": 0, \"part\": \"tail\", \"index\": 1, \"x\": 1, \"y\": 1}]", "part"),
    ("[" + ",".join(["{\"op\": \"mirror\", \"person\": 0}"] * 10_001) + "]", "10,000"),
    ("[" + ",".join(["{\"op\": \"mirror\", \"person\": 0}"] * 40_000) + "]", "bytes"),
    ("[{\"op\": [1], \"person\": 0}]", "one of"),
    ("[{\"op\": \"remove\", \"person\": 0, \"part\": [\"body\"], \"index\": 1}]", "part"),
    ("[{\"op\": \"mirror\", \"person\": 1" + "0" * 400 + "}]", "digits"),
    ("[{\"op\": \"mirror\", \"person\": 100000}]", "person must be a whole number from 0 to 63"),
    ("[{\"op\": \"translate\", \"person\": 0, \"dx\": 1e400, \"dy\": 0}]", "finite"),
    ("[{\"op\": \"translate\", \"person\": 0, \"dx\": true, \"dy\": 0}]", "finite"),
    ("[" * 50 + "]" * 50, "nested"),
])
def test_bad_edits_fail_clearly_and_fast(text, message):
    start = time.perf_counter()
    with pytest.raises(PoseError, match=message):
        edits.parse(text)
    assert time.perf_counter() - start < 2.0


def test_edits_on_a_point_or_person_that_does_not_exist_fail_clearly():
    frame = openpose.Frame(256, 384, [openpose.Person(body_array())])
    with pytest.raises(PoseError, match="person 3 does not exist"):
        edits.apply(frame, edits.parse('[{"op": "mirror", "person": 3}]'))
    with pytest.raises(PoseError, match="points 0 to 17, not 18"):
        edits.apply(frame, edits.parse('[{"op": "remove", "person": 0, "part": "body", "index": 18}]'))


def test_controlnet_aux_openpose_markers_for_undetected_hand_points_read_as_missing():
    # its OpenPose detector writes an undetected hand or face point as -1/W, -1/H with confidence 1
    frame = aux_frame(normalised=True)
    hand = frame["people"][0]["hand_left_keypoints_2d"]
    hand[0:3] = [-1 / 256, -1 / 384, 1.0]
    person = openpose.from_pose_keypoint([frame])[0].people[0]
    assert tuple(person.hand_left[0]) == (0, 0, 0)
    np.testing.assert_allclose(person.body[1, :2], STANDING[1])  # the frame still reads as normalised
    np.testing.assert_allclose(person.hand_left[1, :2], np.array(hand[3:5]) * [256, 384])
    assert openpose.to_pose_keypoint([openpose.from_pose_keypoint([frame])[0]])[0]["people"][0][
        "hand_left_keypoints_2d"][0:3] == [0.0, 0.0, 0.0]


def test_auto_completion_builds_torso_and_legs_below_a_bust_with_body_proportions():
    # only head, neck and shoulders are in the 256 x 120 image; 512 px are padded below
    bust = body_array(drop=(3, 4, 6, 7, 8, 9, 10, 11, 12, 13))
    frame = openpose.Frame(256, 632, [openpose.Person(bust)])
    done = complete.complete(frame, (0, 0, 256, 120)).people[0].body
    assert openpose.present(done).all()
    shoulders = np.hypot(*(done[2, :2] - done[5, :2]))  # 60 px: torso about 120 px
    hips_y = done[[8, 11], 1].mean()
    assert 0.8 * 2 * shoulders < hips_y - done[1, 1] < 1.2 * 2 * shoulders
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        assert done[hip, 1] < done[knee, 1] < done[ankle, 1]
        leg = np.hypot(*(done[knee, :2] - done[hip, :2])) + np.hypot(*(done[ankle, :2] - done[knee, :2]))
        assert 1.6 * shoulders < leg < 2.3 * shoulders  # legs about 0.98 torso, torso about 2 shoulder widths
    assert done[8, 0] < done[11, 0]  # the right hip stays on the image's left, under the right shoulder
    assert (done[:, 0] >= 0).all() and (done[:, 0] < 256).all() and (done[:, 1] < 632).all()
    np.testing.assert_array_equal(done[[0, 1, 2, 5]], bust[[0, 1, 2, 5]])
