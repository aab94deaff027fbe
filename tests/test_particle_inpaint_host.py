"""ParticleInpaintKSampler and ParticleInpaintSampler on the real ComfyUI host, with closed-form problems.

Thresholds: the settings (particles, steps, resample_threshold) were chosen on seed 0 (see
benchmarks/particle_inpaint_bench.py); the assertions run on seed 7, so they are not fitted to it.
"""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.model_base  # noqa: E402
import comfy.samplers  # noqa: E402

import analytic as A  # noqa: E402
import analytic_mixture as M  # noqa: E402
import tiny_models as tm  # noqa: E402
from consistent_synthesis.nodes.particle_inpaint import (ParticleInpaintKSampler, ParticleInpaintSampler,  # noqa: E402
                                                         particle_inpaint_ksampler)

MT = comfy.model_base.ModelType
SEED = 7
OUTPUTS = 256
COND = [[torch.zeros(1, 1, 768), {}]]


def mixture_run(model_type=MT.EPS, hard=True, particles=8, steps=15, threshold=0.0, seed=SEED, outputs=OUTPUTS):
    model, mix = M.mixture_model(model_type, hard)
    x0 = M.known_sample(mix, 0, seed=seed)
    latent = {"samples": x0.float().reshape(1, *M.SHAPE).repeat(outputs, 1, 1, 1), "noise_mask": M.noise_mask(outputs)}
    drawn, ranked = particle_inpaint_ksampler(model, seed, steps, 1.0, "euler_ancestral", "karras", COND, COND, latent,
                                              1.0, particles, threshold)
    known = M.known_mask()
    assert torch.equal(drawn["samples"].reshape(outputs, -1)[:, known], latent["samples"].reshape(outputs, -1)[:, known])
    return M.total_variation(mix, drawn["samples"], x0[known]), drawn, ranked


@pytest.mark.parametrize("model_type", [MT.EPS, MT.V_PREDICTION, MT.FLOW])
def test_mixture_hard_lands_near_the_exact_component_weights(model_type, measured):
    tv, _, _ = mixture_run(model_type)
    single, _, _ = mixture_run(model_type, particles=1)
    measured(f"{model_type.name} mixture-hard, {OUTPUTS} outputs: TV 8x15 {tv:.3f}, 1x15 {single:.3f}")
    assert tv <= 0.1
    assert single >= 0.3  # one particle is masked ancestral sampling, which cannot see the choice


def test_from_pure_noise_the_content_under_the_mask_does_not_enter():
    """At full denoise the generated region starts from noise alone (the host's noise_scaling would add the
    latent there: on mixture-hard that tilted the draw towards the masked content's component, TV 0.05 at any
    particle count); with denoise < 1 the content under the mask is the start, as in KSampler."""
    model, mix = M.mixture_model()
    x0 = M.known_sample(mix, 0, seed=1).float().reshape(1, *M.SHAPE).repeat(2, 1, 1, 1)
    other = x0.clone()
    other[..., M.SHAPE[-1] // 2:] = mix.means[3].float().reshape(M.SHAPE)[..., M.SHAPE[-1] // 2:]
    outs = {}
    for denoise in (1.0, 0.6):
        for name, samples in (("x0", x0), ("other", other)):
            latent = {"samples": samples, "noise_mask": M.noise_mask(2)}
            outs[denoise, name] = particle_inpaint_ksampler(model, 5, 4, 1.0, "euler_ancestral", "karras", COND, COND,
                                                            latent, denoise, 3)[1]["samples"]
    assert torch.equal(outs[1.0, "x0"], outs[1.0, "other"])
    assert not torch.equal(outs[0.6, "x0"], outs[0.6, "other"])


def test_easy_mixture_is_also_right(measured):
    tv, _, _ = mixture_run(hard=False)
    measured(f"mixture 8x15: TV {tv:.3f}")
    assert tv <= 0.1


def test_gaussian_mean_and_variance_at_16_particles_and_120_steps(measured):
    """The issue asks for the variance band at 8 particles; SMCDiff cannot give it there, so it is asserted at 16.

    Measured (variance ratio; host, 256 outputs, seeds 0/1/2/7): 8x120 without resampling 1.147/1.143/1.182/1.189,
    with 0.5 under sigma 1 1.051/1.097/1.139/1.162, 0.7 at any sigma 1.126/1.096/1.041/1.112; 16x120, 0.5 under 1:
    1.043/1.018/1.032/0.991. Pure torch, 4096 outputs (the estimate's own noise ~0.02): 8 particles 1.10-1.15
    for every threshold 0.3-1.0 and limit 0.1-inf, 16: 0.99-1.05, 64: 0.94-0.98 (the 120-step chain's own
    shrinkage). Why: the weights are SMCDiff's exactly (the known half on one forward Markov chain, the
    weight the euler_ancestral kernel's density of its next value, sigma_up^2 = the chain's posterior
    variance); the kernel is diagonal, so its proposal for the generated half is already the fully adapted
    one, and that proposal (one particle = masked sampling) has 2.3 times the exact variance. The weights of
    8 particles end at a mean ESS of 2.4, and a weighted draw from K particles over-disperses by O(Var w / K):
    +0.19 at 8, +0.07 at 16. Neither the final step's weight (its variance x0.5 to x4, or none: 1.13-1.15)
    nor the start (the content under the mask) moves it."""
    model, mu, cov = A.gaussian_model()
    x0 = mu + torch.linalg.cholesky(cov) @ torch.randn(A.DIM, generator=torch.Generator().manual_seed(3),
                                                       dtype=torch.float64)
    unknown = torch.zeros(A.SHAPE, dtype=torch.bool)
    unknown[:, :, 1] = True
    unknown = unknown.reshape(-1)
    latent = {"samples": x0.float().reshape(1, *A.SHAPE).repeat(OUTPUTS, 1, 1, 1),
              "noise_mask": unknown.float().reshape(1, *A.SHAPE)[:, :1].repeat(OUTPUTS, 1, 1, 1)}
    out = particle_inpaint_ksampler(model, SEED, 120, 1.0, "euler_ancestral", "karras", COND, COND, latent, 1.0, 16,
                                    0.5, 1.0)[0]["samples"].reshape(OUTPUTS, -1)
    assert torch.equal(out[:, ~unknown], latent["samples"].reshape(OUTPUTS, -1)[:, ~unknown])
    got = out[:, unknown].double()
    mean, exact_cov = A.conditional(mu, cov, x0[~unknown], unknown)
    # the exact sampler's 95 % spread of the mean of OUTPUTS draws
    draws = torch.distributions.MultivariateNormal(mean, exact_cov).sample((400, OUTPUTS))
    spread = (draws.mean(1) - mean).norm(dim=1).quantile(0.95)
    error = (got.mean(0) - mean).norm()
    ratio = float(torch.cov(got.T).trace() / exact_cov.trace())
    measured(f"Gaussian 16x120: mean error {float(error):.3f} (exact 95 % spread {float(spread):.3f}), "
             f"variance ratio {ratio:.3f}")
    assert error <= 4 * spread
    assert 0.9 <= ratio <= 1.1


def test_model_rows_per_output_are_particles_times_steps_and_cfg_doubles_them():
    model, mix = M.mixture_model()
    rows = []

    def count(apply_model, args):
        rows.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(count)
    latent = {"samples": M.known_sample(mix).float().reshape(1, *M.SHAPE).repeat(2, 1, 1, 1),
              "noise_mask": M.noise_mask(2)}
    particle_inpaint_ksampler(model, 1, 5, 1.0, "euler_ancestral", "karras", COND, COND, latent, 1.0, 4)
    assert rows == [4 * 2] * 5
    rows.clear()
    negative = [[torch.ones(1, 1, 768), {}]]
    particle_inpaint_ksampler(model, 1, 5, 3.0, "euler_ancestral", "karras", COND, negative, latent, 1.0, 4)
    assert sum(rows) == 2 * 4 * 2 * 5  # cond and uncond for every particle row


def test_cfg_above_1_with_per_item_conditioning_on_a_unet(sd15):
    """Two latents with their own prompts and cfg 4 on the tiny SD1.5: every particle row gets its latent's
    prompt (rows p * B + b), the known region is kept, the particles come back latent by latent."""
    chunks = []

    def record(apply_model, args):
        tokens = args["c"]["c_crossattn"][:, 0, 0]
        size = args["input"].shape[0] // len(args["cond_or_uncond"])
        chunks.extend((kind, tokens[j * size:(j + 1) * size].clone()) for j, kind in enumerate(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = sd15.clone()
    model.set_model_unet_function_wrapper(record)
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
              "noise_mask": torch.zeros(2, 1, 8, 8)}
    latent["noise_mask"][..., 4:] = 1.0
    positive = [[torch.cat([tm.conditioning("sd15")[0][0], tm.conditioning("sd15", seed=5)[0][0]]), {}]]
    drawn, ranked = ParticleInpaintKSampler.execute(model, 3, 3, 4.0, "euler_ancestral", "normal", positive,
                                                    tm.conditioning("sd15", seed=1), latent, 1.0, 3, 0.5, 1.0,
                                                    False).result
    assert torch.equal(drawn["samples"][..., :4], latent["samples"][..., :4])
    assert ranked["samples"].shape == (6, 4, 8, 8) and "noise_mask" not in ranked
    assert torch.equal(ranked["samples"][..., :4], latent["samples"].repeat_interleave(3, 0)[..., :4])
    per_latent = positive[0][0][:, 0, 0]
    conds = [tokens for kind, tokens in chunks if kind == 0]
    assert len(conds) == 3 and len(chunks) == 6  # a cond and an uncond chunk at each of the 3 steps
    assert not torch.equal(per_latent[0], per_latent[1])
    for tokens in conds:
        assert torch.equal(tokens, per_latent.repeat(3))  # row p * B + b has latent b's prompt


def test_the_sampler_runs_in_samplercustom_and_keeps_the_known_region(sd15):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
              "noise_mask": torch.zeros(1, 1, 8, 8)}
    latent["noise_mask"][..., 4:] = 0.7  # soft: binarised at 0.5, so generated
    sampler = ParticleInpaintSampler.execute(2, "ddpm", 4, 0.5, 1.0, False).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "karras", 4)
    out = SamplerCustom().sample(sd15, True, 4, 3.0, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1),
                                 sampler, sigmas, latent)[0]["samples"]
    torch.testing.assert_close(out[..., :4], latent["samples"][..., :4], rtol=1e-6, atol=1e-6)
    assert (out[..., 4:] - latent["samples"][..., 4:]).abs().mean() > 0.1


def test_a_seed_reproduces_its_result_and_another_does_not():
    _, first, _ = mixture_run(outputs=4, steps=4, seed=1)
    _, again, _ = mixture_run(outputs=4, steps=4, seed=1)
    _, other, _ = mixture_run(outputs=4, steps=4, seed=2)
    assert torch.equal(first["samples"], again["samples"])
    assert not torch.equal(first["samples"], other["samples"])


def _execute(**changes):
    model, mix = M.mixture_model()
    latent = {"samples": M.known_sample(mix).float().reshape(1, *M.SHAPE), "noise_mask": M.noise_mask(1)}
    values = dict(model=model, seed=0, steps=3, cfg=1.0, sampler_name="euler_ancestral", scheduler="karras",
                  positive=COND, negative=COND, latent_image=latent, denoise=1.0, particles=2,
                  resample_threshold=0.0, resample_below=1.0, twisted=False)
    values.update(changes)
    return ParticleInpaintKSampler.execute(**values)


@pytest.mark.parametrize("changes, pattern", [
    (dict(particles=0), r"ParticleInpaintKSampler: input 'particles': 0 is outside 1 to 64"),
    (dict(particles=65), r"input 'particles': 65 is outside 1 to 64"),
    (dict(resample_threshold=float("nan")), r"input 'resample_threshold': nan is not a finite number"),
    (dict(twisted=True), r"input 'twisted': twisted proposals \(TDS\) are not available"),
    (dict(latent_image={"samples": torch.zeros(1, 4, 8, 8)}), r"input 'latent_image': .*no noise_mask"),
    (dict(sampler_name="euler"), r"input 'sampler_name': 'euler' is not one of"),
])
def test_hostile_inputs_are_refused_naming_node_and_input(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        _execute(**changes)


def test_hostile_inputs_of_the_sampler_node_and_a_latent_without_mask_in_samplercustom(sd15):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    with pytest.raises(ValueError, match=r"ParticleInpaintSampler: input 'particles'"):
        ParticleInpaintSampler.execute(0, "ddpm", 0, 0.0, 1.0, False)
    with pytest.raises(ValueError, match=r"ParticleInpaintSampler: input 'twisted'"):
        ParticleInpaintSampler.execute(0, "ddpm", 2, 0.0, 1.0, True)
    sampler = ParticleInpaintSampler.execute(0, "ddpm", 2, 0.0, 1.0, False).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", 3)
    with pytest.raises(ValueError, match=r"ParticleInpaintSampler: input 'latent_image'.*noise_mask"):
        SamplerCustom().sample(sd15, True, 4, 3.0, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1),
                               sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)})
