"""The headless runner, as the README tells users to run it: ``python -m runner WORKFLOW --smoke``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, require_host

HOST = require_host()

from consistent_synthesis.runner import cli, random_models, workflow  # noqa: E402

SD15 = REPO / "workflows" / "api" / "masactrl_sd15.json"


def _runner(*args, cwd=REPO, timeout=600):
    env = os.environ | {"COMFYUI_PATH": str(HOST), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.server  # the runner starts a ComfyUI server
def test_smoke_run_of_a_shipped_workflow_saves_its_images(tmp_path):
    from PIL import Image

    random_models.ensure("checkpoints", "v1-5-pruned-emaonly.safetensors")  # cached; built once
    done = _runner("masactrl_sd15", "--smoke", "--width", 96, "--height", 64, "--out", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted((tmp_path / "masactrl_sd15").glob("*.png"))
    assert len(files) == 2  # the source and its one target
    assert all(Image.open(f).size == (96, 64) for f in files)
    log = done.stdout + done.stderr
    assert "step 2/2" in log  # progress followed over the websocket
    if not (HOST / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").is_file():
        assert "RANDOM WEIGHTS" in log  # a smoke run with stand-ins says so


def test_a_ui_format_file_is_refused_with_a_pointer_to_the_api_file(tmp_path):
    with pytest.raises(ValueError, match="workflows/api/"):
        workflow.load(REPO / "workflows" / "masactrl_sd15.json")


def test_an_unknown_workflow_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="masactrl_sd15"):
        workflow.resolve("no_such_workflow")


def test_overrides_change_literal_inputs_and_leave_links_alone():
    prompt = workflow.override(workflow.load(SD15), width=96, height=64, steps=3, seed=7)
    latent = next(n for n in prompt.values() if n["class_type"] == "EmptyLatentImage")
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (96, 64)
    assert (sampler["inputs"]["steps"], sampler["inputs"]["seed"]) == (3, 7)
    assert isinstance(sampler["inputs"]["model"], list)


def test_model_refs_name_each_file_once_with_its_models_folder():
    refs = workflow.model_refs(workflow.load(SD15))
    assert [(r.folder, r.name) for r in refs] == [("checkpoints", "v1-5-pruned-emaonly.safetensors")]


@pytest.mark.slow
def test_random_checkpoint_is_the_real_sd15_layout_and_loads_with_the_hosts_loader():
    import torch

    import comfy.sd
    import comfy.supported_models

    path = random_models.ensure("checkpoints", "v1-5-pruned-emaonly.safetensors")
    assert random_models.is_random_model(path)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert model.model.diffusion_model.model_channels == 320
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a corgi"))[0][0]
    assert cond.shape == (1, 77, 768) and bool(torch.isfinite(cond).all())
    image = vae.decode(torch.zeros(1, 4, 4, 4))
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(image).all())


@pytest.mark.slow
def test_random_openpose_controlnet_loads_with_the_hosts_controlnet_loader():
    import comfy.cldm.cldm
    import comfy.controlnet

    path = random_models.ensure("controlnet", "control_v11p_sd15_openpose_fp16.safetensors")
    control = comfy.controlnet.load_controlnet(str(path))
    assert isinstance(control.control_model, comfy.cldm.cldm.ControlNet)
    assert control.control_model.input_hint_block[0].in_channels == 3


def test_random_sdxl_layout_is_what_the_host_detects_as_sdxl():
    """The layout only (the full SDXL file is built and run by the end-to-end tier)."""
    import comfy.model_detection
    import comfy.supported_models

    layout = random_models.layout("sdxl")
    unet = comfy.model_detection.detect_unet_config(layout, "model.diffusion_model.")
    config = comfy.model_detection.model_config_from_unet_config(unet, layout)
    assert isinstance(config, comfy.supported_models.SDXL)
    assert any(k.startswith("conditioner.embedders.1.model.") for k in layout)  # OpenCLIP bigG
    assert sum(v.numel() for v in layout.values()) > 3.4e9


FLUX = REPO / "workflows" / "api" / "masactrl_flux.json"


def test_flux_workflow_names_the_four_files_of_comfyuis_flux_examples_in_their_folders():
    refs = workflow.model_refs(workflow.load(FLUX))
    assert [(r.folder, r.name) for r in refs] == [
        ("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
        ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"), ("vae", "ae.safetensors")]
    assert [random_models.guess_kind(r.folder, r.name) for r in refs] == [
        "flux_reduced", "clip_l", "t5xxl_fp8", "flux_vae"]
    with pytest.raises(ValueError, match="no random stand-in for diffusion_models/'sd3.5_large"):
        random_models.guess_kind("diffusion_models", "sd3.5_large.safetensors")


def test_flux_stand_in_is_detected_as_flux_dev_with_every_block_at_full_size_and_fewer_blocks():
    import torch

    import comfy.model_detection
    import comfy.supported_models

    layout = random_models.layout("flux_reduced")
    unet = comfy.model_detection.detect_unet_config(layout, "")
    config = comfy.model_detection.model_config_from_unet_config(unet, layout)
    assert isinstance(config, comfy.supported_models.Flux)
    assert (unet["depth"], unet["depth_single_blocks"], unet["guidance_embed"]) == (2, 4, True)
    full = comfy.model_detection.model_config_from_unet_config(random_models.flux_config())
    with torch.device("meta"):
        full = full.get_model({}, device="meta").diffusion_model.state_dict()
    assert sum(v.numel() for v in full.values()) > 11.8e9  # FLUX.1-dev: 11.9 B parameters
    for key, tensor in layout.items():  # every key of the stand-in has FLUX.1-dev's shape
        assert full[key].shape == tensor.shape, key
    assert {k for k in full if not k.startswith(("double_blocks.", "single_blocks."))} == \
        {k for k in layout if not k.startswith(("double_blocks.", "single_blocks."))}


@pytest.mark.slow
def test_random_flux_vae_and_text_encoder_files_are_what_the_hosts_loaders_expect():
    import torch
    from safetensors import safe_open

    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(random_models.ensure("vae", "ae.safetensors"))))
    assert vae.latent_channels == 16
    image = vae.decode(torch.zeros(1, 16, 4, 4))
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(image).all())
    for name, dtype in (("clip_l.safetensors", torch.float16), ("t5xxl_fp8_e4m3fn.safetensors", torch.float8_e4m3fn)):
        path = random_models.ensure("text_encoders", name)
        expected = random_models.text_encoder_layout(random_models.guess_kind("text_encoders", name))
        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == set(expected)
            for key in ("encoder.final_layer_norm.weight", "encoder.block.23.layer.1.DenseReluDense.wi_1.weight",
                        "text_model.final_layer_norm.weight"):
                if key in expected:  # T5 takes its dtype from the final norm (ComfyUI's t5_xxl_detect)
                    tensor = f.get_tensor(key)
                    assert tensor.dtype == dtype and tensor.shape == expected[key].shape


def test_fp8_tensors_are_written_as_the_fp16_draw_rounded_to_fp8(tmp_path):
    import torch
    from safetensors.torch import load_file

    shapes = {"a.weight": torch.empty(3, 5, dtype=torch.float8_e4m3fn, device="meta"),
              "norm.weight": torch.empty(5, dtype=torch.float8_e4m3fn, device="meta"),
              "b.weight": torch.empty(4, 2, device="meta")}
    random_models.write_random_safetensors(tmp_path / "x.safetensors", shapes, seed=3)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded["a.weight"].dtype == torch.float8_e4m3fn and loaded["b.weight"].dtype == torch.float16
    drawn = random_models._random_tensor("a.weight", shapes["a.weight"], 3).to(torch.float8_e4m3fn)
    assert torch.equal(loaded["a.weight"].float(), drawn.float())
    assert torch.equal(loaded["norm.weight"].float(), torch.ones(5))


def test_published_flux_block_sets_move_onto_the_stand_in_by_kind_and_relative_depth():
    freeflux = [0, 7, 8, 9, 10, 18, 25, 28, 37, 42, 45, 50, 56]
    assert random_models.stand_in_layers(freeflux) == [0, 1, 2, 3, 4, 5]
    assert random_models.stand_in_layers([0, 1, 17, 18, 25, 28, 53, 54, 56]) == [0, 1, 2, 5]  # Stable Flow
    assert random_models.stand_in_layers(list(range(19))) == [0, 1]  # double blocks stay double
    assert random_models.stand_in_layers(list(range(19, 57))) == [2, 3, 4, 5]
    prompt = workflow.load(FLUX)
    fitted = random_models.fit_to_stand_ins(prompt, workflow.model_refs(prompt))
    changed = {i for i in prompt if prompt[i] != fitted[i]}
    assert [fitted[i]["class_type"] for i in changed] == ["MasaCtrlAttentionPatch"]
    assert fitted[changed.pop()]["inputs"]["layers"] == "0,1,2,3,4,5"
    prompt_semicolons = json.loads(json.dumps(prompt))
    patch_id = next(i for i, n in prompt.items() if n["class_type"] == "MasaCtrlAttentionPatch")
    prompt_semicolons[patch_id]["inputs"]["layers"] = "0; 56"  # the node reads ';' as ','
    assert random_models.fit_to_stand_ins(prompt_semicolons, workflow.model_refs(prompt))[patch_id]["inputs"][
        "layers"] == "0,5"
    prompt_semicolons[patch_id]["inputs"]["layers"] = "0, x"  # the node refuses it, naming the input
    assert random_models.fit_to_stand_ins(prompt_semicolons, workflow.model_refs(prompt)) == prompt_semicolons
    sd15 = workflow.load(SD15)  # no Flux stand-in built: nothing changes
    assert random_models.fit_to_stand_ins(sd15, workflow.model_refs(sd15)) == sd15
    assert random_models.fit_to_stand_ins(prompt, []) == prompt


def test_the_help_names_the_smoke_option():
    assert "--smoke" in cli._parser().format_help()
    assert json.loads(SD15.read_text())  # the README's example workflow exists
