"""RePaint's schedule and transitions (samplers/repaint.py), with no ComfyUI."""

import pytest
import torch

from consistent_synthesis.samplers import repaint as R


def official_get_schedule_jump(t_T, n_sample, jump_length, jump_n_sample):
    """The official RePaint ``get_schedule_jump`` (andreas128/RePaint, guided_diffusion/scheduler.py),
    restated with the jump2/jump3 refinements at their defaults (no effect) and no start_resampling."""
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if t + 1 < t_T - 1:
            for _ in range(n_sample - 1):
                t += 1
                ts.append(t)
                if t >= 0:
                    t -= 1
                    ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize("steps,jump_length,jump_n_sample", [
    (250, 10, 10), (50, 10, 10), (20, 5, 3), (30, 7, 4), (10, 10, 10), (12, 1, 2), (8, 3, 1)])
def test_schedule_is_the_official_one_on_sigma_indices(steps, jump_length, jump_n_sample):
    official = official_get_schedule_jump(steps, 1, jump_length, jump_n_sample)
    assert R.jump_schedule(steps, jump_length, jump_n_sample) == [steps - 1 - t for t in official]


def paper_schedule(steps, jump_length, jump_n_sample):
    """The schedule as the paper describes it (Sec. 4.2, Fig. 3), built without the official loop:
    walk t = T-1 ... 0, -1 one level at a time; at every jump point t = 0, L, 2L, ... below T - L
    go up L levels and down again, jump_n_sample - 1 times. Returned as sigma indices."""
    points = set(range(0, steps - jump_length, jump_length))
    times = []
    for t in range(steps - 1, -2, -1):
        times.append(t)
        if t in points:
            for _ in range(jump_n_sample - 1):
                times += list(range(t + 1, t + jump_length + 1))
                times += list(range(t + jump_length - 1, t - 1, -1))
    return [steps - 1 - t for t in times]


@pytest.mark.parametrize("steps,jump_length,jump_n_sample", [
    (250, 10, 10), (50, 10, 10), (20, 5, 3), (30, 7, 4), (10, 10, 10), (12, 1, 2), (8, 3, 1), (5, 9, 4)])
def test_schedule_is_the_papers_description(steps, jump_length, jump_n_sample):
    schedule = R.jump_schedule(steps, jump_length, jump_n_sample)
    assert schedule == paper_schedule(steps, jump_length, jump_n_sample)
    # closed form: every jump point re-denoises jump_length levels, jump_n_sample - 1 more times
    points = len(range(0, steps - jump_length, jump_length))
    assert R.model_steps(schedule) == steps + (jump_n_sample - 1) * jump_length * points


@pytest.mark.parametrize("steps,evaluations", [(250, 2410), (50, 410)])
def test_paper_settings_give_the_papers_evaluation_counts(steps, evaluations):
    assert R.model_steps(R.jump_schedule(steps, 10, 10)) == evaluations


def test_schedule_moves_by_one_level_from_the_first_sigma_to_the_last():
    schedule = R.jump_schedule(40, 6, 5)
    assert schedule[0] == 0 and schedule[-1] == 40
    assert all(abs(b - a) == 1 for a, b in zip(schedule, schedule[1:]))
    assert min(schedule) == 0 and max(schedule) == 40


def test_one_sample_per_level_is_plain_sampling():
    assert R.jump_schedule(25, 10, 1) == list(range(26))


def test_window_keeps_only_the_jumps_inside_it():
    steps, length = 50, 5
    schedule = R.jump_schedule(steps, length, 4, start=0.4, end=0.8)
    ups = [(a, b) for a, b in zip(schedule, schedule[1:]) if b < a]
    assert ups, "the window holds jumps"
    assert all(0.4 * steps <= b and a <= 0.8 * steps for a, b in ups)
    full = R.jump_schedule(steps, length, 4)
    assert R.model_steps(schedule) < R.model_steps(full)
    assert R.model_steps(R.jump_schedule(steps, length, 4, 0.0, 1.0)) == R.model_steps(full)


def test_segments_split_the_schedule_into_monotone_runs():
    assert R.segments([0, 1, 2, 3, 2, 1, 2, 3, 4]) == [(0, 3), (3, 1), (1, 4)]
    assert R.segments([0, 1]) == [(0, 1)]


def _moments(samples):
    return samples.mean(0), samples.var(0)


@pytest.mark.parametrize("flow", [False, True])
def test_known_region_draw_has_the_forward_marginal(flow):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.5, -1.0, 2.0])
    sigma = 0.6 if flow else 3.0
    samples = R.noised_known(x0.expand(200_000, 3), sigma, torch.randn(200_000, 3, generator=gen), flow)
    mean, var = _moments(samples)
    scale = 1 - sigma if flow else 1.0
    torch.testing.assert_close(mean, scale * x0, atol=0.03 * max(sigma, 1), rtol=0)
    torch.testing.assert_close(var, torch.full((3,), sigma ** 2), rtol=0.02, atol=0)


@pytest.mark.parametrize("flow,sigma_from,sigma_to", [(False, 0.5, 4.0), (False, 2.0, 2.0), (True, 0.2, 0.7)])
def test_forward_transition_has_the_exact_mean_and_variance(flow, sigma_from, sigma_to):
    """x_to | x_from: mean a * x_from, variance sigma_to^2 - a^2 sigma_from^2 (a = 1 for EPS/V);
    from x0 it composes to q(x_to | x0)."""
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    x_from = torch.tensor([1.5, -0.5])
    out = R.forward_transition(x_from.expand(n, 2), sigma_from, sigma_to, torch.randn(n, 2, generator=gen), flow)
    a = (1 - sigma_to) / (1 - sigma_from) if flow else 1.0
    mean, var = _moments(out)
    torch.testing.assert_close(mean, a * x_from, atol=0.02 * max(sigma_to, 0.1), rtol=0)
    torch.testing.assert_close(var, torch.full((2,), sigma_to ** 2 - a ** 2 * sigma_from ** 2), rtol=0.03, atol=1e-6)

    x0 = torch.tensor([0.7, -2.0])
    x_mid = R.noised_known(x0.expand(n, 2), sigma_from, torch.randn(n, 2, generator=gen), flow)
    composed = R.forward_transition(x_mid, sigma_from, sigma_to, torch.randn(n, 2, generator=gen), flow)
    mean, var = _moments(composed)
    torch.testing.assert_close(mean, (1 - sigma_to if flow else 1.0) * x0, atol=0.03 * max(sigma_to, 0.1), rtol=0)
    torch.testing.assert_close(var, torch.full((2,), sigma_to ** 2), rtol=0.03, atol=0)


def test_forward_transition_refuses_to_go_down_or_leave_pure_noise():
    with pytest.raises(ValueError, match="goes up"):
        R.forward_transition(torch.zeros(1), 2.0, 1.0, torch.zeros(1), False)
    with pytest.raises(ValueError, match="sigma 1"):
        R.forward_transition(torch.zeros(1), 1.0, 1.0, torch.zeros(1), True)


def test_repaint_loop_denoises_segments_and_jumps_with_fresh_noise():
    sigmas = torch.linspace(5, 0, 7)
    schedule = R.jump_schedule(6, 2, 2)
    calls, draws = [], []

    def denoise(x, segment, number):
        calls.append((number, segment.tolist()))
        return x

    def noise():
        draws.append(1)
        return torch.ones(1)

    # 6 levels, jumps of 2 at the jump points t = 2 and t = 0 (paper_schedule):
    assert schedule == [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5, 6]
    out = R.repaint(denoise, torch.zeros(1), sigmas, schedule, noise, flow=False)
    # three runs down (levels 0-3, 1-5, 3-6: 10 evaluations), two jumps up (3 -> 1, 5 -> 3), one draw each
    assert [seg for _, seg in calls] == [sigmas[0:4].tolist(), sigmas[1:6].tolist(), sigmas[3:7].tolist()]
    assert len(draws) == 2
    # jumps added exactly sqrt(s_to^2 - s_from^2) of the unit noise each
    expected = (sigmas[1] ** 2 - sigmas[3] ** 2).sqrt() + (sigmas[3] ** 2 - sigmas[5] ** 2).sqrt()
    torch.testing.assert_close(out, expected.reshape(1))


@pytest.mark.parametrize("flow", [False, True])
def test_a_noise_scale_scales_the_known_draw_and_the_jump_back_so_the_marginal_stays_exact(flow):
    """With noise scale s the marginal is N(alpha x0, (s sigma)^2): the draw and the jump both use s."""
    gen = torch.Generator().manual_seed(2)
    n, s = 200_000, 0.35
    sigma_from, sigma_to = (0.2, 0.7) if flow else (0.5, 4.0)
    x0 = torch.tensor([0.7, -2.0])
    x_mid = R.noised_known(x0.expand(n, 2), sigma_from, torch.randn(n, 2, generator=gen), flow, s)
    _, var = _moments(x_mid)
    torch.testing.assert_close(var, torch.full((2,), (s * sigma_from) ** 2), rtol=0.03, atol=0)
    out = R.forward_transition(x_mid, sigma_from, sigma_to, torch.randn(n, 2, generator=gen), flow, s)
    mean, var = _moments(out)
    torch.testing.assert_close(mean, (1 - sigma_to if flow else 1.0) * x0, atol=0.03 * s * sigma_to, rtol=0)
    torch.testing.assert_close(var, torch.full((2,), (s * sigma_to) ** 2), rtol=0.03, atol=0)


def test_forward_process_reads_the_family_and_the_noise_scale_off_a_noising_function():
    assert R.forward_process(lambda sigma, noise, x0: x0 + sigma * noise) == (False, 1.0)
    assert R.forward_process(lambda sigma, noise, x0: sigma * (0.5 * noise) + (1 - sigma) * x0) == (True, 0.5)
    with pytest.raises(ValueError, match="adds no noise"):
        R.forward_process(lambda sigma, noise, x0: x0)
    with pytest.raises(ValueError, match="neither"):
        R.forward_process(lambda sigma, noise, x0: 2 * x0 + sigma * noise)
