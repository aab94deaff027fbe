"""ConsiStory feature injection math (attention/feature_injection.py) against the official code's
transcription (tests/official_consistory_injection.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import official_consistory_injection as official
from consistent_synthesis.attention import anchor_cache, feature_injection as FI
from sync_counter import count_host_syncs

RES, CHANNELS, OUT_CHANNELS = 8, 12, 16  # an 8x8 injection grid


def features(batch, seed=0, side=RES, channels=CHANNELS):
    gen = torch.Generator().manual_seed(seed)
    # a smooth shared pattern plus per-image noise: correspondences neither trivial nor random
    base = torch.randn(1, channels, side, side, generator=gen)
    return base + 0.7 * torch.randn(batch, channels, side, side, generator=gen)


def blob_masks(batch, seed=1, side=RES):
    """One random rectangle per image, ``(batch, side * side)`` bool."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, side, side, dtype=torch.bool)
    for b in range(batch):
        y0, x0 = torch.randint(0, side // 2, (2,), generator=gen).tolist()
        y1, x1 = y0 + side // 2 + 1, x0 + side // 2
        masks[b, y0:y1, x0:x1] = True
    return masks.flatten(1)


def layer_output(batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, RES * RES, OUT_CHANNELS, generator=gen)


def official_injection(feats, masks, output, anchors, step=5, steps=50):
    smoothed = torch.stack([official.gaussian_smooth(x, kernel_size=3, sigma=1) for x in feats], dim=0)
    nn_map, nn_distances = official.cyclic_nn_map(smoothed, {RES: masks}, [RES], torch.device("cpu"))
    mapping = official.create_anchor_mapping(feats.shape[0], anchor_indices=list(range(anchors)))
    return official.inject_outputs(output.clone(), step, RES, mapping, nn_map, nn_distances, {RES: masks},
                                   [(steps // 10, steps // 3, 0.8)])


def ours(feats, masks, output, anchors, alpha=0.8, smoothed=False):
    smoothed = feats if smoothed else FI.gaussian_smooth(feats)
    nn_map, nn_distances = FI.cyclic_nn_map(smoothed, masks, (RES, RES), sources=anchors)
    injector = FI.FeatureInjector.from_nn_map(nn_map, nn_distances, masks, anchors)
    return injector.inject_outputs(output, alpha), injector


def test_gaussian_smooth_equals_the_official_per_slice_convolution():
    feats = features(3)
    expected = torch.stack([official.gaussian_smooth(x) for x in feats])
    torch.testing.assert_close(FI.gaussian_smooth(feats), expected, rtol=0, atol=1e-6)


def test_cyclic_nn_map_equals_the_official_maps_for_every_pair():
    feats, masks = FI.gaussian_smooth(features(4)), blob_masks(4)
    nn_map, nn_distances = FI.cyclic_nn_map(feats, masks, (RES, RES))
    ref_map, ref_distances = official.cyclic_nn_map(feats, {RES: masks}, [RES], torch.device("cpu"))
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(nn_distances, ref_distances[RES], rtol=0, atol=1e-6)  # inf on the diagonal
    assert torch.equal(nn_map[off_diagonal], ref_map[RES][off_diagonal])
    # anchors only: the first columns, unchanged
    few_map, few_distances = FI.cyclic_nn_map(feats, masks, (RES, RES), sources=2)
    assert torch.equal(few_map, nn_map[:, :2]) and torch.equal(few_distances, nn_distances[:, :2])


def test_nn_map_resizes_the_features_to_the_grid_bilinearly():
    coarse = FI.gaussian_smooth(features(3, side=4))  # SD1.5's DIFT grid is half the injection grid
    masks = blob_masks(3)
    nn_map, nn_distances = FI.cyclic_nn_map(coarse, masks, (RES, RES))
    ref_map, ref_distances = official.cyclic_nn_map(coarse, {RES: masks}, [RES], torch.device("cpu"))
    torch.testing.assert_close(nn_distances, ref_distances[RES], rtol=0, atol=1e-6)
    assert torch.equal(nn_map[~torch.eye(3, dtype=torch.bool)], ref_map[RES][~torch.eye(3, dtype=torch.bool)])


def test_masked_out_source_tokens_are_never_chosen():
    feats, masks = FI.gaussian_smooth(features(3)), blob_masks(3)
    nn_map, nn_distances = FI.cyclic_nn_map(feats, masks, (RES, RES))
    for i in range(3):
        for j in range(3):
            if i != j:
                assert masks[j][nn_map[i, j]].all()
                assert (nn_distances[i, j] < 2).all()


@pytest.mark.parametrize("batch, anchors, seed", [(4, 2, 0), (4, 2, 1), (5, 3, 2), (3, 1, 3), (2, 2, 4)])
def test_injection_equals_the_official_feature_injector(batch, anchors, seed):
    feats, masks, output = features(batch, seed), blob_masks(batch, seed + 10), layer_output(batch, seed + 20)
    expected = official_injection(feats, masks, output, anchors)
    got, injector = ours(feats, masks, output, anchors)
    assert injector.final_mask_tgt.any()  # the case injects something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_images_read_the_rows_already_injected_before_them():
    # The official update is in place (old_output aliases output): anchor 1 takes tokens from anchor 0
    # after anchor 0 took tokens from anchor 1. A copy-based blend would differ; ours does not.
    feats, masks, output = features(4, 5), blob_masks(4, 15), layer_output(4, 25)
    expected = official_injection(feats, masks, output, anchors=2)
    got, injector = ours(feats, masks, output, anchors=2)
    from_copy = output.clone()
    flat = output.reshape(-1, OUT_CHANNELS)
    for i in range(4):
        blended = 0.8 * flat[injector.curr_nn_map[i]] + 0.2 * output[i]
        from_copy[i] = torch.where(injector.final_mask_tgt[i][:, None], blended, output[i])
    assert (from_copy - expected).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_only_tokens_inside_the_mask_and_under_the_dynamic_threshold_change():
    feats, masks, output = features(4, 6), blob_masks(4, 16), layer_output(4, 26)
    got, injector = ours(feats, masks, output, anchors=2)
    changed = (got != output).any(dim=-1)
    assert torch.equal(changed, injector.final_mask_tgt)
    assert not (injector.final_mask_tgt & ~masks).any()
    nn_map, nn_distances = FI.cyclic_nn_map(FI.gaussian_smooth(feats), masks, (RES, RES), sources=2)
    nearest = nn_distances.min(dim=1).values
    for i in range(4):
        threshold = official.get_dynamic_threshold(nearest[i])
        assert torch.equal(injector.final_mask_tgt[i], masks[i] & (nearest[i] < float(threshold)))


def test_an_empty_target_mask_injects_nothing():
    feats, output = features(4, 7), layer_output(4, 27)
    masks = torch.zeros(4, RES * RES, dtype=torch.bool)
    got, injector = ours(feats, masks, output, anchors=2)
    assert not injector.final_mask_tgt.any()
    assert torch.equal(got, output)


def test_empty_anchor_masks_inject_nothing():
    # Every source token is at distance 2: Otsu of a constant row is that value, and 2 < 2 is false.
    feats, output = features(4, 8), layer_output(4, 28)
    masks = blob_masks(4, 18)
    masks[:2] = False
    got, injector = ours(feats, masks, output, anchors=2)
    assert not injector.final_mask_tgt.any() and torch.equal(got, output)
    torch.testing.assert_close(got, official_injection(feats, masks, output, anchors=2), rtol=0, atol=0)


def test_a_single_anchor_takes_nothing_from_itself():
    feats, masks, output = features(3, 9), blob_masks(3, 19), layer_output(3, 29)
    got, injector = ours(feats, masks, output, anchors=1)
    assert not injector.final_mask_tgt[0].any() and torch.equal(got[0], output[0])
    assert injector.final_mask_tgt[1:].any()


def test_alpha_zero_is_the_identity():
    feats, masks, output = features(4, 3), blob_masks(4, 13), layer_output(4, 23)
    got, injector = ours(feats, masks, output, anchors=2, alpha=0.0)
    assert injector.final_mask_tgt.any() and torch.equal(got, output)
    assert FI.injection_alpha(7, 50, 0.0) is None


def test_alpha_one_copies_the_anchor_token():
    feats, masks, output = features(4, 4), blob_masks(4, 14), layer_output(4, 24)
    got, injector = ours(feats, masks, output, anchors=2, alpha=1.0)
    i = 3  # not an anchor: reads the anchors, which were injected before it
    flat = got.reshape(-1, OUT_CHANNELS)
    inject = injector.final_mask_tgt[i]
    assert inject.any()
    torch.testing.assert_close(got[i][inject], flat[injector.curr_nn_map[i]][inject], rtol=0, atol=0)


def test_the_official_steps_and_alpha():
    assert FI.injection_steps(50) == (5, 16)  # n_steps // 10 .. n_steps // 3, both included
    assert [FI.injection_alpha(s, 50) for s in (4, 5, 16, 17)] == [None, 0.8, 0.8, None]
    assert FI.injection_steps(20) == (2, 6)
    assert FI.injection_alpha(None, 50) is None


def _sd_sigmas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def test_dift_step_is_timestep_261_of_the_official_50_ddim_steps():
    sigmas = _sd_sigmas()
    timesteps = list(range(981, 0, -20))  # DDIM 'leading' with steps_offset 1 (ComfyUI's ddim_uniform)
    run = [float(sigmas[t]) for t in timesteps] + [0.0]
    step = FI.dift_step(run, float(sigmas[FI.DIFT_TIMESTEP]))
    assert timesteps[step] == 261 and step == 36
    # another schedule: the nearest level in log sigma
    coarse = [float(sigmas[t]) for t in (999, 749, 499, 299, 249, 99)] + [0.0]
    # t 299 and 249 straddle 261: sigma 0.830 and 0.693 around 0.725, 249 nearer in log sigma
    logs = [abs(np.log(s) - np.log(float(sigmas[261]))) for s in coarse[:-1]]
    assert int(np.argmin(logs)) == 4 and FI.dift_step(coarse, float(sigmas[261])) == 4


def test_no_host_sync_in_building_or_applying_the_injection():
    cpu = torch.device("cpu")
    feats, masks, output = features(4, 1), blob_masks(4, 11), layer_output(4, 21)
    smoothed = FI.gaussian_smooth(feats)
    assert count_host_syncs(lambda: FI.gaussian_smooth(feats), cpu) == 0
    assert count_host_syncs(lambda: FI.cyclic_nn_map(smoothed, masks, (RES, RES), sources=2), cpu) == 0
    nn_map, nn_distances = FI.cyclic_nn_map(smoothed, masks, (RES, RES), sources=2)
    assert count_host_syncs(lambda: FI.FeatureInjector.from_nn_map(nn_map, nn_distances, masks, 2), cpu) == 0
    injector = FI.FeatureInjector.from_nn_map(nn_map, nn_distances, masks, 2)
    assert count_host_syncs(lambda: injector.inject_outputs(output, 0.8), cpu) == 0


def test_other_grids_than_square():
    # ComfyUI latents need not be square: the maps work on (height, width) grids
    feats = FI.gaussian_smooth(features(3, 12, side=6))
    masks = torch.zeros(3, 6 * 10, dtype=torch.bool)
    masks[:, 10:40] = True
    nn_map, nn_distances = FI.cyclic_nn_map(feats, masks, (6, 10), sources=2)
    assert nn_map.shape == (3, 2, 60)
    resized = F.interpolate(feats, size=(6, 10), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    a, b = F.normalize(resized[2], dim=-1), F.normalize(resized[0], dim=-1)
    distances = torch.where(masks[0][:, None], 1 - b @ a.T, torch.tensor(2.0))
    torch.testing.assert_close(nn_distances[2, 0], distances.min(dim=0).values, rtol=0, atol=1e-6)


# -- the cached mode: new images injected from saved anchors (official anchor_nn_map, inject_anchors) --


def cached_case(new, anchors, seed):
    """New images' and anchors' smoothed features, masks and outputs, drawn as one batch."""
    feats = FI.gaussian_smooth(features(anchors + new, seed))
    masks, output = blob_masks(anchors + new, seed + 10), layer_output(anchors + new, seed + 20)
    return (feats[anchors:], masks[anchors:], output[anchors:]), (feats[:anchors], masks[:anchors], output[:anchors])


@pytest.mark.parametrize("new, anchors, seed", [(1, 2, 0), (3, 2, 1), (2, 1, 2), (2, 3, 3)])
def test_cached_injection_equals_the_official_anchor_nn_map_and_inject_anchors(new, anchors, seed):
    (feats, masks, output), (a_feats, a_masks, a_output) = cached_case(new, anchors, seed)
    nn_map, nn_distances = official.anchor_nn_map(feats, a_feats, {RES: masks}, {RES: a_masks}, [RES],
                                                  torch.device("cpu"))
    got_map, got_distances = FI.anchor_nn_map(feats, a_feats, a_masks, (RES, RES))
    assert torch.equal(got_map, nn_map[RES])
    torch.testing.assert_close(got_distances, nn_distances[RES], rtol=0, atol=1e-6)
    expected = official.inject_anchors(output.clone(), 5, RES, nn_map, nn_distances, {RES: masks}, [(5, 16, 0.8)],
                                       a_output)
    injector = FI.FeatureInjector.from_anchor_nn_map(got_map, got_distances, masks)
    assert injector.final_mask_tgt.any()  # one anchor too: a new image is never skipped
    torch.testing.assert_close(injector.inject_anchors(output, a_output.reshape(-1, OUT_CHANNELS), 0.8), expected,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_injection_is_the_batch_injection_of_the_new_rows(seed):
    # Batch mode maps a non-anchor image to the anchors only (extended_mapping): the same rule
    (feats, masks, output), (a_feats, a_masks, a_output) = cached_case(2, 2, seed)
    batch_out, _ = ours(torch.cat([a_feats, feats]), torch.cat([a_masks, masks]), torch.cat([a_output, output]),
                        anchors=2, smoothed=True)
    injector = FI.FeatureInjector.from_anchor_nn_map(*FI.anchor_nn_map(feats, a_feats, a_masks, (RES, RES)), masks)
    # the anchors' rows as the batch's own injection left them: what the saving run keeps
    cached = injector.inject_anchors(output, batch_out[:2].reshape(-1, OUT_CHANNELS), 0.8)
    assert torch.equal(cached, batch_out[2:])


@pytest.mark.parametrize("empty_anchor", [None, 0])
def test_anchor_outputs_kept_inside_their_masks_inject_the_same(empty_anchor):
    (feats, masks, output), (a_feats, a_masks, a_output) = cached_case(3, 2, 4)
    if empty_anchor is not None:
        a_masks[empty_anchor] = False
    injector = FI.FeatureInjector.from_anchor_nn_map(*FI.anchor_nn_map(feats, a_feats, a_masks, (RES, RES)), masks)
    full = injector.inject_anchors(output, a_output.reshape(-1, OUT_CHANNELS), 0.8)
    lent = a_output.reshape(-1, OUT_CHANNELS)[a_masks.reshape(-1)]
    compact = anchor_cache.on_lent_outputs(injector, a_masks)
    assert torch.equal(compact.final_mask_tgt, injector.final_mask_tgt) and injector.final_mask_tgt.any()
    assert torch.equal(compact.inject_anchors(output, lent, 0.8), full)
    cpu = torch.device("cpu")
    assert count_host_syncs(lambda: FI.anchor_nn_map(feats, a_feats, a_masks, (RES, RES)), cpu) == 0
    assert count_host_syncs(lambda: anchor_cache.on_lent_outputs(injector, a_masks), cpu) == 0
    assert count_host_syncs(lambda: compact.inject_anchors(output, lent, 0.8), cpu) == 0
