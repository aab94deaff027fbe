"""How RePaint with jump_n_sample = 1 relates to ComfyUI's own masked KSampler, on the real host.

ComfyUI's masked sampling re-blends the known region before every model call with ONE noise
tensor: the run's initial noise (most samplers) or, for "ddim", one draw from a generator seeded
with seed + 1. RePaint re-draws that noise before every call from the same seed + 1 stream. So:
with no known region the two are the same computation; with a known region the first model call
is the same and the later ones differ only by the known region's noise.
"""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.samplers  # noqa: E402
from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced  # noqa: E402

import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes.repaint import RePaintSampler, repaint_ksampler  # noqa: E402
from consistent_synthesis.samplers import repaint as R  # noqa: E402

SEED, CFG = 7, 3.0


def latent_with_mask(generate_right_half=True, batch=2):
    samples = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, 1, 16, 16)
    if generate_right_half:
        mask[..., :8] = 0.0
    return {"samples": samples, "noise_mask": mask}


def ours(model, latent, sampler, steps, jump_n_sample=1, jump_length=2, **window):
    return repaint_ksampler(model, SEED, steps, CFG, sampler, "normal", tm.conditioning("sd15"),
                            tm.conditioning("sd15", seed=1), latent, 1.0, jump_length, jump_n_sample,
                            **window)["samples"]


def host(model, latent, sampler, steps, mask=True):
    latent = latent if mask else {"samples": latent["samples"]}
    return ksampler(model, latent, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), steps, CFG, sampler,
                    seed=SEED)


def recording(model):
    """A clone of ``model`` that records the input of every UNet call."""
    inputs = []

    def wrapper(apply_model, args):
        inputs.append(args["input"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    return model, inputs


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "heun"])
def test_without_a_known_region_it_is_comfyuis_ksampler_bit_for_bit(sd15, sampler):
    """Mask all ones: nothing to re-noise, one segment, the inner sampler (multistep history and
    ancestral noise stream included) runs exactly as in KSampler, masked or not."""
    latent = latent_with_mask(generate_right_half=False)
    out = ours(sd15, latent, sampler, 5)
    assert torch.equal(out, host(sd15, latent, sampler, 5))
    assert torch.equal(out, host(sd15, latent, sampler, 5, mask=False))


def test_with_a_known_region_the_first_call_is_comfyuis_and_later_ones_differ_by_the_fresh_noise(sd15):
    """Host "ddim" blends the known region with one seed + 1 draw; RePaint's first draw is that one."""
    latent = latent_with_mask()
    model, theirs = recording(sd15)
    host(model, latent, "ddim", 4)
    model, mine = recording(sd15)
    ours(model, latent, "ddim", 4)
    assert len(mine) == len(theirs) == 4
    assert torch.equal(mine[0], theirs[0])
    for a, b in zip(mine[1:], theirs[1:]):
        assert not torch.allclose(a[..., :8], b[..., :8])  # the known region: a fresh draw each call


def test_with_a_known_region_and_one_step_it_is_comfyuis_ksampler_bit_for_bit(sd15):
    latent = latent_with_mask()
    out = ours(sd15, latent, "ddim", 1)
    reference = host(sd15, latent, "ddim", 1)
    assert torch.equal(out[..., 8:], reference[..., 8:])
    assert torch.equal(out[..., :8], latent["samples"][..., :8])
    # the host returns its known region only up to the latent scale round trip
    torch.testing.assert_close(reference[..., :8], latent["samples"][..., :8], rtol=0, atol=1e-4)


def test_a_window_without_jump_points_is_plain_repaint_bit_for_bit(sd15):
    latent = latent_with_mask()
    steps, jump_length = 12, 4
    window = {"resample_start": 0.0, "resample_end": 0.3}
    assert R.jump_schedule(steps, jump_length, 5, 0.0, 0.3) == list(range(steps + 1))
    assert torch.equal(ours(sd15, latent, "dpmpp_2m", steps, 5, jump_length, **window),
                       ours(sd15, latent, "dpmpp_2m", steps, 1, jump_length))


def test_partial_denoise_keeps_the_known_region_and_resamples_the_shortened_run(sd15):
    latent = latent_with_mask(batch=1)
    model, inputs = recording(sd15)
    out = repaint_ksampler(model, SEED, 8, CFG, "euler", "normal", tm.conditioning("sd15"),
                           tm.conditioning("sd15", seed=1), latent, 0.5, 2, 3)["samples"]
    assert len(inputs) == R.model_steps(R.jump_schedule(8, 2, 3))  # KSampler: 8 steps of a 16-step schedule
    assert torch.equal(out[..., :8], latent["samples"][..., :8])
    assert torch.isfinite(out).all() and not torch.allclose(out[..., 8:], latent["samples"][..., 8:])


def test_repaint_sampler_runs_in_samplercustomadvanced(sd15):
    latent = latent_with_mask(batch=1)
    sampler = RePaintSampler.execute(comfy.samplers.sampler_object("euler_ancestral"), 2, 3, 0.0, 1.0).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "karras", 6)
    model, inputs = recording(sd15)
    guider = CFGGuider().get_guider(model, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), CFG)[0]

    def run():
        noise = RandomNoise().get_noise(SEED)[0]
        return SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]

    out = run()
    assert len(inputs) == R.model_steps(R.jump_schedule(6, 2, 3))
    torch.testing.assert_close(out[..., :8], latent["samples"][..., :8], rtol=1e-6, atol=1e-6)
    assert torch.equal(out, run())  # the noise seed reproduces the result
