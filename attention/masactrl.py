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
  The official code adds -inf to the excluded logits, which equals attending over the key
  subset; attending over the subset avoids building the N x N logit matrix.

Tensors are laid out as ComfyUI hands them to an attn1 patch: ``(batch, tokens, heads * dim_head)``
with the batch split into ``chunks`` equal chunks (one per ``cond_or_uncond`` entry), each
chunk holding the whole latent batch in order, the source at ``source_index`` of every chunk.
The attention itself is done by ``attention(q, k, v, heads)`` (ComfyUI's optimized attention
in the node; ``sdpa_attention`` here), which never materializes the attention matrix.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

MODES = ("mutual", "union")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention on ``(b, n, heads * d)`` tensors with PyTorch SDPA."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
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


def sampling_step(sample_sigmas: torch.Tensor, sigma: float) -> int:
    """The step of a run that a model call at ``sigma`` belongs to.

    Step ``i`` covers the noise levels in ``(sample_sigmas[i + 1], sample_sigmas[i]]``, so the
    extra evaluations of heun-like samplers and the truncated schedules of ``denoise < 1``
    count by the run's own steps, not by calls (the official code counts calls).
    """
    inner = sample_sigmas[1:-1].float()
    return int((inner >= float(sigma) * (1 - 1e-5)).sum())


def split_rows(batch: int, chunks: int, source_index: int) -> tuple[list[int], list[int]]:
    """Row indices of the sources (one per chunk) and of the targets (chunk-major order)."""
    if chunks < 1 or batch % chunks:
        raise ValueError(f"batch of {batch} cannot be split into {chunks} cond/uncond chunks")
    per_chunk = batch // chunks
    if not 0 <= source_index < per_chunk:
        raise ValueError(f"source_index {source_index} is outside a latent batch of {per_chunk}")
    if per_chunk < 2:
        raise ValueError("the latent batch holds only the source: MasaCtrl needs at least one target")
    sources = [c * per_chunk + source_index for c in range(chunks)]
    targets = [c * per_chunk + i for c in range(chunks) for i in range(per_chunk) if i != source_index]
    return sources, targets


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(m, H, W)`` masks to ``(m, height * width)`` token weights, nearest neighbour as in the official code."""
    resized = F.interpolate(mask[:, None].float(), size=(height, width), mode="nearest")
    return resized.flatten(1)


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
) -> torch.Tensor:
    """MasaCtrl self-attention for one layer.

    ``source_mask`` is ``(tokens,)`` and ``target_mask`` ``(1 or targets per chunk, tokens)``,
    already at this layer's resolution (see ``resize_mask``); both or neither are given.
    A mask region with no key at all (an all-ones or all-zeros source mask) attends to every
    source key, so all-ones masks reduce exactly to plain mutual attention.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if (source_mask is None) != (target_mask is None):
        raise ValueError("mask-guided MasaCtrl needs both a source mask and a target mask")
    if source_mask is not None and mode != "mutual":
        raise ValueError("mask-guided MasaCtrl is defined for mode 'mutual' (paper Sec. 4.2)")
    sources, targets = split_rows(q.shape[0], chunks, source_index)
    per_chunk_targets = len(targets) // chunks
    tokens, inner = q.shape[1], q.shape[2]

    out = torch.empty_like(q)
    # 1. The source keeps plain self-attention.
    out[sources] = attention(q[sources], k[sources], v[sources], heads)

    k_src, v_src = k[sources], v[sources]  # (chunks, tokens, inner)
    # Targets of one chunk are laid end to end as a single query sequence, so each chunk is
    # one attention call over its source's K/V and no K/V is copied per target.
    q_tgt = q[targets].reshape(chunks, per_chunk_targets * tokens, inner)

    def over_source(keep: torch.Tensor | None = None) -> torch.Tensor:
        k_, v_ = k_src, v_src
        if keep is not None and bool(keep.any()) and not bool(keep.all()):
            k_, v_ = k_src[:, keep], v_src[:, keep]
        return attention(q_tgt, k_, v_, heads).reshape(len(targets), tokens, inner)

    if mode == "union":
        # 2. Union variant: [K_s; K_t] and [V_s; V_t] along the sequence, per target.
        k_s = k_src.repeat_interleave(per_chunk_targets, dim=0)
        v_s = v_src.repeat_interleave(per_chunk_targets, dim=0)
        out[targets] = attention(q[targets], torch.cat([k_s, k[targets]], dim=1),
                                 torch.cat([v_s, v[targets]], dim=1), heads)
        return out
    if source_mask is None:
        # 2. Eq. 4: targets query the source's keys and values.
        out[targets] = over_source()
        return out

    # 3. Eq. 6-7: foreground from source foreground, background from source background.
    fg = source_mask > 0.5
    m_t = target_mask.to(q.dtype)
    if m_t.shape[0] == 1:
        m_t = m_t.expand(per_chunk_targets, -1)
    if m_t.shape != (per_chunk_targets, tokens):
        raise ValueError(f"target mask has {m_t.shape[0]} masks of {m_t.shape[1]} tokens; expected 1 "
                         f"or {per_chunk_targets} masks of {tokens} tokens")
    blend = m_t.repeat(chunks, 1)[..., None]  # (targets, tokens, 1)
    out_fg = over_source(fg)
    out_bg = over_source(~fg)
    out[targets] = out_fg * blend + out_bg * (1 - blend)
    return out
