"""Hostile API prompts through the real server: every input of our nodes given a wrong type, an
out-of-range or huge number, NaN or infinity, a wrong-size or non-finite mask, malformed or huge
JSON. Each must be refused, either by the server's validation (HTTP 400 from /prompt, the error
naming our node and the input) or by our node before any work (an execution error whose message
names the node and the input). After each group of hostile prompts, the valid prompt gives the
same images as its first run on this server; and the server's state stays clean: repeated,
concurrent and interrupted runs, and memory over ten runs.

One server for the module (``comfy_server``, random SD1.5 stand-in), 64x64 images, 1-2 steps.
Over 400 lines on purpose: one table of hostile values per node input, all posted to that one
server (a server per file would cost minutes of start-up).

ComfyUI caches every node's output and re-runs a prompt only where an input changed. To make a
valid prompt really sample again, ``fresh`` sets each sampler's ``denoise`` to 1 - k * 1e-7: a new
cache key, while KSampler, BasicScheduler and RePaintKSampler all treat any denoise above 0.9999
as the full schedule, so the computation is the same (and the images must be identical).
"""

from __future__ import annotations

import copy
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import SD15_CHECKPOINT, require_host

require_host()

NAN, INF = float("nan"), float("inf")
WIDTH = HEIGHT = 64
STEPS = 1  # one model evaluation per sampler: the full SD1.5 UNet costs seconds per call on a small CPU
CFG = 1.0  # the host skips the unconditional pass at cfg 1, halving every run's cost
SAVERS = ("save_masactrl", "save_repaint", "save_custom")
OUR_NODES = ("MasaCtrlAttentionPatch", "MasaCtrlConditioningBatch", "MasaCtrlLatentBatch", "RePaintKSampler",
             "RePaintSampler", "PoseEditOutpaint")
TALLY: dict[str, list[str]] = {"refused by validation": [], "refused by our node": [], "ran": []}


def pose_frame() -> dict:
    """A standing person on the 64x32 crop, in pixels (the legs are cut off: completion places them)."""
    points = {0: (32, 4), 1: (32, 10), 2: (26, 10), 3: (23, 18), 4: (22, 26), 5: (38, 10), 6: (41, 18),
              7: (42, 26), 8: (29, 30), 11: (35, 30), 14: (31, 3), 15: (33, 3)}
    body = []
    for i in range(18):
        x, y = points.get(i, (0, 0))
        body += [x, y, 0.9 if i in points else 0.0]
    person = {"pose_keypoints_2d": body, "face_keypoints_2d": None, "hand_left_keypoints_2d": None,
              "hand_right_keypoints_2d": None}
    return {"people": [person], "canvas_width": 64, "canvas_height": 32}


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def full_prompt() -> dict:
    """All six nodes of ours in one prompt with three outputs: MasaCtrl (mask-guided, every step and
    layer) into KSampler; Pose Edit Outpaint into RePaintKSampler; RePaintSampler into SamplerCustom."""
    ckpt = "ckpt"
    p = {
        ckpt: node("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT),
        "pos_src": node("CLIPTextEncode", text="a photo of a red fox", clip=[ckpt, 1]),
        "pos_tgt": node("CLIPTextEncode", text="a photo of a red fox, running", clip=[ckpt, 1]),
        "neg": node("CLIPTextEncode", text="blurry", clip=[ckpt, 1]),
        # MasaCtrl
        "cond_batch": node("MasaCtrlConditioningBatch", source=["pos_src", 0], target=["pos_tgt", 0]),
        "empty": node("EmptyLatentImage", width=WIDTH, height=HEIGHT, batch_size=1),
        "latent_batch": node("MasaCtrlLatentBatch", source=["empty", 0], targets=1, source_is_reference=False,
                             share_noise=True),
        "source_mask": node("SolidMask", value=1.0, width=WIDTH, height=HEIGHT),
        "target_mask": node("SolidMask", value=0.5, width=WIDTH, height=HEIGHT),
        "masactrl": node("MasaCtrlAttentionPatch", model=[ckpt, 0], start_step=0, start_layer=0, end_step=-1,
                         end_layer=-1, mode="mutual", source_index=0, source_mask=["source_mask", 0],
                         target_mask=["target_mask", 0]),
        "ksampler": node("KSampler", model=["masactrl", 0], seed=1, steps=STEPS, cfg=CFG, sampler_name="euler",
                         scheduler="normal", positive=["cond_batch", 0], negative=["neg", 0],
                         latent_image=["latent_batch", 0], denoise=1.0),
        "decode_masactrl": node("VAEDecode", samples=["ksampler", 0], vae=[ckpt, 2]),
        "save_masactrl": node("SaveImage", images=["decode_masactrl", 0], filename_prefix="hostile/masactrl"),
        # Pose Edit Outpaint + RePaintKSampler
        "crop": node("EmptyImage", width=64, height=32, batch_size=1, color=0x3366CC),
        "pose": node("PoseEditOutpaint", image=["crop", 0], pose={"__value__": [pose_frame()]}, pad_left=0,
                     pad_top=0, pad_right=0, pad_bottom=32, feathering=8, completion="auto",
                     edits='[{"op": "translate", "person": 0, "dx": 2, "dy": 0}]'),
        "encode": node("VAEEncode", pixels=["pose", 0], vae=[ckpt, 2]),
        "set_mask": node("SetLatentNoiseMask", samples=["encode", 0], mask=["pose", 1]),
        "repaint": node("RePaintKSampler", model=[ckpt, 0], seed=3, steps=STEPS, cfg=CFG,
                        sampler_name="euler_ancestral", scheduler="normal", positive=["pos_tgt", 0],
                        negative=["neg", 0], latent_image=["set_mask", 0], denoise=1.0, jump_length=1,
                        jump_n_sample=2, resample_start=0.0, resample_end=1.0),
        "decode_repaint": node("VAEDecode", samples=["repaint", 0], vae=[ckpt, 2]),
        "save_repaint": node("SaveImage", images=["decode_repaint", 0], filename_prefix="hostile/repaint"),
        # RePaintSampler in SamplerCustom
        "ksampler_select": node("KSamplerSelect", sampler_name="euler"),
        "repaint_sampler": node("RePaintSampler", sampler=["ksampler_select", 0], jump_length=1, jump_n_sample=2,
                                resample_start=0.0, resample_end=1.0),
        "sigmas": node("BasicScheduler", model=[ckpt, 0], scheduler="normal", steps=STEPS, denoise=1.0),
        "custom": node("SamplerCustom", model=[ckpt, 0], add_noise=True, noise_seed=5, cfg=CFG,
                       positive=["pos_tgt", 0], negative=["neg", 0], sampler=["repaint_sampler", 0],
                       sigmas=["sigmas", 0], latent_image=["set_mask", 0]),
        "decode_custom": node("VAEDecode", samples=["custom", 0], vae=[ckpt, 2]),
        "save_custom": node("SaveImage", images=["decode_custom", 0], filename_prefix="hostile/custom"),
    }
    return p


def unpatched_prompt() -> dict:
    """The MasaCtrl output of ``full_prompt`` with the model straight from the checkpoint."""
    p = only(full_prompt(), ["save_masactrl"])
    p["ksampler"]["inputs"]["model"] = ["ckpt", 0]
    del p["masactrl"], p["source_mask"], p["target_mask"]
    return p


def only(prompt: dict, outputs: list[str]) -> dict:
    """The part of ``prompt`` that ``outputs`` depend on."""
    keep, todo = set(), list(outputs)
    while todo:
        node_id = todo.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        todo += [v[0] for v in prompt[node_id]["inputs"].values()
                 if isinstance(v, list) and len(v) == 2 and v[0] in prompt]
    return {k: v for k, v in prompt.items() if k in keep}


def outputs_using(prompt: dict, node_id: str) -> list[str]:
    return [s for s in SAVERS if s in prompt and node_id in only(prompt, [s])]


def fresh(prompt: dict, k: int) -> dict:
    """``prompt`` with a cache key of its own for every sampler, and the same computation (see above)."""
    assert 0 <= k < 900
    prompt = copy.deepcopy(prompt)
    for n in prompt.values():
        if n["class_type"] in ("KSampler", "RePaintKSampler", "BasicScheduler"):
            n["inputs"]["denoise"] = 1.0 - k * 1e-7
    return prompt


# --- talking to the server ----------------------------------------------------------------------

def post(server, payload) -> tuple[int, dict]:
    data = json.dumps(payload).encode()  # json.dumps writes NaN and Infinity, as a hostile client may
    request = urllib.request.Request(server.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def queue(server, prompt: dict) -> str:
    status, body = post(server, {"prompt": prompt})
    assert status == 200 and not body.get("node_errors"), f"valid prompt rejected ({status}): {body}"
    return body["prompt_id"]


def wait(server, prompt_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n{server.log()[-4000:]}")


def messages(entry: dict) -> dict:
    return {kind: data for kind, data in entry.get("status", {}).get("messages", [])}


def images(server, entry: dict) -> dict[str, np.ndarray]:
    """The saved images of a finished prompt, per SaveImage node id (a batch stacked)."""
    from PIL import Image

    found = {}
    for node_id, output in entry["outputs"].items():
        if not node_id.startswith("save_"):
            continue  # previews (Pose Edit Outpaint shows its canvas)
        batch = []
        for item in output.get("images", []):
            query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
                batch.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")))
        if batch:
            found[node_id] = np.stack(batch)
    return found


def run(server, prompt: dict) -> dict[str, np.ndarray]:
    entry = wait(server, queue(server, prompt))
    assert entry["status"]["status_str"] == "success", f"{messages(entry)}\n{server.log()[-4000:]}"
    return images(server, entry)


def rss_kib(server) -> int:
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


_K = iter(range(1, 900))


@pytest.fixture(scope="module")
def server(comfy_server):
    yield comfy_server
    request = urllib.request.Request(comfy_server.url + "/free", data=json.dumps(
        {"unload_models": True, "free_memory": True}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


@pytest.fixture(scope="module")
def reference(server) -> dict[str, np.ndarray]:
    """The first valid run: the unpatched image first, then the full prompt's three outputs."""
    plain = run(server, unpatched_prompt())
    out = run(server, full_prompt())
    assert set(out) == set(SAVERS)
    assert out["save_masactrl"].shape == (2, HEIGHT, WIDTH, 3)
    assert out["save_repaint"].shape == out["save_custom"].shape == (1, 64, 64, 3)
    return out | {"unpatched": plain["save_masactrl"]}


def assert_same_as_reference(server, reference, outputs=SAVERS) -> None:
    out = run(server, fresh(only(full_prompt(), list(outputs)), next(_K)))
    assert set(out) == set(outputs)
    for saver in out:
        np.testing.assert_array_equal(out[saver], reference[saver], err_msg=saver)


# --- the hostile inputs -------------------------------------------------------------------------

def set_input(node_id: str, name: str, value):
    def change(p):
        p[node_id]["inputs"][name] = value
    return change


def drop_input(node_id: str, name: str):
    def change(p):
        del p[node_id]["inputs"][name]
    return change


def add_nodes(node_id: str, name: str, nodes: dict, link: list):
    def change(p):
        p.update(copy.deepcopy(nodes))
        p[node_id]["inputs"][name] = link
    return change


def solid_mask(value, width=WIDTH, height=HEIGHT) -> dict:
    return {"hostile_mask": node("SolidMask", value=value, width=width, height=height)}


def mask_batch(count: int) -> dict:
    return {"hostile_mask": node("SolidMask", value=1.0, width=WIDTH, height=HEIGHT),
            "hostile_image": node("MaskToImage", mask=["hostile_mask", 0]),
            "hostile_repeat": node("RepeatImageBatch", image=["hostile_image", 0], amount=count),
            "hostile_batch": node("ImageToMask", image=["hostile_repeat", 0], channel="red")}


def edits_case(text: str):
    return set_input("pose", "edits", text)


DEEP = "[" * 200 + "]" * 200
MEGABYTES = json.dumps([{"op": "mirror", "person": 0}] * 80_000)  # about 2 MB
assert len(MEGABYTES) > 2_000_000

# (test id, node id in full_prompt, the input that must be named, change)
CASES = [
    # MasaCtrlAttentionPatch
    ("masactrl-model-string", "masactrl", "model", set_input("masactrl", "model", "v1-5-pruned-emaonly")),
    ("masactrl-model-number", "masactrl", "model", set_input("masactrl", "model", 7)),
    ("masactrl-model-dict", "masactrl", "model", set_input("masactrl", "model", {"a": 1})),
    ("masactrl-model-latent-link", "masactrl", "model", set_input("masactrl", "model", ["empty", 0])),
    ("masactrl-start_step-negative", "masactrl", "start_step", set_input("masactrl", "start_step", -1)),
    ("masactrl-start_step-huge", "masactrl", "start_step", set_input("masactrl", "start_step", 10**30)),
    ("masactrl-start_step-text", "masactrl", "start_step", set_input("masactrl", "start_step", "four")),
    ("masactrl-start_step-nan", "masactrl", "start_step", set_input("masactrl", "start_step", NAN)),
    ("masactrl-start_layer-huge", "masactrl", "start_layer", set_input("masactrl", "start_layer", 10**6)),
    ("masactrl-start_layer-past-model", "masactrl", "start_layer", set_input("masactrl", "start_layer", 999)),
    ("masactrl-end_step-below-min", "masactrl", "end_step", set_input("masactrl", "end_step", -2)),
    ("masactrl-end_layer-past-model", "masactrl", "end_layer", set_input("masactrl", "end_layer", 17)),
    ("masactrl-end_layer-inf", "masactrl", "end_layer", set_input("masactrl", "end_layer", INF)),
    ("masactrl-mode-unknown", "masactrl", "mode", set_input("masactrl", "mode", "sideways")),
    ("masactrl-mode-number", "masactrl", "mode", set_input("masactrl", "mode", 3)),
    ("masactrl-source_index-outside-batch", "masactrl", "source_index", set_input("masactrl", "source_index", 5)),
    ("masactrl-source_index-huge", "masactrl", "source_index", set_input("masactrl", "source_index", 2**70)),
    ("masactrl-source_mask-string", "masactrl", "source_mask", set_input("masactrl", "source_mask", "mask")),
    ("masactrl-source_mask-list", "masactrl", "source_mask", set_input("masactrl", "source_mask", [1, 2, 3])),
    ("masactrl-source_mask-value-list", "masactrl", "source_mask",
     set_input("masactrl", "source_mask", {"__value__": [[1.0, 0.0]]})),
    ("masactrl-source_mask-nan", "masactrl", "source_mask",
     add_nodes("masactrl", "source_mask", solid_mask(NAN), ["hostile_mask", 0])),
    ("masactrl-target_mask-nan", "masactrl", "target_mask",
     add_nodes("masactrl", "target_mask", solid_mask(NAN), ["hostile_mask", 0])),
    ("masactrl-source_mask-wrong-aspect", "masactrl", "source_mask",
     add_nodes("masactrl", "source_mask", solid_mask(1.0, 64, 8), ["hostile_mask", 0])),
    ("masactrl-target_mask-three-for-one-target", "masactrl", "target_mask",
     add_nodes("masactrl", "target_mask", mask_batch(3), ["hostile_batch", 0])),
    ("masactrl-source_mask-two", "masactrl", "source_mask",
     add_nodes("masactrl", "source_mask", mask_batch(2), ["hostile_batch", 0])),
    ("masactrl-target_mask-missing", "masactrl", "target_mask", drop_input("masactrl", "target_mask")),
    ("masactrl-start_step-missing", "masactrl", "start_step", drop_input("masactrl", "start_step")),
    ("masactrl-one-image-batch", "masactrl", "model",
     lambda p: p["ksampler"]["inputs"].update(latent_image=["empty", 0], positive=["pos_src", 0])),
    # MasaCtrlConditioningBatch
    ("condbatch-source-string", "cond_batch", "source", set_input("cond_batch", "source", "a fox")),
    ("condbatch-target-dict", "cond_batch", "target", set_input("cond_batch", "target", {"a": 1})),
    ("condbatch-target-number", "cond_batch", "target", set_input("cond_batch", "target", 3.5)),
    ("condbatch-target-latent-link", "cond_batch", "target", set_input("cond_batch", "target", ["empty", 0])),
    ("condbatch-target-missing", "cond_batch", "target", drop_input("cond_batch", "target")),
    # MasaCtrlLatentBatch
    ("latentbatch-source-string", "latent_batch", "source", set_input("latent_batch", "source", "latent")),
    ("latentbatch-source-dict", "latent_batch", "source", set_input("latent_batch", "source", {"samples": 1})),
    ("latentbatch-source-two-latents", "latent_batch", "source",
     add_nodes("latent_batch", "source", {"hostile_latent": node("EmptyLatentImage", width=64, height=64,
                                                                 batch_size=2)}, ["hostile_latent", 0])),
    ("latentbatch-source-huge-batch", "latent_batch", "targets",
     lambda p: (p["empty"]["inputs"].update(width=16384, height=16384),
                p["latent_batch"]["inputs"].update(targets=63))),
    ("latentbatch-targets-zero", "latent_batch", "targets", set_input("latent_batch", "targets", 0)),
    ("latentbatch-targets-64", "latent_batch", "targets", set_input("latent_batch", "targets", 64)),
    ("latentbatch-targets-huge", "latent_batch", "targets", set_input("latent_batch", "targets", 10**20)),
    ("latentbatch-targets-nan", "latent_batch", "targets", set_input("latent_batch", "targets", NAN)),
    ("latentbatch-target-string", "latent_batch", "target", set_input("latent_batch", "target", "x")),
    ("latentbatch-target-other-size", "latent_batch", "target",
     add_nodes("latent_batch", "target", {"hostile_latent": node("EmptyLatentImage", width=32, height=64,
                                                                 batch_size=1)}, ["hostile_latent", 0])),
    # RePaintKSampler
    ("repaint-model-string", "repaint", "model", set_input("repaint", "model", "model.safetensors")),
    ("repaint-seed-negative", "repaint", "seed", set_input("repaint", "seed", -1)),
    ("repaint-seed-2**64", "repaint", "seed", set_input("repaint", "seed", 2**64)),
    ("repaint-seed-text", "repaint", "seed", set_input("repaint", "seed", "lucky")),
    ("repaint-steps-zero", "repaint", "steps", set_input("repaint", "steps", 0)),
    ("repaint-steps-huge", "repaint", "steps", set_input("repaint", "steps", 10**9)),
    ("repaint-cfg-nan", "repaint", "cfg", set_input("repaint", "cfg", NAN)),
    ("repaint-cfg-inf", "repaint", "cfg", set_input("repaint", "cfg", INF)),
    ("repaint-cfg-minus-inf", "repaint", "cfg", set_input("repaint", "cfg", -INF)),
    ("repaint-cfg-1e308", "repaint", "cfg", set_input("repaint", "cfg", 1e308)),
    ("repaint-sampler_name-bogus", "repaint", "sampler_name", set_input("repaint", "sampler_name", "bogus")),
    ("repaint-sampler_name-number", "repaint", "sampler_name", set_input("repaint", "sampler_name", 5)),
    ("repaint-scheduler-empty", "repaint", "scheduler", set_input("repaint", "scheduler", "")),
    ("repaint-positive-string", "repaint", "positive", set_input("repaint", "positive", "a fox")),
    ("repaint-negative-dict", "repaint", "negative", set_input("repaint", "negative", {"a": 1})),
    ("repaint-latent_image-dict", "repaint", "latent_image",
     set_input("repaint", "latent_image", {"samples": [[1.0]], "noise_mask": None})),
    ("repaint-latent_image-string", "repaint", "latent_image", set_input("repaint", "latent_image", "latent")),
    ("repaint-latent_image-no-noise_mask", "repaint", "latent_image",
     set_input("repaint", "latent_image", ["encode", 0])),
    ("repaint-latent_image-nan-noise_mask", "repaint", "latent_image",
     lambda p: (p.update(copy.deepcopy(solid_mask(NAN))), p["set_mask"]["inputs"].update(mask=["hostile_mask", 0]))),
    ("repaint-denoise-nan", "repaint", "denoise", set_input("repaint", "denoise", NAN)),
    ("repaint-denoise-inf", "repaint", "denoise", set_input("repaint", "denoise", INF)),
    ("repaint-jump_length-zero", "repaint", "jump_length", set_input("repaint", "jump_length", 0)),
    ("repaint-jump_length-huge", "repaint", "jump_length", set_input("repaint", "jump_length", 10**6)),
    ("repaint-jump_n_sample-zero", "repaint", "jump_n_sample", set_input("repaint", "jump_n_sample", 0)),
    ("repaint-jump_n_sample-huge", "repaint", "jump_n_sample", set_input("repaint", "jump_n_sample", 1000)),
    ("repaint-resample_start-nan", "repaint", "resample_start", set_input("repaint", "resample_start", NAN)),
    ("repaint-resample_end-inf", "repaint", "resample_end", set_input("repaint", "resample_end", INF)),
    ("repaint-resample-window-reversed", "repaint", "resample_start",
     lambda p: p["repaint"]["inputs"].update(resample_start=0.8, resample_end=0.2)),
    # RePaintSampler
    ("repaintsampler-sampler-string", "repaint_sampler", "sampler", set_input("repaint_sampler", "sampler", "euler")),
    ("repaintsampler-sampler-sigmas-link", "repaint_sampler", "sampler",
     set_input("repaint_sampler", "sampler", ["sigmas", 0])),
    ("repaintsampler-jump_length-negative", "repaint_sampler", "jump_length",
     set_input("repaint_sampler", "jump_length", -1)),
    ("repaintsampler-jump_n_sample-nan", "repaint_sampler", "jump_n_sample",
     set_input("repaint_sampler", "jump_n_sample", NAN)),
    ("repaintsampler-resample_start-nan", "repaint_sampler", "resample_start",
     set_input("repaint_sampler", "resample_start", NAN)),
    ("repaintsampler-resample_end-2", "repaint_sampler", "resample_end",
     set_input("repaint_sampler", "resample_end", 2.0)),
    ("repaintsampler-latent-no-noise_mask", "repaint_sampler", "latent_image",
     lambda p: p["custom"]["inputs"].update(latent_image=["encode", 0])),
    # PoseEditOutpaint
    ("pose-image-string", "pose", "image", set_input("pose", "image", "person.png")),
    ("pose-image-list", "pose", "image", set_input("pose", "image", [0.5, 0.5, 0.5])),
    ("pose-image-dict", "pose", "image", set_input("pose", "image", {"a": 1})),
    ("pose-image-mask-link", "pose", "image", set_input("pose", "image", ["source_mask", 0])),
    ("pose-pose-string", "pose", "pose", set_input("pose", "pose", "standing")),
    ("pose-pose-bad-people", "pose", "pose", set_input("pose", "pose", {"__value__": [{"people": "many"}]})),
    ("pose-pose-nan-point", "pose", "pose",
     set_input("pose", "pose", {"__value__": [dict(pose_frame(), people=[dict(
         pose_frame()["people"][0], pose_keypoints_2d=[NAN] * 54)])]})),
    ("pose-pad_left-100000", "pose", "pad_left", set_input("pose", "pad_left", 100000)),
    ("pose-pad_top-100000", "pose", "pad_top", set_input("pose", "pad_top", 100000)),
    ("pose-pad_right-100000", "pose", "pad_right", set_input("pose", "pad_right", 100000)),
    ("pose-pad_bottom-100000", "pose", "pad_bottom", set_input("pose", "pad_bottom", 100000)),
    ("pose-pad_bottom-negative", "pose", "pad_bottom", set_input("pose", "pad_bottom", -8)),
    ("pose-pad_right-not-multiple-of-8", "pose", "pad_right", set_input("pose", "pad_right", 12)),
    ("pose-pad_left-nan", "pose", "pad_left", set_input("pose", "pad_left", NAN)),
    ("pose-pad_top-text", "pose", "pad_top", set_input("pose", "pad_top", "lots")),
    ("pose-feathering-negative", "pose", "feathering", set_input("pose", "feathering", -1)),
    ("pose-feathering-huge", "pose", "feathering", set_input("pose", "feathering", 10**9)),
    ("pose-completion-unknown", "pose", "completion", set_input("pose", "completion", "guess")),
    ("pose-edits-malformed", "pose", "edits", edits_case('[{"op": "translate", "person": 0,')),
    ("pose-edits-deep", "pose", "edits", edits_case(DEEP)),
    ("pose-edits-megabytes", "pose", "edits", edits_case(MEGABYTES)),
    ("pose-edits-nan", "pose", "edits", edits_case('[{"op": "translate", "person": 0, "dx": NaN, "dy": 0}]')),
    ("pose-edits-1e308", "pose", "edits", edits_case('[{"op": "translate", "person": 0, "dx": 1e308, "dy": 0}]')),
    ("pose-edits-unknown-op", "pose", "edits", edits_case('[{"op": "explode", "person": 0}]')),
    ("pose-edits-negative-person", "pose", "edits", edits_case('[{"op": "mirror", "person": -1}]')),
    ("pose-edits-absent-person", "pose", "edits", edits_case('[{"op": "mirror", "person": 7}]')),
    ("pose-edits-index-past-part", "pose", "edits",
     edits_case('[{"op": "set", "person": 0, "part": "body", "index": 18, "x": 1, "y": 1}]')),
    ("pose-edits-unknown-part", "pose", "edits",
     edits_case('[{"op": "remove", "person": 0, "part": "tail", "index": 0}]')),
    ("pose-edits-not-a-list", "pose", "edits", edits_case('{"op": "mirror", "person": 0}')),
    ("pose-edits-number", "pose", "edits", set_input("pose", "edits", 12345)),
]
GROUPS = sorted({node_id for _, node_id, _, _ in CASES}, key=[c[1] for c in CASES].index)


def hostile(server, case) -> tuple[str, str]:
    """Queue one hostile prompt; ('validation' | 'execution', message). Fails when it ran through."""
    case_id, node_id, name, change = case
    prompt = full_prompt()
    change(prompt)
    prompt = only(prompt, outputs_using(prompt, node_id) or list(SAVERS))
    class_type = full_prompt()[node_id]["class_type"]
    status, body = post(server, {"prompt": prompt})
    if status == 400 or body.get("node_errors"):
        assert status == 400, f"{case_id}: node errors without a refusal ({status}): {body}"
        errors = body.get("node_errors", {})
        named = [e for nid, group in errors.items() for e in group.get("errors", [])
                 if group.get("class_type") in OUR_NODES and nid == node_id
                 and e.get("extra_info", {}).get("input_name") == name]
        assert named, f"{case_id}: refused without naming {class_type} input '{name}': {body}"
        return "validation", json.dumps(named[0])
    assert status == 200, f"{case_id}: HTTP {status}: {body}"
    entry = wait(server, body["prompt_id"])
    error = messages(entry).get("execution_error")
    assert error is not None, f"{case_id}: the hostile prompt ran through: {entry['status']}"
    message = error["exception_message"]
    assert f"{class_type}: input '{name}'" in message or (
        f"{class_type}: inputs '{name}'" in message), f"{case_id}: {error['node_type']} failed with {message!r}"
    assert error["exception_type"] in ("ValueError", "builtins.ValueError"), error["exception_type"]
    return "execution", message


@pytest.mark.parametrize("group", GROUPS)
def test_hostile_inputs_are_refused_naming_node_and_input_and_leave_the_server_as_it_was(group, server,
                                                                                         reference, measured):
    failures = []
    for case in (c for c in CASES if c[1] == group):
        try:
            how, _ = hostile(server, case)
            TALLY["refused by validation" if how == "validation" else "refused by our node"].append(case[0])
        except AssertionError as e:
            failures.append(str(e)[:600])
            TALLY["ran"].append(case[0])
    assert_same_as_reference(server, reference, outputs_using(full_prompt(), group))
    assert not failures, "\n".join(failures)
    if group == GROUPS[-1]:
        total = sum(len(v) for v in TALLY.values())
        measured(f"{total} hostile inputs: {len(TALLY['refused by validation'])} refused by the server's "
                 f"validation naming node and input, {len(TALLY['refused by our node'])} by our node's message "
                 f"naming node and input, {len(TALLY['ran'])} not")


def test_the_largest_seed_with_an_ancestral_sampler_and_jumps_runs(server, reference):
    """seed 2**64 - 1 (the widget's maximum): the per-stretch seeds stay in the seed range."""
    prompt = only(full_prompt(), ["save_repaint"])
    # 2 steps with jump_length 1 and jump_n_sample 2: one jump, so a second stretch with its own seed
    prompt["repaint"]["inputs"].update(seed=2**64 - 1, steps=2, sampler_name="euler_ancestral", jump_length=1,
                                       jump_n_sample=2)
    out = run(server, prompt)["save_repaint"]
    assert out.shape == reference["save_repaint"].shape and not np.array_equal(out, reference["save_repaint"])


def test_the_same_prompt_twice_gives_identical_images(server, reference):
    assert_same_as_reference(server, reference)  # a cache key of its own: every sampler runs again


def test_a_masactrl_run_followed_by_the_graph_without_it_gives_the_unpatched_image(server, reference):
    patched = run(server, fresh(only(full_prompt(), ["save_masactrl"]), next(_K)))["save_masactrl"]
    np.testing.assert_array_equal(patched, reference["save_masactrl"])
    assert not np.array_equal(patched[1], reference["unpatched"][1]), "MasaCtrl changed nothing"
    # the source row is plain self-attention, computed on its own rows: equal up to float rounding
    assert np.abs(patched[0].astype(int) - reference["unpatched"][0]).max() <= 1
    plain = run(server, fresh(unpatched_prompt(), next(_K)))["save_masactrl"]
    np.testing.assert_array_equal(plain, reference["unpatched"])


def test_six_prompts_queued_at_once_each_equal_their_serial_run(server, reference):
    """Each of the three outputs with the reference seed (its serial run is the reference) and another."""
    def variant(i: int) -> dict:
        prompt = only(full_prompt(), [SAVERS[i % 3]])
        if i >= 3:
            for n in prompt.values():
                for key in ("seed", "noise_seed"):
                    if key in n["inputs"]:
                        n["inputs"][key] = 100 + i
        return prompt

    serial = [{SAVERS[i]: reference[SAVERS[i]]} for i in range(3)] + [run(server, variant(i)) for i in range(3, 6)]
    ids = [queue(server, fresh(variant(i), next(_K))) for i in range(6)]
    for i, prompt_id in enumerate(ids):
        entry = wait(server, prompt_id)
        assert entry["status"]["status_str"] == "success", messages(entry)
        together = images(server, entry)
        assert together.keys() == serial[i].keys()
        for saver in together:
            np.testing.assert_array_equal(together[saver], serial[i][saver], err_msg=f"prompt {i}")
    assert not np.array_equal(serial[3]["save_masactrl"], reference["save_masactrl"])


async def _interrupt_while_running(url: str, prompt: dict, node_id: str, after: float) -> str:
    """Queue ``prompt``, and ``after`` seconds into the run of ``node_id`` (told by the websocket) interrupt."""
    import asyncio
    import uuid

    import aiohttp

    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}", max_msg_size=0) as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                prompt_id = (await r.json())["prompt_id"]
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    event = message.json()
                    if event.get("type") == "executing" and event.get("data", {}).get("node") == node_id:
                        break
            await asyncio.sleep(after)
            async with session.post(f"{url}/interrupt") as r:
                assert r.status == 200
    return prompt_id


def test_interrupting_a_repaint_run_leaves_the_server_healthy(server, reference):
    import asyncio

    long = only(full_prompt(), ["save_repaint"])
    long["repaint"]["inputs"].update(steps=40, jump_length=5, jump_n_sample=5)  # 200 evaluations: minutes
    prompt_id = asyncio.run(_interrupt_while_running(server.url, long, "repaint", after=1.0))
    entry = wait(server, prompt_id)
    interrupted = messages(entry).get("execution_interrupted")
    assert interrupted is not None, entry["status"]
    assert interrupted["node_type"] == "RePaintKSampler"
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert_same_as_reference(server, reference, ["save_repaint"])


RSS_GROWTH_BOUND_MIB = 64


def test_ten_runs_of_one_prompt_do_not_grow_the_servers_memory(server, measured):
    prompt = only(full_prompt(), ["save_masactrl"])
    run(server, fresh(prompt, next(_K)))  # warm: every node has run once with this prompt's shapes
    before = rss_kib(server)
    rss = []
    for _ in range(10):
        run(server, fresh(prompt, next(_K)))
        rss.append(rss_kib(server))
    growth = (rss[-1] - before) / 1024
    shown = ", ".join(f"{r / 1024:.0f}" for r in rss)
    measured(f"server RSS {before / 1024:.0f} MiB after a warm-up run, then {shown} MiB over ten runs: "
             f"{growth:+.1f} MiB (bound {RSS_GROWTH_BOUND_MIB} MiB)")
    assert growth < RSS_GROWTH_BOUND_MIB
