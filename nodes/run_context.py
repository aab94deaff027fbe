"""The pack's one sampler wrapper: a fresh RunContext (samplers/run_context.py) for every run of a
patched model, with the run's StepClock (samplers/step_clock.py).

Three hooks under one key, so several of the pack's patches on one model share one context:

* OUTER_SAMPLE, once a run: puts a fresh context into the run's own ``transformer_options`` (the
  guider's copy) and takes it out when the run ends, even on an error or an interrupt;
* SAMPLER_SAMPLE: gives the context the clock for the run's sampler, and the sampler the callback
  that advances it;
* APPLY_MODEL, every model call: a clock that reads steps from the sigma reads it here, once.

A patch whose own OUTER_SAMPLE wrapper runs outside this one (registered earlier) opens the
context itself with ``opened``; the one that made it removes it.
"""

from __future__ import annotations

from contextlib import contextmanager

import comfy.patcher_extension

from ..samplers import run_context, step_clock

WRAPPER_KEY = run_context.KEY


@contextmanager
def opened(transformer_options: dict):
    """The run's context, made (and removed on exit) here unless the run already has one."""
    context = run_context.current(transformer_options)
    if context is not None:
        yield context
        return
    context = transformer_options[run_context.KEY] = run_context.RunContext()
    try:
        yield context
    finally:
        transformer_options.pop(run_context.KEY, None)


def _outer_sample(executor, *args, **kwargs):
    options = executor.class_obj.model_options.setdefault("transformer_options", {})
    with opened(options):
        return executor(*args, **kwargs)


def _sampler_sample(executor, *args, **kwargs):
    # sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
    args = list(args)
    context = run_context.current(args[2]["model_options"].get("transformer_options", {}))
    if context is not None:
        args[3] = step_clock.install(context, executor.class_obj, args[3])
    return executor(*args, **kwargs)


def _apply_model(executor, x, t, *args, **kwargs):
    # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)
    options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
    step_clock.evaluation_started(options, t)
    return executor(x, t, *args, **kwargs)


def attach(model_patcher) -> None:
    """Give every sampling run of ``model_patcher`` (a clone the caller owns) a run context."""
    wrappers = model_patcher.wrappers
    for wrapper_type, fn in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, _outer_sample),
                             (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, _sampler_sample),
                             (comfy.patcher_extension.WrappersMP.APPLY_MODEL, _apply_model)):
        if fn not in wrappers.get(wrapper_type, {}).get(WRAPPER_KEY, []):
            model_patcher.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
