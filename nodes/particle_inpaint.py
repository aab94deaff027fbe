"""ParticleInpaintSampler and ParticleInpaintKSampler: SMCDiff particle inpainting (samplers/particle_inpaint.py)."""

from __future__ import annotations

import logging

import torch

import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..samplers import particle_inpaint as smc
from . import checks, host_compat
from .repaint import check_mask_aspect, known_region_process, on_device_of

NO_MASK = ("the latent has no noise_mask, so there is no known region to weight the particles by. Add one with "
           "Set Latent Noise Mask, VAE Encode (for Inpainting) or Pose Edit Outpaint (mask: 1 = generate, "
           "0 = keep).")
NO_TWISTED = ("twisted proposals (TDS) are not available in this version: they need a gradient through the model, "
              "and ComfyUI runs nodes under torch.inference_mode and loads the weights as inference tensors, which "
              "cannot be used for a backward pass. Turn 'twisted' off; the gradient-free weights give the same "
              "asymptotic answer with more particles.")

TOOLTIPS = {
    "particles": f"Particles per latent (1 to {smc.MAX_PARTICLES}), run as one model batch: each step evaluates the "
                 "model on particles x batch rows. More particles: closer to the exact conditional (the "
                 "generated region agrees with what the known region implies), at particles times the "
                 "evaluations. 1 = plain masked ancestral sampling.",
    "resample_threshold": "Effective sample size, as a fraction of the particles, under which the particles are "
                          "resampled during the run (only at steps that end under resample_below). 0 = no "
                          "resampling during the run, only the final weighted draw: the safe choice when the "
                          "generated region must commit to a choice (a pose, an object) before the known region "
                          "can tell choices apart. Raise it (0.5) for long runs (100+ steps), where the weights "
                          "otherwise pile onto one particle.",
    "resample_below": "In-run resampling only at steps that end under this noise level (sigma). Weights from "
                      "high noise levels mostly measure noise; resampling on them throws away particles at random. "
                      "1.0 suits SD-family latents.",
    "sampler_name": "The step each particle takes: euler_ancestral (the host's step, eta 1) or ddpm (the exact "
                    "posterior of the forward process; the same as euler_ancestral for SD-family models). Only "
                    "noisy steps have a density to weight the particles by.",
    "twisted": "Twisted proposals (TDS, Wu et al. 2023): not available in this version (ComfyUI's inference mode "
               "allows no gradient through the model); on is refused with an explanation.",
    "seed": "Seed of the particles' randomness (their extra initial noise, every step's noise, the known region's "
            "noised trajectory, the resampling and the final draw). SamplerCustom's noise seed gives particle 0's "
            "initial noise.",
}


class ParticleInpaint(comfy.samplers.Sampler):
    """A SAMPLER that runs SMCDiff on the latent's noise_mask (1 = generate; binarised at 0.5).

    The model is called without the host's denoise-mask blending (``model_wrap`` is the CFG guider), so
    the prediction on the known region is the model's own: every weight depends on it. ``outputs``, when
    given (a dict), receives the run's ``Result`` with the particles in the host's latent space.
    """

    def __init__(self, settings: smc.Settings, seed: int, node: str = "ParticleInpaintSampler",
                 outputs: dict | None = None):
        self.settings = settings
        self.seed = seed
        self.node = node
        self.outputs = outputs

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        flow, noise_scale = known_region_process(
            self, model_wrap, latent_image, denoise_mask,
            "the particles' weights use the model's forward process ({sampling})", NO_MASK)
        model_sampling = model_wrap.inner_model.model_sampling
        count, latents = self.settings.particles, noise.shape[0]
        checks.elements(self.node, "particles", count * noise.numel(), "the particles (particles x latent batch)")
        generator = torch.Generator(device="cpu").manual_seed(self.seed % 2**64)

        def normal(shape):
            return on_device_of(torch.randn(shape, generator=generator, dtype=torch.float32), noise)

        def uniform(shape):
            return on_device_of(torch.rand(shape, generator=generator, dtype=torch.float32), noise)

        more = normal(((count - 1) * latents,) + tuple(noise.shape[1:])) if count > 1 else noise[:0]
        known = latent_image.to(noise)
        generate = (denoise_mask >= 0.5).to(noise.dtype)
        full = self.max_denoise(model_wrap, sigmas)
        # From pure noise, the generated region starts as an empty latent's would: the content under the mask
        # added to the noise (as the host's noise_scaling does) tilts every particle towards it by
        # x0 . (m_i - m_j) / sigma_max^2 (0.23 nats between mixture-hard's components 0 and 1, a TV of 0.05
        # at any particle count); with denoise < 1 that content is the intended start and stays.
        start = known * (1.0 - generate) if full else known
        x = model_sampling.noise_scaling(sigmas[0], torch.cat([noise, more]), start.repeat(
            (count,) + (1,) * (noise.ndim - 1)), full)
        rows = x.new_ones([count * latents])
        model_options, seed = extra_args.get("model_options", {}), extra_args.get("seed")
        steps = len(sigmas) - 1

        def denoise(x, i):
            return model_wrap(x, sigmas[i] * rows, model_options=model_options, seed=seed)

        def on_step(i, x0, x):
            if callback is not None:
                callback(i, x0[:latents], x[:latents], steps)

        result = smc.particle_inpaint(denoise, x, known, generate, sigmas, self.settings, flow, normal, uniform,
                                      noise_scale, on_step)
        logging.info("%s: %d particles x %d steps = %d model rows per latent.", self.node, count, steps,
                     count * steps)
        if self.outputs is not None:
            result.particles = model_sampling.inverse_noise_scaling(sigmas[-1], result.particles)
            self.outputs["result"] = result
        return model_sampling.inverse_noise_scaling(sigmas[-1], result.draw)


def _settings(node: str, particles, resample_threshold, resample_below, sampler_name, twisted) -> smc.Settings:
    if twisted:
        raise checks.error(node, "twisted", NO_TWISTED)
    return smc.Settings(particles, resample_threshold, resample_below, sampler_name)


def _particle_inputs() -> list:
    return [
        io.Int.Input("particles", default=8, min=1, max=smc.MAX_PARTICLES, tooltip=TOOLTIPS["particles"]),
        io.Float.Input("resample_threshold", default=0.0, min=0.0, max=1.0, step=0.05,
                       tooltip=TOOLTIPS["resample_threshold"]),
        io.Float.Input("resample_below", default=1.0, min=0.0, max=1000.0, step=0.05,
                       tooltip=TOOLTIPS["resample_below"]),
        io.Boolean.Input("twisted", default=False, tooltip=TOOLTIPS["twisted"]),
    ]


class ParticleInpaintSampler(io.ComfyNode):
    """SMCDiff as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParticleInpaintSampler",
            display_name="Particle Inpaint Sampler",
            category="consistent synthesis/RePaint",
            description=("Particle inpainting (SMCDiff, Trippe et al. 2022): several particles per latent "
                         "denoise together, weighted by how well each one's prediction agrees with the known "
                         "region, and one is drawn by weight at the end. Unlike masked sampling and RePaint it "
                         "approaches the exact conditional as particles grow, also where the new region must "
                         "commit to a choice early. Costs particles x steps model rows per latent."),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip=TOOLTIPS["seed"]),
                io.Combo.Input("sampler_name", options=list(smc.KERNELS), tooltip=TOOLTIPS["sampler_name"]),
            ] + _particle_inputs(),
            outputs=[io.Sampler.Output(tooltip="A SAMPLER for SamplerCustom or SamplerCustomAdvanced; the latent "
                                       "must carry a noise_mask (1 = generate; soft masks are binarised at 0.5). "
                                       "Gives the weighted draw; ParticleInpaintKSampler also gives all particles.")],
        )

    @classmethod
    def execute(cls, seed, sampler_name, particles, resample_threshold, resample_below, twisted) -> io.NodeOutput:
        checks.inputs(cls, locals())
        settings = _settings("ParticleInpaintSampler", particles, resample_threshold, resample_below, sampler_name,
                             twisted)
        return io.NodeOutput(ParticleInpaint(settings, seed))


def particle_inpaint_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                              denoise=1.0, particles=8, resample_threshold=0.0, resample_below=1.0, twisted=False,
                              node="ParticleInpaintKSampler") -> tuple[dict, dict]:
    """(the weighted draw, every particle sorted by weight); the known region of both is the input's exactly."""
    settings = _settings(node, particles, resample_threshold, resample_below, sampler_name, twisted)
    if latent_image.get("noise_mask") is None:
        raise checks.error(node, "latent_image", NO_MASK)
    original = latent_image["samples"]
    check_mask_aspect(node, latent_image["noise_mask"].shape, original.shape)
    checks.elements(node, "particles", particles * original.numel(), "the particles (particles x latent batch)")
    latent = host_compat.fix_empty_latent_channels(model, latent_image)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    outputs = {}
    sampler = ParticleInpaint(settings, (seed + 1) % 2**64, node, outputs)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
    if len(sigmas) < 2:
        return latent_image.copy(), latent_image.copy()
    mask = latent_image["noise_mask"]
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                         noise_mask=mask, callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    everything = outputs["result"].particles.to(samples)
    everything = model.get_model_object("latent_format").process_out(everything)  # as the host did to samples
    if samples.shape == original.shape:  # VAE-space rounding undone: the known region is the input's
        keep = comfy.sampler_helpers.prepare_mask(mask, samples.shape, samples.device) >= 0.5
        original = original.to(samples)
        samples = torch.where(keep, samples, original)
        everything = torch.where(keep.repeat_interleave(particles, 0), everything,
                                 original.repeat_interleave(particles, 0))
    drawn = host_compat.sampled_latent(latent_image, samples)
    ranked = {k: v for k, v in host_compat.sampled_latent(latent_image, everything).items()
              if k not in ("noise_mask", "batch_index")}
    return drawn, ranked


class ParticleInpaintKSampler(io.ComfyNode):
    """KSampler's inputs plus the particles'."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParticleInpaintKSampler",
            display_name="Particle Inpaint KSampler",
            category="consistent synthesis/RePaint",
            description=("Inpaints or outpaints where the latent's noise_mask is 1 with particle inpainting "
                         "(SMCDiff, Trippe et al. 2022), with any checkpoint: particles per latent denoise as one "
                         "batch, weighted by the known region, one drawn by weight. Evaluations: particles x "
                         "steps model rows per latent (x2 with cfg > 1, as for any sampler)."),
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of the particles' randomness."),
                io.Int.Input("steps", default=15, min=1, max=10000, tooltip="Denoising steps of the schedule."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=list(smc.KERNELS), tooltip=TOOLTIPS["sampler_name"]),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Noise schedule of the steps."),
                io.Conditioning.Input("positive", tooltip="What to generate in the masked area."),
                io.Conditioning.Input("negative", tooltip="What to avoid."),
                io.Latent.Input("latent_image", tooltip=(
                    "The image to complete, with a noise_mask (1 = generate, 0 = keep; soft masks are binarised "
                    "at 0.5) from Set Latent Noise Mask, VAE Encode (for Inpainting) or Pose Edit Outpaint.")),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run, as in KSampler."),
            ] + _particle_inputs(),
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="One completed latent per input latent, drawn by "
                                 "the particles' final weights; the known region is the input's, exactly."),
                io.Latent.Output(display_name="particles", tooltip="Every particle, input latent by input "
                                 "latent, heaviest first (row latent x particles + rank), to choose from by eye."),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler=None):
        # ComfyUI 0.3.x does not check a V3 combo's value itself; unknown names are refused here, at queue time
        return checks.combo_problem("ParticleInpaintKSampler", "scheduler", scheduler,
                                    comfy.samplers.KSampler.SCHEDULERS) or True

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                particles, resample_threshold, resample_below, twisted) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(*particle_inpaint_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                                        negative, latent_image, denoise, particles,
                                                        resample_threshold, resample_below, twisted))
