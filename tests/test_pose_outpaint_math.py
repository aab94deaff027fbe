"""Outpainting a cropped person (pose/outpaint.py): paddings on the latent grid, the feathered mask,
the grey canvas, the pose moved onto it and edited."""

import json

import pytest
import torch

from consistent_synthesis.pose import edits, openpose
from consistent_synthesis.pose import outpaint as O
from test_pose_data import STANDING, aux_frame


@pytest.mark.parametrize("value, expected", [
    (0, None), (8, None), (4096, None),
    (13, "13 is not a multiple of 8 (the latent grid); use 8 or 16."),
    (-8, "-8 must be a whole number of pixels from 0 to 4096."),
    (4104, "4104 must be a whole number of pixels from 0 to 4096."),
    (True, "True must be a whole number of pixels from 0 to 4096."),
    (8.0, "8.0 must be a whole number of pixels from 0 to 4096."),
])
def test_a_padding_is_a_whole_number_of_pixels_on_the_latent_grid(value, expected):
    assert O.padding_problem(value) == expected


def test_without_feathering_the_mask_is_exactly_the_new_area():
    mask = O.outpaint_mask(4, 6, 2, 1, 0, 3, 0)
    assert mask.shape == (8, 8)
    assert mask[1:5, 2:8].eq(0).all()
    assert mask.sum() == 64 - 24


def test_feathering_falls_quadratically_from_the_seam_on_padded_sides_only():
    mask = O.outpaint_mask(8, 8, 4, 0, 0, 0, 4)  # padded on the left only
    inner = mask[:, 4:]
    assert inner[0, :5].tolist() == [1.0, 0.5625, 0.25, 0.0625, 0.0]  # ((4 - d) / 4) ** 2
    assert inner[:, -1].eq(0).all() and inner[0].equal(inner[-1])  # no band on the unpadded sides
    assert mask[:, :4].eq(1).all()


def test_the_padded_image_is_the_rgb_on_grey():
    image = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))  # RGBA
    padded = O.pad_image(image, 1, 2, 3, 4)
    assert padded.shape == (2, 9, 9, 3)
    assert torch.equal(padded[:, 2:5, 1:6], image[..., :3])
    outside = torch.ones(9, 9, dtype=torch.bool)
    outside[2:5, 1:6] = False
    assert padded[:, outside].eq(O.GREY).all()


def test_frames_are_moved_by_the_padding_and_then_edited():
    frames = openpose.from_pose_keypoint([aux_frame()])
    ops = edits.parse(json.dumps([{"op": "translate", "person": 0, "dx": 8, "dy": 0}]))
    base, edited = O.outpaint_frames(frames, 384, 256, 64, 8, 32, 128, False, ops)
    assert (base[0].width, base[0].height) == (256 + 96, 384 + 136)
    neck = openpose.to_pose_keypoint(base)[0]["people"][0]["pose_keypoints_2d"][3:5]
    assert neck == [STANDING[1][0] + 64, STANDING[1][1] + 8]
    moved = openpose.to_pose_keypoint(edited)[0]["people"][0]["pose_keypoints_2d"][3:5]
    assert moved == [STANDING[1][0] + 72, STANDING[1][1] + 8]
    with pytest.raises(openpose.PoseError):
        O.outpaint_frames(frames, 384, 256, 0, 0, 0, 0, False, edits.parse('[{"op": "mirror", "person": 2}]'))


def test_pose_images_are_the_rendered_frames_in_0_1():
    frames = openpose.from_pose_keypoint([aux_frame(width=64, height=64, normalised=True)])
    images = O.pose_images(frames)
    assert images.shape == (1, 64, 64, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() > 0
