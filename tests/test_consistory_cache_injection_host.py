"""A saved ConsiStory subject with Feature Injection on the real host: tiny SD1.5, real two-pass sampling.

The official cached mode keeps two stages (``run_anchor_generation``'s ``anchor_cache_first_stage``
and ``anchor_cache_second_stage``) and maps new images to the cached anchors (``anchor_nn_map``).
In the official batch mode a non-anchor image is mapped to the anchors only too (its
``extended_mapping`` row: the anchors and itself, at infinite distance), and the anchors are
injected before it, so the two modes coincide for a new image: a new prompt sampled alone through
Load Subject + Feature Injection must equal its row of the batch [anchors + new prompt] sampled with
Feature Injection, given the same noise (tests/test_feature_injection_math.py checks the rule
itself against the official transcription).
"""

import pytest
import torch

from conftest import require_host

require_host()

import folder_paths  # noqa: E402

from consistent_synthesis.attention import anchor_cache as ac  # noqa: E402
from consistent_synthesis.nodes import consistory_injection as injection  # noqa: E402
from consistent_synthesis.nodes import consistory_subject as node, consistory_subject_file  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402
from test_consistory_cache_host import ANCHORS, BATCH, NEW, SIDE, _masks, _patch, _relative, _sample  # noqa: E402

STEPS = 10  # injection at steps 1-3 (steps // 10 .. steps // 3), sharing from step 1
ANCHOR_ROWS = slice(0, ANCHORS)
GRID = SIDE // 2  # the latent/2 injection grid
# SD1.5's self-attention layers at latent/2: input blocks 4, 5 and output blocks 6, 7, 8
INJECTED_LAYERS = {"input.4.0", "input.5.0", "output.6.0", "output.7.0", "output.8.0"}


@pytest.fixture
def subjects(tmp_path, monkeypatch):
    """models/consistory_subjects in a temporary folder."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, node.FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _saving(model, automatic=False, order="injection-then-save"):
    patched = _patch(model, ANCHOR_ROWS, automatic)
    if order == "injection-then-save":
        return node.save_subject(injection.patch_model(patched), filename_prefix="dog")
    return injection.patch_model(node.save_subject(patched, filename_prefix="dog"))


def _save(model, automatic=False, order="injection-then-save", prefix="dog"):
    """The anchors sampled alone through Save Subject with Feature Injection; the file's name."""
    before = set(node.subject_files())
    _sample(_saving(model, automatic, order), ANCHOR_ROWS, steps=STEPS)
    (name,) = set(node.subject_files()) - before
    return name


def _read(name):
    return node.read_subject(folder_paths.get_full_path(node.FOLDER, name), name)


def _loading(model, name, automatic=False, order="injection-then-load", inject=True):
    patched = _patch(model, NEW, automatic)
    if not inject:
        return node.load_subject(patched, _read(name))
    if order == "injection-then-load":
        return node.load_subject(injection.patch_model(patched), _read(name))
    return injection.patch_model(node.load_subject(patched, _read(name)))


@pytest.mark.parametrize("automatic, save_order, load_order", [
    (False, "injection-then-save", "injection-then-load"),
    (False, "save-then-injection", "load-then-injection"),
    (True, "injection-then-save", "load-then-injection"),
], ids=["given-masks-dropout-0", "given-masks-other-node-order", "automatic-masks-dropout-0.5"])
def test_cached_anchors_with_injection_give_the_new_prompts_row_of_the_batch_run(sd15, subjects, automatic,
                                                                                 save_order, load_order, measured):
    batch = _sample(injection.patch_model(_patch(sd15, slice(0, BATCH), automatic)), steps=STEPS)
    batch_sdsa = _sample(_patch(sd15, slice(0, BATCH), automatic), steps=STEPS)
    name = _save(sd15, automatic, save_order)
    cached = _sample(_loading(sd15, name, automatic, load_order), NEW, steps=STEPS)
    cached_sdsa = _sample(_loading(sd15, name, automatic, inject=False), NEW, steps=STEPS)
    measured(f"cached + injection vs batch + injection row: relative {_relative(cached, batch[NEW]):.1e}; "
             f"injection changes the batch row by {_relative(batch_sdsa[NEW], batch[NEW]):.1e}")
    assert _relative(cached, batch[NEW]) < 1e-5
    # the injection acts on the new row (the equality says something), and without Feature Injection the
    # same file gives the row of the batch run without it (its first stage: shared attention only)
    assert _relative(batch_sdsa[NEW], batch[NEW]) > 1e-4
    assert _relative(cached_sdsa, batch_sdsa[NEW]) < 1e-5


def test_the_file_holds_both_stages_and_its_first_stage_is_the_plain_save(sd15, subjects):
    name = _save(sd15)
    _sample(node.save_subject(_patch(sd15, ANCHOR_ROWS, False), filename_prefix="plain"), ANCHOR_ROWS, steps=STEPS)
    subject, plain = _read(name), _read("plain_00001.safetensors")
    assert subject.has_injection and not plain.has_injection
    meta = subject.metadata[consistory_subject_file.INJECTION]
    assert meta == dict(alpha=0.8, dift_step=meta["dift_step"], steps=[1, 3], grid=[GRID, GRID])
    # the first pass is the run without injection: the same first stage, bit for bit
    first = {n for n in subject.tensors if not n.startswith(ac.SECOND_STAGE)}
    assert first == set(plain.tensors)
    assert all(torch.equal(subject.tensors[n], plain.tensors[n]) for n in first)
    # the second stage: every shared layer's K/V again, from the second pass (injection changed them)
    second = {n[len(ac.SECOND_STAGE):] for n in subject.tensors if n.startswith(ac.SECOND_STAGE)}
    assert {n for n in first if n.startswith(("k/", "v/"))} <= second
    assert any(not torch.equal(subject.tensors[ac.SECOND_STAGE + n], subject.tensors[n])
               for n in first if n.startswith("k/"))
    # the anchors' DIFT features and masks before dropout at the injection grid (the given masks)
    masks = torch.nn.functional.interpolate(_masks()[:ANCHORS, None], size=(GRID, GRID), mode="nearest").flatten(1)
    assert torch.equal(subject.tensors[ac.MASK_NAME], masks > 0.5)
    assert subject.tensors[ac.DIFT_NAME].shape[0] == ANCHORS
    # the anchors' injected outputs: every latent/2 layer at every injection step, inside the masks only
    outputs = {n for n in subject.tensors if n.startswith(ac.SECOND_STAGE + "out/")}
    assert outputs == {ac.output_name(step, 0, layer) for step in (1, 2, 3) for layer in INJECTED_LAYERS}
    assert all(subject.tensors[n].shape[0] == int((masks > 0.5).sum()) for n in outputs)


def test_the_injected_outputs_are_the_anchors_rows_of_the_saving_runs_second_pass(sd15, subjects, monkeypatch):
    seen = []
    original = injection.fi.FeatureInjector.inject_outputs

    def spy(self, output, alpha):
        out = original(self, output, alpha)
        seen.append(out[:ANCHORS].clone())
        return out

    monkeypatch.setattr(injection.fi.FeatureInjector, "inject_outputs", spy)
    subject = _read(_save(sd15))
    mask = subject.tensors[ac.MASK_NAME].reshape(-1)
    saved = [subject.tensors[ac.output_name(step, 0, layer)] for step in (1, 2, 3)
             for layer in sorted(INJECTED_LAYERS, key=lambda n: (n[0] == "o", int(n.split(".")[1])))]
    assert len(seen) == len(saved) == 15
    assert all(torch.equal(s, o.reshape(-1, o.shape[-1])[mask]) for s, o in zip(saved, seen))


@pytest.mark.parametrize("order", ["injection-then-load", "load-then-injection"])
def test_a_subject_saved_without_injection_is_refused_with_injection(sd15, subjects, order):
    _sample(node.save_subject(_patch(sd15, ANCHOR_ROWS, False), filename_prefix="plain"), ANCHOR_ROWS, steps=STEPS)
    match = "ConsiStoryLoadSubject: input 'subject': 'plain_00001.safetensors' was saved without ConsiStory Feature"
    with pytest.raises(ValueError, match=match):  # when the node runs, or before the first step
        _sample(_loading(sd15, "plain_00001.safetensors", order=order), NEW, steps=STEPS)


def test_saving_and_loading_on_one_model_with_injection_is_refused(sd15, subjects):
    name = _save(sd15)
    both = injection.patch_model(node.load_subject(node.save_subject(_patch(sd15, NEW, False), filename_prefix="x"),
                                                   _read(name)))
    with pytest.raises(ValueError, match="ConsiStoryLoadSubject: input 'model': .*both"):
        _sample(both, NEW, steps=STEPS)


def test_injection_with_a_subject_adds_no_host_sync_and_saving_one_more_a_run(sd15, subjects, measured):
    name = _save(sd15, automatic=True)
    cached = _loading(sd15, name, automatic=True)
    with HostSyncCounter() as batch:  # Feature Injection's own reads: sigma(t=261), the sampler's per pass
        _sample(injection.patch_model(_patch(sd15, slice(0, BATCH), True)), steps=STEPS)
    with HostSyncCounter() as counted:
        _sample(cached, NEW, steps=STEPS)
    with HostSyncCounter() as injected_anchors:
        _sample(injection.patch_model(_patch(sd15, ANCHOR_ROWS, True)), ANCHOR_ROWS, steps=STEPS)
    saving = _saving(sd15, automatic=True)
    with HostSyncCounter() as saved:
        _sample(saving, ANCHOR_ROWS, steps=STEPS)
    lent = sum(1 for n in _read(name).tensors if n.removeprefix(ac.SECOND_STAGE).startswith("keep/"))
    measured(f"host syncs: {batch.total} batch with injection, {counted.total} cached with injection; saving "
             f"{saved.total} against {injected_anchors.total} with injection alone ({lent} step-and-grid index "
             "reads over both passes, 1 for the outputs' tokens)")
    assert counted.total <= batch.total, counted.report()
    assert saved.total - injected_anchors.total == lent + 1 and lent > 0, saved.report()
