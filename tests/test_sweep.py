"""``python -m runner sweep``: the cells, the MasaCtrl-off reference, the pixel metrics, the grid (no server)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import REPO

from consistent_synthesis.runner import cli, grid, metrics, workflow
from consistent_synthesis.runner.__main__ import main as runner
from consistent_synthesis.runner.sweep import SweepError
from consistent_synthesis.runner.sweep.axes import parse_axes
from consistent_synthesis.runner.sweep.cells import make_cells
from consistent_synthesis.runner.sweep.graph import MASK_NODE, MASK_SAVE_NODE, main_output

SD15 = workflow.load(REPO / "workflows" / "api" / "masactrl_sd15.json")
CHARACTER = workflow.load(REPO / "workflows" / "api" / "consistent_character.json")
OUTPAINT = workflow.load(REPO / "workflows" / "api" / "repaint_outpaint.json")
STORY = workflow.load(REPO / "workflows" / "api" / "consistory_sd15.json")


# ---- metrics -----------------------------------------------------------------------------------------------

def test_ssim_of_an_image_with_itself_is_one_and_drops_with_noise():
    rng = np.random.default_rng(0)
    a = rng.random((40, 48, 3))
    noisy = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < metrics.ssim(a, noisy) < 0.95


def test_ssim_of_two_flat_images_is_the_luminance_term_of_wang_et_al():
    # no variance, no covariance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = np.full((32, 32, 3), 0.2), np.full((32, 32, 3), 0.6)
    c1 = 0.01 ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), rel=1e-9)


def test_ssim_agrees_with_scikit_image():
    import skimage.metrics as skimage_metrics  # installed with controlnet_aux (requirements.txt)

    rng = np.random.default_rng(1)
    a = rng.random((37, 45, 3))
    b = np.clip(0.7 * a + 0.3 * rng.random(a.shape), 0, 1)
    expected = skimage_metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                                     use_sample_covariance=False, channel_axis=2)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-10)


def test_histogram_distance_ignores_where_colours_are_and_is_one_without_common_colours():
    rng = np.random.default_rng(2)
    a = rng.random((16, 16, 3))
    shuffled = a.reshape(-1, 3)[rng.permutation(256)].reshape(16, 16, 3)
    assert metrics.histogram_distance(a, shuffled) == pytest.approx(0.0, abs=1e-12)
    assert metrics.histogram_distance(np.zeros((8, 8, 3)), np.ones((8, 8, 3))) == pytest.approx(1.0)
    assert 0.0 < metrics.histogram_distance(a, a ** 2) < 1.0


def test_seam_error_is_the_step_across_the_mask_border():
    image = np.full((20, 30, 3), 0.5)
    image[:, 10:] += 0.01 * np.arange(20)[:, None, None]  # some texture inside the generated region
    mask = np.zeros((20, 30))
    mask[:, 10:] = 1.0
    smooth, _ = metrics.seam_error(image, mask)
    image[:, 10:] += 0.3  # a visible seam
    seam, ratio = metrics.seam_error(image, mask)
    # vertical border at x = 10: the 20 pairs (x = 9, x = 10) differ by 0.3 + 0.01 * y
    assert seam == pytest.approx(0.3 + 0.01 * np.arange(20).mean())
    assert seam > smooth and ratio > 10
    assert np.isnan(metrics.seam_error(image, np.zeros((20, 30)))[0])  # no border, no number


# ---- --vary ------------------------------------------------------------------------------------------------

def test_vary_finds_nodes_by_id_title_class_or_bare_input_and_reads_ranges():
    axes = parse_axes(SD15, ["8.start_step=0..10", "MasaCtrl Attention Patch.start_layer=0..70:5",
                              "KSampler.cfg=1,7.5", "sampler_name=euler,ddim"])
    assert [(a.node, a.input) for a in axes] == [("8", "start_step"), ("8", "start_layer"), ("9", "cfg"),
                                                 ("9", "sampler_name")]
    assert axes[0].values == tuple(range(11))
    assert axes[1].values == tuple(range(0, 71, 5))
    assert axes[2].values == (1.0, 7.5) and all(isinstance(v, float) for v in axes[2].values)
    assert axes[3].values == ("euler", "ddim")


@pytest.mark.parametrize("spec, named", [
    ("Nope.start_step=1,2", "no node 'Nope'"),
    ("8.start_stp=1,2", "no input 'start_stp'"),
    ("8.model=1", "is a link"),
    ("8.start_step=a,b", "cannot read the values"),
    ("text=a", "3 node(s) have a widget input 'text'"),
    ("8.start_step", "NODE.INPUT=v1,v2"),
])
def test_a_bad_vary_is_refused_naming_what_is_wrong(spec, named):
    with pytest.raises(SweepError, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse_axes(SD15, [spec])


def test_an_unknown_node_fails_the_command_before_any_server_is_asked(capsys, tmp_path):
    # the URL is never contacted: nothing listens there
    code = runner(["sweep", "masactrl_sd15", "--vary", "Nope.start_step=1", "--server", "http://127.0.0.1:9",
                   "--out", str(tmp_path)])
    assert code == 2
    assert not (tmp_path / "masactrl_sd15-sweep").exists()


# ---- cells and the MasaCtrl-off reference ----------------------------------------------------------------

def test_cells_are_the_cartesian_product_with_one_masactrl_off_reference():
    axes = parse_axes(SD15, ["start_step=0,2", "start_layer=0,10"])
    cells, references = make_cells(SD15, axes, "masactrl_sd15")
    assert [c.settings for c in cells] == [{"start_step": 0, "start_layer": 0}, {"start_step": 0, "start_layer": 10},
                                           {"start_step": 2, "start_layer": 0}, {"start_step": 2, "start_layer": 10}]
    assert [(c.prompt["8"]["inputs"]["start_step"], c.prompt["8"]["inputs"]["start_layer"]) for c in cells] == [
        (0, 0), (0, 10), (2, 0), (2, 10)]
    assert len({c.key for c in cells}) == 4
    assert len(references) == 1 and {c.reference for c in cells} == {references[0].key}
    off = references[0].prompt
    assert "8" not in off  # the patch node is gone ...
    assert off["9"]["inputs"]["model"] == ["1", 0]  # ... and the sampler reads the checkpoint's model
    rest = {k: v for k, v in SD15.items() if k != "8"}
    for k in rest:  # everything else as in the workflow but the output folder
        a, b = copy.deepcopy(off[k]), copy.deepcopy(rest[k])
        a["inputs"].pop("filename_prefix", None), b["inputs"].pop("filename_prefix", None)
        if k != "9":
            assert a == b
    assert SD15["9"]["inputs"]["model"] == ["8", 0]  # the workflow itself is untouched


def test_a_dimension_outside_masactrl_gets_a_reference_per_value():
    axes = parse_axes(SD15, ["start_layer=0,10", "KSampler.seed=1,2,3"])
    cells, references = make_cells(SD15, axes, "masactrl_sd15")
    assert len(cells) == 6 and len(references) == 3
    for c in cells:
        ref = next(r for r in references if r.key == c.reference)
        assert ref.prompt["9"]["inputs"]["seed"] == c.prompt["9"]["inputs"]["seed"] == c.settings["seed"]


def _node(prompt, class_type):
    return next(i for i, n in prompt.items() if n["class_type"] == class_type)


def test_the_masactrl_reference_drops_the_patch_and_repaint_gets_its_mask_saved():
    patch, sampler = (_node(CHARACTER, c) for c in ("MasaCtrlAttentionPatch", "RePaintKSampler"))
    mask = CHARACTER[_node(CHARACTER, "SetLatentNoiseMask")]["inputs"]["mask"]
    axes = parse_axes(CHARACTER, ["start_step=0,4"])
    cells, references = make_cells(CHARACTER, axes, "consistent_character")
    off = references[0].prompt
    assert patch not in off
    assert not any(v == [patch, 0] for n in off.values() for v in n["inputs"].values())
    assert ["1", 0] in [v for n in off.values() for v in n["inputs"].values()]  # the checkpoint's model is read
    assert sampler in off
    for p in (cells[0].prompt, off):  # the mask that Set Latent Noise Mask gives the RePaint sampler is saved
        assert p[MASK_NODE] == {"class_type": "MaskToImage", "inputs": {"mask": mask},
                                "_meta": {"title": "sweep mask"}}
        assert p[MASK_SAVE_NODE]["inputs"]["images"] == [MASK_NODE, 0]
    assert main_output(CHARACTER) == _node(CHARACTER, "SaveImage")


def test_repaint_graphs_have_no_reference_and_their_mask_is_the_padding_mask():
    axes = parse_axes(OUTPAINT, ["jump_n_sample=1,2", "jump_length=2,4"])
    cells, references = make_cells(OUTPAINT, axes, "repaint_outpaint")
    assert len(cells) == 4 and references == []
    assert cells[0].prompt[MASK_NODE]["inputs"]["mask"] == ["3", 1]


def test_save_nodes_write_into_a_folder_per_cell():
    axes = parse_axes(SD15, ["start_step=0,2"])
    cells, references = make_cells(SD15, axes, "masactrl_sd15")
    prefixes = [c.prompt["11"]["inputs"]["filename_prefix"] for c in cells + references]
    assert prefixes[0] == "consistent-synthesis/masactrl_sd15-sweep/8.start_step=0/masactrl_sd15"
    assert len(set(prefixes)) == 3


def test_a_consistory_sweep_over_mask_dropout_has_one_consistory_off_reference():
    patch, sampler, save = (_node(STORY, c) for c in ("ConsiStoryAttentionPatch", "KSampler", "SaveImage"))
    axes = parse_axes(STORY, ["mask_dropout=0,0.5,1"])
    cells, references = make_cells(STORY, axes, "consistory_sd15")
    assert [c.prompt[patch]["inputs"]["mask_dropout"] for c in cells] == [0, 0.5, 1]
    assert [r.key for r in references] == ["consistory-off"] and {c.reference for c in cells} == {"consistory-off"}
    off = references[0].prompt
    assert patch not in off and off[sampler]["inputs"]["model"] == STORY[patch]["inputs"]["model"]
    assert {n["class_type"] for n in off.values()} == {n["class_type"] for n in STORY.values()} - {
        "ConsiStoryAttentionPatch"}  # the story, its batch size link and everything else stay
    assert main_output(STORY) == save


@pytest.mark.parametrize("name, later", [
    ("consistory_sdxl_injection", {"ConsiStoryFeatureInjection"}),
    ("consistory_subject_save", {"ConsiStoryFeatureInjection", "ConsiStorySaveSubject"}),
    ("consistory_subject_reuse", {"ConsiStoryFeatureInjection", "ConsiStoryLoadSubject"})])
def test_consistory_off_also_drops_the_nodes_that_need_the_patch(name, later):
    """Feature injection and saved subjects refuse a model without ConsiStory: the reference cell goes
    without them, its sampler reading the model from before the patch."""
    story = workflow.load(REPO / "workflows" / "api" / f"{name}.json")
    patch, sampler = _node(story, "ConsiStoryAttentionPatch"), _node(story, "KSampler")
    chain, node = [], story[sampler]["inputs"]["model"][0]  # the sampler's model, back to the patch
    while node != patch:
        chain.append(story[node]["class_type"])
        node = story[node]["inputs"]["model"][0]
    assert set(chain) == later
    cells, references = make_cells(story, parse_axes(story, ["mask_dropout=0,1"]), name)
    off = references[0].prompt
    assert [r.key for r in references] == ["consistory-off"]
    assert off[sampler]["inputs"]["model"] == story[patch]["inputs"]["model"]
    assert {n["class_type"] for n in off.values()} == {n["class_type"] for n in story.values()} - {
        "ConsiStoryAttentionPatch"} - later
    assert all(c.prompt[sampler]["inputs"] == story[sampler]["inputs"] for c in cells)


def test_consistory_metrics_compare_the_later_images_with_the_anchors_and_the_patch_off(tmp_path):
    """histdist_to_anchors: mean colour distance of every non-anchor image to every anchor (the reference
    cell gets it too, as the baseline); *_to_consistory_off: each image against itself without the patch."""
    from PIL import Image

    from consistent_synthesis.runner.sweep.report import measure

    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    save = _node(STORY, "SaveImage")
    records = {}
    for key, images, ref in (("5.mask_dropout=0", batch, "consistory-off"),
                             ("consistory-off", batch[:2] + [batch[0], batch[1]], None)):
        folder = tmp_path / "cells" / key
        folder.mkdir(parents=True)
        names = [f"{i}.png" for i in range(len(images))]
        for name, image in zip(names, images):
            Image.fromarray(image).save(folder / name)
        records[key] = {"cell": key, "files": {save: names}, "reference": ref}
    rows = measure(STORY, tmp_path, records)
    loaded = [metrics.load_rgb(tmp_path / "cells" / "5.mask_dropout=0" / f"{i}.png") for i in range(4)]
    expected = np.mean([metrics.histogram_distance(loaded[t], loaded[a]) for t in (2, 3) for a in (0, 1)])
    assert rows["5.mask_dropout=0"]["histdist_to_anchors"] == pytest.approx(expected, abs=1e-12)
    off = rows["consistory-off"]  # later images equal to the anchors: distance from image 2 to anchor 0 is 0
    assert off["histdist_to_anchors"] == pytest.approx(np.mean([metrics.histogram_distance(loaded[a], loaded[b])
                                                                for a, b in ((0, 0), (0, 1), (1, 0), (1, 1))]))
    on = rows["5.mask_dropout=0"]
    assert on["ssim_to_consistory_off"] == pytest.approx(np.mean([1, 1, metrics.ssim(loaded[2], loaded[0]),
                                                                  metrics.ssim(loaded[3], loaded[1])]))
    assert 0 < on["histdist_to_consistory_off"] < expected


# ---- grid ------------------------------------------------------------------------------------------------

def test_the_grid_puts_each_tile_under_its_labels(tmp_path):
    from PIL import Image

    colours = {(r, c): (40 * r + 10, 80 * c + 20, 90) for r in range(3) for c in range(2)}
    tiles = {rc: Image.new("RGB", (24, 16), colour) for rc, colour in colours.items()}
    layout = grid.draw_grid(tmp_path / "g.png", "title", "start_step", [0, 1, 2], "start_layer", [0, 10], tiles)
    picture = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert len(layout) == 6
    for place in layout:
        left, top, right, bottom = place["box"]
        assert (picture[top:bottom, left:right] == colours[(place["row"], place["col"])]).all()
        assert place["row_label"] == f"start_step={[0, 1, 2][place['row']]}"
        assert place["col_label"] == f"start_layer={[0, 10][place['col']]}"
        for box in (place["row_label_box"], place["col_label_box"]):  # ink where the label is
            l, t, r, b = box
            assert (picture[t:b, l:r] < 128).any()
        assert place["col_label_box"][3] <= top and place["row_label_box"][2] <= left


def test_a_run_without_sweep_is_still_the_plain_runner():
    args = cli._parser().parse_args(["masactrl_sd15", "--smoke"])
    assert args.workflow == "masactrl_sd15" and args.smoke
    assert "sweep" in cli._parser().format_help()
