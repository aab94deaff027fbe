"""Outpainting a cropped person: the padded canvas, the mask of what to generate, the pose moved
onto the canvas (completed and edited) and drawn. Pure torch and numpy; PoseEditOutpaint
(nodes/pose_edit_outpaint.py) reads the inputs and calls these.
"""

from __future__ import annotations

import numpy as np
import torch

from . import complete, edits, openpose, render

MAX_PAD = 4096
LATENT_GRID = 8  # pixels per latent cell (SD, SDXL, Flux VAEs)
GREY = 0.5  # the new area's colour on the padded image


def padding_problem(value) -> str | None:
    """Why ``value`` cannot be a padding (a whole number of pixels from 0 to MAX_PAD on the latent
    grid), or None."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PAD:
        return f"{value!r} must be a whole number of pixels from 0 to {MAX_PAD}."
    if value % LATENT_GRID:
        below = value - value % LATENT_GRID
        return f"{value} is not a multiple of 8 (the latent grid); use {below} or {below + LATENT_GRID}."
    return None


def outpaint_mask(height: int, width: int, left: int, top: int, right: int, bottom: int,
                  feathering: int) -> torch.Tensor:
    """1 on the new area; inside the original image a band of ``feathering`` pixels along each padded
    side falls from 1 at the seam to 0, so the sampler blends the seam."""
    h, w = height + top + bottom, width + left + right
    mask = torch.ones(h, w)
    inner = torch.zeros(height, width)
    if feathering > 0:
        ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
        big = torch.full((height, width), float("inf"))
        distance = torch.minimum(torch.minimum(xs if left else big, (width - 1 - xs) if right else big),
                                 torch.minimum(ys if top else big, (height - 1 - ys) if bottom else big))
        inner = ((feathering - distance) / feathering).clamp(min=0) ** 2
    mask[top:top + height, left:left + width] = inner
    return mask


def pad_image(image: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """The RGB of an IMAGE ``(b, h, w, c)`` on a grey canvas grown by the paddings."""
    batch, height, width = image.shape[:3]
    padded = torch.full((batch, height + top + bottom, width + left + right, 3), GREY, dtype=image.dtype)
    padded[:, top:top + height, left:left + width] = image[..., :3]
    return padded


def outpaint_frames(frames: list[openpose.Frame], height: int, width: int, left: int, top: int, right: int,
                    bottom: int, complete_cut_limbs: bool, ops: list[dict]) -> tuple[list, list]:
    """Each frame on the padded canvas of a ``height x width`` image: scaled to the image first (a pose
    given for another canvas, e.g. a detector's resolution), shifted by the paddings, its cut-off limbs
    placed when ``complete_cut_limbs``; returned as (base frames, frames with ``ops`` applied).
    An edit that does not fit raises ``openpose.PoseError``."""
    new_w, new_h = width + left + right, height + top + bottom
    visible = (left, top, left + width, top + height)
    base_frames, edited_frames = [], []
    for frame in frames:
        moved = openpose.place(frame, new_w, new_h, scale=(width / frame.width, height / frame.height),
                               offset=(left, top))
        if complete_cut_limbs:
            moved = complete.complete(moved, visible)
        base_frames.append(moved)
        edited_frames.append(edits.apply(moved, ops))
    return base_frames, edited_frames


def pose_images(frames: list[openpose.Frame]) -> torch.Tensor:
    """The frames drawn in the OpenPose colours, an IMAGE ``(frames, h, w, 3)`` in 0-1."""
    return torch.from_numpy(np.stack([render.render(f) for f in frames])).float() / 255.0
