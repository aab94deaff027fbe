"""Shared self-attention across a latent batch, in pure torch: ConsiStory's subject-driven shared
self-attention (SDSA; Tewel et al., "Training-Free Consistent Text-to-Image Generation",
SIGGRAPH 2024, Sec. 3.1-3.2) and StoryDiffusion's consistent self-attention (Zhou et al., 2024,
Sec. 3.1).

One mechanism serves both. In a shared layer image ``i`` of a batch of ``B`` images attends to
all of its own tokens and to the *kept* tokens of every image ``j`` that ``pairs[i, j]`` allows:

    keys_i = K_i  U  { K_j[t] : j != i, pairs[i, j], keep[j, t] }
    out_i  = softmax(Q_i keys_i^T / sqrt(d)) values_i

* ConsiStory (SDSA): ``pairs`` is the official ``extended_mapping`` (identity plus the anchor
  columns: images ``0 .. anchors-1``), ``keep`` the subject masks after dropout.
* StoryDiffusion: every image pairs with every other one, ``keep`` a random subset of each
  image's tokens (``rand < rate``).

Tensors are laid out as ComfyUI hands them to an attn1 patch: ``(chunks * B, tokens, heads * d)``,
each cond/uncond chunk holding the whole latent batch in order. The official ConsiStory code
shares in the uncond chunk as well, with the same masks (rows ``b`` and ``b + B`` both use image
``b % B``'s mask); so does this module, for every chunk.

How it is computed (identical to the official code's softmax over the same key set):

1. The official code loops over rows and removes the masked keys by boolean indexing (a
   data-dependent shape, a host sync per row). Here every row gets the same key *layout* and the
   masked keys an additive bias of the dtype's minimum (weight exactly 0 after the softmax), so
   one call of the host's attention covers the whole batch and nothing is read on the host.
2. Only the first ``sources`` images (the anchors) can ever lend tokens. When ``sources + 1 <
   B`` each row's keys are ``[own tokens, tokens of images 0 .. sources-1]`` with the anchor
   block that duplicates an anchor's own tokens masked (so no token counts twice): ``(sources
   + 1) * tokens`` keys per row. Otherwise each row's keys are the whole chunk, ``B * tokens``.
   K and V are copied once into that layout (``(chunks * B, keys, heads * d)``); no
   ``tokens x keys`` matrix is formed here. (The host's xformers path does expand the per-row
   bias over queries; its SDPA path broadcasts it.)

Where this module departs from the official code (and why):

* Dropout draws come from the caller's ``torch.Generator`` on the masks' device, not from the
  global RNG that the official ``AttentionStore`` reseeds with a fixed 0 at every pipeline call.
  The rule (``rand < mask_dropout`` drops a token), the shape ``(B, tokens)`` per resolution
  and the dtype (float32) are the official ones.
* Otsu runs on the device (histogram by ``searchsorted`` against numpy's float bin edges,
  between-class variance in float64, or float32 where the device has no float64), not
  ``skimage`` on the host. The official pipeline runs in fp16, so its maps reach skimage as
  fp16 arrays; here they keep the dtype the caller records them in.
* An image whose prompt holds none of the concepts gets an empty subject mask (it lends
  nothing); the official code fails there (``torch.stack([])``).
* Any latent shape: the official code assumes square 1024 px latents (``width = sqrt(N)``).
* Vanilla-query strength: the official run script fixes the end strength at the literal
  0.81836735 (= 0.9 - 0.8 * 5 / 49, rounded to 8 digits) for every step count, and spreads
  ``steps // 10 + 1`` values from 0.9 to it. Here the end is ``0.9 - 4 / 49`` exactly, so at 50
  steps ``s(i) = 0.9 - 0.8 * i / 49`` exactly; other step counts keep the official rule (fixed
  end, ``steps // 10 + 1`` values).
* StoryDiffusion's batch mode: every image of the batch plays the id-image role of its low-VRAM
  app ("write": each attends to the others' sampled tokens); the app's later one-at-a-time
  images reading a bank of the id images' tokens are not modelled here. Its subset draw is fp16
  ``torch.rand`` on the global RNG; here it is float32 on the caller's generator.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Callable

import torch
import torch.nn.functional as F

from .masactrl import sdpa_attention

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, heads, mask=None) -> out

# ConsiStory run script (consistory_run.py): query mixing over steps 0 .. steps // 10.
QUERY_STRENGTH_START = 0.9
QUERY_STRENGTH_END = 0.9 - 4 / 49  # the official literal 0.81836735, unrounded
# ConsiStory AttentionStore: masks from the mean of the last 20 recorded steps.
MAP_WINDOW = 20
# StoryDiffusion low-VRAM app: sampling rates at the H/32 x W/32 grid and the other grid.
SA32 = 0.5
SA64 = 0.5


# -- the mechanism --------------------------------------------------------------------------

def uses_source_layout(batch: int, sources: int) -> bool:
    """Whether rows take ``[own, images 0 .. sources-1]`` as keys (shorter) rather than the whole chunk."""
    return sources + 1 < batch


def shared_keys(x: torch.Tensor, batch: int, sources: int) -> torch.Tensor:
    """K (or V) ``(chunks * batch, tokens, c)`` rearranged into each row's key layout.

    Row ``r`` (image ``i = r % batch`` of chunk ``c = r // batch``) gets, from its own chunk,
    ``[x_i, x_0, ..., x_{sources-1}]`` when ``uses_source_layout``, else ``[x_0, ..., x_{batch-1}]``.
    """
    rows, tokens, c = x.shape
    chunks = rows // batch
    x4 = x.reshape(chunks, batch, tokens, c)
    if not uses_source_layout(batch, sources):
        return x4.reshape(chunks, 1, batch * tokens, c).expand(chunks, batch, batch * tokens, c) \
                 .reshape(rows, batch * tokens, c)
    lent = x4[:, :sources].reshape(chunks, 1, sources * tokens, c).expand(chunks, batch, sources * tokens, c)
    return torch.cat([x4, lent], dim=2).reshape(rows, (sources + 1) * tokens, c)


def shared_key_bias(pairs: torch.Tensor, keep: torch.Tensor, sources: int, chunks: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias ``(chunks * batch, 1, keys)`` for the layout of ``shared_keys``.

    ``pairs`` ``(batch, batch)`` bool: ``pairs[i, j]`` lets image ``i`` see image ``j``'s kept
    tokens (the diagonal is ignored: own tokens are always all allowed). ``keep`` ``(batch,
    tokens)``: bool, or 0/1 numbers (non-zero keeps). Columns ``j >= sources`` must be False in
    ``pairs``. 0 where a key is allowed, the dtype's minimum elsewhere; decided on the device.
    """
    batch, tokens = keep.shape
    keep = keep if keep.dtype == torch.bool else keep != 0
    pairs = pairs.to(device=keep.device, dtype=torch.bool)
    eye = torch.eye(batch, dtype=torch.bool, device=keep.device)
    if uses_source_layout(batch, sources):
        lent = (pairs[:, :sources] & ~eye[:, :sources])[:, :, None] & keep[None, :sources]
        own = torch.ones(batch, 1, tokens, dtype=torch.bool, device=keep.device)
        allowed = torch.cat([own, lent], dim=1)
    else:
        allowed = eye[:, :, None] | (pairs[:, :, None] & keep[None])
    allowed = allowed.reshape(batch, 1, -1)
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=keep.device)
    bias = torch.where(allowed, zero, low)
    # one bias row per attention row: the host's split and sub-quadratic paths need batch == rows
    return bias[None].expand(chunks, -1, -1, -1).reshape(chunks * batch, 1, -1)


def shared_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                          pairs: torch.Tensor, keep: torch.Tensor, sources: int,
                          attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """Self-attention where each image also sees the kept tokens of the images ``pairs`` allows.

    ``q, k, v``: ``(chunks * batch, tokens, heads * d)``; ``keep``: ``(batch, tokens)``, shared
    by all chunks; ``sources``: only images ``0 .. sources-1`` may lend tokens. One call of
    ``attention`` for the whole batch.
    """
    batch, tokens = keep.shape
    rows = q.shape[0]
    if q.shape[1] != tokens:
        raise ValueError(f"the keep mask has {tokens} tokens per image but the layer has {q.shape[1]}")
    if batch < 1 or rows % batch:
        raise ValueError(f"a batch of {rows} rows cannot be split into chunks of {batch} images")
    if tuple(pairs.shape) != (batch, batch):
        raise ValueError(f"pairs has shape {tuple(pairs.shape)}, expected ({batch}, {batch})")
    sources = max(0, min(sources, batch))
    bias = shared_key_bias(pairs, keep, sources, rows // batch, q.dtype)
    return attention(q, shared_keys(k, batch, sources), shared_keys(v, batch, sources), heads, mask=bias)


# -- ConsiStory: subject-driven shared self-attention ------------------------------------------

def anchor_pairs(batch: int, anchors: int, device=None) -> torch.Tensor:
    """The official ``extended_mapping``: identity plus the columns of images ``0 .. anchors-1``."""
    i = torch.arange(batch, device=device)
    return (i[:, None] == i[None, :]) | (i[None, :] < anchors)


def subject_driven_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                  subject_keep: torch.Tensor, anchors: int = 2,
                                  attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """SDSA (ConsiStory Sec. 3.1): image ``i`` attends to all its tokens and to the kept subject
    tokens of every anchor ``j != i`` (anchors are images ``0 .. anchors-1``; non-anchors see no
    non-anchor). ``subject_keep``: ``(batch, tokens)`` masks at this layer's grid after dropout
    (``keep_masks``); ``batch`` is read from it, ``q.shape[0] // batch`` is the chunk count.
    """
    batch = subject_keep.shape[0]
    pairs = anchor_pairs(batch, anchors, device=subject_keep.device)
    return shared_self_attention(q, k, v, heads, pairs=pairs, keep=subject_keep, sources=anchors,
                                 attention=attention)


def keep_masks(subject_masks: torch.Tensor, mask_dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Subject masks after dropout (ConsiStory Sec. 3.2; ``AttentionStore`` in ``ptp_utils.py``).

    Each subject token is dropped where ``rand < mask_dropout`` (kept where ``rand >=
    mask_dropout``): one float32 draw per image and token, on the masks' device from
    ``generator`` (which must live there). Call once per resolution and step; the official code
    draws the 32 grid then the 64 grid after every step, shared by every layer, head and chunk.
    ``mask_dropout`` 0 keeps every subject token, 1 keeps none.
    """
    draw = torch.rand(subject_masks.shape, generator=generator, device=subject_masks.device)
    masks = subject_masks if subject_masks.dtype == torch.bool else subject_masks != 0
    return masks & (draw >= mask_dropout)


def query_strength(step: int, steps: int) -> float | None:
    """Weight of the vanilla query at ``step`` (``QueryStore`` in ``consistory_utils.py``), or None.

    The official run makes an extra vanilla UNet call at steps ``0 .. steps // 10`` and spreads
    ``steps // 10 + 1`` strengths linearly from 0.9 to a fixed end (0.81836735), whatever the
    step count; at 50 steps that is ``0.9 - 0.8 * i / 49``. Mixing needs SDSA on, so the official
    code never applies step 0's value (its SDSA window, ``t_range = [(1, n_steps)]``, starts at step 1): a caller may skip that vanilla call.
    """
    last = steps // 10
    if not 0 <= step <= last:
        return None
    if last == 0:
        return QUERY_STRENGTH_START
    return QUERY_STRENGTH_START + (QUERY_STRENGTH_END - QUERY_STRENGTH_START) * step / last


def mix_queries(q: torch.Tensor, q_vanilla: torch.Tensor, strength: float) -> torch.Tensor:
    """``s * q_vanilla + (1 - s) * q`` on the projected queries (both chunks), as ``inject_query``."""
    return strength * q_vanilla + (1 - strength) * q


def _stats_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` ``(m, n)``, as ``skimage.filters.threshold_otsu``.

    1. Bin edges as numpy makes them in the values' dtype: ``k * ((max - min) / bins) + min``,
       the last edge ``max``; a value falls in the last bin whose left edge is ``<=`` it.
    2. Between-class variance ``w1 w2 (mu1 - mu2)^2`` for every split after bin ``t``, written
       with bin indices (the centres are affine in the index, which scales it by a constant):
       ``(s1 w2 - s2 w1)^2 / (w1 w2)``, integers up to rounding, in float64.
    3. The threshold is the centre of the first bin that maximises it; a constant row returns
       its value (skimage's early return), so ``values > threshold`` is empty there.

    skimage sums the variance terms in float32; where two bins' variances differ by less than
    its rounding (relative ~1e-7) it may pick the neighbour of the exact maximum this returns:
    8 of 4,000 blob-like maps at 32 and 64 px (one bin apart, 2-3 tokens of ~300 flipped).
    """
    m, n = values.shape
    lo = values.amin(dim=1, keepdim=True)
    hi = values.amax(dim=1, keepdim=True)
    index = torch.arange(bins + 1, dtype=values.dtype, device=values.device)
    edges = torch.cat([(index[:-1] * ((hi - lo) / bins)) + lo, hi], dim=1)  # 1. (m, bins + 1)
    which = torch.searchsorted(edges[:, 1:bins].contiguous(), values.contiguous(), right=True)
    stats = _stats_dtype(values.device)
    counts = torch.zeros(m, bins, dtype=stats, device=values.device)
    counts.scatter_add_(1, which, torch.ones(m, n, dtype=stats, device=values.device))
    k = torch.arange(bins, dtype=stats, device=values.device)
    w1 = counts.cumsum(dim=1)[:, :-1]  # 2. class 1 = bins 0..t, t = 0..bins-2
    s1 = (counts * k).cumsum(dim=1)[:, :-1]
    w2 = n - w1
    s2 = (counts * k).sum(dim=1, keepdim=True) - s1
    variance = (s1 * w2 - s2 * w1) ** 2 / (w1 * w2).clamp_min(1)
    best = variance.argmax(dim=1, keepdim=True)  # 3. first maximum, as np.argmax
    centres = (edges[:, :-1] + edges[:, 1:]) / 2.0
    threshold = centres.gather(1, best)
    return torch.where(hi > lo, threshold, lo).squeeze(1)


def subject_masks(concept_maps: torch.Tensor, size: tuple[int, int],
                  present: torch.Tensor | None = None) -> torch.Tensor:
    """Subject masks ``(batch, height * width)`` bool from cross-attention maps (``AttentionStore``).

    ``concept_maps``: ``(batch, concepts, h, w)``, each image's aggregated map of each concept
    token (see ``AttentionMapWindow``). Each map is resized bilinearly (align_corners False) to
    ``size`` = (height, width), thresholded by its own Otsu threshold (strict ``>``), and the
    concepts are OR-ed. ``present`` ``(batch, concepts)`` bool: concepts missing from an image's
    prompt take no part (an image with none gets an empty mask).
    """
    batch, concepts = concept_maps.shape[:2]
    height, width = size
    resized = F.interpolate(concept_maps, size=(height, width), mode="bilinear", align_corners=False)
    flat = resized.reshape(batch * concepts, height * width)
    masks = (flat > otsu_threshold(flat)[:, None]).reshape(batch, concepts, height * width)
    if present is not None:
        masks = masks & present.to(device=masks.device, dtype=torch.bool)[:, :, None]
    return masks.any(dim=1)


class AttentionMapWindow:
    """Mean of the cross-attention maps of the last ``window`` recorded steps, all layers alike.

    ``aggregate_last_steps_attention`` averages, with equal weight, every (layer, step) map of
    the last 20 entries of each layer's list. Here a step's layer maps are summed as they come
    (``add``), ``end_step`` files the step's sum and count, and only the last ``window`` steps
    are kept, so memory stays bounded. A step that recorded nothing is not filed (the official
    lists do not grow then). Sums stay on the maps' device; counts are host integers.
    """

    def __init__(self, window: int = MAP_WINDOW):
        self.window = window
        self._steps: deque[tuple[torch.Tensor, int]] = deque(maxlen=window)
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, layer_map: torch.Tensor) -> None:
        """One layer's map of the current step (any shape, the same for every call)."""
        layer_map = layer_map.to(torch.promote_types(layer_map.dtype, torch.float32))
        self._sum = layer_map.clone() if self._sum is None else self._sum + layer_map
        self._count += 1

    def end_step(self) -> None:
        if self._count:
            self._steps.append((self._sum, self._count))
        self._sum, self._count = None, 0

    def mean(self) -> torch.Tensor | None:
        """The mean over the filed steps' maps, or None before any step was filed."""
        if not self._steps:
            return None
        total = sum(count for _, count in self._steps)
        return torch.stack([s for s, _ in self._steps]).sum(dim=0) / total


# -- StoryDiffusion: consistent self-attention ---------------------------------------------------

def token_sharing_rate(tokens: int, height: int, width: int, sa32: float = SA32, sa64: float = SA64) -> float:
    """The sampling rate of a layer with ``tokens`` tokens for an image of ``height x width`` pixels:
    ``sa32`` at the ``(height // 32) * (width // 32)`` grid, ``sa64`` anywhere else (its code's test)."""
    return sa32 if tokens == (height // 32) * (width // 32) else sa64


def token_sharing_keep(batch: int, tokens: int, rate: float, generator: torch.Generator,
                       device=None) -> torch.Tensor:
    """Each image's random token subset ``(batch, tokens)``: ``rand < rate``, independent per image.

    Drawn on ``device`` (the generator's by default) from ``generator``; the app draws once per
    step and resolution, shared by every layer, head and chunk.
    """
    device = generator.device if device is None else device
    return torch.rand((batch, tokens), generator=generator, device=device) < rate


def consistent_attention_coin(step: int, rng: random.Random) -> bool:
    """Whether one layer call uses consistent attention (the app's per-call coin, host side).

    Step 0 is plain and draws nothing; later steps draw ``rng.random()`` once per layer call and
    share when it exceeds 0.3 before step 20 (p = 0.7) and 0.1 from step 20 on (p = 0.9). The
    app uses the global Python RNG; pass a seeded ``random.Random`` for reproducible runs.
    """
    if step < 1:
        return False
    return rng.random() > (0.3 if step < 20 else 0.1)


def consistent_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              token_keep: torch.Tensor,
                              attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """StoryDiffusion's consistent self-attention: image ``i`` attends to all its tokens and to the
    sampled tokens (``token_keep``, ``(batch, tokens)``) of every other image of its chunk."""
    batch = token_keep.shape[0]
    pairs = torch.ones(batch, batch, dtype=torch.bool, device=token_keep.device)
    return shared_self_attention(q, k, v, heads, pairs=pairs, keep=token_keep, sources=batch,
                                 attention=attention)
