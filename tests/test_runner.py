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
    assert workflow.output_size(prompt) == (96, 64)


def test_model_refs_name_each_file_once_with_its_models_folder():
    refs = workflow.model_refs(workflow.load(SD15))
    assert [(r.folder, r.name) for r in refs] == [("checkpoints", "v1-5-pruned-emaonly.safetensors")]


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


def test_the_help_names_the_smoke_option():
    assert "--smoke" in cli._parser().format_help()
    assert json.loads(SD15.read_text())  # the README's example workflow exists
