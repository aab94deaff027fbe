"""Which step of a sampling run a model evaluation belongs to, known on the host.

Patches that act from a start step on (MasaCtrl and its relatives) need the step at every
attention layer. Reading it from the sigma of the call (``float(sigma)``, a comparison summed on
the device) stalls the host until the GPU drains, once per layer. A ``StepClock`` instead holds
the step as a Python int, advanced by the sampler's per-step callback, so no device tensor is
read in the hot path.

Step ``i`` of a run is its sigma interval ``(sigmas[i + 1], sigmas[i]]``: every evaluation a
k-diffusion sampler makes inside its loop iteration ``i`` (heun's second call included) comes
before ``callback({"i": i})``, so ``step = i + 1`` after that callback is exact. Samplers whose
evaluations do not line up with their callbacks (UniPC evaluates at the end of its step,
adaptive DPM chooses its own steps, unknown custom samplers) leave the clock "by sigma": the
step is then read from the sigma once per evaluation, not once per layer. A sampler that runs
its own loop over the run's levels (RePaint) sets ``step`` itself before each evaluation and
says so with a true ``drives_step_clock`` attribute.

The clock is per run: a wrapper of the sampler's ``sample`` puts a fresh one into that run's
``transformer_options`` (a copy the host makes for every run), so nothing survives a prompt.
"""

from __future__ import annotations

KEY = "consistent_synthesis.step_clock"

# k-diffusion samplers that evaluate only inside loop iteration i before callback i, but
# do not take the run's sigmas as given: they choose their own levels.
_UNALIGNED = frozenset({"sample_dpm_fast", "sample_dpm_adaptive"})


class StepClock:
    """The current step of one sampling run; ``step is None`` means "read it from the sigma"."""

    __slots__ = ("step", "by_sigma")

    def __init__(self, by_sigma: bool = False):
        self.by_sigma = by_sigma
        self.step: int | None = None if by_sigma else 0

    def __deepcopy__(self, memo):
        return self  # one clock per run, shared by every copy of that run's options

    def on_callback(self, i: int) -> None:
        """The sampler finished loop iteration ``i``: later evaluations belong to step ``i + 1``."""
        self.step = i + 1


def step_from_sigma(sample_sigmas, sigma) -> int:
    """Step of an evaluation at ``sigma``: the fallback, which reads device tensors (one sync)."""
    inner = sample_sigmas[1:-1].float()
    return int((inner >= float(sigma) * (1 - 1e-5)).sum())


def callback_aligned(sampler) -> bool:
    """Whether ``sampler`` (a ComfyUI KSAMPLER) makes step i's evaluations before its callback i."""
    function = getattr(sampler, "sampler_function", None)
    return (getattr(function, "__module__", "") == "comfy.k_diffusion.sampling"
            and getattr(function, "__name__", "") not in _UNALIGNED)


def install(transformer_options: dict, sampler, callback):
    """Give a run (its ``transformer_options``) a clock; returns the callback to hand the sampler.

    A clock already there (another of the pack's patches got there first) is kept.
    """
    clock = transformer_options.get(KEY)
    if clock is None:
        if getattr(sampler, "drives_step_clock", False):
            clock = StepClock()
        else:
            clock = StepClock(by_sigma=not callback_aligned(sampler))
        transformer_options[KEY] = clock
        if clock.by_sigma or getattr(sampler, "drives_step_clock", False):
            return callback

        def advance(step, x0, x, total_steps):
            clock.on_callback(step)
            if callback is not None:
                return callback(step, x0, x, total_steps)
        return advance
    return callback


def evaluation_started(transformer_options: dict, sigma) -> None:
    """Called once per model evaluation: a clock "by sigma" reads this evaluation's step (one sync)."""
    clock = transformer_options.get(KEY)
    if clock is not None and clock.by_sigma:
        sample_sigmas = transformer_options.get("sample_sigmas")
        clock.step = None if sample_sigmas is None else step_from_sigma(sample_sigmas, sigma.max())


def current_step(transformer_options: dict) -> int | None:
    """The step of this evaluation, from the run's clock; without a clock (a model called outside
    the pack's wrappers) from the sigma, a sync per call; None outside sampling."""
    clock = transformer_options.get(KEY)
    if clock is not None:
        return clock.step
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None:
        return None
    return step_from_sigma(sample_sigmas, sigmas.max())
