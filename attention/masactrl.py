"""MasaCtrl mutual self-attention (Cao et al., "MasaCtrl: Tuning-Free Mutual Self-Attention
Control for Consistent Image Synthesis and Editing", ICCV 2023), in pure torch.

In a MasaCtrl layer the source image keeps plain self-attention, and every target image
queries the source's keys and values instead of its own (Sec. 4.1, Eq. 4):

    out_target = Attention(Q_target, K_source, V_source)

so content (identity, texture) is pulled from the source while the target's layout, set by
its own prompt, shapes the queries. Variants:

* ``union`` (``MutualSelfAttentionControlUnion`` of the official code): the target attends
  over the source's and its own keys and values concatenated along the sequence,
  ``Attention(Q_t, [K_s; K_t], [V_s; V_t])``.
* mask-guided, with mode ``mutual`` (Sec. 4.2, Eq. 6-7): with foreground masks M_s (source) and M_t (target), the
  target foreground attends only to source-foreground keys, the background only to
  source-background keys, and the two results are blended by M_t:
  ``out = M_t * Attention(Q_t, K_s[M_s], V_s[M_s]) + (1 - M_t) * Attention(Q_t, K_s[~M_s], V_s[~M_s])``.
  The official code adds the dtype's minimum to the excluded logits; here the same bias is
  a per-key vector handed to the attention function, so no N x N logit matrix is built and
  no key count is read on the host.

Tensors are laid out as ComfyUI hands them to an attn1 patch: ``(batch, tokens, heads * dim_head)``
with the batch split into ``chunks`` equal chunks (one per ``cond_or_uncond`` entry), each
chunk holding the whole latent batch in order, the source at ``source_index`` of every chunk.
The attention itself is done by ``attention(q, k, v, heads, mask=None)`` (ComfyUI's optimized
attention in the node; ``sdpa_attention`` here), which never materializes the attention matrix.

Nothing here reads a device value on the host: rows are chosen by views and slices (the batch
is regular), masks enter as additive key biases, so a patched layer costs the GPU no stall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .layer_selection import LayerSelection, StepWindow

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, heads, mask=None) -> out

MODES = ("mutual", "union")


@dataclass(frozen=True, eq=False)
class MasaCtrlSettings:
    """One MasaCtrl patch's settings, built and validated once at the node boundary.

    ``layers`` are the resolved layer (or block) indices that ``selection`` chose on the model.
    Masks and token lists are for the UNet's mask-guided variants; ``eq=False``: a settings
    object is its own identity (a run keeps its per-patch state under it).
    """

    window: StepWindow
    selection: LayerSelection
    layers: tuple[int, ...]
    mode: str = "mutual"
    source_index: int = 0
    source_mask: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None
    auto_mask: bool = False
    source_tokens: tuple[int, ...] = (1,)
    target_tokens: tuple[int, ...] = (1,)
    mask_threshold: float = 0.1


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head softmax attention on ``(b, n, heads * d)`` tensors with PyTorch SDPA.

    ``mask`` is an additive bias broadcast to ``(b, n, m)``, e.g. ``(1, m)`` for a key bias.
    """
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(q.dtype)
        mask = mask.reshape((1,) * (3 - mask.ndim) + tuple(mask.shape))[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, inner)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention that materializes the ``(b, heads, n, m)`` logit matrix, as the official code does.

    ``key_bias`` (``(m,)`` or ``(b, m)``) is added to the logits: the official mask-guided
    variant passes 0 for kept keys and the dtype's minimum for excluded ones. Reference only.
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * d ** -0.5
    if key_bias is not None:
        sim = sim + key_bias.reshape(-1, 1, 1, sim.shape[-1])
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    return out.transpose(1, 2).reshape(b, n, inner)


def check_rows(batch: int, chunks: int, source_index: int) -> int:
    """Latents per cond/uncond chunk of a MasaCtrl batch; ValueError when it has no target."""
    if chunks < 1 or batch % chunks:
        raise ValueError(f"batch of {batch} cannot be split into {chunks} cond/uncond chunks")
    per_chunk = batch // chunks
    if not 0 <= source_index < per_chunk:
        raise ValueError(f"source_index {source_index} is outside a latent batch of {per_chunk}")
    if per_chunk < 2:
        raise ValueError("the latent batch holds only the source: MasaCtrl needs at least one target")
    return per_chunk


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(m, H, W)`` masks to ``(m, height * width)`` token weights, nearest neighbour as in the official code."""
    resized = F.interpolate(mask[:, None].float(), size=(height, width), mode="nearest")
    return resized.flatten(1)


def region_biases(source_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive key biases ``(1, tokens)`` for the source foreground (mask > 0.5) and background.

    Excluded keys get the dtype's minimum, as the official code adds. A region with no key at
    all (an all-ones or all-zeros source mask) keeps every key, decided on the device.
    """
    fg = source_mask.reshape(1, -1) > 0.5
    bg = ~fg
    keep_fg = fg | ~fg.any()
    keep_bg = bg | ~bg.any()
    zero = torch.zeros((), dtype=dtype, device=source_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=source_mask.device)
    return torch.where(keep_fg, zero, low), torch.where(keep_bg, zero, low)


def _without_row(x: torch.Tensor, index: int) -> torch.Tensor:
    """``x`` (chunks, per_chunk, ...) without row ``index`` of dim 1: a view when it is the first or last."""
    if index == 0:
        return x[:, 1:]
    if index == x.shape[1] - 1:
        return x[:, :-1]
    return torch.cat([x[:, :index], x[:, index + 1:]], dim=1)


def mutual_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    chunks: int,
    source_index: int = 0,
    mode: str = "mutual",
    attention: AttentionFn = sdpa_attention,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    biases: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MasaCtrl self-attention for one layer.

    ``source_mask`` is ``(tokens,)`` and ``target_mask`` ``(1 or targets per chunk, tokens)``,
    already at this layer's resolution (see ``resize_mask``); both or neither are given.
    ``biases`` are ``region_biases(source_mask, q.dtype)`` when the caller has them already.
    A mask region with no key at all (an all-ones or all-zeros source mask) attends to every
    source key, so all-ones masks reduce exactly to plain mutual attention.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if (source_mask is None) != (target_mask is None):
        raise ValueError("mask-guided MasaCtrl needs both a source mask and a target mask")
    if source_mask is not None and mode != "mutual":
        raise ValueError("mask-guided MasaCtrl is defined for mode 'mutual' (paper Sec. 4.2)")
    batch, tokens, inner = q.shape
    per_chunk = check_rows(batch, chunks, source_index)
    n_targets = per_chunk - 1
    q4, k4, v4 = (t.reshape(chunks, per_chunk, tokens, inner) for t in (q, k, v))
    k_src, v_src = k4[:, source_index], v4[:, source_index]  # (chunks, tokens, inner), views

    # 1. The source keeps plain self-attention.
    out_src = attention(q4[:, source_index], k_src, v_src, heads)
    # Targets of one chunk are laid end to end as a single query sequence, so each chunk is
    # one attention call over its source's K/V and no K/V is copied per target.
    q_tgt = _without_row(q4, source_index).reshape(chunks, n_targets * tokens, inner)

    if mode == "union":
        # 2. Union variant: [K_s; K_t] and [V_s; V_t] along the sequence, per target.
        k_t, v_t = _without_row(k4, source_index), _without_row(v4, source_index)
        k_u = torch.cat([k_src[:, None].expand_as(k_t), k_t], dim=2).flatten(0, 1)
        v_u = torch.cat([v_src[:, None].expand_as(v_t), v_t], dim=2).flatten(0, 1)
        out_tgt = attention(q_tgt.reshape(chunks * n_targets, tokens, inner), k_u, v_u, heads)
    elif source_mask is None:
        # 2. Eq. 4: targets query the source's keys and values.
        out_tgt = attention(q_tgt, k_src, v_src, heads)
    else:
        # 3. Eq. 6-7: foreground from source foreground, background from source background.
        m_t = target_mask.to(q.dtype)
        if m_t.shape[0] == 1:
            m_t = m_t.expand(n_targets, -1)
        if m_t.shape != (n_targets, tokens):
            raise ValueError(f"target mask has {m_t.shape[0]} masks of {m_t.shape[1]} tokens; expected 1 "
                             f"or {n_targets} masks of {tokens} tokens")
        bias_fg, bias_bg = biases if biases is not None else region_biases(source_mask, q.dtype)
        out_fg = attention(q_tgt, k_src, v_src, heads, mask=bias_fg)
        out_bg = attention(q_tgt, k_src, v_src, heads, mask=bias_bg)
        blend = m_t.reshape(1, n_targets * tokens, 1)
        out_tgt = out_fg * blend + out_bg * (1 - blend)

    out_tgt = out_tgt.reshape(chunks, n_targets, tokens, inner)
    out = torch.cat([out_tgt[:, :source_index], out_src[:, None].to(out_tgt.dtype), out_tgt[:, source_index:]],
                    dim=1)
    return out.reshape(batch, tokens, inner)
