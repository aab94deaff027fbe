"""nodes/checks.py: every node of the pack refuses wrong types, non-finite numbers and huge sizes
at the top of ``execute`` with "<Node>: input '<name>': ...", before any work. In-process, on
tiny models; tests/test_hostile_prompts.py sends the same kinds of values through the real server."""

import math
import re

import pytest
import torch

from conftest import require_host

require_host()

import comfy.samplers  # noqa: E402

import tiny_models as tm  # noqa: E402
from consistent_synthesis.nodes import NODES, checks  # noqa: E402
from consistent_synthesis.nodes.masactrl import MasaCtrlAttentionPatch  # noqa: E402
from consistent_synthesis.nodes.masactrl_batch import MasaCtrlLatentBatch  # noqa: E402
from consistent_synthesis.nodes.pose_edit_outpaint import PoseEditOutpaint  # noqa: E402
from consistent_synthesis.nodes.repaint import RePaintKSampler, repaint_ksampler  # noqa: E402


class Hostile:
    """Not a ComfyUI value of any type."""


def latent(mask_value=1.0, size=8):
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 2:] = mask_value
    return {"samples": torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)),
            "noise_mask": mask}


def repaint_inputs(sd15, **changes):
    values = dict(model=sd15, seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                  positive=tm.conditioning("sd15"), negative=tm.conditioning("sd15", seed=1), latent_image=latent(),
                  denoise=1.0, jump_length=1, jump_n_sample=2, resample_start=0.0, resample_end=1.0)
    return values | changes


def masactrl_inputs(sd15, **changes):
    return dict(model=sd15, start_step=0, start_layer=0, end_step=-1, end_layer=-1, mode="mutual",
                source_index=0, source_mask=torch.ones(1, 8, 8), target_mask=torch.ones(1, 8, 8)) | changes


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.define_schema().node_id)
def test_every_node_refuses_a_value_of_the_wrong_type_naming_itself_and_the_input(node):
    """Covers nodes added later too: each must check its inputs before doing anything."""
    schema = node.define_schema()
    values = {spec.id: Hostile() for spec in schema.inputs}
    with pytest.raises(ValueError) as caught:
        node.execute(**values)
    assert str(caught.value).startswith(f"{schema.node_id}: input '")
    assert "Hostile" in str(caught.value) or "expected" in str(caught.value)


@pytest.mark.parametrize("name, value, expected", [
    ("model", "checkpoint.safetensors", "expected a MODEL"),
    ("source_mask", [[1.0, 0.0]], "expected a MASK"),
    ("source_mask", torch.full((1, 8, 8), math.nan), "NaN"),
    ("target_mask", torch.full((1, 8, 8), math.inf), "infinite"),
    ("target_mask", torch.ones(8), "shape (batch, height, width)"),
    ("mode", "sideways", "is not one of"),
    ("start_step", 1.5, "whole number"),
    ("start_step", True, "whole number"),
    ("end_layer", 10**9, "outside -1 to 1000"),
    # typed-in number lists, one rule for all three inputs (tokens read even with auto_mask off)
    ("layers", "1,,2", "empty item"),
    ("layers", ",", "empty item"),
    ("layers", "²", "'²' is not a number written with the digits 0-9"),
    ("layers", "-1", "-1 is negative"),
    ("source_tokens", "1,,2", "empty item"),
    ("target_tokens", "hand", "'hand' is not a number"),
    pytest.param("target_tokens", "9" * 10000, "a number of 10000 digits", id="target_tokens-10000-digits"),
    pytest.param("source_tokens", "9" * 10000, "a number of 10000 digits", id="source_tokens-10000-digits"),
])
def test_masactrl_patch_refuses(sd15, name, value, expected):
    with pytest.raises(ValueError, match=rf"^MasaCtrlAttentionPatch: input '{name}': .*{re.escape(expected)}"):
        MasaCtrlAttentionPatch.execute(**masactrl_inputs(sd15, **{name: value}))


@pytest.mark.parametrize("name, value, expected", [
    ("cfg", math.nan, "nan is not a finite number"),
    ("cfg", math.inf, "inf is not a finite number"),
    ("denoise", math.nan, "nan is not a finite number"),
    ("resample_start", -math.inf, "not a finite number"),
    ("sampler_name", "bogus", "is not one of"),
    ("scheduler", "", "is not one of"),
    ("latent_image", {"samples": [[1.0]]}, "'samples' is list"),
    ("latent_image", latent(math.nan), "noise_mask holds NaN"),
    ("latent_image", latent(math.inf), "noise_mask holds infinite"),
    ("positive", "a fox", "expected a CONDITIONING"),
    ("negative", [["not a tensor", {}]], "expected a CONDITIONING"),
    ("seed", 2**64, "outside 0 to"),
])
def test_repaint_ksampler_refuses(sd15, name, value, expected):
    with pytest.raises(ValueError, match=rf"^RePaintKSampler: input '{name}': .*{re.escape(expected)}"):
        RePaintKSampler.execute(**repaint_inputs(sd15, **{name: value}))


def test_repaint_ksampler_validation_refuses_unknown_sampler_and_scheduler_names_at_queue_time():
    assert RePaintKSampler.validate_inputs(sampler_name="euler", scheduler="normal") is True
    assert RePaintKSampler.validate_inputs() is True  # linked values arrive later, in execute
    assert "input 'sampler_name'" in RePaintKSampler.validate_inputs(sampler_name="bogus", scheduler="normal")
    assert "input 'scheduler'" in RePaintKSampler.validate_inputs(sampler_name="euler", scheduler="")
    for name in comfy.samplers.KSampler.SAMPLERS:
        assert RePaintKSampler.validate_inputs(sampler_name=name, scheduler="karras") is True


def test_pose_node_validation_refuses_an_unknown_completion_and_100000_px_pads():
    assert PoseEditOutpaint.validate_inputs(0, 0, 0, 256, "auto") is True
    assert PoseEditOutpaint.validate_inputs() is True
    assert "input 'completion'" in PoseEditOutpaint.validate_inputs(0, 0, 0, 0, "guess")
    assert "input 'pad_right'" in PoseEditOutpaint.validate_inputs(0, 0, 100000, 0, "auto")


def test_the_largest_seed_with_an_ancestral_sampler_and_jumps_runs(sd15):
    """2**64 - 1 is the seed widget's maximum; each re-denoised stretch derives a seed in range."""
    out = repaint_ksampler(**repaint_inputs(sd15, seed=2**64 - 1, sampler_name="euler_ancestral", steps=3,
                                            jump_length=1, jump_n_sample=2))
    assert torch.isfinite(out["samples"]).all()
    other = repaint_ksampler(**repaint_inputs(sd15, seed=2**64 - 2, sampler_name="euler_ancestral", steps=3,
                                              jump_length=1, jump_n_sample=2))
    assert not torch.equal(out["samples"], other["samples"])


def test_a_huge_latent_batch_is_refused_before_it_is_allocated():
    source = {"samples": torch.zeros(1, 4, 1, 1).expand(1, 4, 2048, 2048)}  # a 16384 px latent, not allocated
    with pytest.raises(ValueError, match=r"^MasaCtrlLatentBatch: input 'targets': .*1,073,741,824 values"):
        MasaCtrlLatentBatch.execute(source, 63, False, True)


def test_a_huge_padded_canvas_is_refused_before_it_is_allocated():
    image = torch.zeros(1, 1, 1, 3).expand(8, 4096, 4096, 3)  # 1.5 GiB if it were real; it is a view
    with pytest.raises(ValueError, match=r"^PoseEditOutpaint: input 'image': .*padded batch of 8 4096x4352"):
        PoseEditOutpaint.execute(image, 0, 0, 0, 256, 0, "none", "")


def test_a_nan_image_is_refused():
    with pytest.raises(ValueError, match=r"^PoseEditOutpaint: input 'image': .*NaN"):
        PoseEditOutpaint.execute(torch.full((1, 16, 16, 3), math.nan), 0, 0, 0, 8, 0, "none", "")


def test_well_formed_number_lists_keep_working_with_either_separator(sd15):
    inputs = masactrl_inputs(sd15, source_mask=None, target_mask=None)
    patched = MasaCtrlAttentionPatch.execute(**inputs, layers="10; 12,14", source_tokens="1;2",
                                             target_tokens=" 3 ").result[0]
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == 3
    # blank: start_layer to end_layer, and token lists that auto_mask (off) does not need
    patched = MasaCtrlAttentionPatch.execute(**inputs, layers=" ", source_tokens="", target_tokens="").result[0]
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == 16
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'source_tokens': no token index given"):
        MasaCtrlAttentionPatch.execute(**inputs, auto_mask=True, source_tokens=" ")


def test_a_malformed_block_list_on_flux_fails_as_on_a_unet():
    import tiny_dit_models as td

    model = td.tiny_dit("flux")
    inputs = dict(model=model, start_step=1, start_layer=0, end_step=-1, end_layer=-1, mode="mutual",
                  source_index=0)
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'layers': '0,,2' .*empty item"):
        MasaCtrlAttentionPatch.execute(**inputs, layers="0,,2")
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'target_tokens': .*empty item"):
        MasaCtrlAttentionPatch.execute(**inputs, target_tokens="1,")
    out = MasaCtrlAttentionPatch.execute(**inputs, layers="0; 2").result[0]
    assert len(out.model_options["transformer_options"]["patches_replace"]["dit"]) == 2


STRING_INPUTS = [(node, spec) for node in NODES for spec in node.define_schema().inputs
                 if str(spec.io_type) == "STRING"]


@pytest.mark.parametrize("node, spec", STRING_INPUTS,
                         ids=lambda v: v.define_schema().node_id if isinstance(v, type) else v.id)
def test_every_text_input_refuses_a_lone_surrogate_naming_node_and_input(node, spec):
    """JSON can carry "\\ud800", which is no character: tokenizers fail on it with a TypeError."""
    node_id = node.define_schema().node_id
    checks.check(node_id, spec, "a hand \U0001F91A")  # a real character beyond the BMP passes
    with pytest.raises(ValueError, match=rf"^{node_id}: input '{spec.id}': .*unpaired surrogate, U\+D800, at "
                                         r"position 2"):
        checks.check(node_id, spec, "a \ud800 hand")


def test_latent_for_model_names_node_input_and_both_channel_counts(sd15):
    checks.latent_for_model("Node", "latent", {"samples": torch.randn(2, 4, 8, 8)}, sd15)
    checks.latent_for_model("Node", "latent", {"samples": torch.zeros(1, 16, 8, 8)}, sd15)  # empty: resized by the host
    with pytest.raises(ValueError, match=r"^Node: input 'source': the latent has 16 channels \(a FLUX.1 or SD3 "
                                         r"VAE's\), but this model \(SD15\) takes 4-channel latents"):
        checks.latent_for_model("Node", "source", {"samples": torch.randn(1, 16, 8, 8)}, sd15)
    with pytest.raises(ValueError, match=r"^Node: input 'latent': the latent has 12 channels, but this model"):
        checks.latent_for_model("Node", "latent", {"samples": torch.randn(1, 12, 8, 8)}, sd15)
    with pytest.raises(ValueError, match=r"^Node: input 'latent': got a 5-D video latent"):
        checks.latent_for_model("Node", "latent", {"samples": torch.randn(1, 4, 2, 8, 8)}, sd15)
    checks.latent_for_model("Node", "latent", {"samples": torch.randn(1, 4, 2, 8, 8)}, sd15, dims=(4, 5))
