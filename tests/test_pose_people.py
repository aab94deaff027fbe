"""Faces of 68 (DWPose) and 70 (OpenPose) points, part edits, and several people: pose/ with no ComfyUI."""

import json

import numpy as np
import pytest

from consistent_synthesis.pose import complete, edits, openpose
from consistent_synthesis.pose.openpose import PoseError
from test_pose_data import STANDING, body_array


def face_flat(count, normalised=False, width=256, height=384):
    rng = np.random.default_rng(count)
    div = (width, height) if normalised else (1, 1)
    return [float(v) for x, y in rng.uniform(40, 80, (count, 2)) for v in (x / div[0], y / div[1], 1.0)]


def frame_json(faces, normalised=False, width=256, height=384):
    people = []
    for n, face in enumerate(faces):
        div = (width, height) if normalised else (1, 1)
        body = [v for i in range(18) for v in ((STANDING[i][0] + 60 * n) / div[0], STANDING[i][1] / div[1], 1.0)]
        people.append({"pose_keypoints_2d": body,
                       "face_keypoints_2d": None if face is None else face_flat(face, normalised, width, height),
                       "hand_left_keypoints_2d": None, "hand_right_keypoints_2d": None})
    return [{"people": people, "canvas_width": width, "canvas_height": height}]


@pytest.mark.parametrize("count", [68, 70])
def test_a_face_of_68_or_70_points_is_read_and_written_back_as_it_came(count):
    data = frame_json([count])
    frame = openpose.from_pose_keypoint(data)[0]
    assert frame.people[0].face.shape == (count, 3)
    assert openpose.to_pose_keypoint([frame]) == data


def test_normalised_faces_of_both_sizes_in_one_frame_read_in_pixels_and_write_back_normalised():
    data = frame_json([68, 70], normalised=True)
    frame = openpose.from_pose_keypoint(data)[0]
    assert [p.face.shape[0] for p in frame.people] == [68, 70]
    np.testing.assert_allclose(frame.people[0].face[0, :2],
                               np.array(data[0]["people"][0]["face_keypoints_2d"][:2]) * (256, 384))
    back = openpose.to_pose_keypoint([frame], normalised=True)[0]["people"]
    for ours, theirs in zip(back, data[0]["people"]):
        np.testing.assert_allclose(ours["face_keypoints_2d"], theirs["face_keypoints_2d"], atol=1e-12)


@pytest.mark.parametrize("count", [67, 69, 71, 21])
def test_a_face_of_another_size_is_refused_naming_both_sizes(count):
    with pytest.raises(PoseError, match=r"face_keypoints_2d must be a list of 210 numbers .* or 204 numbers"):
        openpose.from_pose_keypoint(frame_json([count]))


def test_face_points_are_addressed_within_the_face_the_pose_has():
    frame = openpose.from_pose_keypoint(frame_json([68, 70]))[0]
    moved = edits.apply(frame, edits.parse(json.dumps([
        {"op": "set", "person": 0, "part": "face", "index": 67, "x": 11, "y": 12},
        {"op": "set", "person": 1, "part": "face", "index": 69, "x": 13, "y": 14}])))
    assert tuple(moved.people[0].face[67]) == (11, 12, 1) and moved.people[0].face.shape == (68, 3)
    assert tuple(moved.people[1].face[69]) == (13, 14, 1)
    with pytest.raises(PoseError, match="face has points 0 to 67, not 68"):
        edits.apply(frame, edits.parse('[{"op": "set", "person": 0, "part": "face", "index": 68, "x": 1, "y": 1}]'))


def test_set_part_places_a_whole_hand_and_remove_part_deletes_it():
    frame = openpose.Frame(256, 384, [openpose.Person(body_array())])
    hand = [[86 + i, 200 + 2 * i] for i in range(21)]
    hand[20] = None
    ops = [{"op": "set_part", "person": 0, "part": "hand_right", "points": hand}]
    out = edits.apply(frame, edits.parse(json.dumps(ops))).people[0]
    assert out.hand_right.shape == (21, 3) and tuple(out.hand_right[3]) == (89, 206, 1)
    assert tuple(out.hand_right[20]) == (0, 0, 0) and out.hand_left is None
    ops.append({"op": "remove_part", "person": 0, "part": "hand_right"})
    assert edits.apply(frame, edits.parse(json.dumps(ops))).people[0].hand_right is None
    # on the body, every point goes missing; the person keeps its place in the list
    gone = edits.apply(frame, edits.parse('[{"op": "remove_part", "person": 0, "part": "body"}]'))
    assert len(gone.people) == 1 and not openpose.present(gone.people[0].body).any()
    # and the written pose has the part as null
    written = openpose.to_pose_keypoint([edits.apply(frame, edits.parse(json.dumps(ops)))])[0]["people"][0]
    assert written["hand_right_keypoints_2d"] is None


def test_translate_with_a_part_moves_that_part_only():
    frame = openpose.from_pose_keypoint(frame_json([68]))[0]
    out = edits.apply(frame, edits.parse('[{"op": "translate", "person": 0, "part": "face", "dx": 5, "dy": -2}]'))
    np.testing.assert_array_equal(out.people[0].face[:, :2], frame.people[0].face[:, :2] + (5, -2))
    np.testing.assert_array_equal(out.people[0].body, frame.people[0].body)
    # a part the person lacks: nothing to move
    out = edits.apply(frame, edits.parse('[{"op": "translate", "person": 0, "part": "hand_left", "dx": 5, "dy": 0}]'))
    assert out.people[0].hand_left is None


@pytest.mark.parametrize("op,message", [
    ({"op": "set_part", "person": 0, "part": "hand_left", "points": [[1, 2]] * 20}, "21 entries"),
    ({"op": "set_part", "person": 0, "part": "face", "points": [[1, 2]] * 69}, "70 or 68 entries"),
    ({"op": "set_part", "person": 0, "part": "hand_left", "points": [[1, 2]] * 20 + [[1, "a"]]}, "point 20"),
    ({"op": "set_part", "person": 0, "part": "hand_left", "points": [[1, 2]] * 20 + [[1, 2, 3]]}, "point 20"),
    ({"op": "set_part", "person": 0, "part": "hand_left", "points": "none"}, "list"),
    ({"op": "set_part", "person": 0, "part": "hand_left"}, "missing"),
    ({"op": "remove_part", "person": 0, "part": "tail"}, "part must be one of"),
    ({"op": "translate", "person": 0, "part": "wing", "dx": 1, "dy": 1}, "part must be one of"),
    ({"op": "mirror", "person": 0, "part": "body"}, "unknown"),
])
def test_bad_part_edits_fail_clearly(op, message):
    with pytest.raises(PoseError, match=message):
        edits.parse(json.dumps([op]))


def test_every_person_cut_off_at_the_border_is_completed():
    # two people side by side, both cut at the hips by the image's lower edge; 256 px padded below
    people = [openpose.Person(body_array({i: (x + dx, y) for i, (x, y) in STANDING.items()},
                                         drop=(9, 10, 12, 13))) for dx in (-60, 60)]
    frame = openpose.Frame(256, 466, people)
    done = complete.complete(frame, (0, 0, 256, 210))
    for before, after in zip(people, done.people):
        ok = openpose.present(after.body)
        assert ok[[9, 10, 12, 13]].all()
        for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
            assert after.body[hip, 1] < after.body[knee, 1] < after.body[ankle, 1]
            # each person's legs hang below that person's own hips
            assert abs(after.body[knee, 0] - before.body[hip, 0]) < 30
    assert done.people[0].body[9, 0] < done.people[1].body[9, 0]


def test_a_person_wholly_inside_the_image_is_left_as_detected_next_to_one_that_is_completed():
    inside = openpose.Person(body_array({i: (x * 0.4 + 10, y * 0.4 + 10) for i, (x, y) in STANDING.items()},
                                        drop=(9, 10)))  # small, in the image's top left: knee occluded
    cut = openpose.Person(body_array(drop=(9, 10, 12, 13)))
    frame = openpose.Frame(256, 466, [inside, cut])
    done = complete.complete(frame, (0, 0, 256, 210))
    np.testing.assert_array_equal(done.people[0].body, inside.body)
    assert openpose.present(done.people[1].body)[[9, 10, 12, 13]].all()


def test_edits_reach_every_person_and_leave_the_others_untouched():
    people = [openpose.Person(body_array({i: (x + dx, y) for i, (x, y) in STANDING.items()})) for dx in (-60, 0, 60)]
    frame = openpose.Frame(256, 384, people)
    ops = edits.parse(json.dumps([
        {"op": "set", "person": 2, "part": "body", "index": 4, "x": 200, "y": 100},
        {"op": "translate", "person": 1, "dx": 3, "dy": 4},
        {"op": "set_part", "person": 2, "part": "hand_left", "points": [[150, 200]] * 21},
        {"op": "mirror", "person": 0}]))
    out = edits.apply(frame, ops)
    assert tuple(out.people[2].body[4]) == (200, 100, 1) and out.people[2].hand_left.shape == (21, 3)
    np.testing.assert_array_equal(out.people[1].body[:, :2], people[1].body[:, :2] + (3, 4))
    np.testing.assert_array_equal(out.people[0].body[2], people[0].body[5])  # mirrored labels
    assert out.people[0].hand_left is None and out.people[1].hand_left is None
