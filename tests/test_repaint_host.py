"""RePaintKSampler and RePaintSampler on the real ComfyUI host."""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.model_base  # noqa: E402
import comfy.sampler_helpers  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402

import analytic as A  # noqa: E402
import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes.repaint import RePaint, RePaintKSampler, RePaintSampler, repaint_ksampler  # noqa: E402
from consistent_synthesis.samplers import repaint as R  # noqa: E402

MT = comfy.model_base.ModelType


def masked_latent(batch=2, seed=0, size=16):
    latent = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 2:] = 1.0  # generate the right half
    return {"samples": latent, "noise_mask": mask}


def run(model, latent, sampler="euler", steps=6, jump_length=2, jump_n_sample=2, seed=3, cfg=4.0,
        kind="sd15", **kwargs):
    return repaint_ksampler(model, seed, steps, cfg, sampler, "normal", tm.conditioning(kind),
                            tm.conditioning(kind, seed=1), latent, 1.0, jump_length, jump_n_sample,
                            **kwargs)["samples"]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "ddim", "heun", "uni_pc"])
def test_known_region_is_the_original_latent_exactly(sd15, sampler):
    latent = masked_latent()
    out = run(sd15, latent, sampler)
    assert torch.equal(out[..., :8], latent["samples"][..., :8])
    assert (out[..., 8:] - latent["samples"][..., 8:]).abs().mean() > 0.1


@pytest.mark.parametrize("model_type", [MT.V_PREDICTION, MT.FLOW])
def test_v_prediction_and_flow_models_keep_the_known_region(model_type):
    model = tm.tiny_model("sd15", model_type=model_type)
    latent = masked_latent()
    out = run(model, latent, "euler", steps=6, jump_length=2, jump_n_sample=3)
    assert torch.equal(out[..., :8], latent["samples"][..., :8])
    assert torch.isfinite(out).all() and (out[..., 8:] - latent["samples"][..., 8:]).abs().mean() > 0.1


def test_one_sample_per_level_with_fixed_renoise_is_comfyuis_masked_ksampler_bit_for_bit(sd15):
    """ComfyUI's masked sampling re-blends the known region with the run's initial noise; RePaint
    with jump_n_sample = 1 does the same with fresh noise. With the initial noise instead of fresh
    noise the two are the same computation, bit for bit."""
    latent = masked_latent()
    ours = run(sd15, latent, "euler", steps=5, jump_n_sample=1, renoise="fixed")
    host = ksampler(sd15, latent, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), 5, 4.0, seed=3)
    assert torch.equal(ours[..., 8:], host[..., 8:])
    torch.testing.assert_close(ours, host)  # the known region: the host's round trip through scale factors


def test_one_sample_per_level_with_fresh_renoise_differs_only_through_the_known_regions_noise(sd15):
    latent = masked_latent()
    fresh = run(sd15, latent, "euler", steps=5, jump_n_sample=1)
    fixed = run(sd15, latent, "euler", steps=5, jump_n_sample=1, renoise="fixed")
    assert torch.equal(fresh[..., :8], fixed[..., :8])
    assert not torch.allclose(fresh[..., 8:], fixed[..., 8:])
    everything = {"samples": latent["samples"], "noise_mask": torch.ones_like(latent["noise_mask"])}
    assert torch.equal(run(sd15, everything, "euler", steps=5, jump_n_sample=1),
                       run(sd15, everything, "euler", steps=5, jump_n_sample=1, renoise="fixed"))


def test_a_seed_reproduces_its_result_and_another_seed_does_not(sd15):
    latent = masked_latent()
    first = run(sd15, latent, "euler_ancestral", seed=11)
    assert torch.equal(first, run(sd15, latent, "euler_ancestral", seed=11))
    assert not torch.allclose(first, run(sd15, latent, "euler_ancestral", seed=12))


def test_progress_counts_model_evaluations_and_previews_are_sent(sd15, monkeypatch):
    import comfy.cli_args
    import latent_preview

    monkeypatch.setattr(comfy.cli_args.args, "preview_method", latent_preview.LatentPreviewMethod.Latent2RGB)
    latent = masked_latent(batch=1)
    calls, progress = [], []

    def count(apply_model, args):
        calls.append(1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = sd15.clone()
    model.set_model_unet_function_wrapper(count)
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress.append((value, total, preview is not None)))
    steps = R.model_steps(R.jump_schedule(8, 2, 3))
    try:
        for sampler in ("euler", "heun"):
            calls.clear()
            progress.clear()
            out = RePaintKSampler.execute(model, 5, 8, 1.0, sampler, "normal", tm.conditioning("sd15"),
                                          tm.conditioning("sd15", seed=1), latent, 1.0, 2, 3, 0.0, 1.0).result[0]
            evaluations = len(calls)
            assert [v for v, _, _ in progress] == list(range(1, evaluations + 1))
            assert all(preview for _, _, preview in progress)
            if sampler == "euler":
                assert evaluations == steps and progress[-1][1] == steps
            else:
                assert steps < evaluations <= 2 * steps and progress[-1][1] >= evaluations
            assert out["samples"].shape == latent["samples"].shape and "noise_mask" in out
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def test_window_spends_extra_evaluations_only_inside_it(sd15):
    latent = masked_latent(batch=1)
    sampler = RePaint(comfy.samplers.sampler_object("euler"), 2, 4, 0.5, 1.0)
    schedule = sampler.schedule(12)
    assert R.model_steps(R.jump_schedule(12, 2, 1)) < R.model_steps(schedule) < R.model_steps(R.jump_schedule(12, 2, 4))
    out = run(sd15, latent, "euler", steps=12, jump_length=2, jump_n_sample=4, resample_start=0.5)
    assert torch.equal(out[..., :8], latent["samples"][..., :8])


def test_repaint_sampler_runs_in_samplercustom(sd15):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    latent = masked_latent(batch=1)
    sampler = RePaintSampler.execute(comfy.samplers.sampler_object("dpmpp_2m"), 2, 2, 0.0, 1.0).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "karras", 6)
    result = SamplerCustom().sample(sd15, True, 4, 3.0, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1),
                                   sampler, sigmas, latent)
    out, denoised = result[0]["samples"], result[1]["samples"]
    torch.testing.assert_close(out[..., :8], latent["samples"][..., :8], rtol=1e-6, atol=1e-6)
    assert out.shape == denoised.shape == latent["samples"].shape


def test_latent_without_noise_mask_fails_and_says_how_to_add_one(sd15):
    with pytest.raises(ValueError, match="RePaintKSampler: input 'latent_image'.*Set Latent Noise Mask"):
        run(sd15, {"samples": torch.zeros(1, 4, 16, 16)})
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    sampler = RePaintSampler.execute(comfy.samplers.sampler_object("euler"), 2, 2, 0.0, 1.0).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", 3)
    with pytest.raises(ValueError, match="RePaintSampler: input 'latent_image'.*noise_mask"):
        SamplerCustom().sample(sd15, True, 4, 3.0, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1),
                              sampler, sigmas, {"samples": torch.zeros(1, 4, 16, 16)})


def _samplercustom(model, latent, seed=4):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    sampler = RePaintSampler.execute(comfy.samplers.sampler_object("euler"), 2, 2, 0.0, 1.0).result[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    return SamplerCustom().sample(model, True, seed, 3.0, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1),
                                  sampler, sigmas, latent)[0]["samples"]


def _right_half(*shape):
    mask = torch.zeros(shape)
    mask[..., shape[-1] // 2:] = 1.0
    return mask


def test_a_mask_of_another_aspect_ratio_is_refused_by_both_nodes_naming_both_shapes(sd15):
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
              "noise_mask": _right_half(1, 32, 128)}  # 4:1 on a square latent: the host would stretch it
    shapes = r"\(1, 32, 128\).*\(1, 4, 16, 16\)"
    with pytest.raises(ValueError, match=rf"RePaintKSampler: input 'latent_image': its noise_mask .*{shapes}"):
        RePaintKSampler.execute(sd15, 5, 4, 3.0, "euler", "normal", tm.conditioning("sd15"),
                                tm.conditioning("sd15", seed=1), latent, 1.0, 2, 2, 0.0, 1.0)
    with pytest.raises(ValueError, match=rf"RePaintSampler: input 'latent_image': its noise_mask .*{shapes}"):
        _samplercustom(sd15, latent)
    tall = dict(latent, noise_mask=_right_half(1, 128, 64))  # 1:2, the other way round
    with pytest.raises(ValueError, match=r"\(1, 128, 64\).*\(1, 4, 16, 16\)"):
        run(sd15, tall)


@pytest.mark.parametrize("mask_shape", [(2, 16, 16), (2, 128, 128), (1, 128, 128), (1, 135, 128), (16, 16)],
                         ids=["latent_size", "image_size", "batch_1_broadcast", "odd_image_size", "no_batch"])
def test_masks_of_the_latents_aspect_ratio_still_sample_in_both_nodes(sd15, mask_shape):
    """The latent's size, the image's size (8x), a batch of 1 for a batch of 2, and an image of 135 px
    whose latent is floor(135 / 8) = 16: all sample, and the known region is kept."""
    latent = {"samples": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
              "noise_mask": _right_half(*mask_shape)}
    keep = comfy.sampler_helpers.prepare_mask(latent["noise_mask"], latent["samples"].shape, "cpu") == 0
    assert keep.float().mean() > 0.3
    for out in (run(sd15, latent), _samplercustom(sd15, latent)):
        torch.testing.assert_close(out[keep], latent["samples"][keep], rtol=1e-6, atol=1e-6)
        assert (out[~keep] - latent["samples"][~keep]).abs().mean() > 0.1


def test_the_aspect_check_allows_one_latent_pixel_of_rounding():
    from consistent_synthesis.nodes.repaint import check_mask_aspect

    for mask in ((513, 512), (512, 513), (519, 512), (64, 64), (32, 32), (1, 519, 512)):
        check_mask_aspect("RePaintKSampler", mask, (1, 4, 64, 64))
    check_mask_aspect("RePaintKSampler", (1, 1016, 600), (1, 4, 127, 75))  # 1016x600 px -> 127x75
    for mask in ((512, 584), (64, 66), (128, 512)):  # 1.14 latent pixels off and more
        with pytest.raises(ValueError, match="input 'latent_image'"):
            check_mask_aspect("RePaintKSampler", mask, (1, 4, 64, 64))


def test_bad_sampler_or_window_fails_clearly():
    with pytest.raises(ValueError, match="RePaintSampler: input 'sampler'"):
        RePaintSampler.execute(object(), 2, 2, 0.0, 1.0)
    with pytest.raises(ValueError, match="resample_start.*resample_end"):
        RePaintSampler.execute(comfy.samplers.sampler_object("euler"), 2, 2, 0.6, 0.4)


# ---- The analytic test: inpainting a Gaussian whose exact conditional is known -------------------

SAMPLES = 2000


def analytic_run(model_type, jump_n_sample, sampler="euler_ancestral", steps=30, jump_length=5, renoise="fresh"):
    model, mu, cov = A.gaussian_model(model_type)
    x0 = mu + torch.linalg.cholesky(cov) @ torch.randn(A.DIM, generator=torch.Generator().manual_seed(3),
                                                       dtype=torch.float64)
    unknown = torch.zeros(A.SHAPE, dtype=torch.bool)
    unknown[:, :, 1] = True  # the right column of every channel is generated
    unknown = unknown.reshape(-1)
    latent = {"samples": x0.float().reshape(1, *A.SHAPE).repeat(SAMPLES, 1, 1, 1),
              "noise_mask": unknown.float().reshape(1, *A.SHAPE)[:, :1].repeat(SAMPLES, 1, 1, 1)}
    cond = [[torch.zeros(1, 1, 768), {}]]
    out = repaint_ksampler(model, 0, steps, 1.0, sampler, "karras", cond, cond, latent, 1.0, jump_length,
                           jump_n_sample, renoise=renoise)["samples"]
    assert torch.equal(out.reshape(SAMPLES, -1)[:, ~unknown], latent["samples"].reshape(SAMPLES, -1)[:, ~unknown])
    got = out.reshape(SAMPLES, -1)[:, unknown].double()
    mean, cov_u = A.conditional(mu, cov, x0[~unknown], unknown)
    return A.w2_gaussian(got.mean(0), torch.cov(got.T), mean, cov_u)


@pytest.mark.parametrize("model_type", [MT.EPS, MT.V_PREDICTION, MT.FLOW])
def test_resampling_approaches_the_exact_conditional_distribution(model_type, measured):
    """W2 distance between the inpainted samples' Gaussian fit and the exact conditional
    N(mu_u + S_uk S_kk^-1 (x_k - mu_k), S_uu - S_uk S_kk^-1 S_ku) falls as jump_n_sample grows."""
    distances = {r: analytic_run(model_type, r) for r in (1, 3, 10)}
    floor = A.w2_gaussian(*_exact_sample_fit(), *_exact_conditional())
    table = ", ".join(f"jump_n_sample={r}: W2={d:.3f}" for r, d in distances.items())
    measured(f"{model_type.name}, 30 euler_ancestral steps, jump_length 5, {SAMPLES} samples: {table} "
             f"(exact samples: W2={floor:.3f})")
    assert distances[1] > distances[3] > distances[10]
    assert distances[10] < 0.4 * distances[1]
    assert distances[10] < 4 * floor + 0.05


def test_comfyuis_fixed_noise_masked_sampling_stays_far_from_the_conditional(measured):
    fixed = analytic_run(MT.EPS, 1, renoise="fixed")
    resampled = analytic_run(MT.EPS, 10)
    measured(f"ComfyUI-style masked sampling (fixed re-noising) W2={fixed:.3f}; RePaint jump_n_sample=10 "
             f"W2={resampled:.3f}")
    assert resampled < 0.5 * fixed


def _exact_conditional():
    model, mu, cov = A.gaussian_model()
    x0 = mu + torch.linalg.cholesky(cov) @ torch.randn(A.DIM, generator=torch.Generator().manual_seed(3),
                                                       dtype=torch.float64)
    unknown = torch.zeros(A.SHAPE, dtype=torch.bool)
    unknown[:, :, 1] = True
    unknown = unknown.reshape(-1)
    return A.conditional(mu, cov, x0[~unknown], unknown)


def _exact_sample_fit():
    mean, cov = _exact_conditional()
    draws = torch.distributions.MultivariateNormal(mean, cov).sample((SAMPLES,))
    return draws.mean(0), torch.cov(draws.T)
