"""Attach the run's StepClock (samplers/step_clock.py) to a patched model through the host's wrappers."""

from __future__ import annotations

import comfy.patcher_extension

from ..samplers import step_clock

WRAPPER_KEY = "consistent_synthesis.step_clock"


def _sampler_sample(executor, *args, **kwargs):
    # sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
    args = list(args)
    options = args[2]["model_options"].setdefault("transformer_options", {})
    args[3] = step_clock.install(options, executor.class_obj, args[3])
    return executor(*args, **kwargs)


def _apply_model(executor, x, t, *args, **kwargs):
    # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)
    options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
    step_clock.evaluation_started(options, t)
    return executor(x, t, *args, **kwargs)


def attach(model_patcher) -> None:
    """Give every sampling run of ``model_patcher`` (a clone the caller owns) a step clock.

    Registered under one key, so several of the pack's patches on the same model share one clock.
    """
    wrappers = model_patcher.wrappers
    for wrapper_type, fn in ((comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, _sampler_sample),
                             (comfy.patcher_extension.WrappersMP.APPLY_MODEL, _apply_model)):
        if fn not in wrappers.get(wrapper_type, {}).get(WRAPPER_KEY, []):
            model_patcher.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
