"""SMCDiff particle inpainting (samplers/particle_inpaint.py) without ComfyUI: its pieces on answers known by hand."""

import math

import pytest
import torch

from consistent_synthesis.samplers import particle_inpaint as P
from sync_counter import HostSyncCounter


def test_effective_sample_size_of_known_weights():
    log_w = torch.tensor([[0.5, 1.0], [0.25, 0.0], [0.25, 0.0], [0.0, 0.0]]).log()
    ess = P.effective_sample_size(log_w)
    torch.testing.assert_close(ess, torch.tensor([1 / (0.25 + 2 * 0.0625), 1.0]))
    assert P.effective_sample_size(torch.zeros(8, 3)).tolist() == [8.0, 8.0, 8.0]


def test_systematic_resampling_copies_each_particle_floor_or_ceil_of_k_times_its_weight():
    weights = torch.tensor([0.5, 0.3, 0.2, 0.0])[:, None].repeat(1, 200)
    ancestors = P.systematic_indices(weights.log(), torch.rand(200, generator=torch.Generator().manual_seed(0)))
    counts = torch.stack([(ancestors == j).sum(0) for j in range(4)])  # (particle, latent)
    assert counts[0].eq(2).all()  # 4 * 0.5 = 2 exactly
    assert set(counts[1].tolist()) == {1, 2} and set(counts[2].tolist()) == {0, 1}  # 1.2 and 0.8
    assert counts[3].eq(0).all() and counts.sum(0).eq(4).all()
    assert abs(counts[1].double().mean() - 1.2) < 0.1 and abs(counts[2].double().mean() - 0.8) < 0.1


def test_weighted_choice_follows_the_weights():
    log_w = torch.tensor([0.1, 0.6, 0.3])[:, None].repeat(1, 20000).log()
    chosen = P.weighted_choice(log_w, torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    freq = torch.bincount(chosen.reshape(-1), minlength=3).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.015, rtol=0)


def test_ddpm_step_is_the_forward_process_posterior_and_euler_ancestral_equals_it_for_eps():
    for flow in (False, True):
        sigma, nxt = (0.8, 0.5) if flow else (3.0, 1.2)
        a, a2 = (1 - sigma, 1 - nxt) if flow else (1.0, 1.0)
        c_x, c_0, std = P.step_coefficients(sigma, nxt, flow, kernel="ddpm")
        # joint Gaussian of (x', x) given x0 = 0 under the forward process: x = r x' + noise
        r = a / a2
        var_x, cov = sigma ** 2, r * nxt ** 2
        assert math.isclose(c_x, cov / var_x) and math.isclose(std ** 2, nxt ** 2 - cov ** 2 / var_x)
        assert math.isclose(c_0, a2 - c_x * a)  # the mean is exact for x = a x0, eps = 0
    assert all(math.isclose(p, q) for p, q in zip(P.step_coefficients(3.0, 1.2, False),
                                                  P.step_coefficients(3.0, 1.2, False, kernel="ddpm")))
    assert P.step_coefficients(0.3, 0.0, True) == (0.0, 1.0, 0.0)


def test_settings_refuse_hostile_values():
    for bad in (dict(particles=0), dict(particles=P.MAX_PARTICLES + 1), dict(resample_threshold=float("nan")),
                dict(resample_threshold=1.5), dict(resample_below=float("nan")), dict(kernel="euler")):
        with pytest.raises(ValueError):
            P.Settings(**bad)


def _run(settings, denoise, latents=3, size=6, sigmas=(4.0, 2.0, 1.0, 0.5, 0.0), seed=0, trace=None):
    gen = torch.Generator().manual_seed(seed)
    known = torch.randn(latents, size, generator=gen)
    generate = torch.zeros(1, size)
    generate[:, size // 2:] = 1.0
    x = torch.randn(settings.particles * latents, size, generator=gen) * sigmas[0]
    return P.particle_inpaint(denoise, x, known, generate, torch.tensor(sigmas), settings, False,
                              lambda shape: torch.randn(shape, generator=gen),
                              lambda shape: torch.rand(shape, generator=gen), trace=trace), known, generate


def test_known_region_ends_exact_and_every_particle_is_returned_heaviest_first():
    result, known, generate = _run(P.Settings(4), lambda x, i: 0.5 * x)
    keep = generate[0] == 0
    assert torch.equal(result.draw[:, keep], known[:, keep])
    assert result.particles.shape == (12, 6) and torch.equal(result.particles.reshape(3, 4, 6)[..., keep],
                                                             known[:, None, keep].expand(3, 4, -1))
    assert (result.log_weights[:, 1:] <= result.log_weights[:, :-1]).all()
    torch.testing.assert_close(result.log_weights.exp().sum(1), torch.ones(3, dtype=torch.float64))
    drawn = [any(torch.equal(result.draw[b], p) for p in result.particles[4 * b:4 * b + 4]) for b in range(3)]
    assert all(drawn)


def test_weights_are_the_kernels_density_of_the_known_trajectory():
    """A denoiser whose x0 on the known region is a per-particle constant: with one step to sigma 0
    the log weight is -|y0 - c|^2 / (2 sigma^2) over the known half, exactly (weight_variance)."""
    offsets = torch.tensor([0.0, 1.0, 2.0])

    def denoise(x, i):
        return offsets[:, None].expand(3, 4) + 0 * x

    gen = torch.Generator().manual_seed(0)
    known = torch.zeros(1, 4)
    generate = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    x = torch.randn(3, 4, generator=gen)
    result = P.particle_inpaint(denoise, x, known, generate, torch.tensor([0.5, 0.0]), P.Settings(3), False,
                                lambda shape: torch.randn(shape, generator=gen),
                                lambda shape: torch.rand(shape, generator=gen))
    expected = torch.log_softmax(-2 * offsets.double() ** 2 / (2 * 0.25), 0)
    torch.testing.assert_close(result.log_weights[0], expected)


def test_resampling_fires_only_under_the_threshold_and_the_sigma_limit():
    def spread(x, i):  # predictions that disagree with the known region: weights fall apart
        return x * 0 + torch.arange(x.shape[0], dtype=x.dtype)[:, None] * 0.3

    for settings, fired in ((P.Settings(4, 0.0), False), (P.Settings(4, 0.9), True),
                            (P.Settings(4, 0.9, resample_below=0.3), False)):
        trace = []
        result, _, _ = _run(settings, spread, trace=trace)
        assert bool(result.resampled.sum() > 0) == fired, settings
        assert len(trace) == 4 and all(ess.shape == (3,) for ess, _, _ in trace)
    flat = []
    result, _, _ = _run(P.Settings(4, 0.9), lambda x, i: x * 0, trace=flat)
    # every particle predicts the same: the weights stay equal, ESS = K, nothing to resample
    assert result.resampled.sum() == 0 and all(torch.allclose(ess, torch.full((3,), 4.0, dtype=ess.dtype))
                                               for ess, _, _ in flat)


def test_no_host_synchronisation_inside_the_loop():
    sigmas = torch.linspace(5, 0, 13)
    for steps in (6, 12):
        levels = torch.cat([sigmas[:steps], sigmas[-1:]])
        with HostSyncCounter() as counter:
            _run(P.Settings(4, 0.9), lambda x, i: 0.5 * x, sigmas=tuple(levels.tolist()))
        assert counter.total == 0, counter.report()
