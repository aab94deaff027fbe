"""InvertLatent and MasaCtrlInvertedSource on the real ComfyUI host: the paper's real-image editing."""

import math

import pytest
import torch

from conftest import require_host

require_host()

import comfy.model_base  # noqa: E402
import comfy.patcher_extension  # noqa: E402

import analytic as A  # noqa: E402
import sampling  # noqa: E402
import tiny_models as tm  # noqa: E402
from consistent_synthesis.nodes import inversion as N  # noqa: E402
from consistent_synthesis.nodes.masactrl_batch import latent_batch  # noqa: E402

MT = comfy.model_base.ModelType
ANALYTIC_COND = [[torch.zeros(1, 1, 768), {}]]


def ksampler(model, latent, steps, sampler="euler", cfg=1.0, scheduler="normal", positive=None, negative=None,
             denoise=1.0, seed=5):
    """The stock KSampler with this module's defaults (cfg 1, seed 5)."""
    return sampling.ksampler(model, latent, positive, negative, steps, cfg, sampler, scheduler, seed, denoise)


def gaussian_draw(mu, cov, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x0 = mu + torch.linalg.cholesky(cov) @ torch.randn(A.DIM, generator=gen, dtype=torch.float64)
    return {"samples": x0.float().reshape(1, *A.SHAPE)}


def exact_x0(mu, cov, model_type, x, sigma):
    """E[x0 | x at sigma] of the Gaussian data, in sampler space, computed here (not by the host)."""
    flat, s = x.reshape(-1).double(), torch.as_tensor(sigma, dtype=torch.float64)
    c = 1 - s if model_type == MT.FLOW else torch.ones((), dtype=torch.float64)
    gain = c * cov @ torch.linalg.inv(c ** 2 * cov + s ** 2 * torch.eye(A.DIM, dtype=torch.float64))
    return (mu + gain @ (flat - c * mu)).reshape(x.shape)


def official_path(mu, cov, model_type, x0, ascending):
    """MasaCtrl's official ``invert`` with the exact eps: for EPS and V the network gets the VP latent of
    the level left (x_t = x / sqrt(1 + sigma^2)) with the timestep of the level reached, then next_step;
    flow models have no input scaling: the velocity at (x, sigma_next)."""
    path = [x0.double()]
    for s, s_next in zip(ascending[:-1].double(), ascending[1:].double()):
        x = path[-1]
        if model_type == MT.FLOW:
            v = (x - exact_x0(mu, cov, model_type, x, s_next)) / s_next
            path.append(x + (s_next - s) * v)
            continue
        a_t, a_next = 1 / (1 + s ** 2), 1 / (1 + s_next ** 2)
        x_t = x * a_t.sqrt()
        x_in = x_t / a_next.sqrt()  # sampler-space latent whose VP latent at the level reached is x_t
        eps = (x_in - exact_x0(mu, cov, model_type, x_in, s_next)) / s_next
        pred_x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        path.append((a_next.sqrt() * pred_x0 + (1 - a_next).sqrt() * eps) / a_next.sqrt())
    return torch.stack(path).float()


def before_path(mu, cov, model_type, x0, ascending):
    """The step this pack took before: the denoiser at (x, sigma_next), x not rescaled."""
    path = [x0.double()]
    for s, s_next in zip(ascending[:-1].double(), ascending[1:].double()):
        x = path[-1]
        path.append(x + (s_next - s) * (x - exact_x0(mu, cov, model_type, x, s_next)) / s_next)
    return torch.stack(path).float()


def as_inverted(path, ascending, steps):
    """A LATENT as Invert Latent returns it, for a path made in the test (identity latent format)."""
    return {"samples": path[-1].clone(), "inversion_path": path, "inversion_sigmas": ascending.float(),
            "inversion_settings": {"steps": steps, "scheduler": "normal", "denoise": 1.0, "cfg": 1.0}}


def reconstruction_error(model, inverted, source, steps):
    """Sample a target from the inverted noise (undriven) and return its relative error to the source."""
    out = ksampler(N.inverted_source_patch(model, inverted), latent_batch(inverted, 1, True, True), steps,
                   positive=ANALYTIC_COND, negative=ANALYTIC_COND)
    assert torch.equal(out[0], source[0])  # the driven source row is the image itself
    return float((out[1] - source[0]).double().norm() / source[0].double().norm())


@pytest.mark.parametrize("model_type", [MT.EPS, MT.V_PREDICTION, MT.FLOW])
def test_every_move_of_the_path_is_the_official_step_with_the_exact_eps(model_type):
    model, mu, cov = A.gaussian_model(model_type)
    source = gaussian_draw(mu, cov)
    for steps in (10, 50):
        inverted = N.invert_latent(model, ANALYTIC_COND, ANALYTIC_COND, source, steps, "normal", 1.0, 1.0)
        path, ascending = inverted["inversion_path"], inverted["inversion_sigmas"]
        for i in range(steps):  # each move from the node's own level i, so errors do not accumulate
            official = official_path(mu, cov, model_type, path[i], ascending[i:i + 2])[1]
            error = float((path[i + 1] - official).norm() / official.norm())
            assert error <= 1e-3, (steps, i, error)


@pytest.mark.parametrize("model_type", [MT.EPS, MT.V_PREDICTION, MT.FLOW])
def test_invert_then_sample_reconstructs_as_well_as_the_official_step(model_type, measured):
    """Within 10 % of the official step's own reconstruction error at 10, 25, 50 and 100 steps; the step
    taken before (the denoiser at (x, sigma_next)) is 2-3x worse for EPS and V and fails that bound."""
    model, mu, cov = A.gaussian_model(model_type)
    source = gaussian_draw(mu, cov)
    x0 = source["samples"]
    rows = []
    for steps in (10, 25, 50, 100):
        ascending = N.schedule(model, steps, "normal", 1.0).cpu().flip(0)
        ours = reconstruction_error(model, N.invert_latent(model, ANALYTIC_COND, ANALYTIC_COND, source, steps,
                                                           "normal", 1.0, 1.0), x0, steps)
        official = reconstruction_error(model, as_inverted(official_path(mu, cov, model_type, x0, ascending),
                                                           ascending, steps), x0, steps)
        before = reconstruction_error(model, as_inverted(before_path(mu, cov, model_type, x0, ascending),
                                                         ascending, steps), x0, steps)
        rows.append((steps, official, ours, before))
    measured(f"{model_type.name} relative reconstruction error (steps: official / this pack / step before): "
             + "; ".join(f"{s}: {o:.3f} / {u:.3f} / {b:.3f}" for s, o, u, b in rows))
    for steps, official, ours, before in rows:
        assert abs(ours - official) <= 0.1 * official, (steps, official, ours)
        if model_type != MT.FLOW:
            assert before > 1.3 * official, (steps, official, before)  # the bound above tells the steps apart
    errors = [ours for _, _, ours, _ in rows]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_the_path_is_clean_first_at_the_runs_sigmas_reversed_in_latent_units():
    model = tm.tiny_model("sd15")
    source = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    inverted = N.invert_latent(model, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), source, 6,
                               "karras", 1.0, 1.0)
    path, sigmas = inverted["inversion_path"], inverted["inversion_sigmas"]
    assert path.shape == (7, 1, 4, 16, 16) and torch.equal(path[0], source["samples"])
    assert torch.equal(inverted["samples"], path[-1])
    torch.testing.assert_close(sigmas, N.schedule(model, 6, "karras", 1.0).cpu().flip(0))
    assert sigmas[0] == 0 and bool((sigmas[1:] > sigmas[:-1]).all())
    # latent units: the sampler-space noise at sigma_max has std ~ sigma_max, here divided by the SD1.5 scale
    sampler_space = model.model.process_latent_in(path[-1]).detach()
    assert 0.3 < float(sampler_space.std()) / float(sigmas[-1]) < 3


def record_model_inputs(model):
    """The clone of ``model`` with a DIFFUSION_MODEL wrapper recording (x as the network sees it, sigmas)."""
    calls = []

    def record(executor, xc, t, *args, **kwargs):
        options = kwargs.get("transformer_options") or next(a for a in args if isinstance(a, dict)
                                                            and "cond_or_uncond" in a)
        calls.append((xc.detach().clone(), options["sigmas"].detach().clone(), list(options["cond_or_uncond"])))
        return executor(xc, t, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.record", record)
    return calls


_INVERTED = {}


def inverted_tiny(model_type=MT.EPS, steps=6, scheduler="normal"):
    """(model, source, inverted) on a tiny random UNet, inverted once per setting for the module."""
    key = (model_type, steps, scheduler)
    if key not in _INVERTED:
        model = tm.tiny_model("sd15", model_type=model_type)
        source = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
        inv = N.invert_latent(model, tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), source, steps,
                              scheduler, 1.0, 1.0)
        _INVERTED[key] = (model, source, inv)
    return _INVERTED[key]


def invert_and_edit(model_type=MT.EPS, sampler="euler", steps=6, run_steps=None, scheduler="normal", targets=2,
                    cfg=4.0, inverted=True, patched=True):
    model, source, inv = inverted_tiny(model_type, steps, scheduler)
    positive, negative = tm.conditioning("sd15"), tm.conditioning("sd15", seed=1)
    run_model = N.inverted_source_patch(model, inv) if patched else model.clone()
    calls = record_model_inputs(run_model)
    batch = latent_batch(inv, targets, True, True, inverted=inverted)
    out = ksampler(run_model, batch, run_steps or steps, sampler, cfg, scheduler, positive, negative)
    return model, source, inv, calls, out


@pytest.mark.parametrize("model_type,sampler", [(MT.EPS, "euler"), (MT.EPS, "heun"), (MT.V_PREDICTION, "dpmpp_2m"),
                                                (MT.FLOW, "euler")])
def test_source_row_follows_the_inversion_path_and_ends_as_the_source_latent_exactly(model_type, sampler):
    model, source, inv, calls, out = invert_and_edit(model_type, sampler)
    assert torch.equal(out[0], source["samples"][0])
    assert not torch.allclose(out[1], out[0], atol=1e-2)  # targets are generated
    base = model.model
    path = base.process_latent_in(inv["inversion_path"][:, 0])
    asc = inv["inversion_sigmas"]
    assert len(calls) == (2 * 6 - 1 if sampler == "heun" else 6)
    for xc, sigmas, chunks in calls:
        assert len(chunks) == 2  # cond and uncond in one call: the source row of each chunk is driven
        sigma = sigmas[:1]
        level = int((asc - sigma).abs().argmin())
        assert math.isclose(float(asc[level]), float(sigma), rel_tol=1e-6)
        expected = base.model_sampling.calculate_input(sigma, path[level:level + 1])
        rows = xc.reshape(len(chunks), 3, *xc.shape[1:])[:, 0]
        torch.testing.assert_close(rows, expected.expand_as(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", [MT.EPS, MT.FLOW])
def test_every_row_starts_from_the_inverted_noise(model_type):
    model, source, inv, calls, out = invert_and_edit(model_type)
    base = model.model
    first, sigmas, _ = calls[0]
    expected = base.model_sampling.calculate_input(sigmas[:1], base.process_latent_in(inv["samples"]))
    torch.testing.assert_close(first, expected.expand_as(first), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", [dict(run_steps=5), dict(scheduler="karras")])
def test_a_run_with_other_sigmas_than_the_inversion_fails_naming_the_settings(run):
    model, source, inv = inverted_tiny()
    with pytest.raises(ValueError, match=r"MasaCtrlInvertedSource: .*steps 6, scheduler normal, denoise 1.0"):
        ksampler(N.inverted_source_patch(model, inv), latent_batch(inv, 1, True, True), run.get("run_steps", 6),
                 scheduler=run.get("scheduler", "normal"), positive=tm.conditioning("sd15"),
                 negative=tm.conditioning("sd15"))


def test_denoise_below_one_inverts_part_of_the_schedule_and_runs():
    model = tm.tiny_model("sd15")
    source = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    cond = tm.conditioning("sd15")
    inv = N.invert_latent(model, cond, cond, source, 8, "normal", 1.0, 0.5)
    assert len(inv["inversion_sigmas"]) == 9 and float(inv["inversion_sigmas"][-1]) < 14
    out = ksampler(N.inverted_source_patch(model, inv), latent_batch(inv, 1, True, True), 8, denoise=0.5,
                   positive=cond, negative=cond)
    assert torch.equal(out[0], source["samples"][0])


def test_re_noised_mode_leaves_the_run_as_without_the_node():
    """With 'inverted' off the batch holds the clean reference (noise_mask 0) and the model node does nothing."""
    _, _, _, _, plain = invert_and_edit(inverted=False, patched=False, targets=1)
    _, source, inv, _, patched = invert_and_edit(inverted=False, patched=True, targets=1)
    assert torch.equal(plain, patched)
    batch = latent_batch(inv, 2, True, True, inverted=False)
    assert torch.equal(batch["samples"][0], source["samples"][0]) and float(batch["noise_mask"][0].max()) == 0


def test_inverted_batch_rows_hold_the_inverted_noise_and_the_source_is_generated():
    model, source, inv = inverted_tiny()
    batch = latent_batch(inv, 3, True, True)
    assert torch.equal(batch["samples"], inv["samples"].expand(4, -1, -1, -1)) and "noise_mask" not in batch
    with pytest.raises(ValueError, match="source_is_reference"):
        latent_batch(inv, 1, False, True)
    with pytest.raises(ValueError, match="MasaCtrlInvertedSource: input 'inverted' has no inversion_path"):
        N.inverted_source_patch(model, source)


def test_the_nodes_execute_from_their_schemas():
    model, mu, cov = A.gaussian_model()
    source = gaussian_draw(mu, cov)
    inverted = N.InvertLatent.execute(model, ANALYTIC_COND, ANALYTIC_COND, source, 5, "normal", 1.0, 1.0).result[0]
    assert inverted["inversion_path"].shape == (6, 1) + A.SHAPE
    patched = N.MasaCtrlInvertedSource.execute(model, inverted).result[0]
    assert patched is not model and not model.wrappers.get("outer_sample")
    assert N.InvertLatent.validate_inputs(scheduler="nope").startswith("InvertLatent: input 'scheduler'")
    with pytest.raises(ValueError, match="InvertLatent: input 'latent'"):
        N.InvertLatent.execute(model, ANALYTIC_COND, ANALYTIC_COND, "latent", 5, "normal", 1.0, 1.0)


def test_repaint_ksampler_on_an_inverted_reference_and_a_canvas_keeps_both_known_parts():
    """The consistent character graph: RePaint's jumps back up read the path too; the source row is the
    reference exactly and the canvas keeps its known region."""
    from consistent_synthesis.nodes.repaint import repaint_ksampler

    model, source, inv = inverted_tiny(MT.EPS, 4)
    canvas = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1.0
    batch = latent_batch(inv, 1, True, True, target={"samples": canvas, "noise_mask": mask})
    cond = tm.conditioning("sd15")
    out = repaint_ksampler(N.inverted_source_patch(model, inv), 3, 4, 1.0, "euler", "normal", cond, cond, batch,
                           1.0, 2, 2)["samples"]
    assert torch.equal(out[0], source["samples"][0])
    assert torch.equal(out[1, :, :8], canvas[0, :, :8])


def test_an_inversion_of_another_resolution_than_the_batch_is_refused_naming_both_sizes():
    model, source, inv = inverted_tiny()
    other = N.invert_latent(model, tm.conditioning("sd15"), tm.conditioning("sd15"),
                            {"samples": torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(4))}, 6,
                            "normal", 1.0, 1.0)
    cond = tm.conditioning("sd15")
    with pytest.raises(ValueError, match=r"MasaCtrlInvertedSource: input 'inverted' is the inversion of a 16x16 "
                                         r"latent .* samples 8x16 latents"):
        ksampler(N.inverted_source_patch(model, inv), latent_batch(other, 1, True, True), 6, positive=cond,
                 negative=cond)


def test_an_inversion_of_another_image_than_the_batch_is_refused():
    model, source, inv = inverted_tiny()
    cond = tm.conditioning("sd15")
    other = N.invert_latent(model, cond, cond, {"samples": torch.randn(1, 4, 16, 16,
                                                                       generator=torch.Generator().manual_seed(9))},
                            6, "normal", 1.0, 1.0)
    with pytest.raises(ValueError, match=r"MasaCtrlInvertedSource: row 0 of the sampled latent is neither the noise "
                                         r"of input 'inverted' nor its image"):
        ksampler(N.inverted_source_patch(model, inv), latent_batch(other, 1, True, True), 6, positive=cond,
                 negative=cond)


@pytest.mark.parametrize("samples,message", [
    (torch.randn(1, 16, 8, 8), r"InvertLatent: input 'latent': the latent has 16 channels \(a FLUX.1 or SD3 VAE's\)"),
    (torch.randn(1, 4, 2, 8, 8), r"InvertLatent: input 'latent': got a 5-D video latent"),
])
def test_invert_latent_refuses_a_latent_of_another_model(samples, message):
    model = tm.tiny_model("sd15")
    cond = tm.conditioning("sd15")
    with pytest.raises(ValueError, match=message):
        N.InvertLatent.execute(model, cond, cond, {"samples": samples}, 4, "normal", 1.0, 1.0)
