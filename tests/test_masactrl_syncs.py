"""MasaCtrl adds no host synchronisation to sampling (the GPU hot-path rule), counted on the CPU.

Each count is the patched run's minus the unpatched run's at the same settings: the host's own
scheduler and sampler code reads a few device values per run; a patch that read one per layer
would add tens per step (16 patched layers x steps here).
"""

import pytest
import torch

from conftest import require_host

require_host()


import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes.masactrl import patch_model  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

LATENT = (3, 4, 8, 8)
STEPS = 3


def _sample(model, sampler):
    return ksampler(model, torch.zeros(LATENT), tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), STEPS, 5.0,
                    sampler)


def _syncs(model, sampler) -> HostSyncCounter:
    with HostSyncCounter() as counter:
        _sample(model, sampler)
    return counter


def _masks():
    source = torch.zeros(1, 8, 8)
    source[:, 2:6, 2:6] = 1
    target = torch.zeros(2, 8, 8)
    target[0, 1:5, 1:5] = 1
    target[1, 3:8, 0:4] = 1
    return source, target


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("mode", ["mutual", "union", "mask"])
def test_patched_sampling_adds_no_host_sync(sd15, sampler, mode, measured):
    kwargs = dict(start_step=0, start_layer=0)
    if mode == "mask":
        kwargs["source_mask"], kwargs["target_mask"] = _masks()
    else:
        kwargs["mode"] = mode
    baseline = _syncs(sd15, sampler)
    patched = _syncs(patch_model(sd15, **kwargs), sampler)
    added = patched.total - baseline.total
    measured(f"{mode}/{sampler}: {baseline.total} host syncs unpatched, {patched.total} patched")
    assert added <= 0, f"MasaCtrl added {added} host syncs: {patched.report()}"


def test_fallback_for_unaligned_samplers_reads_the_sigma_once_per_evaluation(sd15, measured):
    # UniPC evaluates at the end of its step, so the clock reads the step from the sigma: one read
    # per model evaluation, never one per layer.
    baseline = _syncs(sd15, "uni_pc")
    patched = _syncs(patch_model(sd15, start_step=0, start_layer=0), "uni_pc")
    evaluations = STEPS  # one cond+uncond call per step
    measured(f"uni_pc: {baseline.total} unpatched, {patched.total} patched")
    assert patched.total - baseline.total <= 2 * evaluations, patched.report()


def test_counter_sees_the_per_layer_syncs_of_a_step_read_from_the_sigma(sd15, monkeypatch):
    # The counter is not blind: the pre-clock way (the step read from the sigma in every layer)
    # shows up as one or more syncs per patched layer call.
    from consistent_synthesis.samplers import step_clock

    patched = patch_model(sd15, start_step=0, start_layer=0)
    monkeypatch.setattr(step_clock, "clock_of", lambda options: None)  # no clock: read per layer
    counter = _syncs(patched, "euler")
    monkeypatch.undo()
    baseline = _syncs(sd15, "euler")
    assert counter.total - baseline.total >= 16 * STEPS


def test_given_masks_are_resized_once_per_resolution_and_run(sd15, monkeypatch):
    from consistent_synthesis.attention import masactrl as M

    calls = []
    original = M.resize_mask

    def counting(mask, h, w):
        calls.append((h, w))
        return original(mask, h, w)

    monkeypatch.setattr(M, "resize_mask", counting)
    source, target = _masks()
    model = patch_model(sd15, start_step=0, start_layer=0, source_mask=source, target_mask=target)
    _sample(model, "euler")
    # 8x8 latent: layers at 8x8, 4x4 and 2x2 and the middle block's 1x1
    assert sorted(set(calls)) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert len(calls) == 2 * 4  # source and target, once per resolution for the whole run
    calls.clear()
    _sample(model, "euler")
    assert len(calls) == 2 * 4  # a new run starts afresh: nothing kept from the last prompt


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "dpmpp_2s_ancestral", "heunpp2", "dpmpp_sde",
                                     "uni_pc"])
def test_window_follows_the_sigma_of_every_evaluation(sd15, sampler, monkeypatch):
    # The clock decides the window on the host; for samplers with midpoint evaluations it reads the
    # sigma at the window's edges. Either way every layer call agrees with the sigma rule.
    from consistent_synthesis.samplers import step_clock

    decisions = []
    original = step_clock.in_window

    def checked(options, window):
        inside = original(options, window)
        step = step_clock.step_from_sigma(options["sample_sigmas"], options["sigmas"].max())
        decisions.append((inside, window.contains(step)))
        return inside

    monkeypatch.setattr(step_clock, "in_window", checked)
    ksampler(patch_model(sd15, start_step=2, end_step=4, start_layer=12), torch.zeros(LATENT), tm.conditioning("sd15"),
             tm.conditioning("sd15", seed=1), 6, 5.0, sampler)
    assert decisions and all(inside == expected for inside, expected in decisions)
    assert any(inside for inside, _ in decisions) and not all(inside for inside, _ in decisions)
