"""MasaCtrl Conditioning/Latent Batch with Flux and SD3: pooled outputs, guidance, 16-channel latents."""

import logging

import pytest
import torch

from conftest import require_host

require_host()


import tiny_dit_models as td  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes import masactrl_dit as D  # noqa: E402
from consistent_synthesis.nodes.masactrl_batch import (  # noqa: E402
    MasaCtrlConditioningBatch, MasaCtrlLatentBatch)

CFG = {"flux": 1.0, "sd3": 4.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def stack(source, target):
    return MasaCtrlConditioningBatch.execute(source=source, target=target).result[0]


def latents(source, targets=1, source_is_reference=False):
    return MasaCtrlLatentBatch.execute(source=source, targets=targets, source_is_reference=source_is_reference,
                                       share_noise=True).result[0]


def run(model, kind, latent, positive, negative, steps=3, seed=7):
    return ksampler(model, latent, positive, negative, steps, CFG[kind], scheduler="simple", seed=seed)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_stacked_prompts_condition_each_image_as_if_sampled_alone(kind):
    """Pooled vectors (and Flux's guidance) batched with the text: each row equals its own single run."""
    model = td.tiny_dit(kind)
    source, target = td.conditioning(kind, seed=1), td.conditioning(kind, seed=2)
    negative = td.conditioning(kind, seed=3)
    batched = stack(source, target)
    assert batched[0][1]["pooled_output"].shape == (2, td.POOLED_DIM[kind])
    single = {"samples": torch.zeros(1, 16, 8, 8)}
    together = run(model, kind, latents(single), batched, negative)
    assert together.shape == (2, 16, 8, 8)
    for row, alone in ((0, run(model, kind, single, source, negative)[0]),
                       (1, run(model, kind, single, target, negative)[0])):
        assert (together[row] - alone).abs().max() < 1e-5 * alone.abs().max()


def test_a_flux_batch_runs_patched_and_keeps_the_source():
    model = td.tiny_dit("flux")
    positive = stack(stack(td.conditioning("flux", seed=1), td.conditioning("flux", seed=2)),
                     td.conditioning("flux", seed=4))
    negative = td.conditioning("flux", seed=3)
    batch = latents({"samples": torch.zeros(1, 16, 8, 8)}, targets=2)
    plain = run(model, "flux", batch, positive, negative)
    out = run(D.patch_dit_model(model, start_step=1, layers=[0, 1, 2, 17, 18, 25, 28, 53, 54, 56]), "flux",
              batch, positive, negative)
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1:], plain[1:], atol=1e-4)


def test_a_reference_source_latent_with_16_channels_is_held_known():
    reference = {"samples": torch.randn(1, 16, 8, 8)}
    out = latents(reference, targets=2, source_is_reference=True)
    assert out["samples"].shape == (3, 16, 8, 8)
    assert torch.equal(out["samples"][0], reference["samples"][0])
    assert out["noise_mask"].shape == (3, 1, 8, 8)
    assert out["noise_mask"][0].max() == 0 and out["noise_mask"][1:].min() == 1


def test_a_different_target_guidance_is_reported(caplog):
    source, target = td.conditioning("flux", seed=1, guidance=3.5), td.conditioning("flux", seed=2, guidance=5.0)
    with caplog.at_level(logging.WARNING):
        out = stack(source, target)
    assert out[0][1]["guidance"] == 3.5
    assert "guidance (5.0) differs from the source's (3.5)" in caplog.text


def test_t5_prompts_of_different_length_are_reported(caplog):
    source = [[torch.randn(1, 256, 4096), {"pooled_output": torch.randn(1, 768)}]]
    target = [[torch.randn(1, 512, 4096), {"pooled_output": torch.randn(1, 768)}]]
    with caplog.at_level(logging.WARNING):
        out = stack(source, target)
    assert out[0][0].shape == (2, 512, 4096)
    assert "the source has 256 text tokens and the target 512" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stack(source, source)
    assert "text tokens" not in caplog.text


def test_every_flux_target_gets_the_target_prompt_and_pooled_vector():
    """One target prompt for three targets on patched Flux: text and pooled rows are [source, target x 3]
    in the positive and in the stacked negative (the host alone repeats [source, target])."""
    import comfy.patcher_extension

    prompts = [td.conditioning("flux", seed=s) for s in (1, 2, 3, 4)]
    model = D.patch_dit_model(td.tiny_dit("flux"), start_step=1, layers=[0, 17])
    calls = []

    def record(executor, x, t, context, y, *args, **kwargs):  # Flux.forward(x, timestep, context, y, ...)
        options = kwargs.get("transformer_options") or next(a for a in args if isinstance(a, dict)
                                                            and "cond_or_uncond" in a)
        calls.append((list(options["cond_or_uncond"]), context.clone(), y.clone()))
        return executor(x, t, context, y, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.prompt_rows", record)
    samples = latents({"samples": torch.zeros(1, 16, 8, 8)}, targets=3)["samples"]
    # cfg above 1, so the negative is evaluated too
    ksampler(model, samples, stack(prompts[0], prompts[1]), stack(prompts[2], prompts[3]), 1, 2.0,
             scheduler="simple", seed=7)
    seen = set()
    for cond_or_uncond, context, pooled in calls:
        for chunk, kind in enumerate(cond_or_uncond):
            first, rest = (prompts[0], prompts[1]) if kind == 0 else (prompts[2], prompts[3])
            rows = slice(chunk * 4, chunk * 4 + 4)
            assert torch.equal(context[rows][0], first[0][0][0])
            assert torch.equal(pooled[rows][0], first[0][1]["pooled_output"][0])
            for row in range(1, 4):
                assert torch.equal(context[rows][row], rest[0][0][0])
                assert torch.equal(pooled[rows][row], rest[0][1]["pooled_output"][0])
            seen.add(kind)
    assert seen == {0, 1}
