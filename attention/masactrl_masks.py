"""The masks of mask-guided MasaCtrl (Sec. 4.2) at each layer's resolution, in pure torch.

Given masks are resized once per resolution and run. Automatic masks follow the official
``MutualSelfAttentionControlMaskAuto``: the conditional rows' cross-attention maps of one model
evaluation are averaged over the latent/4 layers recorded so far (``MaskState.add_maps``), the
chosen tokens' map of each row is min-max normalised (``cross_attention.token_map``), resized
nearest to the layer and thresholded. Everything stays on the device; nothing is read on the host.

The node (nodes/masactrl.py) keeps one ``MaskState`` per run and patch and hands these functions
what it reads from the host's ``extra_options``.
"""

from __future__ import annotations

import torch

from . import cross_attention, masactrl
from .masactrl import MasaCtrlSettings

# A mask may differ from the latent's aspect ratio by this fraction before it is refused.
ASPECT_TOLERANCE = 0.02


class MaskState:
    """What one sampling run of one patch computes once and reuses in every layer: the given
    masks as key biases per layer resolution, and the automatic masks' cross-attention maps."""

    def __init__(self):
        self.masks: dict = {}
        # automatic masks: the conditional rows' cross-attention maps of the current evaluation
        self.maps_sigmas = None  # the evaluation's sigmas tensor (held, so identity is safe)
        self.maps_sum: torch.Tensor | None = None  # (latents, tokens, prompt tokens), summed over layers
        self.maps_count = 0
        self.auto_masks: dict = {}
        self.selection: torch.Tensor | None = None  # (latents, prompt tokens): each row's chosen tokens

    def add_maps(self, rows: torch.Tensor, sigmas) -> None:
        if self.maps_sigmas is not sigmas:  # a new model evaluation: maps never carry over
            self.maps_sigmas, self.maps_sum, self.maps_count, self.auto_masks = sigmas, None, 0, {}
        rows = rows.float()
        self.maps_sum = rows.clone() if self.maps_sum is None else self.maps_sum + rows
        self.maps_count += 1
        self.auto_masks = {}

    def maps(self, sigmas) -> torch.Tensor | None:
        """The mean map over the layers recorded so far in this evaluation, or None."""
        if self.maps_sigmas is not sigmas or self.maps_count == 0:
            return None
        return self.maps_sum / self.maps_count


def given_masks(settings: MasaCtrlSettings, state: MaskState, h: int, w: int, device, dtype):
    """``(source, target, region biases)`` of the settings' masks at an ``h x w`` layer."""
    key = (h, w, device, dtype)
    if key not in state.masks:
        source = masactrl.resize_mask(settings.source_mask, h, w)[0].to(device, dtype)
        target = masactrl.resize_mask(settings.target_mask, h, w).to(device, dtype)
        state.masks[key] = (source, target, masactrl.region_biases(source, dtype))
    return state.masks[key]


def auto_masks(settings: MasaCtrlSettings, state: MaskState, sigmas, size: tuple[int, int],
               latent_size: tuple[int, int], dtype, node: str):
    """The official auto variant's ``(source, target, region biases)`` at an ``size = (h, w)`` layer of
    an evaluation at ``sigmas`` of a latent of ``latent_size``: the conditional source and target rows'
    token maps (latent/4, averaged over the layers so far), nearest-resized, thresholded. None before
    any map of this evaluation is recorded (plain mutual attention). ``node`` names a token index
    past the prompt."""
    maps = state.maps(sigmas)
    if maps is None:
        return None
    h, w = size
    key = (h, w, dtype)
    if key not in state.auto_masks:
        s = settings
        per_chunk, _, prompt = maps.shape
        for name in ("source_tokens", "target_tokens"):
            cross_attention.check_token_indices(getattr(s, name), prompt, node, name)
        if state.selection is None or state.selection.shape != (per_chunk, prompt):
            rows = [s.target_tokens] * per_chunk
            rows[s.source_index] = s.source_tokens
            state.selection = cross_attention.selection(rows, prompt, maps.device)
        map_h, map_w = cross_attention.map_size(*latent_size)
        token_maps = cross_attention.token_map([maps], state.selection, map_h, map_w)
        binary = (masactrl.resize_mask(token_maps, h, w) >= s.mask_threshold).to(dtype)
        source = binary[s.source_index]
        target = masactrl._without_row(binary[None], s.source_index)[0]
        state.auto_masks[key] = (source, target, masactrl.region_biases(source, dtype))
    return state.auto_masks[key]


def aspect_matches(mask_size: tuple[int, int], latent_size: tuple[int, int]) -> bool:
    """Whether a mask of ``(h, w)`` has the latent's aspect ratio, within ASPECT_TOLERANCE."""
    mh, mw = mask_size
    lh, lw = latent_size
    return abs(mh / mw - lh / lw) <= ASPECT_TOLERANCE * lh / lw


def check_tokens_against_prompts(settings: MasaCtrlSettings, batch: int, contexts, node: str) -> None:
    """Each token list must point into its own row's prompt. ``contexts``: the run's prompt tensors
    ``(rows, tokens, width)``. A batch repeats a shorter prompt up to the longest's length, so an index
    past the shorter prompt would silently read a repeated token; the maps alone cannot tell, the
    prompts can (once per run: compares values)."""
    source = settings.source_index
    for context in contexts:
        if context.shape[0] == batch:  # one prompt per image
            prompt_of = list(range(batch))
        elif context.shape[0] == 1:  # one prompt for every image
            prompt_of = [0] * batch
        elif context.shape[0] == 2 and source == 0:  # MasaCtrl Conditioning Batch: one target prompt for all
            prompt_of = [0] + [1] * (batch - 1)
        else:
            continue  # rows the host maps to the batch in its own way
        checked = set()
        for row, prompt in enumerate(prompt_of):
            name = "source_tokens" if row == source else "target_tokens"
            if (name, prompt) in checked:
                continue
            checked.add((name, prompt))
            own = cross_attention.own_token_count(context[prompt])
            which = "the source prompt" if row == source else f"the target prompt of batch row {row}"
            if own < context.shape[1]:
                which += f" (repeated to {context.shape[1]} tokens in the batch)"
            cross_attention.check_token_indices(getattr(settings, name), own, node, name, which)
