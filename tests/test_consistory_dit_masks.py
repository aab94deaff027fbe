"""ConsiStory's automatic subject masks on Flux and SD3 (tiny random models, real sampling) equal the rule
of ``nodes/consistory_dit.py`` written out here from each double-stream block's own q and k.

The rule, the DiT analogue of the official ``AttentionStore`` (``utils/ptp_utils.py``: every 32 x 32
cross-attention layer appends its conditional rows' head-mean map at every step;
``aggregate_last_steps_attention`` runs after step ``i`` over the last 20 entries of each layer and its
masks serve step ``i + 1``): the mask that step ``t`` shares is the mean, with equal weight, of the
head-mean image-to-subject-token probabilities of every double-stream block's plain joint attention
(conditional rows, own keys only) at each of the last 20 steps before ``t``; Otsu per subject word;
OR over the image's words; at the patch grid. Step 0 has no maps and shares nothing.
"""

import math

import pytest
import torch

from conftest import require_host

require_host()

import tiny_dit_models as td  # noqa: E402
from sampling import ksampler  # noqa: E402
from consistent_synthesis.attention import joint_shared_attention as J  # noqa: E402
from consistent_synthesis.nodes import consistory  # noqa: E402

LATENT = (3, 16, 16, 12)  # 3 images, an 8 x 6 patch grid (48 image tokens): not square
TEXT_TOKENS = 8
WORDS = [[1, 3], [2, 6], [5]]  # each image's subject words (token indices), as subject_tokens below
STEPS = 25  # past the 20-step window: steps 21-24 drop the first maps
WINDOW = 20
CFG = {"flux": 1.0, "sd3": 4.0}  # Flux: the cond chunk alone; SD3: cond and uncond chunks
OVERRIDE = "optimized_attention_override"  # the host's attention override key in transformer_options

pytestmark = pytest.mark.usefixtures("one_thread")


def otsu(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold (Otsu 1979, as skimage's ``threshold_otsu``) of a 1-D map, from the definition:
    ``bins`` equal bins over [min, max]; for each split after bin ``t`` the between-class variance
    ``w0 w1 (mu0 - mu1)^2`` of the bin centres; the threshold is the centre of bin ``t`` of the first
    maximum. A constant map returns its value (nothing lies above it)."""
    values = values.double()
    lo, hi = values.min(), values.max()
    if lo == hi:
        return lo
    width = (hi - lo) / bins
    counts = torch.bincount(((values - lo) / width).floor().long().clamp(max=bins - 1), minlength=bins).double()
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    w0 = counts.cumsum(0)[:-1]
    w1 = counts.sum() - w0
    m0 = (counts * centres).cumsum(0)[:-1]
    mu0, mu1 = m0 / w0, ((counts * centres).sum() - m0) / w1
    variance = w0 * w1 * (mu0 - mu1) ** 2
    return centres[int(variance.argmax())]


def test_the_otsu_written_here_splits_as_skimage():
    filters = pytest.importorskip("skimage.filters")
    gen = torch.Generator().manual_seed(0)
    for n in (48, 300, 1024):
        for _ in range(20):
            values = torch.rand(n, generator=gen, dtype=torch.float64) ** 3 + torch.rand(1, generator=gen).item()
            reference = filters.threshold_otsu(values.numpy())
            assert torch.equal(values > otsu(values), values > torch.tensor(reference))


class Recorder:
    """``patches_replace["dit"]`` entries on every block, installed before the ConsiStory patch (which
    chains them): they note each block call's step (from its sigma) and block, and in double-stream
    blocks wrap the attention override to keep the conditional rows' plain joint attention
    probabilities ``(batch, heads, image tokens, text tokens)`` recomputed in float64 from the q and k
    the block hands to attention; the patch's own maps and the masks its shared blocks use are kept
    beside them (``spy``)."""

    def __init__(self, model, batch):
        self.batch = batch
        self.current = None  # (step, block) of the block call running now
        self.probs = {}  # (step, block) -> float64 probabilities
        self.patch_maps = []  # ((step, block), caching, the patch's (batch, concepts, tokens) maps)
        self.used = []  # ((step, block), the (batch, tokens) subject_keep a shared block was given)
        dm = model.get_model_object("diffusion_model")
        if hasattr(dm, "double_blocks"):  # Flux, [txt; img] in joint attention
            assert not any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks)
            keys = [("double_block", i) for i in range(len(dm.double_blocks))] + \
                   [("single_block", i) for i in range(len(dm.single_blocks))]
        else:  # SD3: every joint block has a text stream
            keys = [("double_block", i) for i in range(len(dm.joint_blocks))]
        self.doubles = [n for n, (name, _) in enumerate(keys) if name == "double_block"]
        for n, (name, index) in enumerate(keys):
            model.set_model_patch_replace(self._entry(n, name == "double_block"), "dit", name, index)

    def _entry(self, block, double):
        def entry(args, extra):
            options = args["transformer_options"]
            sigmas, sample_sigmas = options["sigmas"], options["sample_sigmas"]
            step = int((sample_sigmas - sigmas.max()).abs().argmin())
            self.current = (step, block)
            if double:
                inner = options.get(OVERRIDE)
                spy = self._spy(inner, (step, block), args["img"].shape[1], options["cond_or_uncond"])
                args = dict(args, transformer_options=dict(options, **{OVERRIDE: spy}))
            return extra["original_block"](args)
        return entry

    def _spy(self, inner, key, image_tokens, cond_or_uncond):
        def spy(func, *args, **kwargs):
            q, k = args[0], args[1]
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            if not kwargs.get("skip_reshape", False):  # SD3: (b, n, heads * d)
                q, k = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
            text = q.shape[2] - image_tokens
            if text > 0 and 0 in cond_or_uncond:  # the joint attention (not SD3's image-only second one)
                c = cond_or_uncond.index(0)
                q, k = (t[c * self.batch:(c + 1) * self.batch].double() for t in (q, k))
                p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
                assert key not in self.probs
                self.probs[key] = p[:, :, text:, :text]
            return func(*args, **kwargs) if inner is None else inner(func, *args, **kwargs)
        return spy

    def install_spies(self, monkeypatch):
        record_maps, subject_driven = J.JointConsiStoryRun.record_maps, J.joint_subject_driven_attention

        def recording(run, maps):
            self.patch_maps.append((self.current, run.caching, maps.clone()))
            return record_maps(run, maps)

        def sharing(*args, subject_keep, **kwargs):
            self.used.append((self.current, subject_keep.clone()))
            return subject_driven(*args, subject_keep=subject_keep, **kwargs)
        monkeypatch.setattr(J.JointConsiStoryRun, "record_maps", recording)
        monkeypatch.setattr(J, "joint_subject_driven_attention", sharing)


def mean_maps(probs, blocks, steps):
    """Every (block, step) head-mean map of the window with equal weight: ``(batch, tokens, text)``."""
    return torch.stack([probs[(s, b)].mean(1) for s in steps for b in blocks]).mean(0)


def max_over_heads(probs, blocks, steps):
    return torch.stack([probs[(s, b)].amax(1) for s in steps for b in blocks]).mean(0)


def max_over_blocks(probs, blocks, steps):
    return torch.stack([torch.stack([probs[(s, b)].mean(1) for b in blocks]).amax(0) for s in steps]).mean(0)


def rule_masks(probs, blocks, step, aggregate=mean_maps, window=WINDOW, this_step=False, margins=None):
    """The rule: ``aggregate`` of the last ``window`` steps before ``step`` (``this_step``: up to it),
    Otsu per word, OR over the image's words. ``(batch, tokens)`` bool. ``margins``: a list that gets
    each word map's smallest distance to its threshold, relative to the map's range."""
    steps = list(range(step + this_step))[-window:]
    maps = aggregate(probs, blocks, steps)
    masks = torch.zeros(maps.shape[:2], dtype=torch.bool)
    for image, words in enumerate(WORDS):
        for word in words:
            word_map = maps[image, :, word]
            threshold = otsu(word_map)
            masks[image] |= word_map > threshold
            if margins is not None:
                margins.append(((word_map - threshold).abs().min() / (word_map.max() - word_map.min())).item())
    return masks


def unit_qk_norms(model):
    """``model`` with its q/k RMS-norm gains at 1, as trained models have them (order 1). ``randomize``
    leaves them N(0, 0.02^2): logits ~1e-3, every probability 1 / tokens to within 1e-4 relative, and
    the maps' spread a few float32 steps, so Otsu would split float rounding, not attention."""
    with torch.no_grad():
        for name, module in model.get_model_object("diffusion_model").named_modules():
            if name.rsplit(".", 1)[-1] in ("query_norm", "key_norm", "ln_q", "ln_k"):
                for p in module.parameters():
                    p.fill_(1.0)
    return model


def record_run(kind):
    """One automatic-mask run of ``kind``, recorded: the ``Recorder`` and the mask each step shared."""
    model = unit_qk_norms(td.tiny_dit(kind)).clone()
    recorder = Recorder(model, LATENT[0])
    patched = consistory.patch_model(model, anchors=2, mask_dropout=0.0, seed=0, start_step=1, end_step=-1,
                                     blocks="up", share_queries=False, subject_masks=None,
                                     subject_tokens=" | ".join(", ".join(map(str, w)) for w in WORDS))
    with pytest.MonkeyPatch.context() as mp:
        recorder.install_spies(mp)
        ksampler(patched, torch.zeros(LATENT), td.conditioning(kind, batch=3, tokens=TEXT_TOKENS),
                 td.conditioning(kind, batch=3, seed=1, tokens=TEXT_TOKENS), STEPS, CFG[kind], scheduler="simple")
    used = {}
    for (step, block), keep in recorder.used:
        assert torch.equal(used.setdefault(step, keep), keep), (kind, step, block)  # one mask per step
    return recorder, used


@pytest.fixture(scope="module")
def runs():
    """Both models' runs, read by every test below."""
    return {kind: record_run(kind) for kind in ("flux", "sd3")}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_the_patch_maps_are_the_plain_joint_attention_of_every_double_block(runs, kind):
    recorder, _ = runs[kind]
    assert set(recorder.probs) == {(s, b) for s in range(STEPS) for b in recorder.doubles}
    keys = [key for key, _, _ in recorder.patch_maps]
    assert sorted(keys) == sorted(recorder.probs) and not any(caching for _, caching, _ in recorder.patch_maps)
    worst = 0.0
    for key, _, maps in recorder.patch_maps:
        mean = recorder.probs[key].mean(1)  # (batch, tokens, text)
        for image, words in enumerate(WORDS):
            expected = mean[image][:, words].T  # (words, tokens)
            worst = max(worst, (maps[image, :len(words)].double() - expected).abs().max().item())
    assert worst < 1e-6, worst


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_each_step_shares_the_masks_of_the_rule(runs, kind):
    recorder, used = runs[kind]
    assert sorted(used) == list(range(1, STEPS))  # step 0 has no maps yet: plain attention, as official
    margins = []
    for step, keep in used.items():
        expected = rule_masks(recorder.probs, recorder.doubles, step, margins=margins)
        assert torch.equal(keep.cpu(), expected), (step, keep.int(), expected.int())
        assert expected.any(dim=1).all() and not expected.all(dim=1).any()  # a real split in every image
    # exact equality is decisive: no value within float32 rounding (~1e-7 of the range) of its threshold
    assert min(margins) > 1e-6, min(margins)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("variant", [
    dict(window=STEPS),  # every step before t, no 20-step window
    dict(window=1),  # the last step's maps alone
    dict(this_step=True),  # step t's own maps included
    dict(aggregate=max_over_heads),
    dict(aggregate=max_over_blocks),
], ids=["all-steps", "last-step", "this-step", "max-heads", "max-blocks"])
def test_a_wrong_rule_gives_other_masks(runs, kind, variant):
    """The transcription can fail: each nearby rule gives different masks at some step. (And the
    equality above fails for an implementation whose window is 19 or 21 steps, or that takes the max
    over steps: tried by swapping the run's ``AttentionMapWindow``.)"""
    recorder, used = runs[kind]
    differ = [s for s, keep in used.items()
              if not torch.equal(keep.cpu(), rule_masks(recorder.probs, recorder.doubles, s, **variant))]
    assert differ
