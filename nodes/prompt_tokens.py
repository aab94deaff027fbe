"""PromptTokenIndices: the token positions of words in a prompt, as the model's context lays them out.

A CLIP tokenizer lays a prompt out in chunks of 77 tokens (start token, up to 75 prompt tokens,
end token, padding); the text encoder encodes each chunk and the UNet sees the chunks
concatenated. Index ``c * 77 + p`` is position ``p`` of chunk ``c``: index 0 is the start token,
so the first word of a short prompt is index 1, as the official MasaCtrl code's ``token_idx=1``.
SD3's context starts with those 77 CLIP tokens (T5's follow); Flux's context is T5's tokens alone
(no start token: the first word is index 0), CLIP-L giving only the pooled vector.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import checks

NODE = "PromptTokenIndices"


def _sub_tokenizers(clip) -> dict:
    """The tokenizer of each text encoder, keyed as ``clip.tokenize`` keys its output."""
    tokenizer = clip.tokenizer
    found = {}
    for key in clip.tokenize("").keys():
        for name in (f"clip_{key}", key, getattr(tokenizer, "clip", None)):
            sub = getattr(tokenizer, name, None) if name else None
            if sub is not None and hasattr(sub, "tokenize_with_weights"):
                found[key] = sub
                break
    return found


def _context_encoders(subs: dict) -> dict:
    """The tokenizers whose layout the model's context follows: T5 alone when there is no CLIP-G
    next to it (Flux: CLIP-L gives only the pooled vector), else the CLIP ones (SD1.x, SD2.x, SDXL,
    and SD3, whose context starts with CLIP's 77 tokens)."""
    if "t5xxl" in subs and "g" not in subs:
        return {"t5xxl": subs["t5xxl"]}
    return {k: v for k, v in subs.items() if k != "t5xxl"} or subs


def _ids(chunks) -> list:
    """The token ids of a tokenized prompt, chunks concatenated (embeddings as None)."""
    return [t[0] if isinstance(t[0], int) else None for chunk in chunks for t in chunk]


def _word_ids(sub, word: str) -> list[int]:
    """The ids of ``word``'s own tokens (no start, end or padding): those with a word id."""
    chunks = sub.tokenize_with_weights(word, True)
    return [t[0] for chunk in chunks for t in chunk if t[2] > 0 and isinstance(t[0], int)]


def _occurrences(sequence: list, pattern: list[int]) -> list[int]:
    k = len(pattern)
    return [i for i in range(len(sequence) - k + 1) if sequence[i:i + k] == pattern]


def split_words(words: str) -> list[str]:
    return [w.strip() for w in str(words).split(",") if w.strip()]


def token_indices(clip, text: str, words: str, text_input: str = "text", words_input: str = "words",
                  node: str = NODE) -> list[int]:
    """Sorted indices into ``text``'s concatenated token chunks of every token of every word of
    ``words`` (comma-separated), at each place the word occurs. Errors name ``node`` (the node the
    user placed) and the inputs; ``clip`` is a CLIP (the node's input checks)."""
    wanted = split_words(words)
    if not wanted:
        raise checks.error(node, words_input, "no word given; write one or more comma-separated words of the "
                           "prompt, e.g. 'hand' or 'red hat, dog'.")
    subs = _context_encoders(_sub_tokenizers(clip))
    if not subs:
        raise checks.error(node, "clip", "this CLIP has no tokenizer this node can read; word positions need an "
                           "SD1.x, SD2.x, SDXL, SD3 or Flux text encoder.")
    prompt = clip.tokenize(text)
    per_encoder = {}
    for key, sub in subs.items():
        sequence = _ids(prompt[key])
        found = set()
        for word in wanted:
            pattern = _word_ids(sub, word)
            places = _occurrences(sequence, pattern) if pattern else []
            if not places:
                raise checks.error(node, words_input, f"{word!r:.60} is not in the prompt of input '{text_input}' "
                                   "(as this CLIP's tokenizer splits it); use words that occur in the prompt.")
            for p in places:
                found.update(range(p, p + len(pattern)))
        per_encoder[key] = sorted(found)
    layouts = list(per_encoder.values())
    if any(layout != layouts[0] for layout in layouts[1:]):
        raise checks.error(node, "clip", f"the text encoders lay the prompt out differently ({per_encoder}); "
                           "the UNet's token positions are ambiguous.")
    return layouts[0]


class PromptTokenIndices(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Prompt Token Indices",
            category="consistent synthesis/cross-attention",
            description=("The token positions of words in a prompt, for the cross-attention maps of those "
                         "words (MasaCtrl's source_tokens / target_tokens). Index 0 is the start token; "
                         "prompts longer than 75 tokens count on through the following 77-token chunks."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt (SD1.x, SD2.x, SDXL; SD3 and "
                              "Flux for ConsiStory); its tokenizer decides where the words land (Flux: T5's "
                              "tokens, the first word is 0)."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt, exactly as given to CLIP Text Encode."),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words or phrases of the prompt (e.g. 'hand' or "
                                        "'red hat'); every token of each, wherever it occurs."),
            ],
            outputs=[io.String.Output(display_name="token_indices",
                                      tooltip="Comma-separated token indices, e.g. '2, 3', for MasaCtrl "
                                              "Attention Patch's source_tokens / target_tokens.")],
        )

    @classmethod
    def execute(cls, clip, text, words) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(", ".join(str(i) for i in token_indices(clip, text, words)))
