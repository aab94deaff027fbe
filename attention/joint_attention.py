"""MasaCtrl for joint-attention transformers (MM-DiT: Flux, SD3), in pure torch.

In an MM-DiT block the text tokens and the image tokens of one sample form a single sequence
and attend to each other in one softmax attention. MasaCtrl (Cao et al., ICCV 2023, Eq. 4)
carries over as Stable Flow (Avrahami et al., CVPR 2025, Sec. 4.1) and FreeFlux (Wei et al.,
2025) do it: in the chosen blocks and steps each target row keeps its own queries and its own
text keys/values, and its image keys/values are replaced by the source's:

    out_target = Attention(Q_target, [K_target_text; K_source_image], [V_target_text; V_source_image])

The source row keeps plain joint attention. ``union`` appends the source's image keys/values to
the target's own: ``Attention(Q_t, [K_t; K_s_image], [V_t; V_s_image])``.

Layout: ``q, k, v`` are ``(batch, heads, tokens, dim_head)`` after the model's positional
embedding (Flux applies RoPE to q and k before its attention call, so the source's image keys
carry the source's positions, which are the target's positions too: one resolution per batch).
The image tokens are ``[image_start, tokens)``: the models put the text first. The batch is split
into ``chunks`` equal chunks (one per ``cond_or_uncond`` entry), each holding the whole latent
batch in order with the source at ``source_index``.

``attention(q, k, v)`` does the softmax attention and returns the model's output layout (the
host's optimized attention in the node; ``sdpa_attention`` here). Rows are chosen by reshapes
and slices of the regular batch, so nothing is read from the device on the host.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .masactrl import check_rows

MODES = ("mutual", "union")

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on ``(b, heads, n, d)`` tensors, returned as ``(b, n, heads * d)``."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def _source_image(t: torch.Tensor, chunks: int, per_chunk: int, source_index: int, image_start: int) -> torch.Tensor:
    """The source's image span of ``t``, broadcast over its chunk: ``(chunks, per_chunk, h, n_img, d)`` (a view)."""
    t5 = t.reshape((chunks, per_chunk) + tuple(t.shape[1:]))
    src = t5[:, source_index:source_index + 1, :, image_start:]
    return src.expand(-1, per_chunk, -1, -1, -1)


def joint_mutual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    image_start: int,
    chunks: int,
    source_index: int = 0,
    mode: str = "mutual",
    attention: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """MasaCtrl joint attention for one MM-DiT attention call (see the module docstring).

    ``image_start`` is the number of text tokens in front of the image tokens (0 for an
    image-only attention, where this reduces to the UNet form of MasaCtrl).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    batch, _, tokens, _ = q.shape
    if not 0 <= image_start < tokens:
        raise ValueError(f"image tokens start at {image_start}, outside a sequence of {tokens}")
    per_chunk = check_rows(batch, chunks, source_index)
    shape = (chunks, per_chunk) + tuple(k.shape[1:])

    if mode == "mutual":
        # 1. Every row gets [own text K/V; source image K/V]. For the source row that is its own
        #    K/V, value for value, so one attention call over the whole batch keeps it unchanged.
        def swap(t):
            t5 = t.reshape(shape)
            return torch.cat([t5[:, :, :, :image_start], _source_image(t, chunks, per_chunk, source_index,
                                                                        image_start)], dim=3).flatten(0, 1)
        return attention(q, swap(k), swap(v))

    # 2. Union: targets attend over [own K/V; source image K/V]; the source keeps plain attention
    #    (appending its own image keys again would change its softmax), so it is a separate call.
    q5 = q.reshape((chunks, per_chunk) + tuple(q.shape[1:]))
    k5, v5 = k.reshape(shape), v.reshape(shape)
    s = source_index
    out_src = attention(q5[:, s], k5[:, s], v5[:, s])

    def targets(t5):
        if s == 0:
            return t5[:, 1:]
        if s == per_chunk - 1:
            return t5[:, :-1]
        return torch.cat([t5[:, :s], t5[:, s + 1:]], dim=1)

    def union(t5):
        own = targets(t5)
        src = t5[:, s:s + 1, :, image_start:].expand(-1, per_chunk - 1, -1, -1, -1)
        return torch.cat([own, src], dim=3).flatten(0, 1)

    out_tgt = attention(targets(q5).flatten(0, 1), union(k5), union(v5))
    out_tgt = out_tgt.reshape((chunks, per_chunk - 1) + tuple(out_tgt.shape[1:]))
    out = torch.cat([out_tgt[:, :s], out_src[:, None].to(out_tgt.dtype), out_tgt[:, s:]], dim=1)
    return out.flatten(0, 1)
