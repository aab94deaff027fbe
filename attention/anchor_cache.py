"""ConsiStory's cached anchors (the official ``AnchorCache``, ``consistory_run.run_anchor_generation``
and ``run_extra_generation``): a subject's anchors are generated once, and a later batch of new
settings attends to them without generating them again. Pure torch.

What is kept, per step, per model evaluation of that step, per shared layer and per cond/uncond
chunk: the keys and values of the anchors' subject tokens that the step lends (the subject mask
after dropout, the same keep mask for every layer of a grid). The official code keeps the layer's
*inputs* of those tokens and projects them again at every later call; keys and values are what the
batch run itself attended to, so a cached run reads them as they were, with no projection and no
rounding from a matmul over another row count, at twice the inputs' size (SD's self-attention has
as many channels in K and in V as in its input).

How a new image attends (``attention_over_cached_anchors``): its keys are its own tokens followed by
every anchor's cached tokens, the same set for every new image (the official ``extended_key``
concatenation), and nothing else: in the batch run a non-anchor image sees no other non-anchor
(``extended_mapping``), so a new image in a cached run sees exactly what it would see as a row of
the batch ``[anchors + new images]`` (``subject_driven_self_attention``), up to float rounding of
the softmax over another key layout.

With feature injection (the official ``anchor_cache_second_stage``), the file holds a second stage:
the same keys and values from the second pass, the anchors' smoothed DIFT features and masks before
dropout at the injection grid (``dift_cache``, ``anchors_last_mask``), and the anchors' conditional
outputs of every injected layer call as their own injection left them (``h_out_cache``), at the
tokens inside their masks only (``on_lent_outputs``: no other token is ever read).

The one host read: storing only the lent tokens needs their count (``lent_token_index``), once per
step and grid of the *saving* run (the full layout would be ~40 GB for SDXL at 1024 px and 50
steps), and once more per saving run for the injected outputs' tokens. A cached run reads nothing
on the host: every shape comes from the stored tensors.
"""

from __future__ import annotations

import torch

from .feature_injection import FeatureInjector
from .masactrl import sdpa_attention
from .shared_attention import AttentionFn

# Keys of the file's tensors: "<k|v>/<step>/<evaluation>/<layer>/<chunk>" and "keep/<step>/<h>x<w>"
# (the first stage); the second stage, when saved, the same names after "injection/", and
# "injection/out/<step>/<evaluation>/<layer>", "injection/dift", "injection/mask".
KEY_SEPARATOR = "/"
SECOND_STAGE = "injection" + KEY_SEPARATOR
DIFT_NAME = SECOND_STAGE + "dift"
MASK_NAME = SECOND_STAGE + "mask"


def entry_name(kind: str, step: int, evaluation: int, layer: str, chunk: int) -> str:
    """The name of one cached K or V (``kind`` "k" or "v"); ``chunk``: 0 conditional, 1 unconditional."""
    return KEY_SEPARATOR.join((kind, str(step), str(evaluation), layer, str(chunk)))


def output_name(step: int, evaluation: int, layer: str) -> str:
    """The name of the anchors' injected outputs of one layer call (second stage, conditional rows)."""
    return SECOND_STAGE + KEY_SEPARATOR.join(("out", str(step), str(evaluation), layer))


def keep_name(step: int, height: int, width: int) -> str:
    return KEY_SEPARATOR.join(("keep", str(step), f"{height}x{width}"))


def layer_name(key: tuple) -> str:
    """``("output", 3, 0)`` -> ``"output.3.0"`` (a host layer key as text)."""
    return ".".join(str(part) for part in key)


def lent_token_index(keep: torch.Tensor, anchors: int) -> torch.Tensor:
    """Flat indices into ``(anchors * tokens)`` of the anchors' lent tokens (``keep``: ``(batch,
    tokens)`` bool, rows past the anchors ignored), in anchor-then-token order as the official
    ``x[last_mask_dropout]``. Its length is data-dependent: one host read, once per step and grid."""
    return keep[:anchors].reshape(-1).nonzero().squeeze(1)


def anchor_tokens(x: torch.Tensor, batch: int, anchors: int, chunk: int, index: torch.Tensor) -> torch.Tensor:
    """``(lent, c)``: the lent tokens of images ``0 .. anchors-1`` of chunk ``chunk`` of ``x``
    (``(chunks * batch, tokens, c)``, each chunk the whole batch in order), picked by ``index``."""
    rows = x[chunk * batch:chunk * batch + anchors]
    return rows.reshape(-1, x.shape[-1]).index_select(0, index)


def attention_over_cached_anchors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                  anchor_k: list[torch.Tensor], anchor_v: list[torch.Tensor],
                                  attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """SDSA of new images over cached anchors: row ``r`` of chunk ``c`` attends to its own tokens and
    to ``anchor_k[c]`` / ``anchor_v[c]`` (``(lent, heads * d)``, the anchors' lent tokens of that
    chunk's kind at this step and layer).

    ``q, k, v``: ``(chunks * batch, tokens, heads * d)``; one call of ``attention``, no bias. Every
    chunk's anchors lend the same number of tokens (one keep mask serves the cond and uncond rows).
    """
    chunks = len(anchor_k)
    rows, tokens, width = k.shape
    if chunks < 1 or rows % chunks:
        raise ValueError(f"{rows} rows cannot be split into {chunks} chunks")
    lent = anchor_k[0].shape[0]
    if any(a.shape != (lent, width) for a in list(anchor_k) + list(anchor_v)):
        raise ValueError(f"cached anchors of shapes {[tuple(a.shape) for a in anchor_k]} for a layer of width {width}")
    if lent == 0:
        return attention(q, k, v, heads)
    batch = rows // chunks
    cached_k = torch.stack([a.to(k.dtype) for a in anchor_k])[:, None].expand(chunks, batch, lent, width)
    cached_v = torch.stack([a.to(v.dtype) for a in anchor_v])[:, None].expand(chunks, batch, lent, width)
    keys = torch.cat([k.reshape(chunks, batch, tokens, width), cached_k], dim=2).reshape(rows, tokens + lent, width)
    values = torch.cat([v.reshape(chunks, batch, tokens, width), cached_v], dim=2).reshape(rows, tokens + lent, width)
    return attention(q, keys, values, heads)


def on_lent_outputs(injector: FeatureInjector, anchor_masks: torch.Tensor) -> FeatureInjector:
    """``injector`` (``FeatureInjector.from_anchor_nn_map``) reading the anchors' outputs as saved:
    only the tokens inside the anchors' masks (``anchor_masks`` ``(anchors, tokens)``, row order of
    ``lent_token_index``). A token is injected from an anchor token inside that anchor's mask only:
    one outside is at distance 2, the largest, and the Otsu threshold of a row lies below its largest
    value (or equals a constant row's value), so ``2 < threshold`` never holds. The rows are
    renumbered on the device (a running count of the mask); the injected set stays the same."""
    inside = anchor_masks.reshape(-1).to(device=injector.curr_nn_map.device, dtype=torch.bool)
    row = (inside.long().cumsum(0) - 1).clamp_min(0)
    return FeatureInjector(curr_nn_map=row[injector.curr_nn_map],
                           final_mask_tgt=injector.final_mask_tgt & inside[injector.curr_nn_map])
