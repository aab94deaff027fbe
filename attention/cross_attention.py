"""Cross-attention maps: where each prompt token lands in the image.

A UNet's cross-attention (attn2) lets every image position ``i`` (a query) attend over the
prompt's tokens ``j`` (the keys): ``A[i, j] = softmax_j(q_i . k_j / sqrt(d))``, one distribution
over the prompt per position and head. Averaged over heads, ``A[:, j]`` is token ``j``'s map.

The aggregation is that of the official MasaCtrl code (TencentARC/MasaCtrl,
``MutualSelfAttentionControlMaskAuto.aggregate_cross_attn_map``):

1. keep the head-averaged maps of the layers at one resolution (the official code keeps the
   16 x 16 maps at 512 px, i.e. latent/4; the pack uses latent/4 for every model),
2. average them over those layers,
3. sum the chosen tokens' maps,
4. min-max normalise each image's map to 0-1.

Pure torch; the ComfyUI side (which layers, which resolution, recording) is in
``nodes/cross_attention_maps.py``.
"""

from __future__ import annotations

import math

import torch

# At most this many float32 scores (batch x heads x queries x tokens) are held at once.
_SCORE_BUDGET = 1 << 26
# The maps are kept at latent/4; a latent side of at most 4 gives one row (or column) of them, and a
# 1 x 1 map cannot show where a word is (min-max makes it 0). 5 is the smallest side with 2 cells.
MAP_DOWNSCALE = 4
SMALLEST_LATENT_SIDE = MAP_DOWNSCALE + 1


def map_size(height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` of the latent/4 maps of a ``height x width`` latent.

    Each of the UNet's stride-2 downsamplings (3 x 3 convolution, padding 1) maps a side ``s`` to
    ``ceil(s / 2)``, so two of them give ``ceil(s / 4)``.
    """
    return -(-height // MAP_DOWNSCALE), -(-width // MAP_DOWNSCALE)


def maps_too_small(height: int, width: int) -> bool:
    """Whether a ``height x width`` latent's maps hold a single position (nothing can stand out)."""
    map_h, map_w = map_size(height, width)
    return map_h * map_w < 2


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Head-averaged cross-attention probabilities, ``(b, n, m)`` in float32.

    ``q`` is ``(b, n, heads * d)`` (image positions) and ``k`` is ``(b, m, heads * d)`` (prompt
    tokens), as an attn2 replacement receives them. Each row ``[b, i, :]`` is a probability
    distribution over the ``m`` prompt tokens. Heads are processed in chunks so at most
    ``_SCORE_BUDGET`` scores exist at once; no ``n x n`` matrix is ever formed.
    """
    b, n, inner = q.shape
    m = k.shape[1]
    d = inner // heads
    scale = d ** -0.5
    qh = q.reshape(b, n, heads, d).float()
    kh = k.reshape(k.shape[0], m, heads, d).float()
    chunk = max(1, min(heads, _SCORE_BUDGET // max(1, b * n * m)))
    total = None
    for start in range(0, heads, chunk):
        sim = torch.einsum("bnhd,bmhd->bhnm", qh[:, :, start:start + chunk], kh[:, :, start:start + chunk]) * scale
        part = sim.softmax(dim=-1).sum(dim=1)
        total = part if total is None else total + part
    return total / heads


def conditional_rows(maps: torch.Tensor, cond_or_uncond: list[int]) -> torch.Tensor | None:
    """The rows of the conditional chunk (``cond_or_uncond`` entry 0) of a call's ``(b, n, m)`` maps,
    or None for a call without one (an unconditional-only call of a split evaluation)."""
    if 0 not in cond_or_uncond:
        return None
    per_chunk = maps.shape[0] // len(cond_or_uncond)
    c = cond_or_uncond.index(0)
    return maps[c * per_chunk:(c + 1) * per_chunk]


def token_map(maps: list[torch.Tensor], selection: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The chosen tokens' map of each image, ``(b, height, width)``, min-max normalised to 0-1.

    ``maps``: the head-averaged maps ``(b, n, m)`` of the layers at one resolution, ``n ==
    height * width``. ``selection``: ``(b, m)``, 1 for the tokens chosen in that row, 0 elsewhere
    (each row may choose other tokens: a source prompt and a target prompt).

    Where an image's summed map is constant (max == min), nothing stands out: the result is 0
    everywhere. The official code divides 0 by 0 there and gets NaN, which its threshold
    (``> thres``) also reads as background; everywhere else the values are the official ones.
    """
    mean = torch.stack(maps, dim=1).mean(dim=1)  # 2. average over layers, (b, n, m)
    b, n, m = mean.shape
    if n != height * width:
        raise ValueError(f"the maps have {n} positions, not {height} x {width} = {height * width}")
    if tuple(selection.shape) != (b, m):
        raise ValueError(f"selection has shape {tuple(selection.shape)}, expected ({b}, {m})")
    # 3. sum of the chosen tokens (products by exact 0/1 and sums with exact zeros: the sum
    # of the chosen entries, without a matmul that could run in reduced precision)
    image = (mean * selection.to(mean)[:, None, :]).sum(dim=-1).reshape(b, height, width)
    # 4. min-max per image; a constant image gives (image - lo) == 0, divided by 1 instead of 0
    lo = image.amin(dim=(1, 2), keepdim=True)
    hi = image.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    return (image - lo) / torch.where(span > 0, span, torch.ones_like(span))


def selection(indices_per_row: list[list[int]], m: int, device=None) -> torch.Tensor:
    """A ``(len(indices_per_row), m)`` float32 0/1 matrix: 1 at each row's token indices.

    Built from Python values in one tensor constructor (no indexing with host-made index
    tensors). Indices must be in ``0..m-1``; check user input with ``check_token_indices``
    first to get an error that names the input.
    """
    rows = []
    for indices in indices_per_row:
        chosen = set(indices)
        bad = [i for i in chosen if not 0 <= i < m]
        if bad:
            raise ValueError(f"token indices {sorted(bad)} are outside 0..{m - 1}")
        rows.append([1.0 if j in chosen else 0.0 for j in range(m)])
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(rows), m)


def check_token_indices(indices: list[int], prompt_length: int, node: str, input_name: str,
                        prompt: str = "the prompt") -> None:
    """Every index must point into the prompt: ``0 <= i < prompt_length``. ``prompt`` says which
    prompt the error means ("the target prompt (batch row 1)")."""
    bad = [i for i in indices if not 0 <= i < prompt_length]
    if bad:
        raise ValueError(f"{node}: input '{input_name}': token indices {bad} are past {prompt}, which has "
                         f"{prompt_length} tokens (valid indices 0 to {prompt_length - 1}).")


def own_token_count(context: torch.Tensor) -> int:
    """The token count of the prompt a context row ``(tokens, width)`` was made from.

    Prompts of different lengths share a batch by repetition: each row is its own token sequence
    repeated up to the longest's length (their lcm, as ComfyUI batches prompts). The smallest
    ``p`` dividing the length whose first ``p`` tokens, repeated, give the whole row exactly, is
    that row's own length. (A prompt whose 77-token chunks are identical reads as one chunk; its
    later chunks repeat the first, so an index into them would read the same tokens anyway.)
    Compares values: once per sampling run, not per layer.
    """
    length = context.shape[0]
    for p in range(1, length):
        if length % p == 0 and torch.equal(context.reshape(length // p, p, -1),
                                           context[:p].expand(length // p, p, context.shape[-1])):
            return p
    return length


def repeat_to_common_length(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat each token sequence up to a common length (their lcm), as ComfyUI batches prompts.

    Repeating the whole key/value sequence leaves softmax cross-attention unchanged, so every
    prompt conditions its image exactly as it would alone. In the joint attention of Flux and
    SD3 it does not (the repeated text tokens are also queried by the image): there prompts of
    equal token count are exact, which short prompts are (T5 pads to 256 tokens for Flux, 77 for SD3).
    """
    length = math.lcm(*(t.shape[1] for t in tensors))
    return [t.repeat(1, length // t.shape[1], 1) for t in tensors]
