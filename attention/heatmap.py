"""A token map as a mask and as a picture: bilinear upsampling to the image, a threshold, the "jet"
colour map. Pure torch; CrossAttentionMask (nodes/cross_attention_mask.py) calls it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def heatmap(values: torch.Tensor) -> torch.Tensor:
    """``(b, h, w)`` values in 0-1 -> ``(b, h, w, 3)`` RGB in 0-1, the "jet" colour map
    (0 blue, 0.5 green-yellow, 1 red)."""
    x = values.clamp(0, 1)[..., None]
    centres = torch.tensor([3.0, 2.0, 1.0], dtype=x.dtype, device=x.device)  # r, g, b
    return (1.5 - (4 * x - centres).abs()).clamp(0, 1)


def mask_and_heatmap(token_map: torch.Tensor, height: int, width: int, threshold: float,
                     image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear upsampling of the ``(b, h, w)`` map to ``height x width``, then the threshold
    (``> threshold``): the mask ``(b, height, width)``; the heatmap ``(b, height, width, 3)`` is the
    upsampled map in colour, half over ``image`` (an IMAGE, resized if needed) when one is given.
    Both on the map's device."""
    upsampled = F.interpolate(token_map[:, None].float(), size=(height, width), mode="bilinear",
                              align_corners=False)[:, 0].clamp(0, 1)
    mask = (upsampled > threshold).float()
    colours = heatmap(upsampled)
    if image is not None:
        picture = image[..., :3].float().to(colours.device)
        if picture.shape[1:3] != (height, width):
            picture = F.interpolate(picture.movedim(-1, 1), size=(height, width), mode="bilinear",
                                    align_corners=False).movedim(1, -1)
        if picture.shape[0] != colours.shape[0]:
            picture = picture[:1].expand(colours.shape[0], -1, -1, -1)
        colours = 0.5 * picture + 0.5 * colours
    return mask, colours
