"""StoryPrompts: a story typed once (style, subject, one setting per line) as the official ConsiStory
CLI takes it, encoded into one CONDITIONING row per setting with the subject words' token indices."""

from __future__ import annotations

from comfy_api.latest import io

from . import checks
from .masactrl_batch import PROMPT_ROWS, stack_conditioning
from .prompt_tokens import split_words, token_indices

NODE = "StoryPrompts"


def story_prompts(style: str, subject: str, settings: str) -> list[str]:
    """The official CLI's prompts: ``f'{style}{subject} {setting}'`` for every non-blank line."""
    return [f"{style}{subject} {line.strip()}" for line in settings.splitlines() if line.strip()]


def subject_token_text(clip, prompts: list[str], subject_words: str) -> str:
    """Each prompt's token index of every subject word (its first token, first occurrence, as the
    official ``create_token_indices``), one group per prompt: ``"2, 5 | 3 | 4"``."""
    words = split_words(subject_words)
    if not words:
        raise checks.error(NODE, "subject_words", "no word given; write the subject's word(s) as they appear in "
                           "every prompt, comma-separated (e.g. 'dog' or 'girl, dragon').")
    groups = []
    for line, prompt in enumerate(prompts, 1):
        found = []
        for word in words:
            try:
                found.append(token_indices(clip, prompt, word, text_input="settings", words_input="subject_words",
                                           node=NODE)[0])
            except ValueError as e:
                raise checks.error(NODE, "subject_words", f"{word!r} was not found in the prompt of settings line "
                                   f"{line} ({prompt!r:.120}); put the word in the subject so every prompt holds "
                                   f"it. ({e})") from None
        groups.append(", ".join(str(i) for i in found))
    return " | ".join(groups)


def encode_story(clip, prompts: list[str]) -> list:
    """One CONDITIONING whose batch holds the prompts in order (shorter token sequences repeated)."""
    stacked = None
    for prompt in prompts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        stacked = cond if stacked is None else stack_conditioning(stacked, cond, node=NODE)
    for entry in stacked:
        entry[1] = {k: v for k, v in entry[1].items() if k != PROMPT_ROWS}  # not a MasaCtrl source/target stack
    return stacked


class StoryPrompts(io.ComfyNode):
    """A story's prompts for ConsiStory Attention Patch: one row per setting, the subject tokens per row."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Story Prompts",
            category="consistent synthesis/ConsiStory",
            description=("Types a story once: every setting line becomes the prompt 'style + subject + setting', "
                         "encoded as one conditioning row, with the subject words' token indices for ConsiStory "
                         "Attention Patch and the image count for Empty Latent Image's batch_size."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint being sampled."),
                io.String.Input("style", default="A photo of ", tooltip=(
                    "Text put before the subject in every prompt (official: 'A photo of ').")),
                io.String.Input("subject", default="a cute dog", tooltip="The subject, the same in every prompt."),
                io.String.Input("settings", multiline=True, default="sitting in the beach\nstanding in the snow",
                                tooltip="One setting per line; each line makes one image."),
                io.String.Input("subject_words", default="dog", tooltip=(
                    "The subject's word(s) whose cross-attention finds it, comma-separated (official "
                    "concept_token); each must be in every prompt.")),
            ],
            outputs=[
                io.Conditioning.Output("conditioning", display_name="conditioning",
                                       tooltip="One row per setting, in order."),
                io.String.Output("subject_tokens", display_name="subject_tokens",
                                 tooltip="Token indices per row, for ConsiStory's subject_tokens."),
                io.Int.Output("count", display_name="count", tooltip="How many images: the latent's batch_size."),
            ],
        )

    @classmethod
    def execute(cls, clip, style, subject, settings, subject_words) -> io.NodeOutput:
        checks.inputs(cls, locals())
        prompts = story_prompts(style, subject, settings)
        if not prompts:
            raise checks.error(NODE, "settings", "no setting given; write one setting per line.")
        tokens = subject_token_text(clip, prompts, subject_words)
        return io.NodeOutput(encode_story(clip, prompts), tokens, len(prompts))
