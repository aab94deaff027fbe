"""PoseEditOutpaint: pad a cropped person's image, complete and edit its OpenPose skeleton, mask the new area."""

from __future__ import annotations

import json
import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from ..pose import detect, edits, openpose, outpaint
from ..pose.outpaint import MAX_PAD
from . import checks

NODE = "PoseEditOutpaint"
PoseKeypoint = io.Custom("POSE_KEYPOINT")
DETECTOR_FOLDER = "openpose"  # ComfyUI/models/openpose/{body_pose_model,hand_pose_model,facenet}.pth
MAX_FEATHERING = 512
COMPLETIONS = ("auto", "none")


class PoseEditOutpaint(io.ComfyNode):
    """Outpainting canvas, mask and edited OpenPose condition for a cropped person."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        pad = dict(default=0, min=0, max=MAX_PAD, step=8)
        return io.Schema(
            node_id=NODE,
            display_name="Pose Edit Outpaint",
            category="consistent synthesis/pose",
            description=("Extends a cropped person onto a larger canvas: pads the image, detects (or takes) its "
                         "OpenPose skeleton, places the limbs the crop cut off, applies your keypoint edits and "
                         "renders the pose for a ControlNet openpose model, with the mask of what to generate."),
            inputs=[
                io.Image.Input("image", tooltip="The cropped image of the person (one image or a batch)."),
                PoseKeypoint.Input("pose", optional=True, tooltip=(
                    "The people's pose (POSE_KEYPOINT from comfyui_controlnet_aux's OpenPose or DWPose, normalised "
                    "or pixels; every person is completed and editable). "
                    "Empty: detected with controlnet_aux's OpenPose from ComfyUI/models/openpose.")),
                io.Int.Input("pad_left", tooltip="Pixels added on the left (a multiple of 8).", **pad),
                io.Int.Input("pad_top", tooltip="Pixels added on top (a multiple of 8).", **pad),
                io.Int.Input("pad_right", tooltip="Pixels added on the right (a multiple of 8).", **pad),
                io.Int.Input("pad_bottom", default=256, min=0, max=MAX_PAD, step=8,
                             tooltip="Pixels added at the bottom (a multiple of 8), e.g. for the legs."),
                io.Int.Input("feathering", default=40, min=0, max=MAX_FEATHERING, tooltip=(
                    "Width in pixels of the seam band inside the original image that is regenerated softly.")),
                io.Combo.Input("completion", options=list(COMPLETIONS), default="auto", tooltip=(
                    "auto: place the keypoints the crop cut off (legs below a cropped waist, arms beyond a "
                    "cropped shoulder) from the visible ones with average proportions. none: keep the pose.")),
                io.String.Input("edits", default="", multiline=True, tooltip=(
                    "Keypoint edits as JSON, written by the pose editor or by hand: a list of operations applied "
                    "in order, in pixels of the padded canvas. "
                    '{"op": "set", "person": P, "part": "body"|"face"|"hand_left"|"hand_right", "index": I, '
                    '"x": X, "y": Y} moves a point (or adds a missing one); '
                    '{"op": "remove", "person": P, "part": ..., "index": I} makes it missing; '
                    '{"op": "translate", "person": P, "dx": DX, "dy": DY} moves the whole person (with "part": '
                    'that part only); {"op": "mirror", "person": P} swaps left and right labels; '
                    '{"op": "set_part", "person": P, "part": ..., "points": [[X, Y] or null, ...]} gives a part all '
                    'its points (e.g. a hand at a wrist); {"op": "remove_part", "person": P, "part": ...} deletes a '
                    "hand or the face. People count from 0 in the pose's order. Body points are OpenPose's 18 "
                    "(0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left leg, 14-17 eyes and "
                    "ears), hands 21, faces 70 (OpenPose) or 68 (DWPose). Empty: no edits.")),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The padded image (new area grey), for VAE Encode."),
                io.Mask.Output(display_name="mask", tooltip="1 = generate: the new area and a feathered seam "
                               "band. For Set Latent Noise Mask."),
                io.Image.Output(display_name="pose_image", tooltip="The edited skeleton drawn in the OpenPose "
                                "colours, for ControlNetApplyAdvanced with an openpose ControlNet."),
                PoseKeypoint.Output(display_name="pose", tooltip="The edited pose in padded-canvas pixels."),
            ],
        )

    @classmethod
    def validate_inputs(cls, pad_left=None, pad_top=None, pad_right=None, pad_bottom=None, completion=None):
        # Naming only these keeps the host's own range checks for the other inputs; a linked (None) or
        # missing value is checked in execute. ComfyUI 0.3.x does not check a V3 combo itself.
        for name, value in (("pad_left", pad_left), ("pad_top", pad_top), ("pad_right", pad_right),
                            ("pad_bottom", pad_bottom)):
            problem = outpaint.padding_problem(value) if value is not None else None
            if problem:
                return f"{NODE}: input '{name}': {problem}"
        return checks.combo_problem(NODE, "completion", completion, COMPLETIONS) or True

    @classmethod
    def execute(cls, image, pad_left, pad_top, pad_right, pad_bottom, feathering, completion, edits="",
                pose=None) -> io.NodeOutput:
        padded, mask, pose_image, base, edited = pose_edit_outpaint(
            image, pose, pad_left, pad_top, pad_right, pad_bottom, feathering, completion, edits)
        preview = ui.PreviewImage(padded, cls=cls).as_dict()
        return io.NodeOutput(padded, mask, pose_image, edited,
                             ui={**preview, "pose_base": [json.dumps(base)], "pose_edited": [json.dumps(edited)]})


def _detector_folder() -> str:
    """The first folder holding the detector's files: those registered for "openpose" (extra model
    paths), then ComfyUI/models/openpose (also where a hub download is cached)."""
    default = os.path.join(folder_paths.models_dir, DETECTOR_FOLDER)
    registered = folder_paths.folder_names_and_paths.get(DETECTOR_FOLDER, ([], set()))[0]
    for folder in list(registered) + [default]:
        if all(os.path.isfile(os.path.join(folder, name)) for name in detect.WEIGHTS):
            return folder
    return default


def _detect_frames(image: torch.Tensor) -> list[openpose.Frame]:
    folder = _detector_folder()
    try:
        detector = detect.load_detector(folder)
    except Exception as e:
        raise checks.error(NODE, "pose", f"no pose was connected, and the OpenPose detector could not be loaded from "
                     f"{folder} ({e}). Put body_pose_model.pth, hand_pose_model.pth and facenet.pth from "
                     "lllyasviel/Annotators there, or connect a pose.") from e
    detector.to(comfy.model_management.get_torch_device())  # one prompt's detector, dropped when it returns
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [detect.detect(detector, frame) for frame in pixels]


def pose_edit_outpaint(image, pose, pad_left, pad_top, pad_right, pad_bottom, feathering, completion, edits_text):
    """(padded image, mask, pose image, base POSE_KEYPOINT, edited POSE_KEYPOINT): the node's inputs
    checked once (their types and ranges against the schema, the latent grid, the canvas size), the
    pose read or detected, then the outpainting of pose/outpaint.py."""
    checks.inputs(PoseEditOutpaint, dict(image=image, pose=pose, pad_left=pad_left, pad_top=pad_top,
                                         pad_right=pad_right, pad_bottom=pad_bottom, feathering=feathering,
                                         completion=completion, edits=edits_text))
    for name, value in (("pad_left", pad_left), ("pad_top", pad_top), ("pad_right", pad_right),
                        ("pad_bottom", pad_bottom)):
        problem = outpaint.padding_problem(value)
        if problem:
            raise checks.error(NODE, name, problem)
    if image.shape[-1] < 3:
        raise checks.error(NODE, "image", f"expected an IMAGE of shape (batch, height, width, 3), got "
                           f"{tuple(image.shape)}")
    batch, height, width = image.shape[:3]
    canvas = (width + pad_left + pad_right, height + pad_top + pad_bottom)
    checks.elements(NODE, "image", batch * canvas[0] * canvas[1] * 3,
                    f"the padded batch of {batch} {canvas[0]}x{canvas[1]} images")
    try:
        ops = edits.parse(edits_text)
    except openpose.PoseError as e:
        raise checks.error(NODE, "edits", f"{e}. Fix the JSON or clear the field.") from None
    if pose is None:
        frames = _detect_frames(image[..., :3])
    else:
        try:
            frames = openpose.from_pose_keypoint(pose)
        except openpose.PoseError as e:
            raise checks.error(NODE, "pose", f"{e}.") from None
    if len(frames) not in (1, batch):
        raise checks.error(NODE, "pose", f"holds {len(frames)} frames for {batch} images; give one, or one per "
                           "image.")

    pads = (pad_left, pad_top, pad_right, pad_bottom)
    try:
        base_frames, edited_frames = outpaint.outpaint_frames(frames, height, width, *pads, completion == "auto",
                                                              ops)
    except openpose.PoseError as e:
        raise checks.error(NODE, "edits", f"{e}.") from None
    padded = outpaint.pad_image(image, *pads)
    mask = outpaint.outpaint_mask(height, width, *pads, feathering).expand(batch, *padded.shape[1:3]).clone()
    return (padded, mask, outpaint.pose_images(edited_frames), openpose.to_pose_keypoint(base_frames),
            openpose.to_pose_keypoint(edited_frames))
