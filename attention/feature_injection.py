"""ConsiStory's feature injection (Tewel et al., SIGGRAPH 2024, Sec. 3.3): the second pass blends each
image's self-attention output inside its subject mask with the output of its nearest anchor token,
correspondences taken from the first pass's DIFT features. Pure torch.

What it must equal (official code ``NVlabs/consistory``): for the conditional rows of one
self-attention layer's output (after ``to_out``) at the injection grid, ``FeatureInjector.inject_outputs``
with ``swap_strategy='min'`` and ``dist_thr='dynamic'`` (``consistory_utils.py``), fed with
``cyclic_nn_map(gaussian_smooth(dift), last_mask, ...)`` (``utils/general_utils.py``), where
``dift`` is the conditional rows of the first up block's output at timestep 261 of the first pass
(``DIFTLatentStore(steps=[261], up_ft_indices=[0])``) and ``last_mask`` the subject masks before
dropout at the end of the first pass (``AttentionStore.last_mask``). Its steps and alpha are those of
``consistory_run.py``: ``inject_range_alpha=[(n_steps // 10, n_steps // 3, 0.8)]``, both ends included.

The pieces, in the official names:

1. ``gaussian_smooth``: each feature channel convolved with a normalised 3x3 Gaussian (sigma 1,
   zero padding).
2. ``cyclic_nn_map``: for every target image ``i`` and source image ``j != i``, each of ``i``'s
   tokens gets the nearest of ``j``'s tokens by cosine distance, ``j``'s tokens outside its mask
   counting as distance 2; ``nn_distances[i, i]`` is infinite. Features are resized bilinearly
   (``align_corners=False``) to the injection grid first. (Despite the name there is no
   cycle-consistency check in the official code: the map goes one way, target to source.)
3. ``FeatureInjector``, per target image ``i`` with another image in its ``extended_mapping`` row
   (anchors ``0 .. anchors-1`` and itself): per token the nearest anchor (``argmin`` over the row's
   images, first on ties), that anchor's nearest token and distance; the dynamic threshold
   ``get_dynamic_threshold`` is Otsu's threshold of the image's distances (all its tokens); a token is
   injected where it is in ``i``'s mask and its distance is below the threshold (strict).
4. ``inject_outputs``: ``out[i] = alpha * out[anchor][nn] + (1 - alpha) * out[i]`` on those tokens,
   images in batch order and in place, so an image reads the already injected rows of the images
   before it (the official ``old_output = output``, its ``.clone()`` commented out): anchor 1 reads
   anchor 0 after anchor 0 took tokens from anchor 1.

5. The cached mode (``run_extra_generation``): new images are mapped to saved anchors only
   (``anchor_nn_map``: the anchors' smoothed DIFT features and masks kept by the run that made
   them), each token takes its nearest anchor over all of them (``from_anchor_nn_map``: no image is
   skipped), and ``inject_anchors`` blends in the anchors' outputs of that layer and step as the
   saving run's own injection left them (``h_out_cache``). For a new image this is the batch rule
   exactly: in a batch its ``extended_mapping`` row holds the anchors and itself (at infinite
   distance), and the anchors are injected before it.

Everything stays on the device: masks select with ``torch.where`` (no boolean indexing, so no
shape depends on the data), nearest neighbours are ``argmin``/``gather``, the threshold is the
device Otsu of ``shared_attention``. The host only reads shapes.

Differences from the official code, all in rounding: distances are computed in float32 whatever the
features' dtype (the official code uses the model's, fp16); the Otsu threshold is
``shared_attention.otsu_threshold`` (skimage's rule, summed in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .shared_attention import otsu_threshold

# DIFTLatentStore(steps=[261], up_ft_indices=[0]) in ConsistorySDXLUNet2DConditionModel.
DIFT_TIMESTEP = 261
# consistory_run.py: inject_range_alpha=[(n_steps // 10, n_steps // 3, 0.8)].
INJECTION_ALPHA = 0.8
# gaussian_smooth(x, kernel_size=3, sigma=1) applied to the DIFT features in consistory_run.py.
SMOOTH_KERNEL_SIZE = 3
SMOOTH_SIGMA = 1.0
# gen_nn_map: source tokens outside the source mask get this cosine distance (the largest there is).
OUTSIDE_MASK_DISTANCE = 2.0


def injection_steps(steps: int) -> tuple[int, int]:
    """First and last step (both included) of the injection: ``(steps // 10, steps // 3)``."""
    return steps // 10, steps // 3


def injection_alpha(step: int | None, steps: int, alpha: float = INJECTION_ALPHA) -> float | None:
    """``alpha`` inside the injection steps, else None (``next(...)`` over ``inject_range_alpha``).
    The official ``if alpha:`` skips the blend for 0 as for None."""
    first, last = injection_steps(steps)
    if step is None or not first <= step <= last or not alpha:
        return None
    return alpha


def dift_step(sigmas: list[float], dift_sigma: float) -> int:
    """The step (0-based, by the run's sigmas) whose noise level is nearest that of timestep 261.

    The official code records when the DDIM timestep equals 261 (step 36 of its 50 'leading'
    steps, which ComfyUI's ``ddim_uniform`` scheduler reproduces); for other schedules the nearest
    level in log sigma stands in (first on ties). ``sigmas``: the run's levels, the final 0 included.
    """
    levels = [s for s in sigmas[:-1]] if len(sigmas) > 1 else list(sigmas)
    target = math.log(dift_sigma)
    return min(range(len(levels)), key=lambda i: abs(math.log(max(levels[i], 1e-30)) - target))


def gaussian_smooth(features: torch.Tensor, kernel_size: int = SMOOTH_KERNEL_SIZE,
                    sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """``(batch, channels, h, w)`` features, each channel convolved with a normalised Gaussian
    (``gaussian_smooth`` of ``general_utils.py``: the kernel made in float64, used in the features'
    dtype, zero padding), as one depthwise convolution."""
    centre = (kernel_size - 1) / 2
    axis = torch.arange(kernel_size, dtype=torch.float64)
    grid = (axis[:, None] - centre) ** 2 + (axis[None, :] - centre) ** 2
    kernel = torch.exp(-grid / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
    kernel = (kernel / kernel.sum()).to(torch.float32).to(device=features.device, dtype=features.dtype)
    channels = features.shape[1]
    weight = kernel[None, None].expand(channels, 1, kernel_size, kernel_size)
    return F.conv2d(features, weight, padding=kernel_size // 2, groups=channels)


def _unit_tokens(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(batch, channels, h, w)`` -> ``(batch, tokens, channels)`` unit vectors at the grid ``size``
    (``gen_nn_map``: bilinear resize, ``align_corners=False``; ``cos_dist`` normalises)."""
    resized = F.interpolate(features.float(), size=size, mode="bilinear", align_corners=False)
    return F.normalize(resized.flatten(2).transpose(1, 2), dim=-1)


def _nearest(sources: torch.Tensor, outside: torch.Tensor, target: torch.Tensor):
    """Each ``target`` token's nearest token of every source: ``sources`` ``(n, tokens, c)``, ``outside``
    ``(n, tokens)`` (source tokens outside its mask, at distance 2), ``target`` ``(tokens, c)``."""
    distances = 1 - sources @ target.T  # (sources, source tokens, target tokens): cos_dist
    distances = torch.where(outside[:, :, None], torch.full_like(distances, OUTSIDE_MASK_DISTANCE), distances)
    best, index = distances.min(dim=1)
    return best, index


def cyclic_nn_map(features: torch.Tensor, masks: torch.Tensor, size: tuple[int, int],
                  sources: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour maps between the images' tokens (``cyclic_nn_map`` / ``gen_nn_map``).

    ``features``: ``(batch, channels, h, w)`` (smoothed DIFT features); ``masks``: ``(batch,
    height * width)`` bool subject masks at the grid ``size`` = (height, width). Returns
    ``nn_map`` (long) and ``nn_distances`` (float32), both ``(batch, sources, height * width)``:
    for target image ``i`` and source ``j``, each token of ``i``'s nearest token of ``j`` and its
    cosine distance, ``j``'s tokens outside its mask at distance 2; ``j == i`` has infinite
    distances (and token 0). ``sources``: compute sources ``0 .. sources-1`` only (the anchors:
    the only columns ``FeatureInjector`` reads); all by default, as the official code.
    """
    batch = features.shape[0]
    sources = batch if sources is None else sources
    flat = _unit_tokens(features, size)  # (batch, tokens, channels)
    tokens = flat.shape[1]
    outside = ~masks[:sources].to(device=flat.device, dtype=torch.bool)  # (sources, tokens)
    nn_map = torch.zeros(batch, sources, tokens, dtype=torch.long, device=flat.device)
    nn_distances = torch.full((batch, sources, tokens), float("inf"), device=flat.device)
    for i in range(batch):
        best, index = _nearest(flat[:sources], outside, flat[i])
        if i < sources:  # no map onto itself: the official loop skips i == j, leaving inf
            best[i] = float("inf")
            index[i] = 0
        nn_map[i], nn_distances[i] = index, best
    return nn_map, nn_distances


def anchor_nn_map(features: torch.Tensor, anchor_features: torch.Tensor, anchor_masks: torch.Tensor,
                  size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour maps from new images to cached anchors (the official ``anchor_nn_map`` of
    ``run_extra_generation``): ``cyclic_nn_map``'s anchor columns, with the anchors' smoothed
    features ``(anchors, channels, h, w)`` and masks ``(anchors, tokens)`` from the run that saved
    them. Every (image, anchor) pair is mapped: a new image is never one of the anchors.
    Returns ``nn_map`` and ``nn_distances``, ``(batch, anchors, tokens)``.
    """
    targets = _unit_tokens(features, size)
    sources = _unit_tokens(anchor_features, size).to(targets.device)
    outside = ~anchor_masks.to(device=targets.device, dtype=torch.bool)
    found = [_nearest(sources, outside, targets[i]) for i in range(targets.shape[0])]
    return torch.stack([index for _, index in found]), torch.stack([best for best, _ in found])


def get_dynamic_threshold(distances: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each row of ``distances`` ``(rows, tokens)`` (the official
    ``get_dynamic_threshold``: ``skimage.filters.threshold_otsu``), on the device."""
    return otsu_threshold(distances)


@dataclass(frozen=True)
class FeatureInjector:
    """Which anchor token each image's tokens take their output from, at one grid.

    ``curr_nn_map``: ``(batch, tokens)`` long, the flat index ``anchor * tokens + token`` of each
    token's nearest anchor token; ``final_mask_tgt``: ``(batch, tokens)`` bool, the tokens injected
    (in the image's mask and nearer than its dynamic threshold; none for an image with no other
    image in its ``extended_mapping`` row). Built once from the first pass by ``from_nn_map``;
    ``inject_outputs`` applies it to any layer at this grid.
    """

    curr_nn_map: torch.Tensor
    final_mask_tgt: torch.Tensor

    @classmethod
    def from_nn_map(cls, nn_map: torch.Tensor, nn_distances: torch.Tensor, attn_masks: torch.Tensor,
                    anchors: int) -> "FeatureInjector":
        """``nn_map, nn_distances``: ``(batch, sources >= anchors, tokens)`` from ``cyclic_nn_map``;
        ``attn_masks``: ``(batch, tokens)`` bool, the subject masks before dropout (``last_mask``);
        ``anchors``: images ``0 .. anchors-1`` lend (``extended_mapping``)."""
        batch = nn_distances.shape[0]
        anchors = max(0, min(anchors, batch))
        # the mapping's other columns are only image i itself: inf
        curr_nn_map, dist_mask = _nearest_anchor(nn_map[:, :anchors], nn_distances[:, :anchors])
        # An image whose mapping row holds no other image is skipped: anchor 0 when it is the only anchor.
        image = torch.arange(batch, device=nn_distances.device)
        has_other = (anchors > 1) | (image >= anchors)
        final_mask_tgt = attn_masks.to(device=dist_mask.device, dtype=torch.bool) & dist_mask & has_other[:, None]
        return cls(curr_nn_map=curr_nn_map, final_mask_tgt=final_mask_tgt)

    @classmethod
    def from_anchor_nn_map(cls, nn_map: torch.Tensor, nn_distances: torch.Tensor,
                           attn_masks: torch.Tensor) -> "FeatureInjector":
        """The cached mode's injector (official ``inject_anchors``): ``nn_map, nn_distances``
        ``(batch, anchors, tokens)`` from ``anchor_nn_map``, ``attn_masks`` the new images' masks
        before dropout. The nearest anchor per token over every cached anchor, then the same dynamic
        threshold; no image is skipped (each has the anchors)."""
        curr_nn_map, dist_mask = _nearest_anchor(nn_map, nn_distances)
        final_mask_tgt = attn_masks.to(device=dist_mask.device, dtype=torch.bool) & dist_mask
        return cls(curr_nn_map=curr_nn_map, final_mask_tgt=final_mask_tgt)

    @property
    def batch(self) -> int:
        return self.final_mask_tgt.shape[0]

    def inject_outputs(self, output: torch.Tensor, alpha: float) -> torch.Tensor:
        """``output`` ``(batch, tokens, channels)``: one layer's conditional rows (after ``to_out``).
        Returns a new tensor: image by image in batch order, each injected token becomes
        ``alpha * (its anchor token's current output) + (1 - alpha) * its own``."""
        batch, tokens, channels = output.shape
        out = output.clone()
        flat = out.view(batch * tokens, channels)
        for i in range(batch):
            other_outputs = flat[self.curr_nn_map[i]]  # a copy: rows before i already injected
            blended = alpha * other_outputs + (1 - alpha) * out[i]
            out[i] = torch.where(self.final_mask_tgt[i][:, None], blended, out[i])
        return out

    def inject_anchors(self, output: torch.Tensor, anchor_outputs: torch.Tensor, alpha: float) -> torch.Tensor:
        """The cached mode's blend (official ``inject_anchors``): ``output`` ``(batch, tokens,
        channels)``, the new images' conditional rows; ``anchor_outputs`` ``(rows, channels)``, the
        anchors' outputs of this layer and step as the saving run's injection left them, row
        ``curr_nn_map`` for each token. The images read only the anchors, so their order is free."""
        blended = alpha * anchor_outputs[self.curr_nn_map] + (1 - alpha) * output
        return torch.where(self.final_mask_tgt[..., None], blended, output)


def _nearest_anchor(nn_map: torch.Tensor, nn_distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``swap_strategy='min'``, ``dist_thr='dynamic'``: per token the nearest anchor (first on ties),
    as the flat index ``anchor * tokens + token`` of its token, and whether that distance is below
    the image's Otsu threshold (strict). ``nn_map, nn_distances``: ``(batch, anchors, tokens)``."""
    tokens = nn_distances.shape[-1]
    min_dists = nn_distances.argmin(dim=1, keepdim=True)  # (batch, 1, tokens): the nearest anchor
    curr_nn_distances = nn_distances.gather(1, min_dists).squeeze(1)
    curr_nn_map = nn_map.gather(1, min_dists).squeeze(1) + min_dists.squeeze(1) * tokens
    dist_thr = get_dynamic_threshold(curr_nn_distances)
    return curr_nn_map, curr_nn_distances < dist_thr[:, None]
