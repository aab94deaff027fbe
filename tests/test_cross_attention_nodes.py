"""PromptTokenIndices and CrossAttentionMask on the real host: the shipped CLIP tokenizers, tiny random UNets."""

import copy
import re

import pytest
import torch

from conftest import require_host

require_host()

import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402

import tiny_dit_models as tdm  # noqa: E402
import tiny_models as tm  # noqa: E402
from consistent_synthesis.attention import heatmap  # noqa: E402
from consistent_synthesis.nodes import cross_attention_mask as mask_node  # noqa: E402
from consistent_synthesis.nodes.cross_attention_mask import CrossAttentionMask  # noqa: E402
from consistent_synthesis.nodes.prompt_tokens import PromptTokenIndices  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

TOKENIZERS = {"sd15": comfy.sd1_clip.SD1Tokenizer, "sdxl": comfy.sdxl_clip.SDXLTokenizer,
              "flux": comfy.text_encoders.flux.FluxTokenizer, "sd3": comfy.text_encoders.sd3_clip.SD3Tokenizer}


def tokenizer_clip(kind="sd15", seed=0):
    """A host ``comfy.sd.CLIP`` with the real tokenizer of the family (files shipped with the host) and,
    instead of text-encoder weights, random embeddings of the right token count and tiny width."""
    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer = TOKENIZERS[kind]()
    clip.tokenizer_options = {}

    def encode(tokens, **kwargs):
        length = {"flux": lambda: len(tokens["t5xxl"][0]), "sd3": lambda: 77 + len(tokens["t5xxl"][0])}.get(
            kind, lambda: sum(len(chunk) for chunk in next(iter(tokens.values()))))()  # the context's tokens
        if kind in ("flux", "sd3"):
            return tdm.conditioning(kind, tokens=length, seed=seed)
        return tm.conditioning(kind, tokens=length, seed=seed)
    clip.encode_from_tokens_scheduled = encode
    return clip


def indices(kind, text, words):
    return PromptTokenIndices.execute(tokenizer_clip(kind), text, words).result[0]


def test_flux_counts_t5s_tokens_and_sd3_the_clip_tokens_its_context_starts_with():
    """Flux's context is T5's tokens (no start token); SD3's starts with CLIP's 77 (L and G agree)."""
    assert indices("flux", "photo of one dog", "dog") == "3"  # ▁photo ▁of ▁one ▁dog
    assert indices("sd3", "photo of one dog", "dog") == "4"  # <start> photo of one dog
    assert indices("flux", "A photo of a cute dog", "a") == "3, 4"  # T5 splits ' a' into '▁', 'a': both


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_first_word_is_index_one(kind):
    assert indices(kind, "hand on a table", "hand") == "1"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_words_at_every_occurrence_with_weights_and_case(kind):
    # "a photo of a cat" -> tokens 1..5; "(cat:1.2)" is weighted, "Hand" lowercased by CLIP
    assert indices(kind, "a photo of a (cat:1.2) with a Hand, hands, a cat", "cat, hand") == "5, 8, 13"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_phrase_gives_all_its_tokens(kind):
    assert indices(kind, "a man in a red hat", "red hat") == "5, 6"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_prompts_longer_than_one_chunk_count_through_the_chunks(kind):
    # 100 tokens: chunk 0 holds start + 75 + end (indices 0..76); chunk 1 starts at 77 with its start token
    text = "a photo of a cat " * 20 + "with a hand"
    clip = tokenizer_clip(kind)
    assert indices(kind, text, "hand") == "105"
    tokens = clip.tokenize(text)
    for chunks in tokens.values():
        assert len(chunks) == 2
        assert clip.tokenizer.clip_l.inv_vocab[chunks[1][105 - 77][0]] == "hand</w>"


@pytest.mark.parametrize("words", ["dog", "hand, dog", ""])
def test_unknown_words_fail_naming_the_input(words):
    with pytest.raises(ValueError, match=r"^PromptTokenIndices: input 'words': "):
        indices("sd15", "a hand", words)


# --- CrossAttentionMask -------------------------------------------------------------------------

def latent(side=32, batch=1, seed=5):
    return {"samples": torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))}


TEXT = "a photo of a hand on a table"


def run(model, words="hand", threshold=0.3, image=None, side=32, batch=1, text=TEXT):
    return CrossAttentionMask.execute(model, tokenizer_clip(), text, words, latent(side, batch), 0.5, 7,
                                      threshold, image).result


def test_mask_and_heatmap_are_at_image_size(sd15):
    mask, heat = run(sd15, batch=2)
    assert mask.shape == (2, 256, 256) and heat.shape == (2, 256, 256, 3)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0 <= heat.min() and heat.max() <= 1
    assert not mask.requires_grad and not heat.requires_grad  # plain tensors, also outside the server


def test_the_map_is_that_of_the_words_tokens_in_the_latent_over_4_layers_of_one_call(sd15):
    # Independently of the recorder: hook every attn2's q and k projections, keep the 16 x 16 calls.
    qs, ks, calls = [], [], []
    diffusion_model = sd15.model.diffusion_model
    handles = [diffusion_model.input_blocks[0][0].register_forward_hook(lambda *a: calls.append(1))]
    for name, module in diffusion_model.named_modules():
        if name.endswith("attn2"):
            handles.append(module.to_q.register_forward_hook(lambda m, a, out: qs.append(out)))
            handles.append(module.to_k.register_forward_hook(lambda m, a, out: ks.append(out)))
            heads = module.heads
    try:
        token_map = mask_node.word_map(sd15, tokenizer_clip(), TEXT, "hand, table", latent(), 0.5, 7)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 1  # one UNet call, the conditional rows only
    layer_maps = []
    for q, k in zip(qs, ks):
        if q.shape[1] == 64:  # latent 32 x 32 -> 8 x 8
            d = q.shape[-1] // heads
            sim = torch.einsum("bnhd,bmhd->bhnm", q.reshape(1, 64, heads, d), k.reshape(1, 77, heads, d))
            layer_maps.append((sim / d ** 0.5).softmax(-1).mean(1))
    assert len(layer_maps) == 5
    image = torch.stack(layer_maps, 1).mean(1)[..., [5, 8]].sum(-1).reshape(1, 8, 8)
    image = (image - image.amin()) / (image.amax() - image.amin())
    torch.testing.assert_close(token_map, image, rtol=1e-5, atol=1e-6)


def test_the_mask_is_the_upsampled_map_above_the_threshold(sd15):
    mask, heat = run(sd15, threshold=0.5)
    token_map = mask_node.word_map(sd15, tokenizer_clip(), TEXT, "hand", latent(), 0.5, 7)
    up = torch.nn.functional.interpolate(token_map[:, None], size=(256, 256), mode="bilinear")[:, 0]
    assert torch.equal(mask, (up > 0.5).float())
    # cell centres of the 8 x 8 map, where bilinear upsampling returns the map's own values
    centres = mask[:, 15::32, 15::32]
    assert torch.equal(centres[token_map > 0.55], torch.ones_like(centres[token_map > 0.55]))
    assert torch.equal(centres[token_map < 0.45], torch.zeros_like(centres[token_map < 0.45]))
    assert 0 < mask.mean() < 1
    # hot where masked: red dominates blue in the heatmap
    assert (heat[..., 0] > heat[..., 2])[mask.bool()].all()


def test_a_higher_threshold_masks_less(sd15):
    token_map = mask_node.word_map(sd15, tokenizer_clip(), TEXT, "hand", latent(), 0.5, 7)
    areas = [heatmap.mask_and_heatmap(token_map, 256, 256, t)[0].mean().item() for t in (0.0, 0.3, 0.7, 1.0)]
    assert areas[0] > areas[1] > areas[2] > areas[3] == 0.0


def test_the_image_input_is_overlaid(sd15):
    _, alone = run(sd15)
    _, over = run(sd15, image=torch.ones(1, 256, 256, 3))
    torch.testing.assert_close(over, 0.5 + 0.5 * alone)


def test_noise_level_picks_the_sigma_of_that_fraction_of_the_schedule(sd15):
    sampling = sd15.get_model_object("model_sampling")
    assert mask_node._sigma(sd15, 1.0) == pytest.approx(float(sampling.sigma_max))
    assert mask_node._sigma(sd15, 0.5) == pytest.approx(float(sampling.sigma(torch.tensor(499.5))), rel=1e-3)
    assert mask_node._sigma(sd15, 0.1) < mask_node._sigma(sd15, 0.5)


def test_the_model_is_unchanged_and_its_output_identical(sd15):
    before = copy.deepcopy(sd15.model_options)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = tm.conditioning("sd15")[0][0]
    reference = sd15.model.apply_model(x, torch.tensor([5.0]), c_crossattn=cond)
    run(sd15)
    assert sd15.model_options == before
    assert torch.equal(sd15.model.apply_model(x, torch.tensor([5.0]), c_crossattn=cond), reference)


def test_recording_adds_no_host_synchronisation(sd15):
    clip = tokenizer_clip()
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
    with HostSyncCounter() as plain:
        mask_node.record_maps(sd15, conditioning, latent()["samples"], 0.5, 7)
    # the same one-call run without recording: the recorder must add nothing
    import comfy.sample
    import comfy.samplers
    with HostSyncCounter() as bare:
        lat = latent()["samples"]
        comfy.sample.sample_custom(sd15, comfy.sample.prepare_noise(lat, 7), 1.0,
                                   comfy.samplers.KSAMPLER(mask_node._one_call),
                                   torch.tensor([mask_node._sigma(sd15, 0.5), 0.0]), conditioning, conditioning,
                                   lat, disable_pbar=True, seed=7)
    assert plain.counts == bare.counts, plain.report()


@pytest.mark.parametrize("inputs, name", [(dict(words="dog"), "words"), (dict(words=""), "words"),
                                          (dict(threshold=1.5), "threshold")])
def test_bad_inputs_fail_naming_the_input(sd15, inputs, name):
    # the node the user placed, not PromptTokenIndices, whose code finds the words
    with pytest.raises(ValueError, match=rf"^CrossAttentionMask: input '{re.escape(name)}': "):
        run(sd15, **inputs)


@pytest.mark.parametrize("name", ["words", "text"])
def test_a_lone_surrogate_in_the_text_fails_naming_node_and_input(sd15, name):
    values = dict(text=TEXT, words="hand") | {name: "hand\ud800"}
    with pytest.raises(ValueError, match=rf"^PromptTokenIndices: input '{name}': .*unpaired surrogate, U\+D800"):
        PromptTokenIndices.execute(tokenizer_clip(), values["text"], values["words"])
    with pytest.raises(ValueError, match=rf"^CrossAttentionMask: input '{name}': .*unpaired surrogate, U\+D800"):
        run(sd15, **values)


@pytest.mark.parametrize("side", [2, 3, 4])
def test_a_latent_too_small_for_any_map_fails_naming_the_smallest_size_that_works(sd15, side):
    # 16, 24 and 32 px: latent/4 maps of 1x1, where min-max leaves nothing (an empty mask)
    with pytest.raises(ValueError, match=rf"^CrossAttentionMask: input 'latent': a {side * 8}x{side * 8} px image "
                                         r".*too small.*at least 40 px on one side"):
        run(sd15, side=side)


def test_the_smallest_latent_named_in_the_error_gives_a_mask(sd15):
    samples = torch.randn(1, 4, 5, 4, generator=torch.Generator().manual_seed(5))  # 40x32 px: maps of 2x1
    mask, _ = CrossAttentionMask.execute(sd15, tokenizer_clip(), TEXT, "hand", {"samples": samples}, 0.5, 7, 0.3,
                                         None).result
    assert mask.shape == (1, 40, 32)
    assert 0 < mask.mean() < 1


@pytest.mark.parametrize("samples, expected", [
    (torch.randn(1, 16, 8, 8), r"the latent has 16 channels \(a FLUX.1 or SD3 VAE's\), but this model \(SD15\) "
                               r"takes 4-channel latents; encode the image with this checkpoint's VAE"),
    (torch.randn(1, 4, 3, 8, 8), r"got a 5-D video latent .* of shape \(1, 4, 3, 8, 8\), but this model \(SD15\) "
                                 r"takes 4-D image latents"),
], ids=["flux-latent", "video-latent"])
def test_a_latent_of_another_model_fails_naming_its_channels_and_the_models(sd15, samples, expected):
    with pytest.raises(ValueError, match=rf"^CrossAttentionMask: input 'latent': {expected}"):
        CrossAttentionMask.execute(sd15, tokenizer_clip(), TEXT, "hand", {"samples": samples}, 0.5, 7, 0.3, None)


def test_an_empty_latent_of_another_channel_count_is_resized_as_the_hosts_samplers_do(sd15):
    mask, _ = CrossAttentionMask.execute(sd15, tokenizer_clip(), TEXT, "hand", {"samples": torch.zeros(1, 16, 8, 8)},
                                         0.5, 7, 0.3, None).result
    assert mask.shape == (1, 64, 64)


def test_sdxl_reads_its_latent_over_4_layers():
    model = tm.tiny_model("sdxl")
    clip = tokenizer_clip("sdxl")
    token_map = mask_node.word_map(model, clip, TEXT, "hand", latent(64), 0.5, 7)
    assert token_map.shape == (1, 16, 16)
    assert token_map.amin() == 0 and token_map.amax() == 1
