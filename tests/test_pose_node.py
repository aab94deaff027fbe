"""PoseEditOutpaint on the real ComfyUI host, with controlnet_aux's detector in its real file format."""

import json
import time

import numpy as np
import pytest
import torch

from conftest import require_host

require_host()

import comfy.cldm.cldm  # noqa: E402
import comfy.controlnet  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import nodes as host_nodes  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

import tiny_models as tm  # noqa: E402
from consistent_synthesis.nodes import pose_edit_outpaint as node  # noqa: E402
from consistent_synthesis.nodes.pose_edit_outpaint import PoseEditOutpaint  # noqa: E402
from consistent_synthesis.nodes.repaint import repaint_ksampler  # noqa: E402
from consistent_synthesis.pose import detect, openpose, render  # noqa: E402
from test_pose_data import STANDING, aux_frame  # noqa: E402


def run(image=None, pose=None, left=0, top=0, right=0, bottom=64, feathering=16, completion="none", edits=""):
    image = torch.rand(1, 384, 256, 3, generator=torch.Generator().manual_seed(0)) if image is None else image
    return node.pose_edit_outpaint(image, pose, left, top, right, bottom, feathering, completion, edits)


def test_padding_moves_every_keypoint_exactly():
    pose = [aux_frame()]
    _, _, _, base, edited = run(pose=pose, left=64, top=8, right=32, bottom=128)
    src = np.array(pose[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    out = np.array(base[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    ok = src[:, 2] > 0
    np.testing.assert_array_equal(out[ok, :2], src[ok, :2] + [64, 8])
    np.testing.assert_array_equal(out[~ok], 0)
    assert (base[0]["canvas_width"], base[0]["canvas_height"]) == (256 + 96, 384 + 136)
    assert edited == base


def test_normalised_pose_and_a_pose_for_another_resolution_land_on_the_image():
    normalised = dict(aux_frame(normalised=True), canvas_width=512, canvas_height=768)  # a detector's size
    doubled = aux_frame()
    doubled["people"][0]["pose_keypoints_2d"] = [2 * v if i % 3 < 2 else v for i, v in
                                                 enumerate(doubled["people"][0]["pose_keypoints_2d"])]
    doubled.update(canvas_width=512, canvas_height=768)
    for pose in (normalised, doubled):
        _, _, _, base, _ = run(pose=[pose], left=8)
        neck = base[0]["people"][0]["pose_keypoints_2d"][3:5]
        assert neck == pytest.approx([STANDING[1][0] + 8, STANDING[1][1]])


def test_outputs_have_the_padded_size_and_the_mask_covers_the_new_area_and_a_seam_band():
    image = torch.rand(2, 384, 256, 3)
    padded, mask, pose_image, _, _ = run(image, [aux_frame()], left=64, bottom=128, feathering=16)
    assert padded.shape == (2, 512, 320, 3) and mask.shape == (2, 512, 320) and pose_image.shape == (1, 512, 320, 3)
    assert torch.equal(padded[:, :384, 64:], image) and (padded[:, :, :64] == 0.5).all()
    assert (mask[:, :, :64] == 1).all() and (mask[:, 384:] == 1).all()
    assert (mask[:, :360, 100:] == 0).all()
    band = mask[0, 200, 64:80]
    assert (band[:-1] > band[1:]).all() and 0 < band[-1] < band[0] <= 1
    assert mask[0, 383, 200] > 0 and mask[0, 200, 200] == 0


def test_pose_image_is_the_rendered_edited_pose():
    edits = json.dumps([{"op": "translate", "person": 0, "dx": 8, "dy": 0}])
    _, _, pose_image, _, edited = run(pose=[aux_frame()], edits=edits)
    expected = render.render(openpose.from_pose_keypoint(edited)[0])
    assert torch.equal(pose_image[0], torch.from_numpy(expected).float() / 255)
    neck = edited[0]["people"][0]["pose_keypoints_2d"][3:5]
    assert neck == [STANDING[1][0] + 8, STANDING[1][1]]


def test_auto_completion_adds_legs_in_the_new_area():
    frame = aux_frame()
    body = frame["people"][0]["pose_keypoints_2d"]
    for i in (9, 10, 12, 13):  # cropped at the knees' height
        body[3 * i:3 * i + 3] = [0, 0, 0]
    frame["canvas_height"] = 230
    image = torch.rand(1, 230, 256, 3)
    _, _, _, base, _ = run(image, [frame], bottom=256, completion="auto")
    out = np.array(base[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    assert (out[[9, 10, 12, 13], 2] > 0).all() and (out[[9, 10, 12, 13], 1] >= 230).all()
    assert (out[:, 1] < 486).all()


def test_execute_returns_the_ui_payload_the_editor_reads():
    result = PoseEditOutpaint.execute(torch.rand(1, 64, 64, 3), 0, 0, 0, 16, 8, "none", "", pose=[aux_frame(
        width=64, height=64, face=False, hands=False, normalised=True)])
    assert set(result.ui) >= {"images", "pose_base", "pose_edited"}
    assert json.loads(result.ui["pose_base"][0])[0]["canvas_height"] == 80


@pytest.mark.parametrize("kwargs,input_name", [
    ({"bottom": 12}, "pad_bottom"),
    ({"pose": "[{\"people\": [{\"pose_keypoints_2d\": [1]}], \"canvas_width\": 8, \"canvas_height\": 8}]"}, "pose"),
    ({"pose": [aux_frame()], "edits": "[{\"op\": \"set\", \"person\": 0}]"}, "edits"),
    ({"pose": [aux_frame()], "edits": "[{\"op\": \"mirror\", \"person\": 2}]"}, "edits"),
    ({"pose": [aux_frame(), aux_frame(), aux_frame()]}, "pose"),
])
def test_bad_inputs_fail_naming_the_node_and_input(kwargs, input_name):
    with pytest.raises(ValueError, match=f"PoseEditOutpaint: input '{input_name}'"):
        run(**kwargs)


def test_padding_off_the_latent_grid_or_out_of_range_is_refused_before_running():
    message = PoseEditOutpaint.validate_inputs(8, 0, 13, 0)
    assert "PoseEditOutpaint: input 'pad_right'" in message and "use 8 or 16" in message
    assert "input 'pad_top'" in PoseEditOutpaint.validate_inputs(0, 10**9, 0, 0)
    assert PoseEditOutpaint.validate_inputs(None, 8, 0, 4096) is True  # a linked value is checked in execute


@pytest.mark.parametrize("kwargs,input_name", [
    ({"left": 10**9}, "pad_left"),
    ({"feathering": -1}, "feathering"),
    ({"completion": "sometimes"}, "completion"),
])
def test_linked_values_out_of_range_fail_in_execute(kwargs, input_name):
    # the host skips min/max/option checks for values that arrive through a link
    with pytest.raises(ValueError, match=f"PoseEditOutpaint: input '{input_name}'"):
        run(pose=[aux_frame()], **kwargs)


@pytest.mark.parametrize("kwargs,input_name", [
    ({"pose": "[" * 200_000 + "]" * 200_000}, "pose"),
    ({"pose": "[" + "1," * 2_000_000 + "1]"}, "pose"),
    ({"pose": [aux_frame()], "edits": "[" + ", ".join(['{"op": "mirror", "person": 0}'] * 40_000) + "]"}, "edits"),
    ({"pose": [aux_frame()], "edits": '[{"op": "translate", "person": 0, "dx": 1' + "0" * 5000 + ', "dy": 0}]'},
     "edits"),
    ({"pose": [aux_frame()], "edits": '[{"op": "translate", "person": 0, "dx": NaN, "dy": 0}]'}, "edits"),
])
def test_hostile_text_fails_fast_naming_the_node_and_input(kwargs, input_name):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"PoseEditOutpaint: input '{input_name}'"):
        run(**kwargs)
    assert time.perf_counter() - start < 2.0


def random_detector_folder(folder):
    from consistent_synthesis.runner.random_models import write_openpose_detector

    return write_openpose_detector(folder)


def test_detector_loads_from_the_models_folder_and_its_output_is_converted(tmp_path, monkeypatch):
    random_detector_folder(tmp_path / "openpose")
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    padded, mask, pose_image, base, _ = run(pose=None, bottom=64)  # detected: random weights find whatever
    assert padded.shape[1:3] == mask.shape[1:] == (448, 256) and base[0]["canvas_height"] == 448

    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    body = [Keypoint(x / 256, y / 384, 0.8) for x, y in (STANDING[i] for i in range(18))]
    body[16] = None
    hand = [Keypoint(-1 / 256, -1 / 384)] + [Keypoint(0.5, 0.5)] * 20
    frame = detect.frame_from_results([PoseResult(BodyResult(body, 10.0, 17), hand, None, None)], 256, 384)
    person = frame.people[0]
    np.testing.assert_allclose(person.body[1], [128, 100, 0.8])
    assert person.body[16, 2] == 0 and person.hand_left[0, 2] == 0 and person.hand_left[1, 2] > 0
    assert person.face is None and person.hand_right is None


def test_missing_detector_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    monkeypatch.setattr(detect, "HUB_REPOSITORY", str(tmp_path / "no-such-repository"))
    with pytest.raises(ValueError, match="PoseEditOutpaint: input 'pose'.*could not be loaded from .*openpose.*connect a pose"):
        run(pose=None)


def test_outputs_plug_into_set_latent_noise_mask_and_repaint_ksampler_without_glue():
    padded, mask, _, _, _ = run(torch.rand(1, 64, 64, 3), [aux_frame(width=64, height=64, normalised=True,
                                                                      face=False, hands=False)], right=64, bottom=0)
    latent = {"samples": torch.randn(1, 4, padded.shape[1] // 8, padded.shape[2] // 8)}
    masked = host_nodes.SetLatentNoiseMask().set_mask(latent, mask)[0]
    out = repaint_ksampler(tm.tiny_model("sd15"), 0, 4, 2.0, "euler", "normal", tm.conditioning("sd15"),
                           tm.conditioning("sd15", seed=1), masked, 1.0, 2, 2)["samples"]
    assert torch.equal(out[..., :4], latent["samples"][..., :4])  # the original image's left half is kept


def tiny_controlnet_and_vae():
    """A random-weight ControlNet shaped like the tiny SD1.5 UNet (3-channel hint) and a small KL VAE,
    wrapped in the host's ControlNet and VAE classes as its loaders would wrap them."""
    config = {k: v for k, v in tm.UNET_CONFIGS["sd15"].items() if k != "out_channels"}
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                               device="cpu", **config)
    tm.randomize(control_model, 3)
    control_net = comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"))
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    autoencoder = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    tm.randomize(autoencoder, 4)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    return control_model, control_net, vae


def test_outputs_plug_into_controlnet_apply_advanced_vae_encode_and_set_latent_noise_mask():
    image = torch.rand(1, 96, 64, 3, generator=torch.Generator().manual_seed(1))
    pose = [aux_frame(width=64, height=96, normalised=True)]
    padded, mask, pose_image, _, _ = node.pose_edit_outpaint(image, pose, 0, 0, 32, 32, 8, "auto", "")
    control_model, control_net, vae = tiny_controlnet_and_vae()
    hints = []
    hook = control_model.input_hint_block.register_forward_hook(lambda m, args, out: hints.append(args[0].clone()))
    try:
        positive, negative = host_nodes.ControlNetApplyAdvanced().apply_controlnet(
            tm.conditioning("sd15"), tm.conditioning("sd15", seed=1), control_net, pose_image, 1.0, 0.0, 1.0)
        latent = host_nodes.SetLatentNoiseMask().set_mask(host_nodes.VAEEncode().encode(vae, padded)[0], mask)[0]
        out = host_nodes.common_ksampler(tm.tiny_model("sd15"), 0, 2, 2.0, "euler", "normal", positive, negative,
                                         latent)[0]["samples"]
    finally:
        hook.remove()
    assert out.shape == latent["samples"].shape == (1, 4, 128 // 8, 96 // 8)
    assert hints and all(torch.equal(h[:1], pose_image.movedim(-1, 1)) for h in hints)  # the hint, unresized
    # the latent cells far from the padded sides keep the encoded original
    assert torch.allclose(out[..., :9, :6], latent["samples"][..., :9, :6], atol=1e-5)
    assert not torch.allclose(out[..., 13:, :], latent["samples"][..., 13:, :])


def test_node_runs_on_the_server_and_reports_the_pose_to_the_frontend(comfy_server):
    random_detector_folder(comfy_server.base / "models" / "openpose")
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 192, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PoseEditOutpaint", "inputs": {
            "image": ["1", 0], "pad_left": 0, "pad_top": 0, "pad_right": 64, "pad_bottom": 64, "feathering": 8,
            "completion": "auto", "edits": ""}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }
    info = comfy_server.get("/object_info/PoseEditOutpaint")["PoseEditOutpaint"]
    assert info["output"] == ["IMAGE", "MASK", "IMAGE", "POSE_KEYPOINT"]
    assert set(info["input"]["required"]) >= {"image", "pad_left", "pad_top", "pad_right", "pad_bottom",
                                             "feathering", "completion", "edits"}
    assert "pose" in info["input"]["optional"] and info["input"]["required"]["edits"][1]["default"] == ""
    status, body = comfy_server.post("/prompt", {"prompt": prompt})
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        history = comfy_server.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    ui = entry["outputs"]["2"]
    assert ui["images"] and json.loads(ui["pose_base"][0])[0]["canvas_width"] == 192
    bad = dict(prompt, **{"2": dict(prompt["2"], inputs=dict(prompt["2"]["inputs"], pad_right=13))})
    status, body = comfy_server.post("/prompt", {"prompt": bad})
    assert status == 400 and "pad_right" in json.dumps(body)
