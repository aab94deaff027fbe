"""ConsiStoryFeatureInjection on the real host: tiny SD1.5 (and SDXL) UNets, real two-pass sampling.

Every injected layer output is recomputed here from what the first pass recorded (the DIFT
features, captured beside the patch) with the official code's transcription
(tests/official_consistory_injection.py): gaussian_smooth, cyclic_nn_map, FeatureInjector.inject_outputs.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import require_host

require_host()

import comfy.samplers  # noqa: E402

import official_consistory_injection as official  # noqa: E402
import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.attention import feature_injection as fi  # noqa: E402
from consistent_synthesis.nodes import consistory, consistory_injection as node  # noqa: E402
from consistent_synthesis.samplers import run_context, step_clock  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

BATCH, SIDE, STEPS = 3, 16, 10
GRID = SIDE // 2  # the latent/2 injection grid


def _masks():
    masks = torch.zeros(BATCH, SIDE * 8, SIDE * 8)
    masks[0, 16:80, 16:96] = 1
    masks[1, 40:128, 0:64] = 1
    masks[2, 0:64, 64:128] = 1
    return masks


def _sample(model, kind="sd15", steps=STEPS, cfg=5.0):
    return ksampler(model, torch.zeros(BATCH, 4, SIDE, SIDE), tm.conditioning(kind, batch=BATCH, seed=1),
                    tm.conditioning(kind, batch=BATCH, seed=2), steps, cfg)


def _consistory(model, **kwargs):
    settings = dict(start_step=1, mask_dropout=0.0, subject_masks=_masks(), share_queries=True) | kwargs
    return consistory.patch_model(model, **settings)


def _install_spies(patched, calls, features):
    patches = patched.model_options["transformer_options"]["patches"]
    (inject,) = patches["attn1_output_patch"]
    recorder = patches["output_block_patch"][0]
    settings = inject.settings

    def state_of(options):
        context = run_context.current(options)
        return None if context is None else context.peek((node.KEY, settings))

    def vanilla(options):  # ConsiStory's extra vanilla-query call: the official code injects nothing there
        context = run_context.current(options)
        run = None if context is None else context.peek((consistory.KEY, settings.consistory))
        return run is not None and run.caching

    def spy(n, extra_options):
        state = state_of(extra_options)
        out = inject(n, extra_options)
        calls.append(dict(n=n.clone(), out=out, block=extra_options["block"], index=extra_options["block_index"],
                          grid=tuple(extra_options["activations_shape"][-2:]),
                          cond_or_uncond=list(extra_options["cond_or_uncond"]),
                          step=step_clock.current_step(extra_options), second=isinstance(state, node.Injecting),
                          vanilla=vanilla(extra_options)))
        return out

    def beside(h, hsp, transformer_options):
        state = state_of(transformer_options)
        h_out, hsp_out = recorder(h, hsp, transformer_options)
        if isinstance(state, node.Recording) and transformer_options["block"][0] == "output":
            features.append(dict(h=h.clone(), block=transformer_options["block"][1],
                                 step=step_clock.current_step(transformer_options),
                                 cond_or_uncond=list(transformer_options["cond_or_uncond"]),
                                 recorded=state.features))
        return h_out, hsp_out

    patches["attn1_output_patch"] = [spy]
    patches["output_block_patch"] = [beside] + patches["output_block_patch"][1:]
    return settings


def _run_sigmas(model, steps=STEPS):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def test_injected_layers_equal_the_official_injection_recomputed_from_the_recorded_features(sd15, measured):
    patched = node.patch_model(_consistory(sd15))
    calls, features = [], []
    _install_spies(patched, calls, features)
    _sample(patched)

    # 1. the DIFT features: the conditional rows entering output block 3 (up_blocks[0]'s output) at the
    #    step of timestep 261, recorded once in the first pass
    model_sampling = sd15.get_model_object("model_sampling")
    dift_step = fi.dift_step(_run_sigmas(sd15).tolist(), float(model_sampling.sigma(torch.tensor(261.0))))
    at_step = [f for f in features if f["block"] == 3 and f["step"] == dift_step]
    assert at_step, "the first pass reached the DIFT step"
    first = at_step[0]
    c = first["cond_or_uncond"].index(0)
    dift = first["h"][c * BATCH:(c + 1) * BATCH]
    recorded = at_step[-1]["recorded"]
    assert recorded is not None and torch.equal(recorded, dift) and dift.shape[-2:] == (SIDE // 4, SIDE // 4)

    # 2. the official maps from those features and the masks (given masks at the 8x8 grid, nearest, > 0.5)
    masks = F.interpolate(_masks()[:, None], size=(GRID, GRID), mode="nearest").flatten(1) > 0.5
    smoothed = torch.stack([official.gaussian_smooth(x, kernel_size=3, sigma=1) for x in dift], dim=0)
    nn_map, nn_distances = official.cyclic_nn_map(smoothed, {GRID: masks}, [GRID], torch.device("cpu"))
    mapping = official.create_anchor_mapping(BATCH, anchor_indices=[0, 1])

    # 3. every layer call of the second pass: injected where the official code injects, untouched elsewhere
    first_step, last_step = STEPS // 10, STEPS // 3
    injected, worst = set(), 0.0
    for call in calls:
        n, out = call["n"], call["out"]
        acts = (call["second"] and not call["vanilla"] and call["grid"] == (GRID, GRID) and call["block"][0] in ("input", "output")
                and first_step <= call["step"] <= last_step)
        if not acts or 0 not in call["cond_or_uncond"]:
            assert torch.equal(out, n)
            continue
        c = call["cond_or_uncond"].index(0)
        rows = slice(c * BATCH, (c + 1) * BATCH)
        expected = official.inject_outputs(n[rows].clone(), call["step"], GRID, mapping, nn_map, nn_distances,
                                           {GRID: masks}, [(first_step, last_step, 0.8)])
        worst = max(worst, (out[rows] - expected).abs().max().item())
        others = [r for r in range(n.shape[0]) if not rows.start <= r < rows.stop]
        assert torch.equal(out[others], n[others])  # the unconditional rows are untouched (official)
        if not torch.equal(out[rows], n[rows]):
            injected.add((call["block"], call["index"]))
    measured(f"worst absolute difference to the official injection {worst:.1e} over the second pass "
             f"({len(calls)} layer calls, vanilla-query calls included and untouched)")
    assert any(c["vanilla"] and c["second"] and c["grid"] == (GRID, GRID) and c["step"] == first_step for c in calls)
    assert worst < 1e-5
    # SD1.5's latent/2 layers: input blocks 4, 5 and output blocks 6, 7, 8 (the official 'down' and 'up' at 64)
    assert injected == {(("input", 4), 0), (("input", 5), 0), (("output", 6), 0), (("output", 7), 0),
                        (("output", 8), 0)}


def test_the_second_pass_changes_the_images_and_alpha_zero_is_one_pass(sd15):
    one_pass = _sample(_consistory(sd15))
    two_pass = _sample(node.patch_model(_consistory(sd15)))
    assert (two_pass - one_pass).abs().max() > 1e-4
    assert torch.equal(_sample(node.patch_model(_consistory(sd15), alpha=0.0)), one_pass)


def test_empty_masks_give_the_first_pass_again(sd15):
    # Nothing to inject: the second pass (a fresh run, the same dropout draws) repeats the first exactly.
    base = dict(subject_masks=torch.zeros(1, 64, 64))
    one_pass = _sample(_consistory(sd15, **base))
    assert torch.equal(_sample(node.patch_model(_consistory(sd15, **base))), one_pass)


def test_automatic_masks_with_dropout_run_both_passes_reproducibly(sd15):
    settings = dict(subject_masks=None, subject_tokens="1, 2 | 2 | 3", mask_dropout=0.5, seed=4)
    one_pass = _sample(_consistory(sd15, **settings))
    first = _sample(node.patch_model(_consistory(sd15, **settings)))
    again = _sample(node.patch_model(_consistory(sd15, **settings)))
    assert torch.equal(first, again)
    assert (first - one_pass).abs().max() > 1e-4


def test_injection_adds_no_host_sync_in_the_layers(sd15, measured):
    patched = node.patch_model(_consistory(sd15))
    patches = patched.model_options["transformer_options"]["patches"]
    in_patches, changed = [], []

    def counted(fn, arguments):
        def call(*args):
            with HostSyncCounter() as counter:
                out = fn(*args)
            in_patches.append(counter.total)
            if arguments == 2 and not torch.equal(out, args[0]):
                changed.append(True)
            return out
        return call

    patches["attn1_output_patch"] = [counted(p, 2) for p in patches["attn1_output_patch"]]
    patches["output_block_patch"] = [counted(p, 3) for p in patches["output_block_patch"]]
    with HostSyncCounter() as one_pass:
        _sample(_consistory(sd15))
    with HostSyncCounter() as two_pass:
        _sample(patched)
    measured(f"{one_pass.total} host syncs with ConsiStory, {two_pass.total} with feature injection (two passes); "
             f"{sum(in_patches)} in {len(in_patches)} patch calls, {len(changed)} of them injecting")
    assert changed and sum(in_patches) == 0
    assert two_pass.total <= 2 * one_pass.total, two_pass.report()


def test_sdxl_injects_in_the_official_latent2_layers(measured):
    sdxl = tm.tiny_model("sdxl")
    patched = node.patch_model(_consistory(sdxl))
    calls, features = [], []
    _install_spies(patched, calls, features)
    _sample(patched, kind="sdxl", steps=6)
    injected = {(c["block"], c["index"]) for c in calls if not torch.equal(c["out"], c["n"])}
    # the official 'down' layers at 64 (down_blocks.1: ComfyUI input blocks 4, 5) and 'up' at 64
    # (up_blocks.1: output blocks 3, 4, 5), two transformer layers each in SDXL
    expected = {(("input", b), i) for b in (4, 5) for i in (0, 1)} | {(("output", b), i) for b in (3, 4, 5)
                                                                      for i in (0, 1)}
    measured(f"SDXL topology: {len(injected)} layers injected")
    assert injected == expected
    assert any(f["block"] == 3 and f["recorded"] is not None for f in features)
    dift = next(f for f in features if f["block"] == 3)["h"]
    assert dift.shape[-2:] == (GRID, GRID)  # SDXL's DIFT features are at the injection grid (the official 64)


@pytest.mark.parametrize("make, name", [
    (lambda m: m, "model"),
    (lambda m: consistory.patch_model(m, token_sharing="storydiffusion"), "model"),
])
def test_a_model_without_consistory_is_refused(sd15, make, name):
    with pytest.raises(ValueError, match=f"ConsiStoryFeatureInjection: input '{name}'"):
        node.patch_model(make(sd15))


def test_alpha_outside_zero_to_one_is_refused(sd15):
    for alpha in (float("nan"), 1.5, -0.1):
        with pytest.raises(ValueError, match="ConsiStoryFeatureInjection: input 'alpha'"):
            node.patch_model(_consistory(sd15), alpha=alpha)
