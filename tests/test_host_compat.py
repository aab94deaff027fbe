"""Forward compatibility: the pack works with both the host we test on (0.3.64) and newer ones.

Each test stands in for a newer host's behaviour (read from the newest stored ComfyUI sources;
docs/compatibility.md names the files and commits) on the host we have, and would fail with the
pack's earlier code.
"""

import re
import tomllib

import pytest
import torch

from conftest import REPO, require_host

HOST = require_host()

import comfy.model_base  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

import tiny_models as tm  # noqa: E402
from consistent_synthesis.nodes import host_compat  # noqa: E402
from consistent_synthesis.nodes.repaint import RePaint, repaint_ksampler  # noqa: E402
from consistent_synthesis.runner import random_models, server  # noqa: E402
from consistent_synthesis.samplers import repaint as R  # noqa: E402

MT = comfy.model_base.ModelType


# ---- BaseModel.state_dict_for_saving: newer hosts take the UNet weights first ---------------------

class NewerStateDictForSaving:
    """A model whose ``state_dict_for_saving(unet_state_dict, clip_state_dict=None, ...)`` is the
    newer hosts' signature (the caller hands in the UNet weights)."""

    def __init__(self, model):
        self.model = model
        self.diffusion_model = model.diffusion_model

    def state_dict_for_saving(self, unet_state_dict, clip_state_dict=None, vae_state_dict=None,
                              clip_vision_state_dict=None):
        config = self.model.model_config
        out = config.process_unet_state_dict_for_saving(dict(unet_state_dict))
        if clip_state_dict is not None:
            out.update(config.process_clip_state_dict_for_saving(clip_state_dict))
        if vae_state_dict is not None:
            out.update(config.process_vae_state_dict_for_saving(vae_state_dict))
        return out


def test_checkpoint_layout_is_the_same_under_the_old_and_the_new_state_dict_for_saving():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = random_models._unet_model_config("sd15")
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
        clip = config.clip_target().clip(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig=dict(random_models._VAE_CONFIG), embed_dim=4)
    old = random_models.state_dict_for_saving(model, clip.state_dict(), vae.state_dict())
    new = random_models.state_dict_for_saving(NewerStateDictForSaving(model), clip.state_dict(), vae.state_dict())
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}
    assert any(k.startswith("model.diffusion_model.") for k in new)
    assert any(k.startswith("cond_stage_model.") for k in new) and any(k.startswith("first_stage_model.") for k in new)


# ---- comfy.sample.fix_empty_latent_channels: newer hosts take the latent's downscale ratios -------

def test_fix_empty_latent_channels_is_called_as_the_installed_host_expects(monkeypatch):
    model = tm.tiny_model("sd15")
    latent = {"samples": torch.zeros(1, 4, 8, 8), "downscale_ratio_spacial": 8}
    assert host_compat.fix_empty_latent_channels(model, latent).shape == (1, 4, 8, 8)  # this host's signature

    calls = []

    def newer(model, latent_image, downscale_ratio_spacial, downscale_ratio_temporal=None):  # no default: required
        calls.append((downscale_ratio_spacial, downscale_ratio_temporal))
        return latent_image

    monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", newer)
    assert host_compat.fix_empty_latent_channels(model, latent) is latent["samples"]
    assert calls == [(8, None)]


def test_repaint_ksampler_output_drops_the_input_latents_downscale_keys():
    model = tm.tiny_model("sd15")
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    latent = {"samples": samples, "noise_mask": mask, "downscale_ratio_spacial": 8}
    out = repaint_ksampler(model, 1, 2, 1.0, "euler", "normal", tm.conditioning("sd15"),
                           tm.conditioning("sd15", seed=1), latent, 1.0, 1, 1)
    assert "downscale_ratio_spacial" not in out and "noise_mask" in out
    assert torch.equal(out["samples"][..., :4], samples[..., :4])


# ---- The server: --disable-assets when the host lists it; the pack a real folder ----------------

def fake_host(tmp_path, lists_disable_assets: bool):
    """A folder with a ``main.py`` whose ``--help`` lists (or not) ``--disable-assets``, and counts its runs."""
    host = tmp_path / ("new-host" if lists_disable_assets else "old-host")
    (host / "comfy").mkdir(parents=True)
    (host / "comfy" / "model_patcher.py").write_text("")
    options = ["--cpu", "--base-directory"] + (["--disable-assets"] if lists_disable_assets else [])
    (host / "main.py").write_text(
        "import argparse, pathlib\n"
        "count = pathlib.Path(__file__).with_name('runs')\n"
        "count.write_text(count.read_text() + 'x' if count.exists() else 'x')\n"
        "p = argparse.ArgumentParser()\n"
        + "".join(f"p.add_argument({o!r}, action='store_true')\n" for o in options)
        + "p.parse_args()\n")
    return host


@pytest.mark.parametrize("newer", [True, False])
def test_server_passes_disable_assets_exactly_when_the_host_lists_it(tmp_path, newer):
    host = fake_host(tmp_path, newer)
    first = server.LocalServer(host, base=tmp_path / "a", cpu=True)
    second = server.LocalServer(host, base=tmp_path / "b", cpu=True)
    assert ("--disable-assets" in first.command()) is newer
    assert ("--disable-assets" in second.command()) is newer
    assert (host / "runs").read_text() == "x"  # main.py --help asked once per host


def test_the_real_host_is_asked_too():
    # what the host's own argument definitions say, read as text (not through host_options)
    listed = '"--disable-assets"' in (HOST / "comfy" / "cli_args.py").read_text()
    assert ("--disable-assets" in server.host_options(str(HOST / "main.py"))) is listed
    assert "--cpu" in server.host_options(str(HOST / "main.py"))
    srv = server.LocalServer(HOST, cpu=True)
    try:
        assert ("--disable-assets" in srv.command()) is listed
    finally:
        srv.stop()  # removes its scratch folder (it never started)


def test_the_pack_is_installed_as_a_real_folder_without_symlinks_or_bytecode(tmp_path):
    """Newer hosts refuse a pack that is or contains a symlink, or holds bytecode, under a custom-node policy."""
    host = fake_host(tmp_path, False)
    srv = server.LocalServer(host, base=tmp_path / "base", cpu=True)
    pack = tmp_path / "base" / "custom_nodes" / server.PACK_FOLDER
    assert pack == srv.pack and pack.is_dir() and not pack.is_symlink()
    files = list(pack.rglob("*"))
    assert not any(f.is_symlink() for f in files)
    assert not any(f.suffix == ".pyc" or f.name in ("__pycache__", ".git") for f in files)
    for name in ("__init__.py", "nodes/repaint.py", "samplers/repaint.py", "web"):
        assert (pack / name).exists(), name
    assert (pack / "nodes" / "repaint.py").read_bytes() == (REPO / "nodes" / "repaint.py").read_bytes()
    # a second server in the same base starts from a fresh copy
    (pack / "stale.py").write_text("")
    server.LocalServer(host, base=tmp_path / "base", cpu=True)
    assert not (pack / "stale.py").exists() and (pack / "nodes" / "repaint.py").exists()


# ---- pyproject.toml (registry, ComfyUI-Manager) and requirements.txt declare the same needs ------

def _requirement_names(lines) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0]).lower()
            for line in lines if line.strip() and not line.strip().startswith("#")}


def test_pyproject_dependencies_are_requirements_txt():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    required = (REPO / "requirements.txt").read_text().splitlines()
    assert sorted(d.strip() for d in declared) == sorted(r.strip() for r in required
                                                         if r.strip() and not r.strip().startswith("#"))
    assert "controlnet-aux" in _requirement_names(declared)  # the pose node's detector


# ---- RePaint: the host's noise scale and the model's actual parameterisation -----------------------

class ScaledNoiseFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """A flow model whose noise is scaled, as newer hosts' ``CONST.noise_scaling`` does with the
    model's ``noise_scale``."""

    noise_scale = 0.5

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.reshape(sigma.shape[:1] + (1,) * (noise.ndim - 1)) if sigma.ndim else sigma
        return sigma * (self.noise_scale * noise) + (1.0 - sigma) * latent_image


class ImageToImageFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """A newer hosts' image-to-image type: a CONST subclass whose noising adds no noise."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image


class FlowWithoutConst(comfy.model_sampling.ModelSamplingDiscreteFlow):
    """Flow noising from a class that does not derive from CONST."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


def test_forward_process_is_read_off_the_hosts_noise_scaling():
    ms = comfy.model_sampling
    assert R.forward_process(ms.EPS().noise_scaling) == (False, 1.0)
    assert R.forward_process(ms.V_PREDICTION().noise_scaling) == (False, 1.0)
    assert R.forward_process(ms.CONST().noise_scaling) == (True, 1.0)
    assert R.forward_process(ScaledNoiseFlow().noise_scaling) == (True, 0.5)
    assert R.forward_process(FlowWithoutConst().noise_scaling) == (True, 1.0)
    with pytest.raises(ValueError, match="adds no noise"):
        R.forward_process(ImageToImageFlow().noise_scaling)


def patched_sampling(model, sampling):
    model = model.clone()
    model.add_object_patch("model_sampling", sampling)
    return model


def test_repaint_refuses_a_model_type_that_adds_no_noise():
    model = patched_sampling(tm.tiny_model("sd15", model_type=MT.FLOW), ImageToImageFlow())
    latent = {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": torch.ones(1, 1, 8, 8)}
    with pytest.raises(ValueError, match=r"RePaintKSampler: input 'model'.*ImageToImageFlow.*adds no noise"):
        repaint_ksampler(model, 1, 2, 1.0, "euler", "normal", tm.conditioning("sd15"),
                         tm.conditioning("sd15", seed=1), latent, 1.0, 1, 1)


C = 0.7  # the data: every latent value is C, so the exact denoiser is known


class ExactFlowDenoiser(torch.nn.Module):
    """The exact velocity for data that is the constant C: v = (x - C) / sigma."""

    dtype = torch.float32

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        sigma = (timesteps / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - C) / sigma


def test_flow_model_with_a_noise_scale_every_evaluation_sees_the_hosts_marginal_and_the_known_region_ends_exact():
    """With the exact denoiser every evaluation's input must be a draw from the host's marginal
    (1 - sigma) C + sigma * s * eps, in the known region (re-noised) and in the generated one
    (carried by the sampler and by the jumps back); the known region ends as the input latent."""
    base = tm.tiny_model("sd15", model_type=MT.FLOW)
    base.model.diffusion_model = ExactFlowDenoiser()
    model = patched_sampling(base, ScaledNoiseFlow())
    n = 1500
    samples = torch.full((n, 4, 2, 2), C)
    mask = torch.zeros(n, 1, 2, 2)
    mask[..., 1] = 1.0  # generate the right column
    stds = []

    def record(apply_model, args):
        x, sigma = args["input"], args["timestep"].reshape(-1, 1, 1, 1)
        z = (x - (1.0 - sigma) * C) / sigma
        stds.append((float(sigma.flatten()[0]), float(z[..., 0].std()), float(z[..., 1].std())))
        return apply_model(x, args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record)
    sampler = RePaint(comfy.samplers.sampler_object("euler"), 2, 3)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)
    out = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(samples, 3), 1.0, sampler, sigmas,
                                     tm.conditioning("sd15"), tm.conditioning("sd15"), samples, noise_mask=mask,
                                     disable_pbar=True, seed=3)
    assert len(stds) == R.model_steps(sampler.schedule(6))
    for sigma, known, generated in stds:
        assert known == pytest.approx(0.5, rel=0.05), (sigma, known)
        assert generated == pytest.approx(0.5, rel=0.05), (sigma, generated)
    torch.testing.assert_close(out[..., 0], samples[..., 0], rtol=1e-6, atol=1e-6)

