"""The graph pictures in docs/ show the shipped workflows as they are: docs/workflow-pictures.json records
the workflow file (and its SHA-256) each picture was taken from, and a workflow edited since fails here."""

from __future__ import annotations

import pytest

import workflow_pictures as W

RETAKE = "re-take the pictures: python -m tests.workflow_pictures"
WORKFLOWS = W.shipped_workflows()


def test_every_shipped_workflow_has_one_recorded_picture_and_nothing_else_is_recorded():
    record = W.read_record()
    assert sorted(entry["workflow"] for entry in record.values()) == [W.relative(w) for w in WORKFLOWS], RETAKE
    for picture, entry in record.items():
        assert picture == W.relative(W.picture_of(W.REPO / entry["workflow"]))
        assert (W.REPO / picture).is_file(), f"{picture} is recorded but missing: {RETAKE}"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_the_picture_was_taken_from_the_workflow_as_it_is_now(workflow):
    entry = W.read_record().get(W.relative(W.picture_of(workflow)))
    assert entry is not None, f"{W.relative(workflow)} has no picture: {RETAKE} {workflow.stem}"
    assert entry["sha256"] == W.workflow_hash(workflow), (
        f"{W.relative(workflow)} changed after {W.relative(W.picture_of(workflow))} was taken: {RETAKE} {workflow.stem}")


def test_the_hash_reads_crlf_as_lf_and_sees_any_other_change(tmp_path):
    lf, crlf, edited = tmp_path / "lf.json", tmp_path / "crlf.json", tmp_path / "edited.json"
    lf.write_bytes(b'{\n  "nodes": []\n}\n')
    crlf.write_bytes(b'{\r\n  "nodes": []\r\n}\r\n')
    edited.write_bytes(b'{\n  "nodes": [ ]\n}\n')
    assert W.workflow_hash(lf) == W.workflow_hash(crlf)
    assert W.workflow_hash(lf) != W.workflow_hash(edited)
