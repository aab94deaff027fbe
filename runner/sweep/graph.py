"""Reading and rewiring an API prompt: its outputs, its attention patches (MasaCtrl, ConsiStory)
bypassed, the mask its RePaint sampler sees, and the image output the metrics read."""

from __future__ import annotations

import copy

MASACTRL_PATCHES = ("MasaCtrlAttentionPatch",)
# attention patches a sweep compares with the same graph without them: class -> the method's name
# (ConsiStory's later nodes need the patch before them, so they go with it)
PATCH_METHODS = {"MasaCtrlAttentionPatch": "MasaCtrl", "ConsiStoryAttentionPatch": "ConsiStory",
                 "ConsiStoryFeatureInjection": "ConsiStory", "ConsiStorySaveSubject": "ConsiStory",
                 "ConsiStoryLoadSubject": "ConsiStory"}
CONSISTORY_PATCHES = ("ConsiStoryAttentionPatch",)
REPAINT_NODES = ("RePaintKSampler", "RePaintSampler", "ParticleInpaintKSampler", "ParticleInpaintSampler")
OUTPUT_IMAGE_NODES = ("SaveImage", "PreviewImage")
MASK_NODE, MASK_SAVE_NODE = "sweep_mask", "sweep_mask_save"  # what saves the mask RePaint sees


def links(node: dict):
    for name, value in node.get("inputs", {}).items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            yield name, value


def sinks(prompt: dict) -> list[str]:
    """Nodes no other node reads: the outputs of an API prompt."""
    used = {v[0] for n in prompt.values() for _, v in links(n)}
    return [i for i in prompt if i not in used]


def ancestors(prompt: dict, start: list[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        i = todo.pop()
        if i in seen or i not in prompt:
            continue
        seen.add(i)
        todo += [v[0] for _, v in links(prompt[i])]
    return seen


def descendants(prompt: dict, start: str) -> set[str]:
    return {i for i in prompt if start in ancestors(prompt, [i]) and i != start}


def masactrl_patches(prompt: dict) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] in MASACTRL_PATCHES]


def consistory_patches(prompt: dict) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] in CONSISTORY_PATCHES]


def attention_patches(prompt: dict) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] in PATCH_METHODS]


def method_off(prompt: dict) -> str:
    """The reference cell's label: 'MasaCtrl off', 'ConsiStory off' (or both)."""
    methods = dict.fromkeys(PATCH_METHODS[prompt[i]["class_type"]] for i in attention_patches(prompt))
    return " and ".join(methods) + " off"


def bypass_patches(prompt: dict) -> dict:
    """The prompt with every attention patch node removed, its consumers reading the unpatched model."""
    prompt = copy.deepcopy(prompt)
    outputs = sinks(prompt)
    for patch in attention_patches(prompt):
        model = prompt[patch]["inputs"]["model"]
        for node in prompt.values():
            for name, value in list(links(node)):
                if value[0] == patch:
                    node["inputs"][name] = list(model)
        del prompt[patch]
    keep = ancestors(prompt, outputs)
    return {i: n for i, n in prompt.items() if i in keep}


def repaint_mask_link(prompt: dict) -> list | None:
    """The link of the mask that a RePaint sampler's latent carries (``SetLatentNoiseMask.mask`` and the like)."""
    samplers = [i for i, n in prompt.items() if n["class_type"] in REPAINT_NODES]
    for s in samplers:
        consumers = [i for i, n in prompt.items() if any(v[0] == s for _, v in links(n))]
        for start in [s] + consumers:
            latent = prompt[start]["inputs"].get("latent_image")
            todo, seen = [latent[0]] if isinstance(latent, list) else [], set()
            while todo:  # breadth first: the nearest node upstream that takes a mask
                i = todo.pop(0)
                if i in seen or i not in prompt:
                    continue
                seen.add(i)
                mask = prompt[i]["inputs"].get("mask")
                if isinstance(mask, list):
                    return list(mask)
                todo += [v[0] for _, v in links(prompt[i])]
    return None


def with_mask_saved(prompt: dict) -> dict:
    """A copy of the prompt that also saves the mask its RePaint sampler works with (for the seam error)."""
    prompt = copy.deepcopy(prompt)
    mask = repaint_mask_link(prompt)
    if mask is not None:
        prompt[MASK_NODE] = {"class_type": "MaskToImage", "inputs": {"mask": mask}, "_meta": {"title": "sweep mask"}}
        prompt[MASK_SAVE_NODE] = {"class_type": "SaveImage", "_meta": {"title": "sweep mask"},
                                  "inputs": {"images": [MASK_NODE, 0], "filename_prefix": "mask"}}
    return prompt


def main_output(prompt: dict) -> str | None:
    """The image output the metrics read: the one fed by an attention patch or the RePaint sampler."""
    for start in attention_patches(prompt) + [i for i, n in prompt.items() if n["class_type"] in REPAINT_NODES]:
        hits = [i for i in sorted(descendants(prompt, start), key=id_order)
                if prompt[i]["class_type"] in OUTPUT_IMAGE_NODES]
        if hits:
            return hits[0]
    images = [i for i in sinks(prompt) if prompt[i]["class_type"] in OUTPUT_IMAGE_NODES and i != MASK_SAVE_NODE]
    return images[0] if images else None


def id_order(i: str):
    """Node ids in numeric order, then the named ones."""
    return (0, int(i), "") if i.isdigit() else (1, 0, i)
