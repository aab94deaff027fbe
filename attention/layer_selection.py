"""Where a patch acts: the layers (UNet self-attention layers or MM-DiT blocks) and the step window.

One selector for every model family, so a number means one thing everywhere:

* ``LayerSelection``: ``start_layer`` .. ``end_layer`` (exclusive, -1 = to the last), or an explicit
  ``layers`` list, or a published set named by ``preset``. Layers are counted in execution order
  (UNet: down, mid, up; Flux: 19 double then 38 single blocks; SD3: its joint blocks).
* ``StepWindow``: steps ``start_step`` .. ``end_step`` (exclusive, -1 = to the last), counted from 0
  by the run's sigmas (``samplers/step_clock.py``).

Both are frozen, built and validated once at the node boundary; errors name the node and the input.
"""

from __future__ import annotations

from dataclasses import dataclass

# Published block sets for FLUX.1-dev (19 double + 38 single blocks, numbered as above).
# FreeFlux (Wei et al., 2025), non-rigid editing: its content-similarity-dependent layers, every step
# of 50 (editing/non_rigid/non_rigid.ipynb of the official code).
# Stable Flow (Avrahami et al., CVPR 2025): the vital layers its code injects in (the paper also names 2).
PRESETS: dict[str, tuple[int, ...]] = {
    "freeflux": (0, 7, 8, 9, 10, 18, 25, 28, 37, 42, 45, 50, 56),
    "stable_flow": (0, 1, 17, 18, 25, 28, 53, 54, 56),
}
PRESET_BLOCKS = 57  # both sets number FLUX.1's blocks


def _error(node: str, name: str, message: str) -> ValueError:
    return ValueError(f"{node}: input '{name}': {message}")


@dataclass(frozen=True)
class LayerSelection:
    """Which of a model's ``count`` layers a patch acts in."""

    start_layer: int = 0
    end_layer: int = -1
    layers: tuple[int, ...] = ()
    preset: str = ""

    @classmethod
    def from_text(cls, node: str, start_layer: int, end_layer: int, layers: str, parse) -> "LayerSelection":
        """From a node's inputs: ``layers`` is blank, a preset name (``freeflux``, ``stable_flow``) or a
        list read by ``parse(text)`` (the pack's one integer-list reader)."""
        name = layers.strip().lower() if isinstance(layers, str) else ""
        if name in PRESETS:
            return cls(start_layer, end_layer, (), name)
        return cls(start_layer, end_layer, tuple(parse(layers)), "")

    def indices(self, count: int, node: str, unit: str) -> tuple[int, ...]:
        """The selected layers of a model with ``count`` of them (``unit`` names one in errors:
        "self-attention layer", "block")."""
        family = unit + "s"
        if self.preset:
            if count != PRESET_BLOCKS:
                raise _error(node, "layers", f"{self.preset!r} is a published block set of FLUX.1 "
                             f"({PRESET_BLOCKS} blocks), but this model has {count} {family}; give a list instead.")
            return PRESETS[self.preset]
        if self.layers:
            past = sorted({i for i in self.layers if i >= count})
            if past:
                raise _error(node, "layers", f"{past} are past this model's {count} {family}; use 0 to {count - 1}.")
            return tuple(sorted(set(self.layers)))
        if self.start_layer > count:
            raise _error(node, "start_layer", f"{self.start_layer} is past this model's {count} {family}; use 0 to "
                         f"{count - 1}.")
        end = count if self.end_layer < 0 else self.end_layer
        if end > count:
            raise _error(node, "end_layer", f"{end} is past this model's {count} {family}; use at most {count}, "
                         "or -1 for the last.")
        if end <= self.start_layer and self.start_layer < count:
            raise _error(node, "end_layer", f"{end} leaves no {unit} after start_layer {self.start_layer}; use -1 or "
                         "a larger value.")
        return tuple(range(self.start_layer, end))

    def describe(self, selected: tuple[int, ...]) -> str:
        """For the log: ``'freeflux' (0,7,...)``, ``10-15`` or ``[10, 12]``."""
        if self.preset:
            return f"{self.preset!r} ({','.join(map(str, selected))})"
        if selected and list(selected) == list(range(selected[0], selected[-1] + 1)):
            return f"{selected[0]}-{selected[-1]}"
        return str(list(selected))


@dataclass(frozen=True)
class StepWindow:
    """Steps ``[start_step, end_step)`` of a run; ``end_step`` -1 = to the last step."""

    start_step: int = 0
    end_step: int = -1

    @classmethod
    def checked(cls, node: str, start_step: int, end_step: int) -> "StepWindow":
        if 0 <= end_step <= start_step:
            raise _error(node, "end_step", f"{end_step} leaves no step after start_step {start_step}; use -1 or a "
                         "larger value.")
        return cls(start_step, end_step)

    def end(self, steps: int) -> int:
        """The exclusive end in a run of ``steps`` steps."""
        return steps if self.end_step < 0 else min(self.end_step, steps)

    def contains(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step < 0 or step < self.end_step)
