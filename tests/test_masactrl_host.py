"""MasaCtrlAttentionPatch on the real ComfyUI host, with random-weight SD1.5 / SDXL UNets."""

import re

import pytest
import torch

from conftest import require_host

require_host()


import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.attention import masactrl as M  # noqa: E402
from consistent_synthesis.nodes import masactrl as node  # noqa: E402
from consistent_synthesis.nodes import host_compat  # noqa: E402
from consistent_synthesis.nodes.masactrl import MasaCtrlAttentionPatch  # noqa: E402

LATENT = (3, 4, 16, 16)  # source + 2 targets, 128 px


def sample(model, kind="sd15", steps=4, cfg=5.0, sampler="euler", denoise=1.0, batch=3, seed=0):
    # a different noise for every row
    return ksampler(model, torch.zeros((batch,) + LATENT[1:]), tm.conditioning(kind), tm.conditioning(kind, seed=1),
                    steps, cfg, sampler, seed=seed, denoise=denoise)


def patched(model, **kwargs):
    settings = dict(start_step=4, start_layer=10, end_step=-1, end_layer=-1, mode="mutual", source_index=0)
    settings.update(kwargs)
    return MasaCtrlAttentionPatch.execute(model, **settings).result[0]


_NAME = re.compile(r"^(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.\d+\.transformer_blocks\.(\d+)\.attn1$")


def attn1_modules(model):
    """Self-attention modules keyed by (block, id, index), parsed from module names (not from the pack)."""
    found = {}
    for name, module in model.model.diffusion_model.named_modules():
        m = _NAME.search(name)
        if m:
            block = m.group(1).split("_")[0]
            block_id = int(m.group(2) or m.group(3) or 0)
            found[(block, block_id, int(m.group(4)))] = module
    assert len(found) in (16, 70)
    return found


def recorded(model, **sample_kwargs) -> "AttentionRecorder":
    """The attention calls of one sampling run of ``model`` (hooks removed afterwards)."""
    recorder = AttentionRecorder(model)
    try:
        sample(model, **sample_kwargs)
    finally:
        recorder.close()
    return recorder


class AttentionRecorder:
    """Records each self-attention layer's input and output on every UNet call."""

    def __init__(self, model):
        self.calls = {}
        self.handles = []
        for key, attn in attn1_modules(model).items():
            self.calls[key] = []
            self.handles.append(attn.to_q.register_forward_pre_hook(self._input(key)))
            self.handles.append(attn.to_out[0].register_forward_pre_hook(self._output(key)))
            self.calls[key + ("module",)] = attn

    def _input(self, key):
        def hook(module, args):
            self.calls[key].append({"x": args[0].detach().clone()})
        return hook

    def _output(self, key):
        def hook(module, args):
            self.calls[key][-1]["out"] = args[0].detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def projections(self, key, call: int = 0):
        """(recorded call, attention module, q, k, v) of one layer's call."""
        record, attn = self.calls[key][call], self.calls[key + ("module",)]
        x = record["x"]
        return record, attn, attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def classify(self, chunks, source=0):
        """Per layer and call: 'plain' self-attention, 'mutual' for the targets, or 'other'."""
        result = {}
        for key, calls in self.calls.items():
            if len(key) == 4:
                continue
            attn = self.calls[key + ("module",)]
            kinds = []
            for call in calls:
                x, out = call["x"], call["out"]
                q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
                plain = M.sdpa_attention(q, k, v, attn.heads)
                per_chunk = x.shape[0] // chunks
                src = [c * per_chunk + source for c in range(chunks)]
                mutual = plain.clone()
                for c, s in enumerate(src):
                    for t in range(c * per_chunk, (c + 1) * per_chunk):
                        mutual[t] = M.sdpa_attention(q[t:t + 1], k[s:s + 1], v[s:s + 1], attn.heads)[0]
                if torch.allclose(out, plain, rtol=1e-4, atol=1e-5):
                    kinds.append("plain")
                elif torch.allclose(out, mutual, rtol=1e-4, atol=1e-5):
                    kinds.append("mutual")
                else:
                    kinds.append("other")
            result[key] = kinds
        return result


@pytest.fixture(scope="module")
def sdxl():
    return tm.tiny_model("sdxl")


@pytest.fixture(scope="module")
def sd15_plain(sd15):
    return sample(sd15)


def test_layer_numbering_follows_execution_order_for_sd15_and_sdxl(sd15, sdxl):
    from consistent_synthesis.nodes.unet_layers import self_attention_layers
    sd_layers = self_attention_layers(sd15.model.diffusion_model)
    assert sd_layers == [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + \
        [("output", i, 0) for i in range(3, 12)]
    xl_layers = self_attention_layers(sdxl.model.diffusion_model)
    assert len(xl_layers) == 70
    assert xl_layers[:4] == [("input", 4, 0), ("input", 4, 1), ("input", 5, 0), ("input", 5, 1)]
    assert xl_layers[24] == ("middle", 0, 0) and xl_layers[34] == ("output", 0, 0)
    assert xl_layers[44] == ("output", 1, 0) and xl_layers[64] == ("output", 3, 0)


def test_start_step_past_the_run_is_bit_identical_to_the_unpatched_model(sd15, sd15_plain):
    assert torch.equal(sample(patched(sd15, start_step=4, start_layer=0)), sd15_plain)


def test_start_layer_at_the_layer_count_is_bit_identical_to_the_unpatched_model(sd15, sd15_plain):
    assert torch.equal(sample(patched(sd15, start_step=0, start_layer=16)), sd15_plain)


def test_source_row_never_changes_and_targets_do(sd15, sd15_plain):
    out = sample(patched(sd15, start_step=0, start_layer=10))
    assert torch.equal(out[0], sd15_plain[0])
    assert not torch.allclose(out[1:], sd15_plain[1:], atol=1e-3)


def test_sd15_defaults_patch_exactly_output_blocks_6_to_11_from_step_4(sd15):
    model = patched(sd15, start_step=2, start_layer=10)
    recorder = recorded(model, steps=4, cfg=5.0)
    kinds = recorder.classify(chunks=2)
    mutual_layers = {("output", i, 0) for i in range(6, 12)}
    for key, per_call in kinds.items():
        expected = ["plain", "plain", "mutual", "mutual"] if key in mutual_layers else ["plain"] * 4
        assert per_call == expected, key


def test_sdxl_layer_44_on_patches_output_blocks_1_to_5(sdxl):
    model = patched(sdxl, start_step=0, start_layer=44)
    recorder = recorded(model, kind="sdxl", steps=1, cfg=1.0, batch=2)
    kinds = recorder.classify(chunks=1)
    changed = {key for key, per_call in kinds.items() if per_call == ["mutual"]}
    untouched = {key for key, per_call in kinds.items() if per_call == ["plain"]}
    assert changed == {("output", b, i) for b in (1, 2) for i in range(10)} | \
        {("output", b, i) for b in (3, 4, 5) for i in range(2)}
    assert len(untouched) == 44


def test_union_mode_targets_attend_over_source_and_own_keys(sd15):
    model = patched(sd15, start_step=0, start_layer=15, mode="union")
    recorder = recorded(model, steps=1, cfg=1.0, batch=2)
    call, attn, q, k, v = recorder.projections(("output", 11, 0))
    union = M.sdpa_attention(q[1:], torch.cat([k[:1], k[1:]], 1), torch.cat([v[:1], v[1:]], 1), attn.heads)
    torch.testing.assert_close(call["out"][1:], union, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(call["out"][:1], M.sdpa_attention(q[:1], k[:1], v[:1], attn.heads), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_cfg_with_and_without_uncond_batch_keeps_source_and_changes_targets(sd15, cfg):
    plain = sample(sd15, cfg=cfg, batch=4)
    out = sample(patched(sd15, start_step=1, start_layer=8), cfg=cfg, batch=4)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], plain[0])
    for t in (1, 2, 3):
        assert not torch.allclose(out[t], plain[t], atol=1e-3)


def test_source_index_other_than_zero(sd15):
    plain = sample(sd15, cfg=1.0)
    out = sample(patched(sd15, start_step=0, start_layer=10, source_index=2), cfg=1.0)
    assert torch.equal(out[2], plain[2])
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


def test_heun_steps_are_counted_by_sigma_not_by_calls(sd15):
    model = patched(sd15, start_step=2, start_layer=15)
    recorder = recorded(model, steps=4, cfg=1.0, sampler="heun", batch=2)
    # heun evaluates s0,s1 | s1,s2 | s2,s3 | s3 (last step to 0 is an euler step);
    # step i covers (s[i+1], s[i]], so evaluations at s2 and s3 belong to steps 2 and 3.
    assert recorder.classify(chunks=1)[("output", 11, 0)] == ["plain", "plain", "plain", "mutual",
                                                                "mutual", "mutual", "mutual"]


def test_denoise_below_one_counts_steps_of_the_truncated_run(sd15):
    model = patched(sd15, start_step=1, start_layer=15)
    recorder = recorded(model, steps=3, cfg=1.0, denoise=0.5, batch=2)
    assert recorder.classify(chunks=1)[("output", 11, 0)] == ["plain", "mutual", "mutual"]


def test_end_step_and_end_layer_bound_the_window(sd15):
    model = patched(sd15, start_step=1, end_step=2, start_layer=9, end_layer=11)
    recorder = recorded(model, steps=3, cfg=1.0, batch=2)
    kinds = recorder.classify(chunks=1)
    for key, per_call in kinds.items():
        expected = ["plain", "mutual", "plain"] if key in {("output", 5, 0), ("output", 6, 0)} else ["plain"] * 3
        assert per_call == expected, key


def test_all_ones_masks_equal_plain_mutual_on_the_host(sd15):
    mutual = sample(patched(sd15, start_step=0, start_layer=10), cfg=1.0)
    ones = torch.ones(1, 128, 128)
    masked = sample(patched(sd15, start_step=0, start_layer=10, source_mask=ones, target_mask=ones), cfg=1.0)
    assert torch.equal(mutual, masked)


def test_mask_guided_layer_matches_subset_attention(sd15):
    source_mask = torch.zeros(1, 128, 128)
    source_mask[:, 32:96, 32:96] = 1
    target_mask = torch.zeros(1, 128, 128)
    target_mask[:, :64] = 1
    model = patched(sd15, start_step=0, start_layer=15, source_mask=source_mask, target_mask=target_mask)
    recorder = recorded(model, steps=1, cfg=1.0, batch=2)
    call, attn, q, k, v = recorder.projections(("output", 11, 0))
    fg = M.resize_mask(source_mask, 16, 16)[0] > 0.5
    m_t = M.resize_mask(target_mask, 16, 16)[0][:, None]
    out_fg = M.sdpa_attention(q[1:], k[:1, fg], v[:1, fg], attn.heads)
    out_bg = M.sdpa_attention(q[1:], k[:1, ~fg], v[:1, ~fg], attn.heads)
    torch.testing.assert_close(call["out"][1], (out_fg * m_t + out_bg * (1 - m_t))[0], rtol=1e-4, atol=1e-5)


def test_requeue_gives_the_same_output(sd15):
    model = patched(sd15, start_step=1, start_layer=10)
    assert torch.equal(sample(model), sample(model))


def test_original_model_is_unaffected(sd15, sd15_plain):
    before = dict(sd15.model_options["transformer_options"])
    sample(patched(sd15, start_step=0, start_layer=0))
    assert sd15.model_options["transformer_options"] == before
    assert "patches_replace" not in sd15.model_options["transformer_options"]
    assert torch.equal(sample(sd15), sd15_plain)


def test_other_attn1_patches_keep_working(sd15):
    """Another pack's attn1 replacement runs where MasaCtrl is off; attn1 input patches always run."""
    seen = {"replace": 0, "patch": 0}

    def other_replace(q, k, v, extra_options):
        seen["replace"] += 1
        return host_compat.optimized_attention(extra_options)(q, k, v, extra_options["n_heads"])

    def other_patch(n, context, value, extra_options):
        seen["patch"] += 1
        return n, context, value

    base = sd15.clone()
    base.set_model_attn1_replace(other_replace, "output", 11, 0)
    base.set_model_attn1_patch(other_patch)
    sample(patched(base, start_step=2, start_layer=15), steps=3, cfg=1.0)
    assert seen == {"replace": 2, "patch": 16 * 3}


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,names", [
    ({"start_layer": 17}, ["start_layer", "16"]),
    ({"start_layer": 4, "end_layer": 17}, ["end_layer", "16"]),
    ({"start_layer": 12, "end_layer": 11}, ["end_layer"]),
    ({"start_step": 5, "end_step": 5}, ["end_step"]),
    ({"source_mask": torch.ones(1, 64, 64)}, ["target_mask", "both"]),
    ({"source_mask": torch.ones(2, 64, 64), "target_mask": torch.ones(1, 64, 64)}, ["source_mask"]),
    ({"source_mask": torch.ones(1, 1, 64, 64), "target_mask": torch.ones(1, 64, 64)}, ["source_mask", "shape"]),
    ({"mode": "union", "source_mask": torch.ones(64, 64), "target_mask": torch.ones(64, 64)}, ["mode", "mutual"]),
])
def test_bad_settings_fail_naming_the_input(sd15, kwargs, names):
    with pytest.raises(ValueError) as err:
        patched(sd15, **kwargs)
    assert "MasaCtrlAttentionPatch" in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_sdxl_accepts_its_70_layers_and_rejects_more(sdxl):
    patched(sdxl, start_layer=64)
    with pytest.raises(ValueError, match="start_layer.*70"):
        patched(sdxl, start_layer=71)


def test_batch_without_a_target_fails_before_sampling(sd15):
    with pytest.raises(ValueError, match="no target"):
        sample(patched(sd15), batch=1)


def test_source_index_outside_the_batch_fails(sd15):
    with pytest.raises(ValueError, match="source_index"):
        sample(patched(sd15, source_index=3))


def test_mask_with_another_aspect_fails(sd15):
    model = patched(sd15, source_mask=torch.ones(1, 64, 128), target_mask=torch.ones(1, 128, 128))
    with pytest.raises(ValueError, match="source_mask.*aspect"):
        sample(model)


def test_target_masks_must_match_the_target_count(sd15):
    model = patched(sd15, source_mask=torch.ones(1, 128, 128), target_mask=torch.ones(3, 128, 128))
    with pytest.raises(ValueError, match="target_mask.*3 masks for 2 targets"):
        sample(model)


def test_non_unet_model_is_rejected():
    class NotAUnet:
        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="model.*SDXL"):
        node.patch_model(NotAUnet())


def test_the_hosts_per_layer_attention_choice_reaches_patched_layers(monkeypatch):
    # Newer hosts give every attention module a backend choice (``comfy_attention``) and pass it as
    # ``preferred_attention``; inside MasaCtrl layers and outside the window alike it must arrive.
    import comfy.ldm.modules.attention as host_attention

    model = tm.tiny_model("sd15", seed=3)
    choice = object()
    for attn in attn1_modules(model).values():
        attn.comfy_attention = choice
    seen = []
    original = host_attention.optimized_attention

    def spy(q, k, v, heads, **kwargs):
        if k.shape[1] != 77:  # self-attention (cross-attention keys are the 77 prompt tokens)
            seen.append(kwargs.get("preferred_attention"))
        kwargs.pop("preferred_attention", None)  # v0.3.64's backends do not take it
        return original(q, k, v, heads, **kwargs)

    monkeypatch.setattr(host_attention, "optimized_attention", spy)
    sample(patched(model, start_step=2, start_layer=0), steps=3)
    # 16 layers: steps 0-1 outside the window (one call each), step 2 inside (source call + targets' call)
    assert len(seen) == 16 * 2 + 16 * 2
    assert all(p is choice for p in seen)


def test_the_node_patches_flux_and_sd3_through_their_blocks():
    import tiny_dit_models as td

    from consistent_synthesis.nodes import masactrl_dit

    for kind in ("flux", "sd3"):
        model = td.tiny_dit(kind)
        out = MasaCtrlAttentionPatch.execute(model, start_step=1, start_layer=0, end_step=-1, end_layer=-1,
                                             mode="mutual", source_index=0, layers="0, 2").result[0]
        replaced = out.model_options["transformer_options"]["patches_replace"]["dit"]
        keys = masactrl_dit.block_keys(model.get_model_object("diffusion_model"))
        assert set(replaced) == {keys[0], keys[2]}, kind
        with pytest.raises(ValueError, match="auto_mask"):
            MasaCtrlAttentionPatch.execute(model, start_step=1, start_layer=0, end_step=-1, end_layer=-1,
                                           mode="mutual", source_index=0, auto_mask=True)
