"""MasaCtrl's automatic masks (auto_mask) on the real host against the official auto variant."""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.model_management  # noqa: E402

import official_masactrl  # noqa: E402
import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.attention import masactrl_masks  # noqa: E402
from consistent_synthesis.nodes import masactrl as node  # noqa: E402
from consistent_synthesis.samplers import run_context  # noqa: E402
from consistent_synthesis.attention.layer_selection import LayerSelection, StepWindow  # noqa: E402
from consistent_synthesis.attention.masactrl import MasaCtrlSettings  # noqa: E402
from consistent_synthesis.nodes.unet_layers import self_attention_layers  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

STEPS = 5


def _prompts(batch=2):
    """Source and target prompts stacked along the batch (random embeddings), and a negative."""
    gen = torch.Generator().manual_seed(3)
    positive = [[torch.randn(batch, 77, tm.CONTEXT_DIM, generator=gen), {}]]
    negative = [[torch.randn(batch, 77, tm.CONTEXT_DIM, generator=gen), {}]]
    return positive, negative


def _sample(model, side=64, batch=2, sampler="euler", steps=STEPS, model_options=None):
    positive, negative = _prompts(batch)
    return ksampler(model, torch.zeros((batch, 4, side, side)), positive, negative, steps, 5.0, sampler)


@pytest.mark.slow  # a whole run at 4096 tokens, twice: about half a minute, most of the fast loop's time
def test_auto_mask_equals_the_official_mask_auto_over_a_whole_run(sd15, monkeypatch, measured):
    # SD1.5 at a 64 x 64 latent: the official code keeps its 16 x 16 maps, the pack its latent/4 maps,
    # the same layers. Steps and layers from the official defaults' shape (start 1 of 4, layer 10).
    # Both runs use PyTorch's SDPA as the host's attention (the CPU default, sub-quadratic, is slow at
    # 4096 tokens), so the comparison is of the MasaCtrl logic alone.
    import comfy.ldm.modules.attention as host_attention

    monkeypatch.setattr(host_attention, "optimized_attention", host_attention.attention_pytorch)
    monkeypatch.setattr(host_attention, "optimized_attention_masked", host_attention.attention_pytorch)
    steps = 4
    ours = node.patch_model(sd15, start_step=1, start_layer=10, auto_mask=True, source_tokens="1, 2",
                            target_tokens="3", mask_threshold=0.1)
    editor = official_masactrl.OfficialMaskAuto(start_step=1, start_layer=10, total_steps=steps,
                                                ref_token_idx=[1, 2], cur_token_idx=[3])
    reference = official_masactrl.patch(sd15, editor,
                                        self_attention_layers(sd15.get_model_object("diffusion_model")))
    regions = []
    original = node._auto_masks

    def spy(settings, state, extra_options, dtype):
        masks = original(settings, state, extra_options, dtype)
        if masks is not None:
            source, target, _ = masks
            regions.append((source.mean().item(), target.mean().item()))
        return masks

    monkeypatch.setattr(node, "_auto_masks", spy)
    out_ours = _sample(ours, steps=steps)
    out_official = _sample(reference, steps=steps)
    assert editor.cur_step == steps  # one batched cond/uncond forward per step, as the official code assumes
    # the masks were neither empty nor full: the comparison exercised the mask-guided branches
    assert regions and all(0 < s < 1 and 0 < t < 1 for s, t in regions)
    diff = (out_ours - out_official).abs().max().item()
    measured(f"max |pack - official auto| = {diff:.2e} over {len(regions)} masked layer calls")
    torch.testing.assert_close(out_ours, out_official, rtol=1e-4, atol=1e-4)


def _no_free_memory(device=None, torch_free_too=False):
    """The host's free-memory probe reporting (almost) nothing: it then runs cond and uncond apart."""
    return (1, 1) if torch_free_too else 1


def test_maps_that_select_everything_equal_plain_mutual(sd15):
    # A threshold of 0 makes every token foreground in source and target: plain mutual attention.
    auto = _sample(node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True, mask_threshold=0.0),
                   side=16, batch=3)
    plain = _sample(node.patch_model(sd15, start_step=0, start_layer=0), side=16, batch=3)
    assert torch.equal(auto, plain)


def test_split_calls_use_the_conditional_maps_of_their_evaluation_when_they_exist(sd15, monkeypatch, measured):
    # Under memory pressure the host runs cond and uncond in separate calls (forced here). A call
    # has automatic masks exactly when a cond call of the same evaluation recorded maps before it.
    used = []
    original = node._auto_masks

    def spy(settings, state, extra_options, dtype):
        masks = original(settings, state, extra_options, dtype)
        used.append((tuple(extra_options["cond_or_uncond"]), masks is not None, extra_options["sigmas"]))
        return masks

    monkeypatch.setattr(node, "_auto_masks", spy)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", _no_free_memory)
    _sample(node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True), side=16, batch=3, steps=2)
    assert {chunks for chunks, _, _ in used} == {(0,), (1,)}  # the calls were split
    for p, (chunks, has, sigmas) in enumerate(used):
        cond_before = any(c == (0,) and s is sigmas for c, _, s in used[:p])
        if chunks == (1,):
            assert has == cond_before, p
        elif not cond_before:
            assert has is False, p  # the first layer of a cond call has seen no cross-attention yet
    measured("split call order: " + " ".join("cond" if c == (0,) else "uncond" for c, _, _ in used[::16]))


def test_an_uncond_call_after_its_cond_call_uses_the_cond_maps(sd15):
    # The layer patch and the recorder of a patched model, called as the host would call them for an
    # evaluation split into a cond call then an uncond call (same sigmas object).
    model = node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True, source_tokens="1",
                             target_tokens="1")
    replace = model.model_options["transformer_options"]["patches_replace"]
    key = self_attention_layers(sd15.get_model_object("diffusion_model"))[4]  # a 16x16 layer at a 64x64 latent
    attn1, attn2 = replace["attn1"][key], replace["attn2"][key]
    sigmas = torch.tensor([1.0])
    options = {run_context.KEY: run_context.RunContext(), "sigmas": sigmas, "n_heads": 8,
               "activations_shape": [2, 32, 16, 16], "original_shape": [2, 4, 64, 64],
               "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 64, generator=gen) for _ in range(3))
    ctx = torch.randn(2, 77, 64, generator=gen)
    uncond = dict(options, cond_or_uncond=[1])
    plain = node._auto_masks(attn1.settings, node._run_state(uncond, attn1.settings), uncond, q.dtype)
    assert plain is None  # nothing recorded yet in this evaluation
    attn2(q, ctx, ctx, dict(options, cond_or_uncond=[0]))
    masks = node._auto_masks(attn1.settings, node._run_state(uncond, attn1.settings), uncond, q.dtype)
    assert masks is not None
    later = dict(uncond, sigmas=torch.tensor([0.5]))  # the next evaluation: nothing carried over
    assert node._auto_masks(attn1.settings, node._run_state(later, attn1.settings), later, q.dtype) is None


def test_only_the_conditional_rows_maps_are_kept(sd15, monkeypatch):
    seen = []
    original = masactrl_masks.MaskState.add_maps

    def add_maps(self, rows, sigmas):
        seen.append(rows.shape[0])
        return original(self, rows, sigmas)

    monkeypatch.setattr(masactrl_masks.MaskState, "add_maps", add_maps)
    _sample(node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True), side=16, batch=3, steps=2)
    # cond and uncond batched: 6 rows a call, of which the 3 conditional ones are kept, in the 1 layer
    # at latent/4 (4 x 4 here) of each of the 2 evaluations
    assert seen == [3] * 2 * 5  # SD1.5 has 5 transformer layers at latent/4 (input 7, 8, output 3, 4, 5)


def test_auto_mask_adds_no_host_sync(sd15, measured):
    baseline = HostSyncCounter()
    with baseline:
        _sample(node.patch_model(sd15, start_step=0, start_layer=0), side=16, batch=3, steps=3)
    with HostSyncCounter() as auto:
        _sample(node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True), side=16, batch=3, steps=3)
    measured(f"plain mutual {baseline.total} host syncs, auto mask {auto.total}")
    assert auto.total <= baseline.total, auto.report()


@pytest.mark.parametrize("side", [2, 3, 4])
def test_a_latent_too_small_for_any_map_is_refused_naming_the_smallest_size_that_works(sd15, side):
    # 16, 24 and 32 px: latent/4 maps of 1x1, where min-max leaves nothing (an empty mask, silently)
    model = node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True)
    with pytest.raises(ValueError, match=rf"^MasaCtrlAttentionPatch: input 'auto_mask': a {side * 8}x{side * 8} px "
                                         r"image .*too small.*at least 40 px on one side.*turn auto_mask off"):
        _sample(model, side=side, steps=1)
    _sample(node.patch_model(sd15, start_step=0, start_layer=0), side=side, steps=1)  # without auto_mask: runs


def test_the_smallest_latent_named_in_the_refusal_gives_masks_that_are_neither_empty_nor_full(sd15, monkeypatch):
    regions = []
    original = node._auto_masks

    def spy(settings, state, extra_options, dtype):
        masks = original(settings, state, extra_options, dtype)
        if masks is not None:
            h, w = extra_options["activations_shape"][-2:]
            regions.append((h * w, masks[0].mean().item(), masks[1].mean().item()))
        return masks

    monkeypatch.setattr(node, "_auto_masks", spy)
    out = _sample(node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True), side=5, steps=1)  # 40 px
    assert torch.isfinite(out).all()
    assert regions and all(s > 0 and t > 0 for _, s, t in regions)  # never empty
    # neither empty nor full wherever a layer has more than one position (the middle block's 1x1 is all in)
    assert [n for n, _, _ in regions if n > 1] and all(0 < s < 1 and 0 < t < 1 for n, s, t in regions if n > 1)


def test_auto_mask_with_given_masks_names_both_inputs(sd15):
    mask = torch.ones(1, 16, 16)
    with pytest.raises(ValueError, match="auto_mask.*source_mask/target_mask"):
        node.patch_model(sd15, auto_mask=True, source_mask=mask, target_mask=mask)


def test_token_index_past_the_prompt_fails_naming_the_input(sd15):
    model = node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True, target_tokens="1, 80")
    with pytest.raises(ValueError, match="target_tokens"):
        _sample(model, side=16, batch=2, steps=1)


def test_malformed_token_list_fails_naming_the_input(sd15):
    with pytest.raises(ValueError, match="source_tokens"):
        node.patch_model(sd15, auto_mask=True, source_tokens="one")


def test_original_model_is_untouched(sd15):
    before = _sample(sd15, side=16, batch=2, steps=2)
    _sample(node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True), side=16, batch=2, steps=2)
    assert torch.equal(_sample(sd15, side=16, batch=2, steps=2), before)
    assert "attn2" not in sd15.model_options.get("transformer_options", {}).get("patches_replace", {})


def test_explicit_layer_list_patches_only_those_layers(sd15):
    model = node.patch_model(sd15, start_step=0, layers=[3, 10, 12])
    patched = model.model_options["transformer_options"]["patches_replace"]["attn1"]
    keys = self_attention_layers(sd15.get_model_object("diffusion_model"))
    assert set(patched) == {keys[3], keys[10], keys[12]}
    with pytest.raises(ValueError, match="layers"):
        node.patch_model(sd15, layers=[3, 16])


def _stacked(source_tokens: int, target_tokens: int):
    """A source and a target prompt of different lengths stacked as MasaCtrl Conditioning Batch does
    (the shorter repeated up to the longer's length), and a negative."""
    from consistent_synthesis.nodes.masactrl_batch import stack_conditioning

    source = tm.conditioning("sd15", tokens=source_tokens, seed=1)
    target = tm.conditioning("sd15", tokens=target_tokens, seed=2)
    return stack_conditioning(source, target), tm.conditioning("sd15", batch=2, seed=3)


def _sample_with(model, positive, negative, side=16, steps=1):
    return ksampler(model, torch.zeros((2, 4, side, side)), positive, negative, steps, 5.0)


def test_a_target_token_past_the_target_prompt_fails_though_the_source_prompt_is_longer(sd15):
    # source: two chunks (154 tokens); target: one chunk (77), repeated to 154 in the batch. Index 100 is in
    # the source's length but would read the target's repeated token 23.
    positive, negative = _stacked(154, 77)
    model = node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True, source_tokens="100",
                             target_tokens="1, 100")
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'target_tokens': token indices \[100\] "
                                         r"are past the target prompt of batch row 1 \(repeated to 154 tokens in "
                                         r"the batch\), which has 77 tokens \(valid indices 0 to 76\)"):
        _sample_with(model, positive, negative)
    ok = node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True, source_tokens="100",
                          target_tokens="1, 76")
    assert torch.isfinite(_sample_with(ok, positive, negative)).all()


def test_a_source_token_past_the_source_prompt_fails_though_the_target_prompt_is_longer(sd15):
    positive, negative = _stacked(77, 154)
    model = node.patch_model(sd15, start_step=0, start_layer=0, auto_mask=True, source_tokens="120",
                             target_tokens="120")
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'source_tokens': token indices \[120\] "
                                         r"are past the source prompt .*which has 77 tokens"):
        _sample_with(model, positive, negative)


def test_one_short_target_prompt_for_several_targets_is_checked_too(sd15):
    positive, _ = _stacked(154, 77)  # a source and one target prompt over a batch of 1 + 3
    def settings(target_tokens):
        return MasaCtrlSettings(window=StepWindow(), selection=LayerSelection(), layers=(), source_index=0,
                                source_tokens=(100,), target_tokens=target_tokens)
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'target_tokens': .*batch row 1 .*77 tokens"):
        masactrl_masks.check_tokens_against_prompts(settings((100,)), 4, [positive[0][0]], node.NODE)
    masactrl_masks.check_tokens_against_prompts(settings((76,)), 4, [positive[0][0]], node.NODE)
