"""``python -m runner sweep`` on two real ComfyUI servers on loopback, with the random full-size SD1.5.

The shipped MasaCtrl workflow at 64x64 px, 2 steps and CFG 1 (one model call per step), swept over
start_step x start_layer. Run under the heavy lock: two servers with the full-size model each.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, SD15_CHECKPOINT, require_host

HOST = require_host()

from live_server import ComfyServer  # noqa: E402

from consistent_synthesis.runner import metrics, random_models  # noqa: E402

pytestmark = pytest.mark.server  # two ComfyUI servers and the sweep command against them

STEPS, SIZE = 2, 64
SHIPPED = json.loads((REPO / "workflows" / "api" / "masactrl_sd15.json").read_text())
SAVE = next(i for i, n in SHIPPED.items() if n["class_type"] == "SaveImage")  # files: <SAVE>_00 source, _01 target
STUDY = ["--vary", "start_step=0,2", "--vary", "start_layer=0,10"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    random_models.ensure("checkpoints", SD15_CHECKPOINT)
    pair = [ComfyServer(HOST, tmp_path_factory.mktemp(f"sweep-server-{i}"), model_roots=[random_models.cache_dir()],
                        cpu=True) for i in range(2)]
    errors = []
    threads = [threading.Thread(target=lambda s=s: _start(s, errors)) for s in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        yield pair
    finally:
        for s in pair:
            s.stop()


def _start(server, errors):
    try:
        server.start()
    except Exception as e:  # reported by the fixture
        errors.append(e)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The shipped workflow with CFG 1, under its own name (the output folder is named after it)."""
    folder = tmp_path_factory.mktemp("workflow")
    prompt = json.loads(json.dumps(SHIPPED))
    next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]["cfg"] = 1.0
    path = folder / "masactrl_sd15.json"
    path.write_text(json.dumps(prompt))
    return path


def _sweep(workflow, out, urls, *extra, popen=False):
    args = [sys.executable, "-m", "runner", "sweep", str(workflow), "--width", str(SIZE), "--height", str(SIZE),
            "--steps", str(STEPS), "--out", str(out), *[a for u in urls for a in ("--server", u)], *extra]
    env = os.environ | {"COMFYUI_PATH": str(HOST), "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _history(server) -> int:
    return len(server.get("/history"))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_sweep(servers, study, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-out")
    before = [_history(s) for s in servers]
    started = time.monotonic()
    done = _sweep(study, out, [s.url for s in servers], *STUDY)
    return done, out / "masactrl_sd15-sweep", before, time.monotonic() - started


def test_two_servers_share_a_2x2_sweep_and_every_cell_runs_once(servers, first_sweep, measured):
    done, folder, before, seconds = first_sweep
    assert done.returncode == 0, done.stdout + done.stderr
    rows, references = _rows(folder / "cells.csv"), _rows(folder / "reference.csv")
    assert [(r["start_step"], r["start_layer"]) for r in rows] == [("0", "0"), ("0", "10"), ("2", "0"), ("2", "10")]
    assert len(references) == 1
    ran = rows + references
    assert {r["server"] for r in ran} == {s.url for s in servers}  # both servers got work
    for s, n in zip(servers, before):  # each cell was queued once, on the server the CSV names
        assert _history(s) - n == sum(r["server"] == s.url for r in ran)
    assert all(int(r["evaluations"]) == STEPS and r["seed"] == "42" for r in ran)
    measured(f"2x2 MasaCtrl sweep + 1 reference cell, 64 px, {STEPS} steps, on two CPU servers: {seconds:.1f} s")


def test_the_metrics_are_in_range_and_an_empty_window_equals_the_masactrl_off_cell(first_sweep):
    done, folder, _, _ = first_sweep
    rows = _rows(folder / "cells.csv")
    for r in rows:
        assert -1.0 <= float(r["ssim_to_source"]) <= 1.0 and 0.0 <= float(r["histdist_to_source"]) <= 1.0
        assert -1.0 <= float(r["ssim_to_masactrl_off"]) <= 1.0 and 0.0 <= float(r["histdist_to_masactrl_off"]) <= 1.0
        if r["start_step"] == str(STEPS):  # the window starts after the last step: MasaCtrl does nothing
            assert float(r["ssim_to_masactrl_off"]) == pytest.approx(1.0, abs=1e-9)
            assert float(r["histdist_to_masactrl_off"]) == pytest.approx(0.0, abs=1e-9)
        else:  # from step 0 on the target attends to the source and changes
            assert float(r["ssim_to_masactrl_off"]) < 0.9999
    # the metrics are those of the saved images
    first = rows[0]
    cell = folder / "cells" / first["cell"]
    ref = folder / "cells" / "masactrl-off"
    target, source, off = (metrics.load_rgb(cell / f"{SAVE}_01.png"), metrics.load_rgb(cell / f"{SAVE}_00.png"),
                           metrics.load_rgb(ref / f"{SAVE}_01.png"))
    assert float(first["ssim_to_source"]) == pytest.approx(metrics.ssim(target, source), abs=1e-6)
    assert float(first["ssim_to_masactrl_off"]) == pytest.approx(metrics.ssim(target, off), abs=1e-6)


def test_the_grid_has_four_labelled_tiles_showing_each_cells_target(first_sweep):
    import numpy as np
    from PIL import Image

    done, folder, _, _ = first_sweep
    layout = json.loads((folder / "grid.json").read_text())
    picture = np.asarray(Image.open(folder / "grid.png").convert("RGB"))
    assert sorted((p["row_label"], p["col_label"]) for p in layout) == [
        ("start_step=0", "start_layer=0"), ("start_step=0", "start_layer=10"),
        ("start_step=2", "start_layer=0"), ("start_step=2", "start_layer=10")]
    for place in layout:
        left, top, right, bottom = place["box"]
        target = np.asarray(Image.open(folder / "cells" / place["cell"] / f"{SAVE}_01.png").convert("RGB"))
        assert (picture[top:bottom, left:right] == target).all()  # the target, not the source
    assert (folder / "plot.png").stat().st_size > 10_000
    assert Image.open(folder / "plot.png").size[0] > 600


def test_running_the_command_again_runs_nothing_new(servers, study, first_sweep):
    done, folder, _, _ = first_sweep
    before = [_history(s) for s in servers]
    again = _sweep(study, folder.parent, [s.url for s in servers], *STUDY)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "5 already done, 0 to run" in again.stderr
    assert [_history(s) for s in servers] == before
    assert len(_rows(folder / "cells.csv")) == 4


def test_an_unknown_node_or_input_fails_before_anything_is_queued(servers, study, tmp_path):
    before = [_history(s) for s in servers]
    for vary, named in (("Nope.start_step=1", "no node 'Nope'"), ("8.start_stp=1", "no input 'start_stp'")):
        done = _sweep(study, tmp_path, [s.url for s in servers], "--vary", vary, "--vary", "start_layer=0,10")
        assert done.returncode == 2 and named in done.stderr, done.stderr
    assert [_history(s) for s in servers] == before
    assert not (tmp_path / "masactrl_sd15-sweep").exists()


def test_a_server_killed_mid_sweep_leaves_its_cells_to_the_other(servers, study, tmp_path):
    """Last in the module: it kills the second server."""
    survivor, victim = servers
    sweep = _sweep(study, tmp_path, [survivor.url, victim.url], "--vary", "start_layer=0,5,10",
                   "--vary", "start_step=0", popen=True)
    deadline = time.monotonic() + 600
    while not victim.get("/queue")["queue_running"]:  # wait until the victim is running a cell ...
        assert sweep.poll() is None and time.monotonic() < deadline, "the victim never got a cell"
        time.sleep(0.1)
    victim.process.kill()  # ... and stop it mid-cell, by its pid
    output, _ = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, output
    assert f"server {victim.url} lost" in output and "goes back to the queue" in output
    folder = tmp_path / "masactrl_sd15-sweep"
    rows, references = _rows(folder / "cells.csv"), _rows(folder / "reference.csv")
    assert sorted(r["start_layer"] for r in rows) == ["0", "10", "5"] and len(references) == 1
    cells = rows + references
    assert all((folder / "cells" / r["cell"] / "cell.json").is_file() for r in cells)
    assert all(r["server"] == survivor.url for r in cells)  # the victim finished nothing
