"""Which step of a sampling run a model evaluation belongs to, known on the host.

Patches that act from a start step on (MasaCtrl and its relatives) need the step at every
attention layer. Reading it from the sigma of the call (``float(sigma)``, a comparison summed on
the device) stalls the host until the GPU drains, once per layer. A ``StepClock`` instead holds
the step as a Python int, advanced by the sampler's per-step callback, so no device tensor is
read in the hot path.

Step ``i`` of a run is its sigma interval ``(sigmas[i + 1], sigmas[i]]``. A k-diffusion sampler
evaluates at ``sigmas[i]`` and then calls ``callback({"i": i})``, so after that callback the clock
says ``i + 1``: exact for samplers whose other evaluations sit at the next level (euler, heun,
dpmpp_2m, ...). Samplers with midpoint evaluations after the callback (dpm_2, dpmpp_2s_ancestral,
dpmpp_sde, ...) or evaluations two levels on (heunpp2) are within one step of the clock; where
that step of doubt crosses the edge of a patch's window, ``in_window`` reads this evaluation's
sigma once, and only there. Samplers whose evaluations do not follow their callbacks at all
(UniPC evaluates at the end of its step, adaptive DPM chooses its own steps, unknown custom
samplers) leave the clock "by sigma": the step is then read once per evaluation, not once per
layer. A sampler that runs its own loop over the run's levels (RePaint) sets ``step`` itself and
says so with a true ``drives_step_clock`` attribute.

The clock is per run: it lives in the run's ``RunContext`` (``samplers/run_context.py``), made
fresh for every run, so nothing survives a prompt.
"""

from __future__ import annotations

from . import run_context

# k-diffusion samplers that choose their own levels instead of the run's sigmas.
_UNALIGNED = frozenset({"sample_dpm_fast", "sample_dpm_adaptive"})
# k-diffusion samplers whose every evaluation is at sigmas[i] before callback i or at
# sigmas[i + 1] after it: the clock is exact for them.
_EXACT = frozenset({
    "sample_euler", "sample_euler_ancestral", "sample_euler_ancestral_RF", "sample_heun", "sample_lms",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_gpu", "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2m_sde_heun_gpu", "sample_dpmpp_3m_sde", "sample_dpmpp_3m_sde_gpu", "sample_lcm",
    "sample_ddpm", "sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_euler_cfg_pp",
    "sample_euler_ancestral_cfg_pp", "sample_dpmpp_2m_cfg_pp", "sample_res_multistep",
    "sample_res_multistep_cfg_pp", "sample_res_multistep_ancestral", "sample_res_multistep_ancestral_cfg_pp",
    "sample_gradient_estimation", "sample_gradient_estimation_cfg_pp", "sample_er_sde",
})


class StepClock:
    """The current step of one sampling run; ``step is None`` means "read it from the sigma"."""

    __slots__ = ("step", "by_sigma", "slack", "_sigmas", "_exact")

    def __init__(self, by_sigma: bool = False, slack: int = 0):
        self.by_sigma = by_sigma
        self.slack = slack  # how far the true step of an evaluation may be from ``step``
        self.step: int | None = None if by_sigma else 0
        self._sigmas = None  # the evaluation whose exact step was read (its sigmas tensor, held)
        self._exact: int | None = None

    def on_callback(self, i: int) -> None:
        """The sampler finished loop iteration ``i``: later evaluations belong to step ``i + 1``."""
        self.step = i + 1

    def set_step(self, step: int) -> None:
        """A sampler that runs its own loop over the run's levels (RePaint) says which step its next
        evaluations belong to; ignored once the clock reads steps from the sigma."""
        if not self.by_sigma:
            self.step = step

    def read_by_sigma(self) -> None:
        """From now on read each evaluation's step from its sigma (once per evaluation): for a driving
        sampler whose inner sampler's callbacks do not mark its steps."""
        self.by_sigma = True


def step_from_sigma(sample_sigmas, sigma) -> int:
    """Step of an evaluation at ``sigma``: the fallback, which reads device tensors (one sync)."""
    inner = sample_sigmas[1:-1].float()
    return int((inner >= float(sigma) * (1 - 1e-5)).sum())


def _exact_steps(sampler) -> bool:
    function = getattr(sampler, "sampler_function", None)
    return getattr(function, "__name__", "") in _EXACT


def callback_aligned(sampler) -> bool:
    """Whether ``sampler`` (a ComfyUI KSAMPLER) makes step i's evaluations before its callback i."""
    function = getattr(sampler, "sampler_function", None)
    return (getattr(function, "__module__", "") == "comfy.k_diffusion.sampling"
            and getattr(function, "__name__", "") not in _UNALIGNED)


def clock_of(transformer_options: dict) -> StepClock | None:
    """The run's clock (None outside a run of a patched model)."""
    context = run_context.current(transformer_options)
    return None if context is None else context.clock


def install(context: run_context.RunContext, sampler, callback):
    """Give a run (its context) a clock; returns the callback to hand the sampler.

    A clock already there (the run's sampler was entered before) is kept.
    """
    clock = context.clock
    if clock is None:
        if getattr(sampler, "drives_step_clock", False):
            clock = StepClock(slack=1)  # its inner sampler's steps are marked as above
        else:
            clock = StepClock(by_sigma=not callback_aligned(sampler), slack=0 if _exact_steps(sampler) else 1)
        context.clock = clock
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
    clock = clock_of(transformer_options)
    if clock is not None and clock.by_sigma:
        sample_sigmas = transformer_options.get("sample_sigmas")
        clock.step = None if sample_sigmas is None else step_from_sigma(sample_sigmas, sigma.max())


def in_window(transformer_options: dict, window) -> bool:
    """Whether this evaluation's step is in ``window`` (a ``StepWindow``: ``[start_step, end_step)``,
    ``end_step < 0``: to the last step).

    Decided from the clock on the host; the sigma is read (once per evaluation) only when the
    clock's step of doubt straddles an edge of the window. False outside sampling.
    """
    start, end = window.start_step, window.end_step
    clock = clock_of(transformer_options)
    sample_sigmas = transformer_options.get("sample_sigmas")
    if clock is not None and clock.step is not None and clock.slack and not clock.by_sigma \
            and sample_sigmas is not None:
        last = sample_sigmas.shape[-1] - 2  # host-side shape: the run's last step
        candidates = {min(max(clock.step + d, 0), last) for d in range(-clock.slack, clock.slack + 1)}
        inside = {start <= c and (end < 0 or c < end) for c in candidates}
        if len(inside) == 1:
            return inside.pop()
        sigmas = transformer_options.get("sigmas")
        if clock._sigmas is not sigmas:
            clock._sigmas, clock._exact = sigmas, step_from_sigma(sample_sigmas, sigmas.max())
        step = clock._exact
    else:
        step = current_step(transformer_options)
    return step is not None and start <= step and (end < 0 or step < end)


def current_step(transformer_options: dict) -> int | None:
    """The step of this evaluation, from the run's clock; without a clock (a model called outside
    the pack's wrappers) from the sigma, a sync per call; None outside sampling."""
    clock = clock_of(transformer_options)
    if clock is not None:
        return clock.step
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None:
        return None
    return step_from_sigma(sample_sigmas, sigmas.max())
