"""Recording cross-attention maps (nodes/cross_attention_maps.py) on the real host, tiny random UNets."""

import copy

import pytest
import torch

from conftest import require_host

require_host()

import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes import cross_attention_maps as maps_node  # noqa: E402


def sample(model, kind, side, steps=1, batch=1, cfg=5.0):
    return ksampler(model, torch.zeros((batch, 4, side, side)), tm.conditioning(kind, batch),
                    tm.conditioning(kind, batch, seed=1), steps, cfg)


def recording(model, on_maps):
    patched = model.clone()
    for key in maps_node.cross_attention_layers(patched.get_model_object("diffusion_model")):
        patched.set_model_attn2_replace(maps_node.recording_attn2(on_maps), *key)
    return patched


def recorded_layers(model, kind, side):
    seen = []

    def on_maps(maps, extra_options):
        seen.append(((extra_options["block"][0], extra_options["block"][1], extra_options["block_index"]),
                     tuple(maps.shape)))
    sample(recording(model, on_maps), kind, side, cfg=1.0)  # cfg 1: the conditional row only
    return seen


@pytest.mark.parametrize("shape, expected", [((1, 4, 64, 64), (16, 16)), ((2, 4, 128, 128), (32, 32)),
                                             ((1, 4, 63, 90), (16, 23)), ((1, 4, 1, 5), (1, 2))])
def test_map_resolution_is_the_latent_over_four_rounded_up(shape, expected):
    assert maps_node.map_resolution({"original_shape": list(shape)}) == expected


def test_sd15_at_512_px_records_the_five_16x16_layers():
    seen = recorded_layers(tm.tiny_model("sd15"), "sd15", 64)
    keys = sorted({key for key, _ in seen})
    assert keys == [("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)]
    # one call of the conditional row: 256 positions, the 77 prompt tokens
    assert {shape for _, shape in seen} == {(1, 256, 77)}
    assert len(seen) == 5


def test_sdxl_at_1024_px_records_the_sixty_32x32_layers():
    seen = recorded_layers(tm.tiny_model("sdxl"), "sdxl", 128)
    keys = {key for key, _ in seen}
    expected = ({("input", b, i) for b in (7, 8) for i in range(10)} | {("middle", 0, i) for i in range(10)}
                | {("output", b, i) for b in (0, 1, 2) for i in range(10)})
    assert keys == expected
    assert {shape for _, shape in seen} == {(1, 1024, 77)}


def test_odd_latent_sizes_record_at_the_rounded_up_resolution():
    seen = recorded_layers(tm.tiny_model("sd15"), "sd15", 30)  # 30 -> 15 -> 8
    assert len(seen) == 5 and {shape for _, shape in seen} == {(1, 64, 77)}


def test_recording_leaves_the_output_bit_identical():
    model = tm.tiny_model("sd15")
    calls = []
    plain = sample(model, "sd15", 16, steps=2)
    recorded = sample(recording(model, lambda maps, extra: calls.append(maps.sum())), "sd15", 16, steps=2)
    assert calls, "nothing was recorded"
    assert torch.equal(plain, recorded)


def test_recorded_maps_are_distributions_over_the_prompt():
    collected = []
    sample(recording(tm.tiny_model("sd15"), lambda maps, extra: collected.append(maps)), "sd15", 16)
    assert len(collected) == 5
    for maps in collected:
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:2]), rtol=0, atol=1e-5)


def test_recording_chains_an_earlier_attn2_replacement():
    model = tm.tiny_model("sd15")
    earlier = model.clone()
    called = []

    def scaled(q, k, v, extra_options):
        called.append(1)
        import comfy.ldm.modules.attention as attention
        return 0.5 * attention.optimized_attention(q, k, v, extra_options["n_heads"])

    layers = maps_node.cross_attention_layers(earlier.get_model_object("diffusion_model"))
    for key in layers:
        earlier.set_model_attn2_replace(scaled, *key)
    expected = sample(earlier, "sd15", 16)
    chained = earlier.clone()
    existing = chained.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key in layers:
        chained.set_model_attn2_replace(maps_node.recording_attn2(lambda m, e: None, existing[key]), *key)
    called.clear()
    assert torch.equal(sample(chained, "sd15", 16), expected)
    assert len(called) == len(layers)  # one step: cond and uncond rows in one call per layer


def test_the_original_model_is_untouched():
    model = tm.tiny_model("sd15")
    before = copy.deepcopy(model.model_options)
    recording(model, lambda maps, extra: None)
    assert model.model_options == before
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


class MapCollector:
    """Keeps the maps it is handed; its bound ``add`` is the recorder's callback, as a node's state would be."""

    def __init__(self):
        self.maps = []

    def add(self, maps, extra_options):
        self.maps.append(maps)


def test_maps_recorded_by_a_clone_of_the_model_reach_the_callers_collector():
    """``ModelPatcher.clone`` deep-copies ``model_options``: the maps must still reach the collector the
    caller holds, not a copy of it made with the patch."""
    collector = MapCollector()
    patched = recording(tm.tiny_model("sd15"), collector.add)
    sample(patched.clone().clone(), "sd15", 16)
    assert len(collector.maps) == 5
