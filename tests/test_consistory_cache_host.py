"""Reusable ConsiStory subjects on the real host: tiny SD1.5 UNet, real sampling.

The anchors are sampled once with ConsiStory Save Subject; a new prompt sampled alone through
ConsiStory Load Subject must equal that prompt's row of the batch run [anchors + new prompt] with the
same noise (the official run_extra_generation draws the batch's latents and drops the anchors').
"""

import json

import pytest
import torch

from conftest import require_host

require_host()

import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402

import tiny_models as tm  # noqa: E402
from consistent_synthesis.attention import anchor_cache as ac  # noqa: E402
from consistent_synthesis.nodes import consistory, consistory_subject as node, consistory_subject_file  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

ANCHORS, SIDE, STEPS, CFG = 2, 16, 4, 5.0
BATCH = ANCHORS + 1
NEW = slice(ANCHORS, BATCH)


@pytest.fixture
def subjects(tmp_path, monkeypatch):
    """models/consistory_subjects in a temporary folder."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, node.FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _masks():
    masks = torch.zeros(BATCH, SIDE * 8, SIDE * 8)
    masks[0, 16:80, 16:96] = 1
    masks[1, 40:128, 0:64] = 1
    masks[2, 0:64, 64:128] = 1
    return masks


def _rows(conditioning, rows):
    return [[c[rows], dict(e)] for c, e in conditioning]


def _sample(model, rows=slice(0, BATCH), side=SIDE, steps=STEPS, cfg=CFG):
    noise = torch.randn(BATCH, 4, side, side, generator=torch.Generator().manual_seed(7))[rows]
    positive = _rows(tm.conditioning("sd15", batch=BATCH, seed=1), rows)
    negative = _rows(tm.conditioning("sd15", batch=BATCH, seed=2), rows)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), disable_pbar=True, seed=0)


def _patch(model, rows, automatic, **kwargs):
    if automatic:
        settings = dict(subject_tokens="1, 2 | 2 | 3".split(" | ")[rows], mask_dropout=0.5, seed=5)
        settings["subject_tokens"] = " | ".join(settings["subject_tokens"])
    else:
        settings = dict(subject_masks=_masks()[rows], mask_dropout=0.0)
    return consistory.patch_model(model, anchors=ANCHORS, **(settings | kwargs))


def _save(model, automatic=False, **kwargs):
    """Sample the anchors alone through Save Subject; the file's name and the anchors' latents."""
    anchors = _sample(node.save_subject(_patch(model, slice(0, ANCHORS), automatic, **kwargs), filename_prefix="dog"),
                      slice(0, ANCHORS), **{k: kwargs[k] for k in ("side", "steps") if k in kwargs})
    (name,) = node.subject_files()
    return name, anchors


def _load(model, name, automatic=False, **kwargs):
    subject = node.read_subject(folder_paths.get_full_path(node.FOLDER, name), name)
    return node.load_subject(_patch(model, NEW, automatic, **kwargs), subject)


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("automatic", [False, True], ids=["given-masks-dropout-0", "automatic-masks-dropout-0.5"])
def test_cached_anchors_give_the_new_prompts_row_of_the_batch_run(sd15, subjects, automatic, measured):
    batch = _sample(_patch(sd15, slice(0, BATCH), automatic))
    name, anchors = _save(sd15, automatic)
    cached = _sample(_load(sd15, name, automatic), NEW)
    alone = _sample(sd15, NEW)
    measured(f"cached vs batch row: relative {_relative(cached, batch[NEW]):.1e}; anchors alone vs in the batch: "
             f"{_relative(anchors, batch[:ANCHORS]):.1e}; the new row without anchors differs by "
             f"{_relative(alone, batch[NEW]):.1e}")
    # the anchors do not depend on the images after them (dropout is drawn for the anchors only)
    assert _relative(anchors, batch[:ANCHORS]) < 1e-5
    assert _relative(cached, batch[NEW]) < 1e-5
    assert _relative(alone, batch[NEW]) > 1e-3  # the anchors shape the new image: the equality says something


def test_the_file_holds_what_the_run_lent_and_round_trips(sd15, subjects, monkeypatch):
    written = {}
    original = consistory_subject_file.save_file

    def spy(tensors, path, metadata=None):
        written.update(tensors=dict(tensors), metadata=dict(metadata))
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(consistory_subject_file, "save_file", spy)
    name, _ = _save(sd15)
    subject = node.read_subject(folder_paths.get_full_path(node.FOLDER, name), name)
    assert subject.tensors.keys() == written["tensors"].keys()
    assert all(torch.equal(subject.tensors[n], t) and subject.tensors[n].dtype == t.dtype
               for n, t in written["tensors"].items())
    meta = subject.metadata
    assert meta == json.loads(written["metadata"][node.METADATA_KEY])
    assert (meta["anchors"], meta["steps"], meta["latent"], meta["window"], meta["chunks"]) == \
        (ANCHORS, STEPS, [4, SIDE, SIDE], [1, STEPS], [0, 1])
    assert meta["model"] == node.model_fingerprint(sd15) and len(meta["sigmas"]) == STEPS + 1
    decoder = {k for k in (ac.layer_name(k) for k in consistory.self_attention_layers(
        sd15.get_model_object("diffusion_model"))) if k.startswith("output")}
    assert set(meta["layers"]) == decoder and len(decoder) == 9
    # every shared layer at every step 1..STEPS-1, both chunks, K and V of exactly the lent tokens
    masks = torch.nn.functional.interpolate(_masks()[:ANCHORS, None], size=(SIDE, SIDE), mode="nearest")
    for step in range(1, STEPS):
        for layer in decoder:
            grid = SIDE // 2 ** ((11 - int(layer.split(".")[1])) // 3)  # output blocks 3-5: /4, 6-8: /2, 9-11: /1
            keep = subject.tensors[ac.keep_name(step, grid, grid)]
            expected = torch.nn.functional.interpolate(masks, size=(grid, grid), mode="nearest").flatten(1) > 0.5
            assert torch.equal(keep, expected)
            for chunk in (0, 1):
                k = subject.tensors[ac.entry_name("k", step, 0, layer, chunk)]
                v = subject.tensors[ac.entry_name("v", step, 0, layer, chunk)]
                assert k.shape[0] == int(expected.sum()) and v.shape == k.shape
    assert not any(n.startswith("k/0/") for n in subject.tensors)  # step 0 shares nothing (official window)


@pytest.mark.parametrize("change, name", [
    (dict(model_seed=1), "subject"),
    (dict(side=24), "subject"),
    (dict(steps=STEPS + 1), "subject"),
    (dict(blocks="mid+up"), "model"),
    (dict(start_step=2), "model"),
    (dict(cfg=1.0), None),  # a run with cfg 1 uses the conditional rows only: allowed
])
def test_a_subject_is_refused_for_another_model_size_steps_or_layers(sd15, subjects, change, name):
    saved, _ = _save(sd15)
    model = tm.tiny_model("sd15", seed=change["model_seed"]) if "model_seed" in change else sd15
    patch_args = {k: change[k] for k in ("blocks", "start_step") if k in change}
    sample_args = {k: change[k] for k in ("side", "steps", "cfg") if k in change}

    def run():
        _sample(_load(model, saved, **patch_args), NEW, **sample_args)

    if name is None:
        run()
        return
    with pytest.raises(ValueError, match=f"ConsiStoryLoadSubject: input '{name}'"):
        run()


def test_a_subject_saved_with_cfg_1_is_refused_for_cfg_above_1(sd15, subjects):
    saving = node.save_subject(_patch(sd15, slice(0, ANCHORS), False), filename_prefix="dog")
    _sample(saving, slice(0, ANCHORS), cfg=1.0)
    (saved,) = node.subject_files()
    with pytest.raises(ValueError, match="ConsiStoryLoadSubject: input 'subject': .*cfg 1"):
        _sample(_load(sd15, saved), NEW)


def test_other_files_and_models_are_refused(sd15, subjects):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(subjects / "other.safetensors"))
    with pytest.raises(ValueError, match="ConsiStoryLoadSubject: input 'subject': 'other.safetensors' is not"):
        node.read_subject(str(subjects / "other.safetensors"), "other.safetensors")
    with pytest.raises(ValueError, match="ConsiStorySaveSubject: input 'model'"):
        node.save_subject(sd15)
    with pytest.raises(ValueError, match="ConsiStorySaveSubject: input 'model'"):
        node.save_subject(consistory.patch_model(sd15, token_sharing="storydiffusion"))
    with pytest.raises(ValueError, match="ConsiStorySaveSubject: input 'filename_prefix'"):
        _sample(node.save_subject(_patch(sd15, slice(0, ANCHORS), False), filename_prefix="../escape"),
                slice(0, ANCHORS))
    with pytest.raises(ValueError, match="ConsiStoryLoadSubject: input 'subject'"):
        node.ConsiStoryLoadSubject.execute(sd15, "missing.safetensors")


def test_a_second_save_gets_the_next_number(sd15, subjects):
    _save(sd15)
    _sample(node.save_subject(_patch(sd15, slice(0, ANCHORS), False), filename_prefix="dog"), slice(0, ANCHORS))
    assert node.subject_files() == ["dog_00001.safetensors", "dog_00002.safetensors"]


def test_cached_generation_adds_no_host_sync_and_saving_one_per_step_and_grid(sd15, subjects, measured):
    name, _ = _save(sd15, automatic=True)
    cached = _load(sd15, name, automatic=True)
    with HostSyncCounter() as baseline:
        _sample(sd15, NEW)
    with HostSyncCounter() as counted:
        _sample(cached, NEW)
    saving = node.save_subject(_patch(sd15, slice(0, ANCHORS), True), filename_prefix="again")
    with HostSyncCounter() as plain_anchors:
        _sample(sd15, slice(0, ANCHORS))
    with HostSyncCounter() as saved:
        _sample(saving, slice(0, ANCHORS))
    lent = sum(1 for n in node.read_subject(folder_paths.get_full_path(node.FOLDER, name), name).tensors
               if n.startswith("keep/"))
    measured(f"host syncs: {baseline.total} plain, {counted.total} cached; saving {saved.total} against "
             f"{plain_anchors.total} plain ({lent} step-and-grid index reads)")
    assert counted.total - baseline.total <= 0, counted.report()
    assert saved.total - plain_anchors.total == lent and lent > 0, saved.report()

