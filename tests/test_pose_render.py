"""Our pose rendering against controlnet_aux's own drawing (the ControlNet annotator) of the same keypoints.

Agreement stated and tested here:
- at the annotator's scale (shorter side 512) our image IS its image: 0 differing pixels against
  ``open_pose.draw_poses`` (its draw_bodypose, draw_handpose, draw_facepose) and against DWPose's
  ``draw_pose``, for a DWPose input (pixels, 68-point faces, hands, two people) and an OpenPose input
  (normalised, 70-point faces), when the coordinates survive its normalise-and-multiply round trip
  exactly (a power-of-two canvas); on other canvases that round trip moves a few limb-edge pixels
  (at most 0.1 % of the drawn pixels);
- on other canvases the strokes scale with the shorter side: joint discs, face dots, limbs and hand
  lines are as wide as the annotator's times the scale within 1 pixel or 10 % (the larger).
"""

import colorsys
import json
import math
import warnings

import cv2
import numpy as np
import pytest

from consistent_synthesis.pose import openpose, render
from test_pose_data import STANDING

with warnings.catch_warnings():  # controlnet_aux (requirements.txt) warns about optional packages
    warnings.simplefilter("ignore")
    import controlnet_aux.dwpose as aux_dwpose
    import controlnet_aux.open_pose as aux_open_pose
    import matplotlib  # noqa: F401  (requirements-dev.txt) controlnet_aux's draw_handpose imports it
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

WIDTH, HEIGHT = 512, 1024  # shorter side 512 (the annotator's); x / W * W == x for quarter pixels


def person_json(dx, face_points, seed, scale=1.0, normalised=False, width=WIDTH, height=HEIGHT):
    """One person as comfyui_controlnet_aux writes it: body (right ear missing), face, both hands."""
    rng = np.random.default_rng(seed)
    quarter = lambda v: np.round(np.asarray(v) * 4) / 4  # noqa: E731
    body = np.array([[x * 0.9 + dx, y * 1.5 + 20, 0.8] for _, (x, y) in sorted(STANDING.items())])
    body[:, :2] = quarter(body[:, :2] * scale + 0.25)
    body[16] = 0
    nose, l_wrist, r_wrist = body[0, :2], body[7, :2], body[4, :2]
    face = quarter(rng.uniform(0, 1, (face_points, 2)) * (40, 36) * scale + nose - np.array([20, 24]) * scale)
    hands = [quarter(rng.uniform(0, 1, (21, 2)) * 40 * scale + wrist - (20 * scale, 0)) for wrist in (l_wrist, r_wrist)]
    div = (width, height) if normalised else (1, 1)

    def flat(points, c=1.0):
        return [float(v) for x, y in points for v in (x / div[0], y / div[1], c)]
    body_flat = [float(v) for x, y, c in body for v in ((x / div[0], y / div[1], c) if c else (0, 0, 0))]
    return {"pose_keypoints_2d": body_flat, "face_keypoints_2d": flat(face),
            "hand_left_keypoints_2d": flat(hands[0]), "hand_right_keypoints_2d": flat(hands[1])}


def dwpose_input(width=WIDTH, height=HEIGHT, scale=1.0):
    """A DWPose POSE_KEYPOINT: pixels, 68-point faces, two people side by side."""
    people = [person_json(-20 * scale, 68, 1, scale), person_json(230 * scale, 68, 2, scale)]
    return [{"people": people, "canvas_width": width, "canvas_height": height}]


def openpose_input():
    """An OpenPose POSE_KEYPOINT: normalised 0-1, 70-point faces (68 landmarks and the pupils)."""
    people = [person_json(-20, 70, 3, normalised=True), person_json(230, 70, 4, normalised=True)]
    return [{"people": people, "canvas_width": WIDTH, "canvas_height": HEIGHT}]


def _keypoints(flat, width, height, normalised):
    if flat is None:
        return None
    div = (1, 1) if normalised else (width, height)
    return [Keypoint(x / div[0], y / div[1]) if c > 0 else None for x, y, c in np.reshape(flat, (-1, 3))]


def draw_poses_of(data, normalised=False):
    """controlnet_aux's ``open_pose.draw_poses`` of a POSE_KEYPOINT frame (it takes 0-1 coordinates)."""
    frame = data[0]
    w, h = frame["canvas_width"], frame["canvas_height"]
    poses = [aux_open_pose.PoseResult(BodyResult(_keypoints(p["pose_keypoints_2d"], w, h, normalised), 0, 0),
                                      _keypoints(p["hand_left_keypoints_2d"], w, h, normalised),
                                      _keypoints(p["hand_right_keypoints_2d"], w, h, normalised),
                                      _keypoints(p["face_keypoints_2d"], w, h, normalised))
             for p in frame["people"]]
    return aux_open_pose.draw_poses(poses, h, w)


def dwpose_draw_pose_of(data):
    """controlnet_aux's DWPose ``draw_pose`` (candidate/subset arrays, 0-1) of a pixel POSE_KEYPOINT frame."""
    frame = data[0]
    w, h = frame["canvas_width"], frame["canvas_height"]
    candidate, subset, hands, faces = [], [], [], []
    for n, p in enumerate(frame["people"]):
        body = np.reshape(p["pose_keypoints_2d"], (18, 3))
        candidate += [[x / w, y / h] for x, y, _ in body]
        subset.append([18 * n + j if body[j, 2] > 0 else -1 for j in range(18)])
        hands += [np.reshape(p[k], (21, 3))[:, :2] / (w, h)
                  for k in ("hand_left_keypoints_2d", "hand_right_keypoints_2d")]
        faces.append(np.reshape(p["face_keypoints_2d"], (-1, 3))[:, :2] / (w, h))
    pose = {"bodies": {"candidate": np.array(candidate), "subset": np.array(subset, float)}, "hands": hands,
            "faces": faces}
    return aux_dwpose.draw_pose(pose, h, w)


def ours(data):
    return render.render(openpose.from_pose_keypoint(json.loads(json.dumps(data)))[0])


def differing(a, b):
    return int((a != b).any(-1).sum())


def drawn(image):
    return int((image > 0).any(-1).sum())


def test_a_dwpose_input_renders_exactly_as_controlnet_aux_draws_it(measured):
    data = dwpose_input()
    assert len(data[0]["people"][0]["face_keypoints_2d"]) == 3 * 68
    image = ours(data)
    theirs, theirs_dw = draw_poses_of(data), dwpose_draw_pose_of(data)
    assert drawn(theirs) > 15_000  # two people with faces and hands
    assert differing(image, theirs) == 0
    assert differing(image, theirs_dw) == 0
    measured(f"DWPose input, 512x1024: 0 of {drawn(theirs)} drawn pixels differ from draw_poses and draw_pose")


def test_an_openpose_input_with_70_point_faces_renders_exactly_as_controlnet_aux_draws_it():
    data = openpose_input()
    assert len(data[0]["people"][1]["face_keypoints_2d"]) == 3 * 70
    image, theirs = ours(data), draw_poses_of(data, normalised=True)
    assert differing(image, theirs) == 0
    # all 70 points drawn: the pupils (68, 69) too
    face = np.reshape(data[0]["people"][1]["face_keypoints_2d"], (70, 3))
    for x, y, _ in face[68:]:
        assert tuple(image[int(y * HEIGHT), int(x * WIDTH)]) in ((255, 255, 255), (0, 0, 255))


def test_on_a_canvas_that_is_not_a_power_of_two_only_limb_edge_pixels_differ(measured):
    # 512 x 640: controlnet_aux multiplies y / 640 back by 640, which can land a hair below a whole pixel
    data = dwpose_input(WIDTH, 640)
    image, theirs = ours(data), draw_poses_of(data)
    assert differing(image, theirs) <= 0.001 * drawn(theirs)
    measured(f"DWPose input, 512x640: {differing(image, theirs)} of {drawn(theirs)} drawn pixels differ")


def strokes(size, theirs=False):
    """Sizes in pixels of one body joint and one face dot (diameter of the disc of the same area), and
    of one limb and one hand bone (pixels across their middle), drawn alone on a size x size canvas by
    us, or (``theirs``) by controlnet_aux on its own canvas of that size."""
    c, length = size // 2, size / 4

    def draw(person):
        person = {"hand_left_keypoints_2d": None, "hand_right_keypoints_2d": None, "face_keypoints_2d": None,
                  **person}
        frame = [{"people": [person], "canvas_width": size, "canvas_height": size}]
        return draw_poses_of(frame) if theirs else ours(frame)

    def body(points):
        flat = [0.0] * 54
        for i, (x, y) in points.items():
            flat[3 * i:3 * i + 3] = [x, y, 1.0]
        return flat
    undetected = [-1.0, -1.0, 1.0]  # controlnet_aux's marker: not drawn (our reader: missing)
    joint = drawn(draw({"pose_keypoints_2d": body({0: (c, c)})}))
    face = drawn(draw({"pose_keypoints_2d": body({}), "face_keypoints_2d": [c, c, 1.0] + undetected * 67}))
    limb = draw({"pose_keypoints_2d": body({1: (c - length, c + 0.5), 2: (c + length, c + 0.5)})})
    hand = draw({"pose_keypoints_2d": body({}),
                 "hand_left_keypoints_2d": [c - length, c + 0.5, 1.0, c + length, c + 0.5, 1.0] + undetected * 19})
    return {"joint": 2 * math.sqrt(joint / math.pi), "face": 2 * math.sqrt(face / math.pi),
            "limb": int((limb[:, c] > 0).any(-1).sum()), "hand line": int((hand[:, c] > 0).any(-1).sum())}


def test_joint_discs_are_opencv_circles_not_the_larger_pillow_ellipses(measured):
    # radius-4 joint: OpenCV fills the 49 pixels within 4 of the centre; Pillow's ellipse in the 8 px box,
    # which we drew before, filled 61 (25 % more)
    ours_512, theirs = strokes(512), strokes(512, theirs=True)
    assert ours_512 == theirs
    assert round(math.pi * (theirs["joint"] / 2) ** 2) == 49 and round(math.pi * (theirs["face"] / 2) ** 2) == 29
    assert (theirs["limb"], theirs["hand line"]) == (9, 3)
    measured("512 px: joint disc 49 px, face dot 29 px, limb 9 px across, hand line 3 px: equal to controlnet_aux "
             "(Pillow's joint disc was 61 px, +24.5 %)")


@pytest.mark.parametrize("size", [256, 384, 576, 768, 1024, 1536])
def test_strokes_scale_with_the_canvas_within_a_pixel_or_10_percent(size, measured):
    scale = size / 512
    got, annotator = strokes(size), strokes(512, theirs=True)
    for name, value in got.items():
        expected = annotator[name] * scale
        assert abs(value - expected) <= max(1.0, 0.1 * expected), (name, value, expected)
    measured(f"{size} px: " + ", ".join(f"{n} {got[n]:.1f} vs {annotator[n] * scale:.1f}" for n in got))


def test_hand_bones_use_the_hue_wheel_opencv_writes_for_draw_handpose():
    # draw_handpose passes hsv(i / 20, 1, 1) * 255 as a float colour to cv2.line; what OpenCV writes
    # from it is the table we draw with
    for i, colour in enumerate(render.HAND_COLORS):
        canvas = np.zeros((5, 5, 3), np.uint8)
        cv2.line(canvas, (0, 2), (4, 2), [c * 255 for c in colorsys.hsv_to_rgb(i / 20, 1.0, 1.0)], thickness=2)
        assert tuple(canvas[2, 2]) == colour, i
