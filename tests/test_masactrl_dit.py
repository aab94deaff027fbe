"""MasaCtrl on Flux and SD3 (MM-DiT) models on the real ComfyUI host, tiny random-weight models."""

import pytest
import torch

from conftest import require_host

require_host()


import tiny_dit_models as td  # noqa: E402
import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.nodes import masactrl  # noqa: E402
from consistent_synthesis.nodes import masactrl_dit as D  # noqa: E402
from consistent_synthesis.samplers import step_clock  # noqa: E402
from consistent_synthesis.attention.layer_selection import PRESETS  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

LATENT = (3, 16, 8, 8)  # source + 2 targets, 16 image tokens at patch size 2
TEXT_TOKENS = 8
STEPS = 3
CFG = {"flux": 1.0, "sd3": 4.0}  # Flux: one chunk (guidance-distilled); SD3: cond and uncond chunks


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {"flux": td.tiny_dit("flux"), "sd3": td.tiny_dit("sd3")}


def sample(model, kind, cfg=None, seed=0):
    # a different noise for every row
    return ksampler(model, torch.zeros(LATENT), td.conditioning(kind, batch=3, tokens=TEXT_TOKENS),
                    td.conditioning(kind, batch=3, seed=1, tokens=TEXT_TOKENS), STEPS,
                    CFG[kind] if cfg is None else cfg, scheduler="simple", seed=seed)


def patched(model, **kwargs):
    settings = dict(start_step=1, start_layer=0, end_step=-1, end_layer=-1, layers=None, mode="mutual",
                    source_index=0)
    settings.update(kwargs)
    return D.patch_dit_model(model, **settings)


def reference_override(text_tokens_of):
    """Joint MasaCtrl written out row by row from the formula (independent of the pack's code).

    ``text_tokens_of(n)`` is how many text tokens open a sequence of ``n`` tokens.
    """
    def override(func, q, k, v, *rest, **kwargs):
        heads = rest[0] if rest else kwargs["heads"]
        if not kwargs.get("skip_reshape", False):
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        b, h, n, d = q.shape
        options = kwargs["transformer_options"]
        mode, source = options["test.mode"], options["test.source"]
        text = text_tokens_of(n)
        per_chunk = b // len(options["cond_or_uncond"])
        out = torch.empty(b, n, h * d, dtype=torch.float64)
        for row in range(b):
            src = row - row % per_chunk + source
            if row == src:
                kr, vr = k[row], v[row]
            elif mode == "mutual":  # [own text; source image]
                kr = torch.cat([k[row, :, :text], k[src, :, text:]], dim=1)
                vr = torch.cat([v[row, :, :text], v[src, :, text:]], dim=1)
            else:  # union: [own text; own image; source image]
                kr = torch.cat([k[row], k[src, :, text:]], dim=1)
                vr = torch.cat([v[row], v[src, :, text:]], dim=1)
            logits = q[row].double() @ kr.double().transpose(1, 2) / d ** 0.5
            out[row] = (logits.softmax(-1) @ vr.double()).transpose(0, 1).reshape(n, h * d)
        return out.to(q.dtype)
    return override


class BlockRecorder:
    """A ``patches_replace["dit"]`` entry on every block, installed before the MasaCtrl patch (which
    then chains it): records which blocks run patched at which step, and in a patched block compares
    the block's output with the same block run under ``reference_override``."""

    def __init__(self, model, kind, mode="mutual", source=0):
        self.kind, self.mode, self.source = kind, mode, source
        self.patched = set()
        self.errors = []
        self.calls = 0
        keys = D.block_keys(model.get_model_object("diffusion_model"))
        for layer, (name, index) in enumerate(keys):
            model.set_model_patch_replace(self._entry(layer, name == "single_block"), "dit", name, index)

    def _entry(self, layer, single):
        def entry(args, extra):
            self.calls += 1
            options = args["transformer_options"]
            if D.LAYER_KEY not in options:
                return extra["original_block"](args)
            assert options[D.LAYER_KEY] == layer
            self.patched.add((step_clock.current_step(options), layer))
            image_tokens = args["img"].shape[1] - (TEXT_TOKENS if single else 0)
            reference = dict(options, **{"optimized_attention_override": reference_override(
                lambda n: n - image_tokens if n >= image_tokens else 0), "test.mode": self.mode,
                "test.source": self.source})
            # blocks add to their inputs in place: give the reference run copies
            expected = extra["original_block"](dict(args, transformer_options=reference, img=args["img"].clone(),
                                                    **({"txt": args["txt"].clone()} if "txt" in args else {})))
            plain = dict(options)
            del plain["optimized_attention_override"]
            unpatched = extra["original_block"](dict(args, transformer_options=plain, img=args["img"].clone(),
                                                     **({"txt": args["txt"].clone()} if "txt" in args else {})))
            out = extra["original_block"](args)
            per_chunk = LATENT[0]
            for key, value in out.items():
                if value is None:
                    continue
                error = (value - expected[key]).abs().max().item()
                scale = expected[key].abs().max().item()
                self.errors.append((layer, key, error / scale))
                sources = value[self.source::per_chunk]
                if not torch.equal(sources, unpatched[key][self.source::per_chunk]):
                    self.errors.append((layer, key + " source row changed", 1.0))
                targets = [r for r in range(value.shape[0]) if r % per_chunk != self.source]
                if torch.allclose(value[targets], unpatched[key][targets], atol=1e-6):
                    self.errors.append((layer, key + " targets unchanged", 1.0))
            return out
        return entry


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_blocks_counted_from_the_model(models, kind):
    assert D.is_dit(models[kind])
    assert D.block_count(models[kind]) == td.BLOCKS[kind]


def test_unet_is_not_a_dit():
    assert not D.is_dit(tm.tiny_model("sd15"))
    with pytest.raises(ValueError, match=r"MasaCtrlAttentionPatch: input 'model': .*Flux or SD3"):
        patched(tm.tiny_model("sd15"))


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_outside_the_window_output_is_bit_identical(models, kind):
    plain = sample(models[kind], kind)
    assert torch.equal(sample(patched(models[kind], start_step=STEPS), kind), plain)
    early = patched(models[kind], start_step=0, end_step=1, layers=[0])
    first = sample(early, kind)
    assert not torch.equal(first, plain)
    assert torch.equal(sample(early, kind), first)  # a second queue of the same prompt repeats it


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["mutual", "union"])
def test_patched_blocks_equal_the_joint_formula_and_the_source_never_changes(models, kind, mode):
    layers = [0, 1, 18, 19, 40, 56] if kind == "flux" else [0, 7, 12, 13, 23]
    model = models[kind].clone()
    recorder = BlockRecorder(model, kind, mode)
    out = sample(patched(model, layers=layers, mode=mode, start_step=1), kind)
    assert recorder.patched == {(s, layer) for s in range(1, STEPS) for layer in layers}
    worst = max(recorder.errors, key=lambda e: e[2])
    assert worst[2] < 1e-5, worst
    assert torch.equal(out[0], sample(models[kind], kind)[0])  # the source image is the unpatched one


def test_source_in_the_middle_and_layer_range(models):
    model = models["flux"].clone()
    recorder = BlockRecorder(model, "flux", "mutual", source=1)
    sample(patched(model, start_layer=17, end_layer=21, source_index=1, start_step=2), "flux", cfg=2.0)
    assert recorder.patched == {(2, layer) for layer in (17, 18, 19, 20)}
    worst = max(recorder.errors, key=lambda e: e[2])
    assert worst[2] < 1e-5, worst


def test_flux_attention_sees_keys_after_rope(models):
    """The keys MasaCtrl swaps are the model's post-RoPE keys, computed here from the block's own
    projections and the rotation of its positional embedding."""
    model = models["flux"].clone()
    seen = {}

    def entry(args, extra):
        block = model.get_model_object("diffusion_model").double_blocks[3]
        img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]

        def qk(stream, x, mod):
            x = (1 + mod.scale) * getattr(block, stream[:3] + "_norm1")(x) + mod.shift
            q, k, v = getattr(block, stream).qkv(x).unflatten(-1, (3, block.num_heads, -1)).permute(2, 0, 3, 1, 4)
            return getattr(block, stream).norm(q, k, v)
        (img_mod, _), (txt_mod, _) = block.img_mod(vec), block.txt_mod(vec)
        qi, ki = qk("img_attn", img, img_mod)
        qt, kt = qk("txt_attn", txt, txt_mod)
        k = torch.cat([kt, ki], dim=2)
        pairs = k.unflatten(-1, (-1, 2))  # rotate each (even, odd) pair by the position's angle
        rotation = pe  # (b, 1, n, d/2, 2, 2): one 2x2 rotation per position and pair
        seen.setdefault("expected", torch.einsum("bhnpij,bhnpj->bhnpi", rotation.expand(-1, k.shape[1], -1, -1, -1, -1),
                                        pairs.float()).flatten(-2))

        def record(func, q, k, v, *rest, **kwargs):
            seen.setdefault("keys", k)
            return func(q, k, v, *rest, **kwargs)
        options = dict(args["transformer_options"], optimized_attention_override=record)
        return extra["original_block"](dict(args, transformer_options=options))

    model.set_model_patch_replace(entry, "dit", "double_block", 3)
    sample(model, "flux")
    torch.testing.assert_close(seen["keys"], seen["expected"].to(seen["keys"].dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_an_existing_attention_override_is_chained(models, kind):
    model = models[kind].clone()
    calls = []

    def counting(func, *args, **kwargs):
        calls.append(args[0].shape[0])
        return func(*args, **kwargs)
    model.model_options["transformer_options"]["optimized_attention_override"] = counting
    sample(model, kind)
    plain_calls = len(calls)
    calls.clear()
    out = sample(patched(model, mode="union", start_step=0), kind)
    assert len(calls) > plain_calls  # union makes a second call per patched attention; both reach it
    assert not torch.equal(out, sample(model, kind))


def test_the_clone_is_patched_and_the_original_is_not(models):
    model = models["flux"]
    before = dict(model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}))
    clone = patched(model, layers=[2, 30])
    assert set(clone.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("double_block", 2), ("single_block", 11)}
    assert model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}) == before


@pytest.mark.parametrize("kwargs, name, words", [
    (dict(layers=[0, 57]), "layers", r"\[57\] are past this model.s 57 blocks"),
    (dict(layers=[]), "layers", "empty"),
    (dict(start_layer=60), "start_layer", "past this model's 57 blocks"),
    (dict(start_layer=5, end_layer=5), "end_layer", "leaves no block"),
    (dict(start_step=3, end_step=2), "end_step", "leaves no step"),
    (dict(mode="swap"), "mode", "not one of"),
])
def test_bad_inputs_are_refused_by_name(models, kwargs, name, words):
    with pytest.raises(ValueError, match=rf"MasaCtrlAttentionPatch: input '{name}': .*{words}"):
        patched(models["flux"], **kwargs)


def test_a_host_without_the_hooks_is_told_the_version(models, monkeypatch):
    monkeypatch.setattr(D, "host_has_hooks", lambda: False)
    with pytest.raises(ValueError, match=r"input 'model': .*ComfyUI 0\.3\.64 or newer"):
        patched(models["flux"])


def test_a_batch_without_target_is_refused(models):
    latent = torch.zeros((1,) + LATENT[1:])
    with pytest.raises(ValueError, match=r"input 'model': the latent batch holds one image"):
        ksampler(patched(models["flux"]), latent, td.conditioning("flux"), td.conditioning("flux"), STEPS, 1.0,
                 scheduler="simple")


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_no_host_sync_is_added(models, kind):
    def syncs(model):
        with HostSyncCounter() as counter:
            sample(model, kind)
        return counter.total
    assert syncs(patched(models[kind], start_step=0, mode="union")) == syncs(models[kind])


def test_flux1_is_recognised_for_the_published_block_sets(models):
    assert D.is_flux1(models["flux"]) and not D.is_flux1(models["sd3"])
    assert max(max(blocks) for blocks in PRESETS.values()) < D.block_count(models["flux"])


@pytest.mark.parametrize("kind, kwargs, blocks", [
    ("flux", {}, set(PRESETS["freeflux"])),  # saved prompts' defaults on FLUX.1: FreeFlux's blocks, as before
    ("flux", dict(preset="freeflux"), set(PRESETS["freeflux"])),  # asked for by name
    ("flux", dict(preset="stable_flow"), set(PRESETS["stable_flow"])),
    ("flux", dict(start_layer=50), set(range(50, 57))),  # a start_layer of the user's: that range
    ("flux", dict(end_layer=12), set(range(10, 12))),
    ("flux", dict(layers=[3, 40]), {3, 40}),
    ("sd3", {}, set(range(10, 24))),  # no published SD3 set: start_layer 10 to the last block
])
def test_the_nodes_default_blocks_are_freeflux_on_flux1_and_the_range_elsewhere(models, kind, kwargs, blocks):
    model = models[kind].clone()
    recorder = BlockRecorder(model, kind, "mutual")
    sample(masactrl.patch_model(model, start_step=STEPS - 1, **kwargs), kind)
    assert recorder.patched == {(STEPS - 1, layer) for layer in blocks}
