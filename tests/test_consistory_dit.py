"""ConsiStory's shared attention on Flux and SD3 (MM-DiT) on the real ComfyUI host, tiny random-weight
models of the real topology: every shared block equals SDSA written out from the block's own q, k, v."""

import pytest
import torch

from conftest import require_host

require_host()


import tiny_dit_models as td  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.attention import joint_shared_attention as J  # noqa: E402
from consistent_synthesis.nodes import consistory  # noqa: E402
from consistent_synthesis.nodes import consistory_dit as D  # noqa: E402
from consistent_synthesis.nodes import masactrl_dit  # noqa: E402
from consistent_synthesis.samplers import step_clock  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

LATENT = (3, 16, 8, 8)  # 3 images, a 4 x 4 patch grid (16 image tokens)
GRID = (4, 4)
TEXT_TOKENS = 8
STEPS = 3
CFG = {"flux": 1.0, "sd3": 4.0}  # Flux: one chunk (guidance-distilled); SD3: cond and uncond chunks
DEFAULT_BLOCKS = {"flux": set(range(19, 57)), "sd3": set(range(12, 24))}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {"flux": td.tiny_dit("flux"), "sd3": td.tiny_dit("sd3")}


def masks():
    """A different subject region in each image (latent pixels; 2 x 2 per patch token)."""
    m = torch.zeros(3, 8, 8)
    m[0, 0:4, 0:6] = 1
    m[1, 2:8, 4:8] = 1
    m[2, 4:8, 0:4] = 1
    return m


def grid_keep(m):
    """The masks at the patch grid, as the test reads the issue: nearest resize, > 0.5."""
    return torch.nn.functional.interpolate(m[:, None], size=GRID, mode="nearest").flatten(1) > 0.5


def sample(model, kind, cfg=None, seed=0, steps=STEPS):
    return ksampler(model, torch.zeros(LATENT), td.conditioning(kind, batch=3, tokens=TEXT_TOKENS),
                    td.conditioning(kind, batch=3, seed=1, tokens=TEXT_TOKENS), steps,
                    CFG[kind] if cfg is None else cfg, scheduler="simple", seed=seed)


def patched(model, **kwargs):
    settings = dict(anchors=2, mask_dropout=0.0, seed=0, start_step=1, end_step=-1, blocks="up",
                    share_queries=False, subject_tokens="", subject_masks=masks())
    settings.update(kwargs)
    return consistory.patch_model(model, **settings)


def reference_override(image_tokens, keep, anchors, batch):
    """SDSA on joint attention written out row by row (independent of the pack's code): image
    queries over [own text; own image; kept image tokens of every anchor j != i], text queries over
    their own sequence."""
    def override(func, q, k, v, *rest, **kwargs):
        heads = rest[0] if rest else kwargs["heads"]
        if not kwargs.get("skip_reshape", False):
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        b, h, n, d = q.shape
        text, dtype = n - image_tokens, q.dtype
        q, k, v = q.double(), k.double(), v.double()
        out = torch.empty(b, n, h * d, dtype=torch.float64)
        for row in range(b):
            i, first = row % batch, row - row % batch
            keys, values = [k[row]], [v[row]]
            for j in range(anchors):
                if j != i:
                    idx = keep[j].nonzero().flatten() + text
                    keys.append(k[first + j][:, idx])
                    values.append(v[first + j][:, idx])
            kk, vv = torch.cat(keys, dim=1), torch.cat(values, dim=1)
            image = (q[row, :, text:] @ kk.transpose(1, 2) / d ** 0.5).softmax(-1) @ vv
            own = (q[row, :, :text] @ k[row].transpose(1, 2) / d ** 0.5).softmax(-1) @ v[row]
            out[row] = torch.cat([own, image], dim=1).transpose(0, 1).reshape(n, h * d)
        return out.to(dtype)
    return override


class BlockRecorder:
    """A ``patches_replace["dit"]`` entry on every block, installed before the ConsiStory patch (which
    chains it): in a shared block call, the block's output against the same block run under
    ``reference_override`` and unpatched."""

    def __init__(self, model, keep, anchors=2):
        self.keep, self.anchors = keep, anchors
        self.patched = set()
        self.errors = []
        self.image_changed = 0
        keys = masactrl_dit.block_keys(model.get_model_object("diffusion_model"))
        for layer, (name, index) in enumerate(keys):
            model.set_model_patch_replace(self._entry(layer, name == "single_block"), "dit", name, index)

    def _entry(self, layer, single):
        def entry(args, extra):
            options = args["transformer_options"]
            if D.LAYER_KEY not in options:
                return extra["original_block"](args)
            assert options[D.LAYER_KEY] == layer
            self.patched.add((step_clock.current_step(options), layer))
            text = TEXT_TOKENS if single else 0
            image_tokens = args["img"].shape[1] - text

            def run(override):
                o = dict(options)
                if override is None:
                    del o["optimized_attention_override"]
                else:
                    o["optimized_attention_override"] = override
                # blocks add to their inputs in place: give each run copies
                return extra["original_block"](dict(args, transformer_options=o, img=args["img"].clone(),
                                                    **({"txt": args["txt"].clone()} if "txt" in args else {})))
            expected = run(reference_override(image_tokens, self.keep, self.anchors, LATENT[0]))
            unpatched = run(None)
            out = extra["original_block"](args)
            for key, value in out.items():
                if value is None:
                    continue
                scale = expected[key].abs().max().item()
                self.errors.append((layer, key, (value - expected[key]).abs().max().item() / scale))
                if key == "txt" or single:  # the text stream: plain joint attention
                    t = value if key == "txt" else value[:, :text]
                    u = unpatched[key] if key == "txt" else unpatched[key][:, :text]
                    self.errors.append((layer, key + " text", (t - u).abs().max().item() / scale))
                if key == "img":
                    self.image_changed += not torch.allclose(value[:, text:], unpatched[key][:, text:], atol=1e-6)
            return out
        return entry


# -- the math, against the formula ----------------------------------------------------------------

def test_joint_sdsa_equals_the_formula_row_by_row():
    torch.manual_seed(0)
    batch, heads, n, d, text = 3, 2, 10, 8, 4
    q, k, v = (torch.randn(2 * batch, heads, n, d, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(batch, n - text) > 0.5
    for anchors in (1, 2, 3):
        out = J.joint_subject_driven_attention(q, k, v, image_start=text, subject_keep=keep, anchors=anchors)
        expected = reference_override(n - text, keep, anchors, batch)(None, q, k, v, heads, skip_reshape=True)
        assert (out - expected).abs().max() < 1e-6


def test_subject_maps_are_the_joint_softmax_columns_of_the_subject_tokens():
    torch.manual_seed(1)
    q, k = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    columns = torch.tensor([[1, 2], [0, 3], [2, 2]])
    maps = J.subject_token_maps(q, k, 4, columns)
    probs = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1).mean(1)  # (b, n, n), mean over heads
    expected = torch.stack([probs[b, 4:][:, columns[b]].T for b in range(3)])
    assert maps.shape == (3, 2, 6)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-7)


# -- on the host ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, cfg", [("flux", 1.0), ("sd3", 4.0), ("flux", 2.0)])
def test_shared_blocks_equal_sdsa_from_their_own_projections(models, kind, cfg):
    model = models[kind].clone()
    recorder = BlockRecorder(model, grid_keep(masks()))
    out = sample(patched(model), kind, cfg=cfg)
    assert recorder.patched == {(s, layer) for s in range(1, STEPS) for layer in DEFAULT_BLOCKS[kind]}
    worst = max(recorder.errors, key=lambda e: e[2])
    assert worst[2] < 1e-5, worst
    assert recorder.image_changed > 0
    plain = sample(models[kind], kind, cfg=cfg)
    assert not torch.allclose(out[1:], plain[1:], atol=1e-4)  # the images change


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("settings", [dict(subject_masks=torch.zeros(1, 8, 8)), dict(mask_dropout=1.0)])
def test_empty_masks_and_full_dropout_give_the_unpatched_model(models, kind, settings):
    plain = sample(models[kind], kind)
    out = sample(patched(models[kind], start_step=0, blocks="down+mid+up", **settings), kind)
    assert (out - plain).abs().max() <= 1e-5 * plain.abs().max()


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_blocks_choice_on_a_dit(models, kind):
    keys = masactrl_dit.block_keys(models[kind].get_model_object("diffusion_model"))
    assert set(D.shared_blocks(keys, "up")) == DEFAULT_BLOCKS[kind]
    assert set(D.shared_blocks(keys, "down+mid+up")) == set(range(len(keys)))
    mid = {"flux": set(range(9, 57)), "sd3": set(range(8, 24))}[kind]
    assert set(D.shared_blocks(keys, "mid+up")) == mid
    assert set(D.map_blocks(keys)) == {"flux": set(range(19)), "sd3": set(range(24))}[kind]


def test_the_anchors_are_untouched_by_the_other_images_with_one_anchor(models):
    """With one anchor, image 0 sees only itself: its latent is the unpatched one."""
    out = sample(patched(models["flux"], anchors=1), "flux")
    assert (out[0] - sample(models["flux"], "flux")[0]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_automatic_masks_run_and_repeat(models, kind):
    model = patched(models[kind], subject_masks=None, subject_tokens="1, 3 | 2 | 5", mask_dropout=0.5,
                    share_queries=True, start_step=1)
    first = sample(model, kind, steps=4)
    assert torch.equal(sample(model, kind, steps=4), first)  # a second queue of the same prompt repeats it
    assert not torch.allclose(first[1:], sample(models[kind], kind, steps=4)[1:], atol=1e-4)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("automatic", [False, True])
def test_no_host_sync_is_added(models, kind, automatic):
    def syncs(model):
        with HostSyncCounter() as counter:
            sample(model, kind, steps=10)  # 10 steps: one vanilla-query step
        return counter
    kwargs = dict(subject_masks=None, subject_tokens="1, 3", mask_dropout=0.5) if automatic else {}
    base, patched_count = syncs(models[kind]), syncs(patched(models[kind], start_step=0, share_queries=True,
                                                             blocks="down+mid+up", **kwargs))
    assert patched_count.total == base.total, patched_count.report()


def test_vanilla_queries_make_one_extra_call_in_the_first_tenth(models):
    import comfy.patcher_extension

    def calls(model):
        seen = []
        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.calls",
                                   lambda executor, *a, **kw: seen.append(1) or executor(*a, **kw))
        out = sample(model, "flux", steps=10)
        return len(seen), out
    plain_calls, _ = calls(patched(models["flux"], start_step=0))
    mixed_calls, mixed = calls(patched(models["flux"], start_step=0, share_queries=True))
    assert mixed_calls == plain_calls + 2  # steps 0 and 1 (10 // 10): one vanilla call each
    _, unmixed = calls(patched(models["flux"], start_step=0))
    # the vanilla call itself changes nothing (no dropout draw, no map): only the mixing can
    assert not torch.equal(mixed, unmixed)


@pytest.mark.parametrize("kwargs, name, words", [
    (dict(anchors=4), "anchors", "4 anchors for a batch of 3"),
    (dict(subject_masks=torch.ones(2, 8, 8)), "subject_masks", "2 masks for a batch of 3"),
    (dict(subject_masks=None, subject_tokens="1 | 2"), "subject_tokens", "2 token groups for a batch of 3"),
    (dict(subject_masks=None, subject_tokens="1, 30"), "subject_tokens", "30"),
])
def test_impossible_runs_are_refused_by_name(models, kwargs, name, words):
    with pytest.raises(ValueError, match=rf"ConsiStoryAttentionPatch: input '{name}': .*{words}"):
        sample(patched(models["flux"], **kwargs), "flux")


@pytest.mark.parametrize("kwargs, name", [
    (dict(anchors=0), "anchors"), (dict(mask_dropout=float("nan")), "mask_dropout"), (dict(blocks="all"), "blocks"),
    (dict(start_step=3, end_step=2), "end_step"),
])
def test_bad_settings_are_refused_by_name(models, kwargs, name):
    with pytest.raises(ValueError, match=rf"ConsiStoryAttentionPatch: input '{name}'"):
        patched(models["sd3"], **kwargs)


def test_the_clone_is_patched_and_the_original_is_not(models):
    model = models["flux"]
    clone = patched(model)
    assert set(clone.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("single_block", i) for i in range(38)}
    assert "dit" not in model.model_options.get("transformer_options", {}).get("patches_replace", {})
