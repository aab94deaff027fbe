"""RePaintSampler and RePaintKSampler: RePaint resampling around any ComfyUI sampler."""

from __future__ import annotations

import logging
import sys

import torch

import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..samplers import repaint, step_clock
from . import checks, host_compat

NO_MASK = ("the latent has no noise_mask, so RePaint has nothing to keep. Add one with Set Latent Noise "
           "Mask, VAE Encode (for Inpainting) or Pose Edit Outpaint (mask: 1 = generate, 0 = keep).")

JUMP_TOOLTIPS = {
    "jump_length": "Levels the sampler jumps back at each resampling point (paper: 10). Counted in steps of "
                   "this run.",
    "jump_n_sample": "Times each stretch is denoised (paper: 10). 1 = no resampling: plain masked sampling "
                     "with the known region re-noised afresh each step. Cost grows about linearly.",
    "resample_start": "Start of the resampling window as a fraction of the run (0 = the noisiest step). "
                      "Jumps outside the window are skipped, so the extra evaluations go where they help.",
    "resample_end": "End of the resampling window as a fraction of the run (1 = the last step).",
}


def check_mask_aspect(node: str, mask_shape, latent_shape) -> None:
    """Refuse a noise_mask whose aspect ratio is not the latent's (``repaint.mask_fits_latent``): the
    host would stretch it over the latent."""
    if repaint.mask_fits_latent(mask_shape[-2:], latent_shape[-2:]):
        return
    mask_h, mask_w = (int(n) for n in mask_shape[-2:])
    latent_h, latent_w = (int(n) for n in latent_shape[-2:])
    raise checks.error(node, "latent_image", (
        f"its noise_mask has shape {tuple(mask_shape)} ({mask_w}x{mask_h}), the latent {tuple(latent_shape)} "
        f"({latent_w}x{latent_h}): the aspect ratios differ, so the mask would be stretched over the image. "
        f"Give a mask of the image's size (for SD, SDXL and Flux {8 * latent_w}x{8 * latent_h}) or the latent's "
        f"({latent_w}x{latent_h}): crop or pad it to the image before Set Latent Noise Mask."))


def _mask_given_to_guider(sampler) -> torch.Tensor | None:
    """The noise_mask as SamplerCustom / SamplerCustomAdvanced handed it to the guider, before the host
    resized it to the latent (a SAMPLER only ever receives the resized one): read from the caller's frame
    of ``CFGGuider.sample`` that runs ``sampler``. None where the host calls the sampler another way."""
    code = getattr(getattr(comfy.samplers.CFGGuider, "sample", None), "__code__", None)
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return None
        if frame.f_code is code:
            if frame.f_locals.get("sampler") is not sampler:
                return None
            mask = frame.f_locals.get("denoise_mask")
            return mask if isinstance(mask, torch.Tensor) else None
        frame = frame.f_back
    return None


def known_region_process(sampler, model_wrap, latent_image, denoise_mask, why: str,
                         no_mask: str = NO_MASK) -> tuple[bool, float]:
    """What every inpainting SAMPLER checks before its first step (a noise_mask, with the aspect the user
    gave it) and the model's forward process it re-noises the known region with: ``(flow, noise_scale)``.
    ``why`` starts the error for a model without a usable forward process (``{sampling}`` names its
    type); ``no_mask`` is the error for a latent without a noise_mask."""
    if denoise_mask is None:
        raise checks.error(sampler.node, "latent_image", no_mask)
    given = _mask_given_to_guider(sampler)
    if given is not None:
        check_mask_aspect(sampler.node, given.shape, latent_image.shape)
    model_sampling = model_wrap.inner_model.model_sampling
    try:
        return repaint.forward_process(model_sampling.noise_scaling)
    except ValueError as e:
        raise checks.error(sampler.node, "model", f"{why.format(sampling=type(model_sampling).__name__)}, but {e}. "
                           "Use a text-to-image model (SD1.x, SD2.x, SDXL, SD3, Flux, ...).") from None


def on_device_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Numbers drawn on the CPU (the same on every device), copied to ``like``'s device and dtype without
    waiting for the device."""
    if like.device.type == "cuda":
        return values.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return values.to(like)


class _KnownRegionDenoiser:
    """The model a k-diffusion sampler calls: the known region is a fresh draw from q(x_t | x_0)
    before every evaluation (paper Eq. 8), and the denoised known region is the known latent."""

    def __init__(self, model_wrap, latent, sigmas, noise, flow, noise_scale, on_evaluation):
        self.inner_model = model_wrap  # samplers read model.inner_model.inner_model.model_sampling
        self.latent = latent
        self.sigmas = sigmas
        self.noise = noise
        self.flow = flow
        self.noise_scale = noise_scale
        self.on_evaluation = on_evaluation

    def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None):
        mask = denoise_mask
        if "denoise_mask_function" in model_options:
            mask = model_options["denoise_mask_function"](
                sigma, mask, extra_options={"model": self.inner_model, "sigmas": self.sigmas})
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        x = repaint.blend_known(x, self.latent, mask, s, self.noise(), self.flow, self.noise_scale)
        out = self.inner_model(x, sigma, model_options=model_options, seed=seed)
        out = out * mask + self.latent * (1.0 - mask)
        self.on_evaluation(out, x)
        return out


class RePaint(comfy.samplers.Sampler):
    """A SAMPLER that runs an inner k-diffusion sampler along the RePaint jump schedule.

    ``renoise="fixed"`` re-blends the known region with the run's initial noise instead of fresh
    noise, as ComfyUI's masked sampling does (for comparisons and tests).

    It runs its own loop over the run's noise levels, so it tells the run's step clock
    (samplers/step_clock.py) which level each evaluation belongs to, with no device read.
    """

    drives_step_clock = True

    def __init__(self, inner, jump_length: int = 10, jump_n_sample: int = 10, resample_start: float = 0.0,
                 resample_end: float = 1.0, renoise: str = "fresh", node: str = "RePaintSampler"):
        if not hasattr(inner, "sampler_function"):
            raise checks.error(node, "sampler", f"{type(inner).__name__} is not a k-diffusion sampler "
                               "(KSamplerSelect and the other SAMPLER nodes of ComfyUI give one).")
        if not 0.0 <= resample_start < resample_end <= 1.0:
            raise ValueError(f"{node}: inputs 'resample_start'/'resample_end': need 0 <= start < end <= 1, got "
                             f"{resample_start} and {resample_end}.")
        self.inner = inner
        self.jump_length = jump_length
        self.jump_n_sample = jump_n_sample
        self.window = (resample_start, resample_end)
        self.renoise = renoise
        self.node = node

    def schedule(self, steps: int) -> list[int]:
        return repaint.jump_schedule(steps, self.jump_length, self.jump_n_sample, *self.window)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        flow, noise_scale = known_region_process(
            self, model_wrap, latent_image, denoise_mask,
            "RePaint re-noises the known region the way the model's sampling type ({sampling}) noises a latent")
        model_sampling = model_wrap.inner_model.model_sampling
        steps = len(sigmas) - 1
        schedule = self.schedule(steps)
        denoise_steps = repaint.model_steps(schedule)
        seed = extra_args.get("seed") or 0
        extra_args = dict(extra_args, denoise_mask=denoise_mask)

        if self.renoise == "fixed":
            def fresh_noise():
                return noise
        else:
            generator = torch.Generator(device="cpu").manual_seed((seed + 1) % 2**64)

            def fresh_noise():
                return on_device_of(torch.randn(noise.shape, generator=generator, dtype=torch.float32), noise)

        counter = {"evaluations": 0, "steps_done": 0, "evaluations_done": 0}

        def on_evaluation(denoised, x):
            counter["evaluations"] += 1
            if callback is not None:
                evals = counter["evaluations"]
                # evaluations a step costs (2 for heun), known once a segment has finished
                done = counter["steps_done"]
                per_step = counter["evaluations_done"] / done if done else 1.0
                total = max(round(denoise_steps * per_step), evals)
                callback(evals - 1, denoised, x, total)

        denoiser = _KnownRegionDenoiser(model_wrap, latent_image, sigmas, fresh_noise, flow, noise_scale,
                                        on_evaluation)
        inner = self.inner
        clock = step_clock.clock_of(extra_args.get("model_options", {}).get("transformer_options", {}))
        if clock is not None and not step_clock.callback_aligned(inner):
            clock.read_by_sigma()  # the inner sampler's callbacks do not mark its steps
        runs = repaint.segments(schedule)

        def denoise_segment(x, segment_sigmas, number):
            # ancestral and SDE samplers seed their noise from extra_args: a new stream per segment
            # (seed + number * an odd constant, mod 2**64: in the seed range, never the fresh noise's seed + 1)
            args = dict(extra_args, seed=(seed + number * 0x9E3779B97F4A7C15) % 2**64) if number else extra_args
            step_callback = None
            if clock is not None and not clock.by_sigma:
                begin = runs[number][0]
                clock.set_step(begin)  # the segment's iteration i evaluates at level begin + i

                def step_callback(info):
                    clock.set_step(begin + info["i"] + 1)
            x = inner.sampler_function(denoiser, x, segment_sigmas, extra_args=args, callback=step_callback,
                                       disable=True, **inner.extra_options)
            counter["steps_done"] += len(segment_sigmas) - 1
            counter["evaluations_done"] = counter["evaluations"]
            return x

        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        x = repaint.repaint(denoise_segment, x, sigmas, schedule, fresh_noise, flow, noise_scale)
        # the known region at the last level, exact (the latent itself when the run ends at sigma 0)
        x = repaint.blend_known(x, latent_image, denoise_mask, sigmas[-1], fresh_noise(), flow, noise_scale)
        logging.info("%s: %d model evaluations for %d steps (jump_length %d, jump_n_sample %d).", self.node,
                     counter["evaluations"], steps, self.jump_length, self.jump_n_sample)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)


def _jump_inputs() -> list:
    return [
        io.Int.Input("jump_length", default=10, min=1, max=1000, tooltip=JUMP_TOOLTIPS["jump_length"]),
        io.Int.Input("jump_n_sample", default=10, min=1, max=100, tooltip=JUMP_TOOLTIPS["jump_n_sample"]),
        io.Float.Input("resample_start", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip=JUMP_TOOLTIPS["resample_start"]),
        io.Float.Input("resample_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip=JUMP_TOOLTIPS["resample_end"]),
    ]


class RePaintSampler(io.ComfyNode):
    """Wraps a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RePaintSampler",
            display_name="RePaint Sampler",
            category="consistent synthesis/RePaint",
            description=("RePaint resampling (Lugmayr et al., CVPR 2022) around any sampler: the known region "
                         "of the latent's noise_mask is re-noised afresh before every step, and the sampler "
                         "jumps back jump_length steps, jump_n_sample times, so new content harmonises with "
                         "the old. Works with any model, no inpainting checkpoint needed."),
            inputs=[io.Sampler.Input("sampler", tooltip="The sampler to run between jumps (euler, dpmpp_2m, "
                                     "euler_ancestral, ...), e.g. from KSamplerSelect.")] + _jump_inputs(),
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom or SamplerCustomAdvanced; the "
                                       "latent must carry a noise_mask.")],
        )

    @classmethod
    def execute(cls, sampler, jump_length, jump_n_sample, resample_start, resample_end) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(RePaint(sampler, jump_length, jump_n_sample, resample_start, resample_end))


def repaint_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                     denoise=1.0, jump_length=10, jump_n_sample=10, resample_start=0.0, resample_end=1.0,
                     renoise="fresh", node="RePaintKSampler") -> dict:
    """KSampler with RePaint; the known region of the result is the input latent, bit for bit."""
    if latent_image.get("noise_mask") is None:
        raise checks.error(node, "latent_image", NO_MASK)
    original = latent_image["samples"]
    check_mask_aspect(node, latent_image["noise_mask"].shape, original.shape)
    latent = host_compat.fix_empty_latent_channels(model, latent_image)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    sampler = RePaint(comfy.samplers.sampler_object(sampler_name), jump_length, jump_n_sample, resample_start,
                      resample_end, renoise, node)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
    if len(sigmas) < 2:
        return latent_image.copy()
    mask = latent_image["noise_mask"]
    callback = latent_preview.prepare_callback(model, repaint.model_steps(sampler.schedule(len(sigmas) - 1)))
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                         noise_mask=mask, callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    if samples.shape == original.shape:
        keep = comfy.sampler_helpers.prepare_mask(mask, samples.shape, samples.device)
        samples = samples * keep + original.to(samples) * (1.0 - keep)  # VAE-space rounding undone
    return host_compat.sampled_latent(latent_image, samples)


class RePaintKSampler(io.ComfyNode):
    """KSampler's inputs plus RePaint's jump schedule."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RePaintKSampler",
            display_name="RePaint KSampler",
            category="consistent synthesis/RePaint",
            description=("Inpaints or outpaints where the latent's noise_mask is 1 with RePaint resampling "
                         "(Lugmayr et al., CVPR 2022), with any checkpoint. Evaluations: about jump_n_sample "
                         "times the steps inside the resampling window."),
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of RePaint's fresh noise."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Denoising steps of the schedule."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Sampler run between jumps."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Noise schedule of the steps."),
                io.Conditioning.Input("positive", tooltip="What to generate in the masked area."),
                io.Conditioning.Input("negative", tooltip="What to avoid."),
                io.Latent.Input("latent_image", tooltip=(
                    "The image to complete, with a noise_mask (1 = generate, 0 = keep) from Set Latent Noise "
                    "Mask, VAE Encode (for Inpainting) or Pose Edit Outpaint.")),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run, as in KSampler."),
            ] + _jump_inputs(),
            outputs=[io.Latent.Output(tooltip="The completed latent; the known region is the input's, exactly.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None):
        # ComfyUI 0.3.x does not check a V3 combo's value itself; unknown names are refused here, at queue time
        for name, value, options in (("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
                                     ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)):
            problem = checks.combo_problem("RePaintKSampler", name, value, options)
            if problem:
                return problem
        return True

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, jump_length, jump_n_sample, resample_start, resample_end) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(repaint_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image, denoise, jump_length, jump_n_sample, resample_start,
                                              resample_end))
