"""One sampling run's state, shared by every patch of the pack on the model.

A ``RunContext`` is made fresh for each run by the pack's one sampler wrapper (``nodes/run_context.py``)
and placed in that run's own ``transformer_options``, so nothing survives a prompt. It holds:

* ``clock``: the run's ``StepClock`` (``samplers/step_clock.py``), which step an evaluation belongs to;
* ``state(key, make)``: per-patch state that a patch computes once a run and reuses in every layer
  (resized masks, cross-attention maps, an inverted source's path), made on first use.

What never changes during a run (a patch's settings) is not kept here: closures and frozen
settings objects carry it.
"""

from __future__ import annotations

from typing import Any, Callable

KEY = "consistent_synthesis.run"


class RunContext:
    """The run's clock and the per-patch states, by key."""

    __slots__ = ("clock", "_states")

    def __init__(self):
        self.clock = None
        self._states: dict[Any, Any] = {}

    def __deepcopy__(self, memo):
        return self  # one context per run, shared by every copy the host makes of that run's options

    def state(self, key, make: Callable[[], Any]):
        """The state under ``key``, made by ``make()`` the first time it is asked for in this run."""
        found = self._states.get(key)
        if found is None:
            found = self._states[key] = make()
        return found

    def peek(self, key):
        """The state under ``key``, or None when no patch made it in this run."""
        return self._states.get(key)


def current(transformer_options: dict) -> RunContext | None:
    """The run context of the run these options belong to; None outside a wrapped run."""
    return transformer_options.get(KEY)
