"""RePaint reads nothing back from the device per model evaluation, and drives the step clock.

On a GPU every host synchronisation stalls kernel launches; testing/sync_counter.py counts, on the
CPU, the operations that would cause one. RePaint runs its own loop over the noise levels, so it
must know them on the host (one copy per run) and say which level each evaluation is at.

The UNet is replaced by a stand-in (``0.5 * x``) so the counts are those of the sampling machinery:
the host's CFG and sampler code, the same for both runs, and RePaint's own.
"""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.model_base  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

import tiny_models as tm  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402
from consistent_synthesis.nodes import run_context as clock_node  # noqa: E402
from consistent_synthesis.nodes.repaint import RePaint  # noqa: E402
from consistent_synthesis.samplers import repaint as R  # noqa: E402
from consistent_synthesis.samplers import step_clock  # noqa: E402

MT = comfy.model_base.ModelType
JUMP_LENGTH, JUMP_N_SAMPLE = 2, 3


class StandInUNet(torch.nn.Module):
    """A denoiser with no synchronisation of its own: the model output is half the input."""

    dtype = torch.float32

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        return 0.5 * x


def stand_in_model(model_type):
    """A model with a step clock; ``steps`` receives the clock's step at every evaluation."""
    patcher = tm.tiny_model("sd15", model_type=model_type)
    patcher.model.diffusion_model = StandInUNet()
    clock_node.attach(patcher)
    steps = []

    def record(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])  # a clock on sigma reads it in there
        clock = step_clock.clock_of(args["c"]["transformer_options"])
        steps.append(clock.step if not clock.by_sigma else ("by sigma", clock.step))
        return out

    patcher.set_model_unet_function_wrapper(record)
    return patcher, steps


def latent():
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    return samples, mask


def sample(model, sampler, steps):
    """Syncs counted during ``sample_custom`` (the sigmas computed before counting, as the
    scheduler's are the same for both samplers)."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    samples, mask = latent()
    noise = comfy.sample.prepare_noise(samples, 1)
    with HostSyncCounter() as counter:
        comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, tm.conditioning("sd15"),
                                   tm.conditioning("sd15", seed=1), samples, noise_mask=mask, disable_pbar=True,
                                   seed=1)
    return counter


def expected_steps(schedule, evaluated_levels):
    """The step of every evaluation along a RePaint schedule: the level (sigma index) it is at;
    ``evaluated_levels(level)`` lists the levels the inner sampler's step from ``level`` evaluates."""
    return [evaluated for begin, stop in R.segments(schedule) if stop > begin
            for level in range(begin, stop) for evaluated in evaluated_levels(level)]


@pytest.mark.parametrize("model_type", [MT.EPS, MT.FLOW])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun"])
def test_repaint_with_jumps_adds_no_sync_per_evaluation_over_the_stock_masked_sampler(model_type, name, measured):
    """Counted over two run lengths: the inner sampler's own syncs per step are measured on the
    stock run; what RePaint adds beyond them is a constant per run, not a number per evaluation."""
    model, _ = stand_in_model(model_type)
    extra, lines = {}, []
    stock = {steps: sample(model, comfy.samplers.sampler_object(name), steps).total for steps in (6, 12)}
    per_step = (stock[12] - stock[6]) / 6
    for steps in (6, 12):
        sampler = RePaint(comfy.samplers.sampler_object(name), JUMP_LENGTH, JUMP_N_SAMPLE)
        inner_steps = R.model_steps(sampler.schedule(steps))
        counter = sample(model, sampler, steps)
        extra[steps] = counter.total - stock[steps] - per_step * (inner_steps - steps)
        lines.append(f"{steps} steps ({inner_steps} inner steps): stock {stock[steps]}, RePaint {counter.total} "
                     f"({counter.report(4) or 'none'})")
    measured(f"{model_type.name} {name}: " + "; ".join(lines))
    assert inner_steps > 2 * 12  # the jumps more than double the evaluations
    assert extra[12] <= extra[6] <= 2, extra


def test_old_style_float_of_device_sigmas_per_jump_would_be_counted():
    """The counter sees what RePaint used to do at every jump (``float()`` of the sigma tensors)."""
    sigmas = torch.linspace(3, 0, 7)
    schedule = R.jump_schedule(6, 2, 3)
    with HostSyncCounter() as counter:
        for begin, stop in R.segments(schedule):
            if stop < begin:
                R.forward_transition(torch.zeros(2), sigmas[begin], sigmas[stop], torch.zeros(2), False)
    assert counter.total == 2 * sum(1 for b, s in R.segments(schedule) if s < b)
    with HostSyncCounter() as counter:
        R.repaint(lambda x, segment, number: x, torch.zeros(2), sigmas, schedule, lambda: torch.zeros(2), False)
    assert counter.total == 0


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_repaint_sets_the_step_clock_to_the_level_of_every_evaluation(name):
    """Step i is the interval (sigma[i+1], sigma[i]]: along the jump schedule each evaluation is
    at the level its descending stretch has reached; heun's second call, at sigma[i+1], is in
    step i + 1 (and skipped on the last step down to sigma 0), as in a plain run."""
    model, steps = stand_in_model(MT.EPS)
    sampler = RePaint(comfy.samplers.sampler_object(name), JUMP_LENGTH, JUMP_N_SAMPLE)
    assert sampler.drives_step_clock
    sample(model, sampler, 8)
    total = 8
    schedule = sampler.schedule(total)
    if name == "heun":
        def levels(level):
            return [level] if level == total - 1 else [level, level + 1]
    else:
        def levels(level):
            return [level]
    assert steps == expected_steps(schedule, levels)
    assert max(steps) == total - 1 and len(set(steps)) == total


def test_an_inner_sampler_whose_callbacks_do_not_mark_steps_puts_the_clock_on_sigma():
    """uni_pc evaluates at the end of its step: its callbacks cannot place evaluations, so the
    clock reads each evaluation's level from its sigma (once per evaluation, the fallback)."""
    model, steps = stand_in_model(MT.EPS)
    inner = comfy.samplers.sampler_object("uni_pc")
    assert not step_clock.callback_aligned(inner)
    sample(model, RePaint(inner, JUMP_LENGTH, JUMP_N_SAMPLE), 8)
    assert steps and all(isinstance(s, tuple) and s[0] == "by sigma" for s in steps)
    levels = [s[1] for s in steps]
    assert set(levels) <= set(range(8)) and 7 in levels


def test_without_a_clock_repaint_runs_as_before():
    model = tm.tiny_model("sd15")
    model.model.diffusion_model = StandInUNet()
    counter = sample(model, RePaint(comfy.samplers.sampler_object("euler"), JUMP_LENGTH, JUMP_N_SAMPLE), 6)
    assert counter.total <= sample(model, comfy.samplers.sampler_object("euler"), 6).total
