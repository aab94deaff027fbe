"""ConsiStory's subject-driven shared self-attention (SDSA) on joint-attention transformers (MM-DiT:
Flux, SD3), in pure torch.

In an MM-DiT block one sample's text tokens and image tokens form one sequence ``[text; image]``
attended by one softmax. SDSA (Tewel et al., SIGGRAPH 2024, Sec. 3.1) carries over with the text
left alone: row ``i`` keeps its own queries and its own keys/values (text and image) and adds the
*kept* image tokens of every anchor ``j != i`` (the official ``extended_mapping``):

    keys_i = [K_i_text; K_i_image]  U  { K_j_image[t] : j != i, pairs[i, j], keep[j, t] }
    out_i  = softmax(Q_i keys_i^T / sqrt(d)) values_i

for the image queries; the text queries keep plain joint attention over their own sequence (the
text stream is never touched, as the UNet's cross-attention is not), and no row ever sees another
row's text. ``keep`` is the subject mask after dropout
(``shared_attention.keep_masks``); StoryDiffusion's token sharing is the same call with every pair
allowed and a random ``keep``.

Layout, as the pack's DiT hooks hand it over (``joint_attention.py``): ``q, k, v`` are ``(rows,
heads, tokens, d)`` after the model's positional embedding (Flux's RoPE: an anchor's image keys
carry the anchor's positions, which are every row's positions: one resolution per batch); the
image tokens are ``[image_start, tokens)``; ``rows = chunks * batch``, each cond/uncond chunk
holding the whole latent batch in order (the uncond chunk shares within itself, as the official
code does).

1. Each row's keys are ``[own sequence; image tokens of images 0 .. sources-1]`` (``(1 + sources) *
   ...`` keys, never ``batch`` times): one layout for every row, so one attention call covers the
   batch. The anchor block that repeats a row's own image is masked (no token counts twice).
2. Disallowed keys get an additive bias of the dtype's minimum (weight exactly 0 after the softmax),
   decided on the device: no host read, no data-dependent shape (the official code drops keys by
   boolean indexing, row by row).
3. The text queries are a second call over the row's own keys; the two calls together cost what one
   call over every query would, without a per-query bias (``tokens x keys``) in memory.

Subject maps (the automatic masks): on joint attention the image queries' probabilities of the
subject's text tokens play the role of the UNet's cross-attention maps (``subject_token_maps``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .consistory import ConsiStoryRun, concept_table
from .shared_attention import anchor_pairs

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, mask=None) on (rows, heads, n, d) -> (rows, n, heads * d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention on ``(b, heads, n, d)`` tensors with an additive ``mask``, as ``(b, n, heads * d)``."""
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def joint_shared_keys(t: torch.Tensor, batch: int, sources: int, image_start: int) -> torch.Tensor:
    """K (or V) ``(rows, heads, n, d)`` in each row's key layout: ``[own n tokens; image tokens of
    images 0 .. sources-1 of the row's chunk]``, ``(rows, heads, n + sources * n_image, d)``."""
    rows, heads, n, d = t.shape
    chunks = rows // batch
    t5 = t.reshape(chunks, batch, heads, n, d)
    lent = t5[:, :sources, :, image_start:].transpose(1, 2).reshape(chunks, 1, heads, -1, d)
    lent = lent.expand(chunks, batch, heads, lent.shape[3], d)
    return torch.cat([t5, lent], dim=3).reshape(rows, heads, -1, d)


def joint_shared_key_bias(pairs: torch.Tensor, keep: torch.Tensor, sources: int, chunks: int, own_tokens: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias ``(chunks * batch, 1, own_tokens + sources * n_image)`` for ``joint_shared_keys``.

    ``pairs`` ``(batch, batch)`` bool (the diagonal is ignored: a row's own tokens are all allowed);
    ``keep`` ``(batch, n_image)`` bool or 0/1: the image tokens each image may lend. 0 where a key is
    allowed, the dtype's minimum elsewhere.
    """
    batch = keep.shape[0]
    keep = keep if keep.dtype == torch.bool else keep != 0
    pairs = pairs.to(device=keep.device, dtype=torch.bool)
    eye = torch.eye(batch, dtype=torch.bool, device=keep.device)
    lent = ((pairs[:, :sources] & ~eye[:, :sources])[:, :, None] & keep[None, :sources]).reshape(batch, -1)
    own = torch.ones(batch, own_tokens, dtype=torch.bool, device=keep.device)
    allowed = torch.cat([own, lent], dim=1)
    bias = torch.where(allowed, torch.zeros((), dtype=dtype, device=keep.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=keep.device))
    return bias[None].expand(chunks, -1, -1).reshape(chunks * batch, 1, -1)


def _with_existing_mask(bias: torch.Tensor, existing: torch.Tensor, own_tokens: int, queries: int) -> torch.Tensor:
    """``bias`` ``(rows, 1, keys)`` with the model's own attention mask (over the row's own ``[text;
    image]`` sequence; bool = allowed, or additive) in its own-token columns: ``(rows, h, queries, keys)``."""
    if existing.dtype == torch.bool:
        existing = torch.where(existing, torch.zeros((), dtype=bias.dtype, device=bias.device),
                               torch.full((), torch.finfo(bias.dtype).min, dtype=bias.dtype, device=bias.device))
    while existing.ndim < 4:
        existing = existing[None] if existing.ndim < 3 else existing[:, None]
    rows, heads = bias.shape[0], existing.shape[1]
    own = existing.to(bias.dtype).expand(rows, heads, queries, own_tokens)
    lent = bias[:, None, :, own_tokens:].expand(rows, heads, queries, -1)
    return torch.cat([own, lent], dim=3)


def joint_shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image_start: int,
                           pairs: torch.Tensor, keep: torch.Tensor, sources: int,
                           attention: AttentionFn = sdpa_attention, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Joint attention where each row also sees the kept image tokens of the images ``pairs`` allows.

    ``q, k, v``: ``(chunks * batch, heads, n, d)`` with image tokens ``[image_start, n)``; ``keep``:
    ``(batch, n - image_start)``, shared by all chunks; only images ``0 .. sources-1`` lend. ``mask``:
    the model's own attention mask for the ``[text; image]`` sequence, if any (kept on the own keys).
    Two calls of ``attention(q, k, v, mask=...)`` for the whole batch: image queries over the shared
    keys, text queries over their own (the text's output is that of plain joint attention).
    """
    batch, image_tokens = keep.shape
    rows, _, n, _ = q.shape
    if n - image_start != image_tokens:
        raise ValueError(f"the keep mask has {image_tokens} image tokens per image but the call has {n - image_start}")
    if batch < 1 or rows % batch:
        raise ValueError(f"a batch of {rows} rows cannot be split into chunks of {batch} images")
    if tuple(pairs.shape) != (batch, batch):
        raise ValueError(f"pairs has shape {tuple(pairs.shape)}, expected ({batch}, {batch})")
    sources = max(0, min(sources, batch))
    bias = joint_shared_key_bias(pairs, keep, sources, rows // batch, n, q.dtype)  # 2.
    own_mask = image_mask = None
    if mask is not None:
        queries = mask.shape[-2] == n and mask.ndim >= 2
        own_mask = mask[..., :image_start, :] if queries else mask
        image_mask = mask[..., image_start:, :] if queries else mask
        bias = _with_existing_mask(bias, image_mask, n, n - image_start)
    out = attention(q[:, :, image_start:], joint_shared_keys(k, batch, sources, image_start),  # 1.
                    joint_shared_keys(v, batch, sources, image_start), mask=bias)
    if image_start == 0:
        return out
    text = attention(q[:, :, :image_start], k, v, mask=own_mask)  # 3.
    return torch.cat([text, out.to(text.dtype)], dim=1)


def joint_subject_driven_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image_start: int,
                                   subject_keep: torch.Tensor, anchors: int = 2,
                                   attention: AttentionFn = sdpa_attention,
                                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDSA on joint attention: row ``i`` attends to its own text and image tokens and to the kept
    subject image tokens of every anchor ``j != i`` (images ``0 .. anchors-1``)."""
    batch = subject_keep.shape[0]
    return joint_shared_attention(q, k, v, image_start=image_start, pairs=anchor_pairs(batch, anchors,
                                  subject_keep.device), keep=subject_keep, sources=anchors, attention=attention,
                                  mask=mask)


def joint_consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image_start: int,
                               token_keep: torch.Tensor, attention: AttentionFn = sdpa_attention,
                               mask: torch.Tensor | None = None) -> torch.Tensor:
    """StoryDiffusion's consistent self-attention on joint attention: every row also sees the sampled
    image tokens (``token_keep``) of every other image of its chunk."""
    batch = token_keep.shape[0]
    pairs = torch.ones(batch, batch, dtype=torch.bool, device=token_keep.device)
    return joint_shared_attention(q, k, v, image_start=image_start, pairs=pairs, keep=token_keep, sources=batch,
                                  attention=attention, mask=mask)


def subject_token_maps(q: torch.Tensor, k: torch.Tensor, image_start: int, columns: torch.Tensor) -> torch.Tensor:
    """Each image token's attention probability of each subject text token, mean over heads:
    ``(b, concepts, n - image_start)`` float32.

    ``q, k``: ``(b, heads, n, d)`` of one plain joint attention (own keys only); ``columns``: ``(b,
    concepts)`` token indices into the text ``[0, image_start)``. The probability is the joint
    softmax's (over text and image keys), read without forming the ``n x n`` matrix: attention with
    one-hot values (value ``c`` is 1 on key ``columns[b, c]``) returns exactly those columns of the
    softmax, through the fused kernel.
    """
    b, heads, n, _ = q.shape
    concepts = columns.shape[1]
    width = -(-concepts // 8) * 8  # kernels like value widths in multiples of 8
    onehot = torch.zeros(b, n, width, dtype=q.dtype, device=q.device)
    onehot.scatter_(1, columns[:, None, :], torch.ones(b, 1, concepts, dtype=q.dtype, device=q.device))
    probs = F.scaled_dot_product_attention(q[:, :, image_start:], k, onehot[:, None].expand(b, heads, n, width))
    return probs[..., :concepts].float().mean(dim=1).transpose(1, 2)


class JointConsiStoryRun(ConsiStoryRun):
    """One ConsiStory run on a joint-attention model: ``ConsiStoryRun`` fed with subject maps read from
    the joint attention (``subject_token_maps``) instead of cross-attention layers, and told each
    model call's token grid and text length (the hooks see sequences, not latents)."""

    def __init__(self, settings, batch: int):
        super().__init__(settings, batch)
        self.grid: tuple[int, int] = (0, 0)  # the latent's patch grid (height, width) in this call
        self.text_tokens = 0  # text tokens in front of the image in Flux's single blocks

    def subject_columns(self, device) -> torch.Tensor:
        """``(batch, concepts)`` text-token index of each image's concepts (absent ones: index 0)."""
        if self._table is None:
            self._table = concept_table(self.settings.subject_tokens, self.batch, device)
        return self._table[0]

    def record_maps(self, maps: torch.Tensor) -> None:
        """One block's ``(batch, concepts, grid tokens)`` maps of the conditional rows (not in the vanilla call)."""
        if not self.caching:
            self.maps.add(maps)
