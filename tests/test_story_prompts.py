"""StoryPrompts on the real host's tokenizers (SD1.5, SDXL, Flux's T5): the official CLI's prompts, the subject
tokens per row as the official create_token_indices finds them, one conditioning row per setting."""

import pytest
import torch

from conftest import require_host

require_host()

from test_cross_attention_nodes import tokenizer_clip  # noqa: E402
from consistent_synthesis.nodes import consistory  # noqa: E402
from consistent_synthesis.nodes.masactrl_batch import PROMPT_ROWS  # noqa: E402
from consistent_synthesis.nodes.story_prompts import StoryPrompts, story_prompts  # noqa: E402

SETTINGS = "sitting in the beach\n\n  standing in the snow  \nreading a book by the fire"


def _clip(kind, encoded):
    """The real tokenizer; the encoder replaced by one that records the prompt order."""
    clip = tokenizer_clip(kind)
    plain = clip.encode_from_tokens_scheduled

    def encode(tokens, **kwargs):
        out = plain(tokens)
        out[0][0] = torch.full_like(out[0][0], float(len(encoded)))
        encoded.append(out[0][0].shape[1])
        return out
    clip.encode_from_tokens_scheduled = encode
    return clip


def test_prompts_are_the_official_clis():
    assert story_prompts("A photo of ", "a cute dog", SETTINGS) == [
        "A photo of a cute dog sitting in the beach", "A photo of a cute dog standing in the snow",
        "A photo of a cute dog reading a book by the fire"]


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "flux"])
def test_one_row_per_setting_with_the_subject_tokens(kind):
    encoded = []
    cond, tokens, count = StoryPrompts.execute(_clip(kind, encoded), "A photo of ", "a cute dog", SETTINGS,
                                               "dog, photo").result
    assert count == 3 and len(encoded) == 3
    # <start> A photo of a cute dog: 'dog' is token 6, 'photo' token 2, in every prompt; on Flux the
    # context is T5's: ▁A ▁photo ▁of ▁ a ▁cute ▁dog, 'dog' 6 and 'photo' 1
    expected = "6, 1" if kind == "flux" else "6, 2"
    assert tokens == " | ".join([expected] * 3)
    assert consistory.subject_token_groups(tokens) == (tuple(int(i) for i in expected.split(", ")),) * 3
    (rows, extra), = cond
    assert rows.shape[0] == 3 and [rows[i, 0, 0].item() for i in range(3)] == [0.0, 1.0, 2.0]
    assert PROMPT_ROWS not in extra
    if kind in ("sdxl", "flux"):
        assert extra["pooled_output"].shape[0] == 3


def test_a_word_missing_from_one_setting_is_refused_naming_the_line():
    with pytest.raises(ValueError, match=r"StoryPrompts: input 'subject_words': 'beach' was not found in the "
                                         r"prompt of settings line 2"):
        StoryPrompts.execute(_clip("sd15", []), "A photo of ", "a cute dog", SETTINGS, "beach")


@pytest.mark.parametrize("settings, words, name", [("\n \n", "dog", "settings"), (SETTINGS, " , ", "subject_words")])
def test_empty_settings_or_words_are_refused(settings, words, name):
    with pytest.raises(ValueError, match=f"StoryPrompts: input '{name}'"):
        StoryPrompts.execute(_clip("sd15", []), "A photo of ", "a cute dog", settings, words)
