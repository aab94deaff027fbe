"""One ConsiStory run: which tokens each image lends at each step and layer grid, and the vanilla
queries (Tewel et al., SIGGRAPH 2024; official code ``NVlabs/consistory``). Pure torch.

The mechanism (SDSA, StoryDiffusion's token sharing, Otsu, the map window, dropout, query strengths)
is in ``shared_attention.py``; this module keeps what one sampling run of one patch accumulates:

* the cross-attention maps of the subject tokens (conditional rows, latent/4 grid, mean over heads;
  ``AttentionStore.__call__``), filed per step into an ``AttentionMapWindow`` of the last 20 steps;
* per step and layer grid, each image's subject mask after dropout (``keep``): computed on first
  use in a step from the maps of the steps before it (the official code aggregates after step ``i``
  and uses the mask from step ``i + 1``), drawn once per grid and step and shared by every layer,
  head and cond/uncond chunk, from the node's seed;
* the vanilla queries of the layers it acts in during the extra model call (``QueryStore``).

Everything is decided on the device; the host only reads shapes and its own step counter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layer_selection import StepWindow
from .shared_attention import (AttentionMapWindow, consistent_attention_coin, keep_masks, query_strength,
                               subject_masks, token_sharing_keep, token_sharing_rate)

SHARING = ("consistory", "storydiffusion")
# The official ``extend_kv_unet_parts``: "up" is ComfyUI's output blocks, "mid" its middle block,
# "down" its input blocks.
UNET_PARTS = {"up": ("output",), "mid+up": ("middle", "output"), "down+mid+up": ("input", "middle", "output")}
MASK_THRESHOLD = 0.5  # given subject masks: a token is the subject's where its nearest mask value is > 0.5


@dataclass(frozen=True, eq=False)
class ConsiStorySettings:
    """One patch's settings, built and validated once by the node (``eq=False``: a run keeps its
    state under the settings object itself).

    ``subject_tokens``: one tuple of prompt-token indices per image (or one for every image), each
    index a concept (the official ``concept_token`` list; their masks are OR-ed). ``subject_masks``:
    ``(1 or batch, H, W)`` masks that replace the automatic ones.
    """

    window: StepWindow
    layers: tuple[int, ...]
    anchors: int = 2
    mask_dropout: float = 0.5
    seed: int = 0
    share_queries: bool = True
    subject_tokens: tuple[tuple[int, ...], ...] = ()
    subject_masks: torch.Tensor | None = None
    sharing: str = "consistory"

    @property
    def automatic(self) -> bool:
        """Whether masks come from the cross-attention maps (ConsiStory without given masks)."""
        return self.sharing == "consistory" and self.subject_masks is None


def concept_table(subject_tokens: tuple[tuple[int, ...], ...], batch: int, device=None):
    """``(index, present)``, both ``(batch, concepts)``: image ``b``'s concept ``c`` is prompt token
    ``index[b, c]`` where ``present[b, c]`` (shorter lists are padded with absent concepts)."""
    rows = subject_tokens * batch if len(subject_tokens) == 1 else subject_tokens
    concepts = max(1, max(len(r) for r in rows))
    index = torch.zeros(batch, concepts, dtype=torch.long)
    present = torch.zeros(batch, concepts, dtype=torch.bool)
    for b, row in enumerate(rows):
        index[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        present[b, :len(row)] = True
    return index.to(device), present.to(device)


class ConsiStoryRun:
    """What one sampling run of one patch accumulates (see the module docstring)."""

    def __init__(self, settings: ConsiStorySettings, batch: int):
        self.settings = settings
        self.batch = batch
        self.step: int | None = None
        self.maps = AttentionMapWindow()
        self.keep: dict[tuple[int, int], torch.Tensor] = {}
        self.queries: dict = {}  # layer -> the vanilla call's query
        self.caching = False  # inside the vanilla call: record queries, share nothing, record no maps
        self.strength: float | None = None  # the vanilla queries' weight in the current call
        self._generator: torch.Generator | None = None
        self._table = None
        self._coins = random.Random(settings.seed)
        self._coin: dict = {}

    # -- steps ---------------------------------------------------------------------------------

    def begin(self, step: int | None) -> None:
        """A model call of ``step`` begins; a new step files the last one's maps. The vanilla
        queries are mixed in this call only once ``vanilla_done`` sets their weight."""
        if step != self.step:
            self.maps.end_step()
            self.step, self.keep, self._coin = step, {}, {}
        self.strength = None

    def wants_vanilla_call(self, steps: int) -> bool:
        s = self.settings
        return (s.share_queries and s.sharing == "consistory" and self.step is not None
                and s.window.contains(self.step) and query_strength(self.step, steps) is not None)

    def vanilla_done(self, steps: int) -> None:
        self.strength = query_strength(self.step, steps)

    def call_done(self) -> None:
        self.queries.clear()
        self.strength = None

    # -- cross-attention maps --------------------------------------------------------------------

    def record(self, probs: torch.Tensor) -> None:
        """One latent/4 cross-attention layer's conditional rows: ``(batch, tokens, prompt tokens)``
        head-averaged probabilities; the subject tokens' columns join this step's maps."""
        if self.caching:
            return  # the official vanilla call records nothing (record_attention=False)
        if self._table is None:
            self._table = concept_table(self.settings.subject_tokens, self.batch, probs.device)
        index, _ = self._table
        columns = probs.gather(2, index[:, None, :].expand(-1, probs.shape[1], -1))  # (b, n, concepts)
        self.maps.add(columns.transpose(1, 2))

    # -- the tokens each image lends ---------------------------------------------------------------

    def _generator_on(self, device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.settings.seed)
        return self._generator

    def _subject(self, height: int, width: int, map_size: tuple[int, int], device) -> torch.Tensor | None:
        s = self.settings
        if s.subject_masks is not None:
            masks = F.interpolate(s.subject_masks[:, None].to(device=device, dtype=torch.float32),
                                  size=(height, width), mode="nearest").flatten(1) > MASK_THRESHOLD
            return masks.expand(self.batch, -1)
        mean = self.maps.mean()
        if mean is None:
            return None  # no step filed yet: nothing to share (the official step 0)
        _, present = self._table
        concept_maps = mean.reshape(self.batch, -1, *map_size)
        return subject_masks(concept_maps, (height, width), present)

    def last_mask(self, height: int, width: int, map_size: tuple[int, int], device) -> torch.Tensor | None:
        """``(batch, height * width)`` bool subject masks before dropout from every map recorded so far,
        the last step's included: after a run, the official ``AttentionStore.last_mask`` (what feature
        injection reads). None: automatic masks and no map recorded."""
        self.maps.end_step()
        return self._subject(height, width, map_size, device)

    def lent(self, height: int, width: int, map_size: tuple[int, int], device) -> torch.Tensor | None:
        """``(batch, height * width)`` bool: the tokens each image lends in this step at this grid
        (subject tokens after dropout, or StoryDiffusion's random subset); None: share nothing."""
        key = (height, width)
        if key not in self.keep:
            s = self.settings
            generator = self._generator_on(device)
            if s.sharing == "storydiffusion":
                rate = token_sharing_rate(height * width, map_size[0] * 32, map_size[1] * 32)
                self.keep[key] = token_sharing_keep(self.batch, height * width, rate, generator, device)
            else:
                masks = self._subject(height, width, map_size, device)
                self.keep[key] = None if masks is None else self._anchor_dropout(masks, generator)
        return self.keep[key]

    def _anchor_dropout(self, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Dropout drawn for the anchors' rows only: only anchors lend (``extended_mapping``), so the
        other rows' draws would change nothing but the generator's position. Drawn so, the anchors
        lend the same tokens whatever the images after them: a setting added to a story changes no
        other image, and a cached run (``anchor_cache.py``) equals the batch run it stands for.
        Rows past the anchors keep their masks undropped (never read by SDSA)."""
        lenders = min(self.settings.anchors, self.batch)
        kept = keep_masks(masks[:lenders], self.settings.mask_dropout, generator)
        return torch.cat([kept, masks[lenders:].to(torch.bool)])

    def shares(self, layer) -> bool:
        """StoryDiffusion's per-call coin, one per layer and step (shared by the cond and uncond calls);
        ConsiStory shares in every active call."""
        if self.settings.sharing != "storydiffusion":
            return True
        if layer not in self._coin:
            self._coin[layer] = consistent_attention_coin(self.step or 0, self._coins)
        return self._coin[layer]
