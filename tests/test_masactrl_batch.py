"""Getting a MasaCtrl source and its targets into one batch for a stock KSampler."""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.sample  # noqa: E402

import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes.masactrl import MasaCtrlAttentionPatch  # noqa: E402
from consistent_synthesis.nodes.masactrl_batch import (  # noqa: E402
    MasaCtrlConditioningBatch, MasaCtrlLatentBatch)


def stack(source, target):
    return MasaCtrlConditioningBatch.execute(source, target).result[0]


def latents(source, targets=1, source_is_reference=False, share_noise=True, target=None):
    return MasaCtrlLatentBatch.execute(source, targets, source_is_reference, share_noise, target).result[0]


def run(model, latent, positive, negative, kind="sd15", steps=3, cfg=4.0, seed=7):
    return ksampler(model, latent, positive, negative, steps, cfg, seed=seed)


def test_stacked_prompts_condition_each_image_as_if_sampled_alone(sd15):
    """A 77-token source and a 154-token target, batched: each row equals its own single run."""
    source, target = tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2, tokens=154)
    negative = tm.conditioning("sd15", seed=3)
    batched = stack(source, target)
    assert batched[0][0].shape == (2, 154, tm.CONTEXT_DIM)
    single = {"samples": torch.zeros(1, 4, 16, 16)}
    together = run(sd15, latents(single), batched, negative)
    alone_source = run(sd15, single, source, negative)
    alone_target = run(sd15, single, target, negative)
    for row, alone in ((0, alone_source[0]), (1, alone_target[0])):
        # float32 round-off only: relative to the sample's scale
        assert (together[row] - alone).abs().max() < 1e-5 * alone.abs().max()


def test_stacking_chains_for_more_targets_and_batches_sdxl_pooled_vectors():
    a, b, c = (tm.conditioning("sdxl", seed=s) for s in (1, 2, 3))
    out = stack(stack(a, b), c)
    assert out[0][0].shape[0] == 3
    assert torch.equal(out[0][1]["pooled_output"],
                       torch.cat([a[0][1]["pooled_output"], b[0][1]["pooled_output"], c[0][1]["pooled_output"]]))


def test_stacking_prompts_from_different_clip_models_fails_clearly():
    with pytest.raises(ValueError, match="MasaCtrlConditioningBatch.*same CLIP"):
        stack(tm.conditioning("sd15"), [[torch.zeros(1, 77, 64), {}]])
    with pytest.raises(ValueError, match="pooled_output"):
        stack(tm.conditioning("sd15"), tm.conditioning("sdxl"))


def test_latent_batch_shares_the_initial_noise_across_the_batch():
    latent = latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=3)
    assert latent["samples"].shape == (4, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent["samples"], 0, latent["batch_index"])
    for i in range(1, 4):
        assert torch.equal(noise[i], noise[0])
    own = latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=1, share_noise=False)
    assert "batch_index" not in own


def test_reference_source_is_held_known_and_returned_exactly(sd15):
    reference = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    latent = latents({"samples": reference}, targets=2, source_is_reference=True)
    assert latent["noise_mask"][:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]
    model = MasaCtrlAttentionPatch.execute(sd15, 0, 10, -1, -1, "mutual", 0).result[0]
    prompts = stack(stack(tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2)),
                    tm.conditioning("sd15", seed=3))
    out = run(model, latent, prompts, tm.conditioning("sd15", seed=4))
    torch.testing.assert_close(out[0], reference[0])
    assert not torch.allclose(out[1], out[2], atol=1e-3)


def test_latent_batch_rejects_a_batch_as_source():
    with pytest.raises(ValueError, match="MasaCtrlLatentBatch.*'source'.*batch size 1"):
        latents({"samples": torch.zeros(2, 4, 16, 16)})


def test_target_canvas_keeps_its_noise_mask_and_known_pixels(sd15):
    gen = torch.Generator().manual_seed(7)
    reference, canvas = torch.randn(2, 1, 4, 16, 16, generator=gen)
    outpaint = torch.zeros(1, 1, 16, 16)
    outpaint[..., 12:] = 1.0  # generate the right quarter
    latent = latents({"samples": reference}, targets=1, source_is_reference=True,
                     target={"samples": canvas, "noise_mask": outpaint})
    assert torch.equal(latent["samples"][1], canvas[0])
    assert torch.equal(latent["noise_mask"][1, 0], outpaint[0, 0])
    assert latent["noise_mask"][0].max() == 0
    model = MasaCtrlAttentionPatch.execute(sd15, 0, 10, -1, -1, "mutual", 0).result[0]
    out = run(model, latent, stack(tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2)),
              tm.conditioning("sd15", seed=4))
    torch.testing.assert_close(out[0], reference[0])
    torch.testing.assert_close(out[1, :, :, :12], canvas[0, :, :, :12])
    assert not torch.allclose(out[1, :, :, 12:], canvas[0, :, :, 12:], atol=1e-2)


def test_generated_source_with_a_target_canvas_masks_only_the_target():
    canvas = {"samples": torch.ones(1, 4, 16, 16), "noise_mask": torch.zeros(1, 16, 16)}
    latent = latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=2, target=canvas)
    assert latent["noise_mask"][:, 0].amax(dim=(1, 2)).tolist() == [1.0, 0.0, 0.0]
    assert latent["samples"][1:].eq(1).all() and latent["samples"][0].eq(0).all()


def test_target_of_another_size_or_count_fails_clearly():
    source = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="MasaCtrlLatentBatch: input 'target'.*same size"):
        latents(source, target={"samples": torch.zeros(1, 4, 16, 24)})
    with pytest.raises(ValueError, match="MasaCtrlLatentBatch: input 'target' holds 3 latents for 2"):
        latents(source, targets=2, target={"samples": torch.zeros(3, 4, 16, 16)})


@pytest.mark.parametrize("targets, masks", [(1, 3), (3, 2)])
def test_a_target_noise_mask_count_that_is_neither_one_nor_the_target_count_fails_naming_the_input(targets, masks):
    source = {"samples": torch.zeros(1, 4, 16, 16)}
    canvas = {"samples": torch.ones(1, 4, 16, 16), "noise_mask": torch.ones(masks, 16, 16)}
    with pytest.raises(ValueError, match=rf"^MasaCtrlLatentBatch: input 'target': its noise_mask holds {masks} "
                                         rf"masks for {targets} targets?; give one mask for all targets or one for each"):
        latents(source, targets=targets, target=canvas)


def test_one_target_noise_mask_per_target_is_kept_row_by_row():
    source = {"samples": torch.zeros(1, 4, 16, 16)}
    masks = torch.stack([torch.full((16, 16), v) for v in (0.0, 1.0, 0.0)])
    latent = latents(source, targets=3, target={"samples": torch.ones(1, 4, 16, 16), "noise_mask": masks})
    assert latent["noise_mask"][:, 0].amax(dim=(1, 2)).tolist() == [1.0, 0.0, 1.0, 0.0]


def record_prompt_rows(model):
    """The clone's DIFFUSION_MODEL calls as (cond_or_uncond, text context rows) per call."""
    import comfy.patcher_extension

    calls = []

    def record(executor, x, t, *args, **kwargs):
        options = kwargs.get("transformer_options") or next(a for a in args if isinstance(a, dict)
                                                            and "cond_or_uncond" in a)
        context = kwargs.get("context", args[0] if args else None)
        calls.append((list(options["cond_or_uncond"]), context.detach().clone()))
        return executor(x, t, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.prompt_rows", record)
    return calls


def assert_rows_are(context, first, rest, batch):
    """Row 0 of ``context`` is the prompt ``first``, rows 1 to batch - 1 are ``rest``."""
    assert context.shape[0] == batch
    assert torch.equal(context[0], first[0][0][0])
    for row in range(1, batch):
        assert torch.equal(context[row], rest[0][0][0]), f"row {row} is not the target prompt"


@pytest.mark.parametrize("targets", [1, 3, 4])
def test_every_target_gets_the_target_prompt_for_cond_and_uncond(sd15, targets):
    """One MasaCtrl Conditioning Batch for positive and negative, MasaCtrl Latent Batch with 1, 3 and 4
    targets: the model sees the source's prompts in row 0 and the target's in every other row (the
    host alone would repeat [source, target], giving targets 2, 4, ... the source's prompt)."""
    source, target = tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2)
    negative_source, negative_target = tm.conditioning("sd15", seed=3), tm.conditioning("sd15", seed=4)
    model = MasaCtrlAttentionPatch.execute(sd15, 0, 10, -1, -1, "mutual", 0).result[0].clone()
    calls = record_prompt_rows(model)
    latent = latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=targets)
    run(model, latent, stack(source, target), stack(negative_source, negative_target), steps=2)
    batch = 1 + targets
    seen = set()
    for cond_or_uncond, context in calls:
        for chunk, kind in enumerate(cond_or_uncond):  # 0 = cond, 1 = uncond; each chunk the whole batch
            first, rest = (source, target) if kind == 0 else (negative_source, negative_target)
            assert_rows_are(context[chunk * batch:(chunk + 1) * batch], first, rest, batch)
            seen.add(kind)
    assert seen == {0, 1} and len(calls) >= 2


def test_without_the_patch_the_host_repeats_source_and_target():
    """Why the patch fits the prompts: a plain run over 1 + 3 images gives target 2 the source's prompt."""
    model = tm.tiny_model("sd15").clone()
    calls = record_prompt_rows(model)
    source, target = tm.conditioning("sd15", seed=1), tm.conditioning("sd15", seed=2)
    run(model, latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=3), stack(source, target),
        tm.conditioning("sd15", seed=3), steps=1)
    cond_or_uncond, context = calls[0]
    rows = context[cond_or_uncond.index(0) * 4:][:4]
    assert torch.equal(rows[2], source[0][0][0]) and torch.equal(rows[3], target[0][0][0])


def test_prompts_for_each_target_pass_unchanged_and_a_count_mismatch_is_refused(sd15):
    prompts = [tm.conditioning("sd15", seed=s) for s in (1, 2, 3)]
    negative = tm.conditioning("sd15", seed=4)
    model = MasaCtrlAttentionPatch.execute(sd15, 0, 10, -1, -1, "mutual", 0).result[0].clone()
    calls = record_prompt_rows(model)
    three = stack(stack(prompts[0], prompts[1]), prompts[2])
    run(model, latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=2), three, negative, steps=1)
    cond_or_uncond, context = calls[0]
    rows = context[cond_or_uncond.index(0) * 3:][:3]
    for row in range(3):
        assert torch.equal(rows[row], prompts[row][0][0][0])
    with pytest.raises(ValueError, match="MasaCtrlConditioningBatch: input 'target': the conditioning stacks 3 "
                                         r"prompts.*holds 4 images.*Set MasaCtrl Latent Batch 'targets' to 2"):
        run(model, latents({"samples": torch.zeros(1, 4, 16, 16)}, targets=3), three, negative, steps=1)
