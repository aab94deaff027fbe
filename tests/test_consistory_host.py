"""ConsiStoryAttentionPatch on the real host: tiny SD1.5 UNet, real sampling.

Each active layer's output is recomputed here row by row the way the official code does it (keys
picked by boolean indexing, an explicit softmax), from the layer's own projections.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import require_host

require_host()

import tiny_models as tm  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.attention import shared_attention  # noqa: E402
from consistent_synthesis.nodes import consistory as node  # noqa: E402
from consistent_synthesis.nodes.unet_layers import self_attention_layers  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

BATCH, SIDE, STEPS = 3, 16, 3


def _sample(model, cfg=5.0, steps=STEPS, batch=BATCH, side=SIDE):
    return ksampler(model, torch.zeros(batch, 4, side, side), tm.conditioning("sd15", batch=batch, seed=1),
                    tm.conditioning("sd15", batch=batch, seed=2), steps, cfg)


def _masks():
    masks = torch.zeros(BATCH, SIDE * 8, SIDE * 8)
    masks[0, 16:80, 16:96] = 1
    masks[1, 40:128, 0:64] = 1
    masks[2, 0:64, 64:128] = 1
    return masks


def _reference(q, k, v, heads, keep, anchors):
    """The official per-row SDSA: own tokens plus the kept tokens of every other anchor."""
    batch = keep.shape[0]
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        c, i = divmod(r, batch)
        keys, values = [k[r]], [v[r]]
        for j in range(min(anchors, batch)):
            if j != i:
                keys.append(k[c * batch + j][keep[j]])
                values.append(v[c * batch + j][keep[j]])
        kk, vv = torch.cat(keys), torch.cat(values)
        qh = q[r].reshape(-1, heads, d).transpose(0, 1)
        kh = kk.reshape(-1, heads, d).transpose(0, 1)
        vh = vv.reshape(-1, heads, d).transpose(0, 1)
        weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[r] = (weights @ vh).transpose(0, 1).reshape(-1, heads * d)
    return out


def _spy(patched, calls):
    """Wrap every attn1 replacement of ``patched`` to record its inputs, output and run state."""
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    for key, patch in list(replace.items()):
        def spy(q, k, v, extra_options, patch=patch, key=key):
            run = node._run(extra_options, patch.settings)
            vanilla = None if run is None or run.caching else run.queries.get(key)
            strength = None if run is None else run.strength
            out = patch(q, k, v, extra_options)
            calls.append(dict(key=key, q=q, k=k, v=v, out=out, heads=extra_options["n_heads"],
                              shape=tuple(extra_options["activations_shape"][-2:]), vanilla=vanilla,
                              strength=strength, caching=run is not None and run.caching))
            return out
        spy.settings = patch.settings
        replace[key] = spy


@pytest.mark.parametrize("cfg", [5.0, 1.0])
@pytest.mark.parametrize("share_queries", [False, True])
def test_active_layers_equal_sdsa_recomputed_from_their_projections(sd15, cfg, share_queries, measured):
    patched = node.patch_model(sd15, start_step=0, mask_dropout=0.0, subject_masks=_masks(),
                               share_queries=share_queries)
    layers = self_attention_layers(sd15.get_model_object("diffusion_model"))
    replaced = set(patched.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert replaced == {key for key in layers if key[0] == "output"}  # the decoder only, as 'up'
    calls = []
    _spy(patched, calls)
    _sample(patched, cfg=cfg, steps=10)
    real = [c for c in calls if not c["caching"]]
    mixed = [c for c in real if c["strength"] is not None]
    worst = 0.0
    for c in real:
        h, w = c["shape"]
        keep = F.interpolate(_masks()[:, None], size=(h, w), mode="nearest").flatten(1) > 0.5
        q = c["q"]
        if c["strength"] is not None:
            q = c["strength"] * c["vanilla"] + (1 - c["strength"]) * q
        expected = _reference(q, c["k"], c["v"], c["heads"], keep, anchors=2)
        worst = max(worst, ((c["out"] - expected).abs().max() / expected.abs().max()).item())
    measured(f"cfg {cfg}, share_queries {share_queries}: worst relative error {worst:.1e} over {len(real)} "
             f"layer calls, {len(mixed)} with vanilla queries")
    assert worst < 1e-5
    if share_queries:  # 10 steps: vanilla queries at steps 0..1, used where SDSA is on (step 0 and 1 here)
        assert {round(c["strength"], 6) for c in mixed} == {0.9, round(0.9 - 4 / 49, 6)}
        assert len([c for c in calls if c["caching"]]) == 2 * len(replaced)  # steps 0 and 1, cond and uncond in one call
    else:
        assert not mixed and not any(c["caching"] for c in calls)


@pytest.mark.parametrize("share_queries", [False, True])
def test_empty_masks_and_full_dropout_give_the_unpatched_model(sd15, share_queries):
    plain = _sample(sd15)
    empty = node.patch_model(sd15, subject_masks=torch.zeros(1, 64, 64), mask_dropout=0.0,
                             share_queries=share_queries)
    dropped = node.patch_model(sd15, subject_tokens="1, 2", mask_dropout=1.0, share_queries=share_queries)
    scale = plain.abs().max()
    for patched in (empty, dropped):
        assert ((_sample(patched) - plain).abs().max() / scale).item() < 1e-4


def test_automatic_masks_share_the_subject_and_the_seed_reproduces_the_images(sd15):
    plain = _sample(sd15)
    first = _sample(node.patch_model(sd15, subject_tokens="1, 2 | 2 | 3", seed=7))
    again = _sample(node.patch_model(sd15, subject_tokens="1, 2 | 2 | 3", seed=7))
    other = _sample(node.patch_model(sd15, subject_tokens="1, 2 | 2 | 3", seed=8))
    assert torch.equal(first, again)
    assert (first - plain).abs().max() > 1e-3
    assert (first - other).abs().max() > 1e-4  # the dropout draws follow the seed


def test_automatic_masks_follow_the_official_rule(sd15):
    # The masks of step t come from the maps of steps < t: the mean over layers and steps of the
    # conditional rows' head-averaged latent/4 maps of the subject tokens, bilinear to the layer
    # grid, Otsu per concept, OR-ed; recomputed here from maps recorded beside the patch.
    patched = node.patch_model(sd15, subject_tokens="1, 2 | 2 | 3", mask_dropout=0.0, share_queries=False)
    recorded, seen = [], []
    original_record = node.ConsiStoryRun.record
    original_lent = node.ConsiStoryRun.lent

    def record(self, probs):
        original_record(self, probs)
        recorded.append((self.step, probs.clone()))

    def lent(self, height, width, map_size, device):
        out = original_lent(self, height, width, map_size, device)
        seen.append((self.step, (height, width), map_size, out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(node.ConsiStoryRun, "record", record)
        mp.setattr(node.ConsiStoryRun, "lent", lent)
        _sample(patched)
    tokens = [[1, 2], [2], [3]]
    checked = 0
    for step, (h, w), (mh, mw), out in seen:
        before = [p for s, p in recorded if s < step]
        assert out is not None and before
        mean = torch.stack(before).float().mean(dim=0)  # (batch, positions, prompt tokens)
        for b, row in enumerate(tokens):
            expected = torch.zeros(h * w, dtype=torch.bool)
            for t in row:
                token_map = F.interpolate(mean[b, :, t].reshape(1, 1, mh, mw), size=(h, w), mode="bilinear",
                                          align_corners=False).flatten()
                expected |= token_map > shared_attention.otsu_threshold(token_map[None])[0]
            assert torch.equal(out[b].cpu(), expected)
            checked += 1
    assert checked


def test_sharing_adds_no_host_sync(sd15, measured):
    with HostSyncCounter() as baseline:
        _sample(sd15)
    with HostSyncCounter() as patched:
        _sample(node.patch_model(sd15, subject_tokens="1, 2 | 2 | 3"))
    measured(f"{baseline.total} host syncs unpatched, {patched.total} with ConsiStory (automatic masks, "
             "vanilla queries)")
    assert patched.total - baseline.total <= 0, patched.report()


def test_storydiffusion_mode_shares_random_tokens(sd15):
    plain = _sample(sd15)
    first = _sample(node.patch_model(sd15, token_sharing="storydiffusion", seed=3))
    assert torch.equal(first, _sample(node.patch_model(sd15, token_sharing="storydiffusion", seed=3)))
    assert (first - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, name, batch", [
    (dict(anchors=4, subject_tokens="1"), "anchors", 3),
    (dict(subject_masks=torch.ones(2, 128, 128)), "subject_masks", 3),
    (dict(subject_masks=torch.ones(1, 128, 512)), "subject_masks", 3),
    (dict(subject_tokens="1 | 2"), "subject_tokens", 3),
    (dict(subject_tokens="80"), "subject_tokens", 3),
])
def test_bad_runs_are_refused_naming_node_and_input(sd15, kwargs, name, batch):
    with pytest.raises(ValueError, match=f"ConsiStoryAttentionPatch: input '{name}'"):
        _sample(node.patch_model(sd15, **kwargs), batch=batch)


@pytest.mark.parametrize("kwargs, name", [
    (dict(mask_dropout=float("nan"), subject_tokens="1"), "mask_dropout"),
    (dict(anchors=0, subject_tokens="1"), "anchors"),
    (dict(subject_tokens=""), "subject_tokens"),
    (dict(subject_tokens="1, x"), "subject_tokens"),
    (dict(blocks="decoder", subject_tokens="1"), "blocks"),
    (dict(start_step=3, end_step=2, subject_tokens="1"), "end_step"),
])
def test_bad_settings_are_refused_when_the_node_runs(sd15, kwargs, name):
    with pytest.raises(ValueError, match=f"ConsiStoryAttentionPatch: input '{name}'"):
        node.patch_model(sd15, **kwargs)


def test_sdxl_topology_shares_in_the_decoder_and_equals_sdsa_recomputed(measured):
    sdxl = tm.tiny_model("sdxl")
    patched = node.patch_model(sdxl, start_step=0, mask_dropout=0.0, subject_masks=_masks(), share_queries=True)
    layers = self_attention_layers(sdxl.get_model_object("diffusion_model"))
    replaced = set(patched.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert replaced == {key for key in layers if key[0] == "output"} and len(layers) == 70
    calls = []
    _spy(patched, calls)
    latent = torch.zeros(BATCH, 4, SIDE, SIDE)
    out = ksampler(patched, latent, tm.conditioning("sdxl", batch=BATCH, seed=1),
                   tm.conditioning("sdxl", batch=BATCH, seed=2), 2, 5.0)
    plain = ksampler(sdxl, latent, tm.conditioning("sdxl", batch=BATCH, seed=1),
                     tm.conditioning("sdxl", batch=BATCH, seed=2), 2, 5.0)
    worst = 0.0
    for c in (c for c in calls if not c["caching"]):
        h, w = c["shape"]
        keep = F.interpolate(_masks()[:, None], size=(h, w), mode="nearest").flatten(1) > 0.5
        q = c["q"] if c["strength"] is None else c["strength"] * c["vanilla"] + (1 - c["strength"]) * c["q"]
        expected = _reference(q, c["k"], c["v"], c["heads"], keep, anchors=2)
        worst = max(worst, ((c["out"] - expected).abs().max() / expected.abs().max()).item())
    measured(f"SDXL topology: worst relative error {worst:.1e} over {len(calls)} layer calls")
    assert worst < 1e-5
    assert (out - plain).abs().max() > 1e-4  # the subject is shared: the images change
