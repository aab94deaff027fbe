"""Write the shipped workflows, UI format and API format, from one Python description.

    python workflows/build.py           # (re)write workflows/*.json and workflows/api/*.json
    python workflows/build.py --check   # exit 1 if a written file differs from the description

UI-format files (what the canvas loads; the template browser lists the top level of this
folder) and API-format files (what ``/prompt`` and ``python -m runner`` take) come from the same
``Graph``, so they cannot drift. The node specs below say which inputs are sockets and which are
widgets, in the order the frontend lays them out; the end-to-end tests check them against the
server's ``/object_info``. Add a workflow by adding a function to ``WORKFLOWS``.

Over 400 lines on purpose: every shipped workflow is described here beside the node specs they
share, so one ``--check`` proves all of them against one description.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass(frozen=True)
class NodeSpec:
    """A node type as the frontend sees it: inputs (name, type) in order, outputs (name, type)."""
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...] = ()
    title: str = ""
    seed_widgets: tuple[str, ...] = ()  # INT widgets followed by a "control after generate" widget
    optional: tuple[str, ...] = ()
    extra_widgets: tuple[tuple[str, object], ...] = ()  # (input, value): a frontend-only widget after it
    widget_defaults: tuple[tuple[str, object], ...] = ()  # (input, value): an optional widget left unset


NODE_SPECS: dict[str, NodeSpec] = {
    "CheckpointLoaderSimple": NodeSpec(
        (("ckpt_name", "COMBO"),), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")), "Load Checkpoint"),
    "CLIPTextEncode": NodeSpec(
        (("text", "STRING"), ("clip", "CLIP")), (("CONDITIONING", "CONDITIONING"),), "CLIP Text Encode (Prompt)"),
    "EmptyLatentImage": NodeSpec(
        (("width", "INT"), ("height", "INT"), ("batch_size", "INT")), (("LATENT", "LATENT"),), "Empty Latent Image",
        widget_defaults=(("batch_size", 1),)),
    "KSampler": NodeSpec(
        (("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
         ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("denoise", "FLOAT")),
        (("LATENT", "LATENT"),), "KSampler", seed_widgets=("seed",)),
    "VAEDecode": NodeSpec((("samples", "LATENT"), ("vae", "VAE")), (("IMAGE", "IMAGE"),), "VAE Decode"),
    "SaveImage": NodeSpec((("images", "IMAGE"), ("filename_prefix", "STRING")), (), "Save Image"),
    "ControlNetLoader": NodeSpec(
        (("control_net_name", "COMBO"),), (("CONTROL_NET", "CONTROL_NET"),), "Load ControlNet Model"),
    "ControlNetApplyAdvanced": NodeSpec(
        (("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("control_net", "CONTROL_NET"),
         ("image", "IMAGE"), ("strength", "FLOAT"), ("start_percent", "FLOAT"), ("end_percent", "FLOAT"),
         ("vae", "VAE")),
        (("positive", "CONDITIONING"), ("negative", "CONDITIONING")), "Apply ControlNet", optional=("vae",)),
    "UNETLoader": NodeSpec((("unet_name", "COMBO"), ("weight_dtype", "COMBO")), (("MODEL", "MODEL"),),
                           "Load Diffusion Model"),
    "DualCLIPLoader": NodeSpec(
        (("clip_name1", "COMBO"), ("clip_name2", "COMBO"), ("type", "COMBO"), ("device", "COMBO")),
        (("CLIP", "CLIP"),), "DualCLIPLoader", optional=("device",), widget_defaults=(("device", "default"),)),
    "VAELoader": NodeSpec((("vae_name", "COMBO"),), (("VAE", "VAE"),), "Load VAE"),
    "FluxGuidance": NodeSpec((("conditioning", "CONDITIONING"), ("guidance", "FLOAT")),
                             (("CONDITIONING", "CONDITIONING"),), "FluxGuidance"),
    "ConditioningZeroOut": NodeSpec((("conditioning", "CONDITIONING"),), (("CONDITIONING", "CONDITIONING"),),
                                    "ConditioningZeroOut"),
    "EmptySD3LatentImage": NodeSpec(
        (("width", "INT"), ("height", "INT"), ("batch_size", "INT")), (("LATENT", "LATENT"),), "EmptySD3LatentImage",
        widget_defaults=(("batch_size", 1),)),
    "MasaCtrlAttentionPatch": NodeSpec(
        (("model", "MODEL"), ("start_step", "INT"), ("start_layer", "INT"), ("end_step", "INT"),
         ("end_layer", "INT"), ("mode", "COMBO"), ("source_index", "INT"), ("source_mask", "MASK"),
         ("target_mask", "MASK"), ("auto_mask", "BOOLEAN"), ("source_tokens", "STRING"), ("target_tokens", "STRING"),
         ("mask_threshold", "FLOAT"), ("layers", "STRING")),
        (("MODEL", "MODEL"),), "MasaCtrl Attention Patch",
        optional=("source_mask", "target_mask", "auto_mask", "source_tokens", "target_tokens", "mask_threshold",
                  "layers"),
        widget_defaults=(("auto_mask", False), ("source_tokens", "1"), ("target_tokens", "1"),
                         ("mask_threshold", 0.1), ("layers", ""))),
    "MasaCtrlConditioningBatch": NodeSpec(
        (("source", "CONDITIONING"), ("target", "CONDITIONING")), (("CONDITIONING", "CONDITIONING"),),
        "MasaCtrl Conditioning Batch"),
    "MasaCtrlLatentBatch": NodeSpec(
        (("source", "LATENT"), ("targets", "INT"), ("source_is_reference", "BOOLEAN"), ("share_noise", "BOOLEAN"),
         ("target", "LATENT"), ("inverted", "BOOLEAN")),
        (("LATENT", "LATENT"),), "MasaCtrl Latent Batch", optional=("target",)),
    "InvertLatent": NodeSpec(
        (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
         ("steps", "INT"), ("scheduler", "COMBO"), ("cfg", "FLOAT"), ("denoise", "FLOAT")),
        (("LATENT", "LATENT"),), "Invert Latent (DDIM inversion)"),
    "MasaCtrlInvertedSource": NodeSpec(
        (("model", "MODEL"), ("inverted", "LATENT")), (("MODEL", "MODEL"),), "MasaCtrl Inverted Source"),
    "LoadImage": NodeSpec((("image", "COMBO"),), (("IMAGE", "IMAGE"), ("MASK", "MASK")), "Load Image",
                          extra_widgets=(("image", "image"),)),
    "VAEEncode": NodeSpec((("pixels", "IMAGE"), ("vae", "VAE")), (("LATENT", "LATENT"),), "VAE Encode"),
    "SetLatentNoiseMask": NodeSpec((("samples", "LATENT"), ("mask", "MASK")), (("LATENT", "LATENT"),),
                                   "Set Latent Noise Mask"),
    "ImagePadForOutpaint": NodeSpec(
        (("image", "IMAGE"), ("left", "INT"), ("top", "INT"), ("right", "INT"), ("bottom", "INT"),
         ("feathering", "INT")), (("IMAGE", "IMAGE"), ("MASK", "MASK")), "Pad Image for Outpainting"),
    "ImageCompositeMasked": NodeSpec(
        (("destination", "IMAGE"), ("source", "IMAGE"), ("x", "INT"), ("y", "INT"), ("resize_source", "BOOLEAN"),
         ("mask", "MASK")), (("IMAGE", "IMAGE"),), "ImageCompositeMasked", optional=("mask",)),
    "InvertMask": NodeSpec((("mask", "MASK"),), (("MASK", "MASK"),), "InvertMask"),
    "PoseEditOutpaint": NodeSpec(
        (("image", "IMAGE"), ("pad_left", "INT"), ("pad_top", "INT"), ("pad_right", "INT"), ("pad_bottom", "INT"),
         ("feathering", "INT"), ("completion", "COMBO"), ("edits", "STRING"), ("pose", "POSE_KEYPOINT")),
        (("image", "IMAGE"), ("mask", "MASK"), ("pose_image", "IMAGE"), ("pose", "POSE_KEYPOINT")),
        "Pose Edit Outpaint", optional=("pose",)),
    "CrossAttentionMask": NodeSpec(
        (("model", "MODEL"), ("clip", "CLIP"), ("text", "STRING"), ("words", "STRING"), ("latent", "LATENT"),
         ("noise_level", "FLOAT"), ("seed", "INT"), ("threshold", "FLOAT"), ("image", "IMAGE")),
        (("mask", "MASK"), ("heatmap", "IMAGE")), "Cross Attention Mask", optional=("image",),
        seed_widgets=("seed",)),
    "PromptTokenIndices": NodeSpec(
        (("clip", "CLIP"), ("text", "STRING"), ("words", "STRING")), (("token_indices", "STRING"),),
        "Prompt Token Indices"),
    "RePaintKSampler": NodeSpec(
        (("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
         ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("denoise", "FLOAT"), ("jump_length", "INT"), ("jump_n_sample", "INT"),
         ("resample_start", "FLOAT"), ("resample_end", "FLOAT")),
        (("LATENT", "LATENT"),), "RePaint KSampler", seed_widgets=("seed",)),
    "ParticleInpaintKSampler": NodeSpec(
        (("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
         ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("denoise", "FLOAT"), ("particles", "INT"), ("resample_threshold", "FLOAT"),
         ("resample_below", "FLOAT"), ("twisted", "BOOLEAN")),
        (("LATENT", "LATENT"), ("particles", "LATENT")), "Particle Inpaint KSampler", seed_widgets=("seed",)),
    "FreeU": NodeSpec((("model", "MODEL"), ("b1", "FLOAT"), ("b2", "FLOAT"), ("s1", "FLOAT"), ("s2", "FLOAT")),
                      (("MODEL", "MODEL"),), "FreeU"),
    "StoryPrompts": NodeSpec(
        (("clip", "CLIP"), ("style", "STRING"), ("subject", "STRING"), ("settings", "STRING"),
         ("subject_words", "STRING")),
        (("conditioning", "CONDITIONING"), ("subject_tokens", "STRING"), ("count", "INT")), "Story Prompts"),
    "ConsiStoryAttentionPatch": NodeSpec(
        (("model", "MODEL"), ("anchors", "INT"), ("mask_dropout", "FLOAT"), ("seed", "INT"), ("start_step", "INT"),
         ("end_step", "INT"), ("blocks", "COMBO"), ("share_queries", "BOOLEAN"), ("subject_tokens", "STRING"),
         ("token_sharing", "COMBO"), ("subject_masks", "MASK")),
        (("MODEL", "MODEL"),), "ConsiStory Attention Patch", seed_widgets=("seed",), optional=("subject_masks",),
        widget_defaults=(("subject_tokens", ""),)),
    "ConsiStoryFeatureInjection": NodeSpec((("model", "MODEL"), ("alpha", "FLOAT")), (("MODEL", "MODEL"),),
                                           "ConsiStory Feature Injection"),
    "ConsiStorySaveSubject": NodeSpec((("model", "MODEL"), ("filename_prefix", "STRING")), (("MODEL", "MODEL"),),
                                      "ConsiStory Save Subject"),
    "ConsiStoryLoadSubject": NodeSpec((("model", "MODEL"), ("subject", "COMBO")), (("MODEL", "MODEL"),),
                                      "ConsiStory Load Subject"),
}

# Where users get the files the workflows name (shown by the frontend's missing-models dialog).
MODEL_FILES = {
    "v1-5-pruned-emaonly.safetensors": (
        "checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors"),
    "sd_xl_base_1.0.safetensors": (
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                       "sd_xl_base_1.0.safetensors"),
    "control_v11p_sd15_openpose_fp16.safetensors": (
        "controlnet", "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                      "control_v11p_sd15_openpose_fp16.safetensors"),
    "flux1-dev.safetensors": (
        "diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    "clip_l.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp8_e4m3fn.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
                         "t5xxl_fp8_e4m3fn.safetensors"),
    "ae.safetensors": ("vae", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"),
}

COLUMN, ROW = 380, 60  # layout grid in canvas pixels


@dataclass
class Node:
    id: int
    type: str
    inputs: dict
    title: str
    pos: tuple[float, float]
    size: tuple[float, float]

    def __getitem__(self, slot: int) -> tuple["Node", int]:
        return (self, slot)

    @property
    def spec(self) -> NodeSpec:
        return NODE_SPECS[self.type]


@dataclass
class Graph:
    """A workflow: nodes added in order; an input is a value (widget) or ``node[slot]`` (link)."""
    name: str
    description: str
    nodes: list[Node] = field(default_factory=list)

    def add(self, type_: str, title: str = "", at: tuple[float, float] = (0, 0), size=(320, 130), **inputs) -> Node:
        spec = NODE_SPECS[type_]
        names = [n for n, _ in spec.inputs]
        unknown = set(inputs) - set(names)
        if unknown:
            raise ValueError(f"{self.name}: {type_} has no input {sorted(unknown)}")
        missing = [n for n in names if n not in inputs and n not in spec.optional]
        if missing:
            raise ValueError(f"{self.name}: {type_} needs {missing}")
        unplaced = [n for n, t in spec.inputs if t in WIDGET_TYPES and _is_link(inputs.get(n))
                    and n not in dict(spec.widget_defaults)]
        if unplaced:
            raise ValueError(f"{self.name}: {type_}'s linked widgets {unplaced} need a widget_defaults value")
        node = Node(len(self.nodes) + 1, type_, inputs, title or spec.title,
                    (40 + at[0] * COLUMN, 40 + at[1] * ROW), size)
        self.nodes.append(node)
        return node

    def api(self) -> dict:
        """The API-format prompt (what the frontend's "Export (API)" writes)."""
        prompt = {}
        for node in self.nodes:
            inputs = {}
            defaults = dict(node.spec.widget_defaults)  # the frontend sends every widget's value
            for name, _ in node.spec.inputs:
                if name not in node.inputs and name not in defaults:
                    continue
                value = node.inputs.get(name, defaults.get(name))
                inputs[name] = [str(value[0].id), value[1]] if _is_link(value) else value
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": node.title}}
        return prompt

    def ui(self) -> dict:
        """The UI-format workflow (litegraph serialisation, version 0.4) of the current frontend.

        A widget fed by a link (``batch_size=story[2]``) is listed after the sockets with
        ``widget: {name}``, as the frontend writes a widget converted to an input; its
        ``widgets_values`` entry keeps the spec's ``widget_defaults`` value, which the link overrides."""
        links, by_target = [], {}
        for node in self.nodes:
            sockets = [n for n, _ in _sockets(node)]
            for name, type_ in node.spec.inputs:
                value = node.inputs.get(name)
                if _is_link(value):
                    link = [len(links) + 1, value[0].id, value[1], node.id, sockets.index(name), type_]
                    links.append(link)
                    by_target[(node.id, name)] = link
        order = {node.id: i for i, node in enumerate(self.nodes)}  # nodes are added in dependency order
        out_nodes, models = [], []
        for node in self.nodes:
            inputs = [{"name": n, "type": t, "link": by_target.get((node.id, n), [None])[0]}
                      | ({"widget": {"name": n}} if t in WIDGET_TYPES else {}) for n, t in _sockets(node)]
            outputs = [{"name": n, "type": t, "slot_index": i,
                        "links": [link[0] for link in links if link[1] == node.id and link[2] == i]}
                       for i, (n, t) in enumerate(node.spec.outputs)]
            widgets = []
            defaults = dict(node.spec.widget_defaults)
            for name, type_ in node.spec.inputs:
                if type_ in WIDGET_TYPES:
                    value = node.inputs.get(name, defaults.get(name))
                    widgets.append(defaults[name] if _is_link(value) else value)
                    if name in node.spec.seed_widgets:
                        widgets.append("fixed")
                    widgets += [value for after, value in node.spec.extra_widgets if after == name]
            properties = {"Node name for S&R": node.type}
            files = [MODEL_FILES[v] + (v,) for v in widgets if isinstance(v, str) and v in MODEL_FILES]
            if files:
                properties["models"] = [{"name": name, "url": url, "directory": folder} for folder, url, name in files]
                models += properties["models"]
            out_nodes.append({
                "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                "order": order[node.id], "mode": 0, "inputs": inputs, "outputs": outputs, "title": node.title,
                "properties": properties, "widgets_values": widgets})
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"consistent-synthesis/workflows/{self.name}")),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(links),
            "nodes": out_nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "info": {"description": self.description}},
            "models": models, "version": 0.4,
        }


def _sockets(node: Node) -> list[tuple[str, str]]:
    """The node's input slots: its sockets in order, then its widgets fed by a link."""
    inputs = node.spec.inputs
    return [(n, t) for n, t in inputs if t not in WIDGET_TYPES] + [
        (n, t) for n, t in inputs if t in WIDGET_TYPES and _is_link(node.inputs.get(n))]


def _is_link(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Node)


# ---------------------------------------------------------------- the workflows

NEGATIVE = "lowres, bad anatomy, bad hands, blurry, watermark, text"


def masactrl_synthesis(name: str, checkpoint: str, size: int, start_layer: int, family: str) -> Graph:
    """(b) MasaCtrl synthesis: one KSampler draws the source prompt and the target prompt together;
    from start_step and start_layer on, the target's self-attention reads the source's keys and values."""
    g = Graph(name, f"MasaCtrl synthesis ({family}): the target prompt changes the pose or action of the "
                    "source prompt's subject while MasaCtrl keeps its identity and texture.")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name=checkpoint)
    source = g.add("CLIPTextEncode", "Source prompt", at=(1, 0), size=(360, 140), clip=ckpt[1],
                   text="a photo of a corgi, standing on the grass, full body")
    target = g.add("CLIPTextEncode", "Target prompt", at=(1, 3), size=(360, 140), clip=ckpt[1],
                   text="a photo of a corgi, running on the grass, full body")
    negative = g.add("CLIPTextEncode", "Negative prompt", at=(1, 6), size=(360, 140), clip=ckpt[1], text=NEGATIVE)
    batch = g.add("MasaCtrlConditioningBatch", at=(2, 2), size=(300, 60), source=source[0], target=target[0])
    empty = g.add("EmptyLatentImage", at=(1, 9), size=(320, 110), width=size, height=size, batch_size=1)
    latents = g.add("MasaCtrlLatentBatch", at=(2, 8), size=(320, 150), source=empty[0], targets=1,
                    source_is_reference=False, share_noise=True, inverted=True)
    patch = g.add("MasaCtrlAttentionPatch", at=(2, 4), size=(320, 220), model=ckpt[0],
                  start_step=4, start_layer=start_layer, end_step=-1, end_layer=-1, mode="mutual", source_index=0)
    sampler = g.add("KSampler", at=(3, 0), size=(320, 270), model=patch[0], seed=42, steps=50, cfg=7.5,
                    sampler_name="ddim", scheduler="ddim_uniform", positive=batch[0], negative=negative[0],
                    latent_image=latents[0], denoise=1.0)
    decode = g.add("VAEDecode", at=(4, 0), size=(220, 50), samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", at=(4, 2), size=(420, 300), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


def _presets() -> dict:
    """The published block sets, read from their one home (``PRESETS`` in attention/layer_selection.py)."""
    import ast
    path = Path(__file__).resolve().parent.parent / "attention" / "layer_selection.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "PRESETS":
            return ast.literal_eval(node.value)
    raise LookupError(f"no PRESETS in {path.name}")


# FreeFlux (Wei et al., 2025), official non-rigid editing: FLUX.1-dev blocks whose output depends on content
# (double blocks 0-18, then single blocks 19-56), injected at every step. Written out as a list (not the
# 'freeflux' preset name) so the runner can move it onto the reduced-depth stand-in.
FREEFLUX_LAYERS = ",".join(map(str, _presets()["freeflux"]))


def masactrl_flux(name: str) -> Graph:
    """(b'') MasaCtrl on FLUX.1-dev: in FreeFlux's non-rigid block set, from the first step, the target's
    image tokens attend to its own text and the source's image keys/values (joint attention)."""
    g = Graph(name, "MasaCtrl synthesis on FLUX.1-dev: the target prompt changes the pose or action of the "
                    "source prompt's subject; in FreeFlux's non-rigid blocks the target reads the source's image "
                    "keys and values. Guidance is set once for the batch, after MasaCtrl Conditioning Batch.")
    unet = g.add("UNETLoader", at=(0, 0), size=(320, 90), unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", at=(0, 2.5), size=(320, 130), clip_name1="clip_l.safetensors",
                 clip_name2="t5xxl_fp8_e4m3fn.safetensors", type="flux")
    vae = g.add("VAELoader", at=(0, 6), size=(320, 60), vae_name="ae.safetensors")
    source = g.add("CLIPTextEncode", "Source prompt", at=(1, 0), size=(360, 140), clip=clip[0],
                   text="a photo of a corgi, standing on the grass, full body")
    target = g.add("CLIPTextEncode", "Target prompt", at=(1, 3), size=(360, 140), clip=clip[0],
                   text="a photo of a corgi, running on the grass, full body")
    batch = g.add("MasaCtrlConditioningBatch", at=(2, 0), size=(300, 60), source=source[0], target=target[0])
    guided = g.add("FluxGuidance", at=(2, 2), size=(300, 60), conditioning=batch[0], guidance=3.5)
    # cfg 1: FLUX.1-dev is guidance-distilled, so the negative is never evaluated
    negative = g.add("ConditioningZeroOut", "Negative (unused at cfg 1)", at=(2, 4), size=(300, 30),
                     conditioning=source[0])
    empty = g.add("EmptySD3LatentImage", at=(1, 6), size=(320, 110), width=1024, height=1024, batch_size=1)
    latents = g.add("MasaCtrlLatentBatch", at=(2, 6), size=(320, 150), source=empty[0], targets=1,
                    source_is_reference=False, share_noise=True, inverted=True)
    patch = g.add("MasaCtrlAttentionPatch", at=(1, 9), size=(320, 330), model=unet[0], start_step=0,
                  start_layer=0, end_step=-1, end_layer=-1, mode="mutual", source_index=0, layers=FREEFLUX_LAYERS)
    sampler = g.add("KSampler", at=(3, 0), size=(320, 270), model=patch[0], seed=42, steps=28, cfg=1.0,
                    sampler_name="euler", scheduler="simple", positive=guided[0], negative=negative[0],
                    latent_image=latents[0], denoise=1.0)
    decode = g.add("VAEDecode", at=(4, 0), size=(220, 50), samples=sampler[0], vae=vae[0])
    g.add("SaveImage", at=(4, 2), size=(420, 300), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


def masactrl_real_image(name: str) -> Graph:
    """(b') MasaCtrl editing of a real image as the paper does it: the photo is inverted (DDIM inversion
    with its own prompt, cfg 1), every image starts from the inverted noise, and the source follows its
    inversion path while the target prompt changes the pose or action."""
    g = Graph(name, "MasaCtrl real-image editing: the loaded photo is inverted to noise; the source row retraces "
                    "the photo's own denoising path while the target prompt edits pose or action, keeping "
                    "identity and texture. Invert Latent and the KSampler share steps, scheduler and denoise.")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name="v1-5-pruned-emaonly.safetensors")
    image = g.add("LoadImage", "Real image", at=(0, 3), size=(320, 320), image=PERSON_IMAGE)
    source = g.add("CLIPTextEncode", "Source prompt (describes the photo)", at=(1, 0), size=(360, 140),
                   clip=ckpt[1], text="a photo of a woman in a red jacket, upper body")
    target = g.add("CLIPTextEncode", "Target prompt", at=(1, 3), size=(360, 140), clip=ckpt[1],
                   text="a photo of a woman in a red jacket, raising her arms, upper body")
    negative = g.add("CLIPTextEncode", "Negative prompt", at=(1, 6), size=(360, 140), clip=ckpt[1], text=NEGATIVE)
    encode = g.add("VAEEncode", at=(1, 9), size=(220, 50), pixels=image[0], vae=ckpt[2])
    invert = g.add("InvertLatent", at=(2, 7), size=(320, 200), model=ckpt[0], positive=source[0],
                   negative=negative[0], latent=encode[0], steps=50, scheduler="ddim_uniform", cfg=1.0, denoise=1.0)
    batch = g.add("MasaCtrlConditioningBatch", at=(2, 0), size=(300, 60), source=source[0], target=target[0])
    latents = g.add("MasaCtrlLatentBatch", at=(3, 7), size=(320, 150), source=invert[0], targets=1,
                    source_is_reference=True, share_noise=True, inverted=True)
    patch = g.add("MasaCtrlAttentionPatch", at=(2, 2), size=(320, 220), model=ckpt[0], start_step=4,
                  start_layer=10, end_step=-1, end_layer=-1, mode="mutual", source_index=0)
    driven = g.add("MasaCtrlInvertedSource", at=(3, 4), size=(300, 60), model=patch[0], inverted=invert[0])
    sampler = g.add("KSampler", at=(4, 0), size=(320, 270), model=driven[0], seed=42, steps=50, cfg=7.5,
                    sampler_name="ddim", scheduler="ddim_uniform", positive=batch[0], negative=negative[0],
                    latent_image=latents[0], denoise=1.0)
    decode = g.add("VAEDecode", at=(5, 0), size=(220, 50), samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", at=(5, 2), size=(420, 300), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


def repaint(name: str, outpaint: bool) -> Graph:
    """(c) RePaint inpainting (the transparent area of the loaded image) or outpainting (a padded
    border) with any SD1.5 checkpoint; the original pixels are composited back over the result."""
    what = "outpainting: the canvas grows by the padding" if outpaint else \
        "inpainting: the transparent area of the loaded image is generated"
    g = Graph(name, f"RePaint {what}, with any checkpoint (no inpainting model needed). jump_length and "
                    "jump_n_sample trade time for harmony between the new region and the old.")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name="v1-5-pruned-emaonly.safetensors")
    image = g.add("LoadImage", at=(0, 3), size=(320, 320), image=INPUT_IMAGE)
    if outpaint:
        pad = g.add("ImagePadForOutpaint", at=(1, 6), size=(320, 180), image=image[0], left=64, top=0,
                    right=64, bottom=0, feathering=24)
        pixels, mask = pad[0], pad[1]
    else:
        pixels, mask = image[0], image[1]
    positive = g.add("CLIPTextEncode", "Prompt", at=(1, 0), size=(360, 140), clip=ckpt[1],
                     text="a cozy living room with a sofa and plants, photo, soft light")
    negative = g.add("CLIPTextEncode", "Negative prompt", at=(1, 3), size=(360, 140), clip=ckpt[1], text=NEGATIVE)
    encode = g.add("VAEEncode", at=(2, 5), size=(220, 50), pixels=pixels, vae=ckpt[2])
    masked = g.add("SetLatentNoiseMask", at=(2, 7), size=(220, 50), samples=encode[0], mask=mask)
    sampler = g.add("RePaintKSampler", at=(3, 0), size=(320, 380), model=ckpt[0], seed=42, steps=50, cfg=7.5,
                    sampler_name="euler_ancestral", scheduler="normal", positive=positive[0], negative=negative[0],
                    latent_image=masked[0], denoise=1.0, jump_length=10, jump_n_sample=10,
                    resample_start=0.0, resample_end=1.0)
    decode = g.add("VAEDecode", at=(4, 0), size=(220, 50), samples=sampler[0], vae=ckpt[2])
    # the VAE round trip changes known pixels a little; put the originals back where the mask is 0
    keep = g.add("ImageCompositeMasked", "Composite original pixels", at=(4, 2), size=(320, 160),
                 destination=pixels, source=decode[0], x=0, y=0, resize_source=False, mask=mask)
    g.add("SaveImage", at=(5, 0), size=(420, 300), images=keep[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


def consistent_character(name: str) -> Graph:
    """(a) The consistent character graph: a cropped reference person is extended onto a taller canvas.
    PoseEditOutpaint pads it and completes its OpenPose skeleton; an openpose ControlNet shapes the
    new body; MasaCtrl (mask-guided: the new area reads the reference's pixels only) carries the
    person's identity and clothing into the new area; RePaint harmonises it with the known part.
    The masks are automatic: the cross-attention maps of "woman" (token 5 of both prompts; Prompt
    Token Indices gives such numbers from words) in the reference and in the target."""
    g = Graph(name, "Consistent character outpainting: the cropped reference person continues below the frame "
                    "in the completed (and editable) pose, keeping identity and clothing. Batch: the reference "
                    "(kept) then the outpainted target.")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name="v1-5-pruned-emaonly.safetensors")
    image = g.add("LoadImage", "Reference (cropped person)", at=(0, 3), size=(320, 320), image=PERSON_IMAGE)
    pose = g.add("PoseEditOutpaint", at=(1, 0), size=(340, 330), image=image[0], pad_left=0, pad_top=0,
                 pad_right=0, pad_bottom=256, feathering=40, completion="auto", edits="")
    source = g.add("CLIPTextEncode", "Source prompt", at=(1, 6), size=(360, 140), clip=ckpt[1],
                   text="a photo of a woman in a red jacket, upper body")
    target = g.add("CLIPTextEncode", "Target prompt", at=(1, 9), size=(360, 140), clip=ckpt[1],
                   text="a photo of a woman in a red jacket and blue jeans, full body, standing")
    negative = g.add("CLIPTextEncode", "Negative prompt", at=(1, 12), size=(360, 140), clip=ckpt[1],
                     text=NEGATIVE)
    batch = g.add("MasaCtrlConditioningBatch", at=(2, 6), size=(300, 60), source=source[0], target=target[0])
    controlnet = g.add("ControlNetLoader", at=(2, 8), size=(320, 60),
                       control_net_name="control_v11p_sd15_openpose_fp16.safetensors")
    control = g.add("ControlNetApplyAdvanced", at=(3, 7.5), size=(320, 190), positive=batch[0], negative=negative[0],
                    control_net=controlnet[0], image=pose[2], strength=1.0, start_percent=0.0, end_percent=1.0)
    encode = g.add("VAEEncode", at=(2, 0), size=(220, 50), pixels=pose[0], vae=ckpt[2])
    canvas = g.add("SetLatentNoiseMask", "Target canvas", at=(2, 2), size=(240, 50), samples=encode[0],
                   mask=pose[1])
    # the reference enters inverted (the paper's real-image editing); 'inverted' off: re-noised reference
    invert = g.add("InvertLatent", at=(2, 10), size=(320, 200), model=ckpt[0], positive=source[0],
                   negative=negative[0], latent=encode[0], steps=50, scheduler="normal", cfg=1.0, denoise=1.0)
    latents = g.add("MasaCtrlLatentBatch", at=(3, 0), size=(320, 170), source=invert[0], targets=1,
                    source_is_reference=True, share_noise=True, target=canvas[0], inverted=True)
    # mask-guided MasaCtrl with automatic masks: the person in the target reads the person in the
    # reference, the background the background (maps of "woman", token 5 in both prompts)
    patch = g.add("MasaCtrlAttentionPatch", at=(3, 3), size=(320, 330), model=ckpt[0], start_step=4,
                  start_layer=10, end_step=-1, end_layer=-1, mode="mutual", source_index=0, auto_mask=True,
                  source_tokens="5", target_tokens="5", mask_threshold=0.1, layers="")
    driven = g.add("MasaCtrlInvertedSource", at=(3, 11), size=(300, 60), model=patch[0], inverted=invert[0])
    sampler = g.add("RePaintKSampler", at=(4, 0), size=(320, 380), model=driven[0], seed=42, steps=50, cfg=7.5,
                    sampler_name="euler_ancestral", scheduler="normal", positive=control[0], negative=control[1],
                    latent_image=latents[0], denoise=1.0, jump_length=10, jump_n_sample=10,
                    resample_start=0.0, resample_end=0.5)
    decode = g.add("VAEDecode", at=(5, 0), size=(220, 50), samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", at=(5, 2), size=(420, 400), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


def word_inpaint(name: str) -> Graph:
    """(d) The seed's "Cross Attention Map" method: an image is generated, CrossAttentionMask finds
    where a word of its prompt ("hand") is from the UNet's cross-attention, and RePaint regenerates
    that region with a refined prompt; everything else is kept."""
    g = Graph(name, "Cross-attention inpainting: the mask of a word of the prompt (here 'hand') comes from the "
                    "UNet's cross-attention maps, and RePaint regenerates only that region. The heatmap shows "
                    "where the word attends.")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name="v1-5-pruned-emaonly.safetensors")
    text = "a photo of a woman waving her hand, city park in the background"
    prompt = g.add("CLIPTextEncode", "Prompt", at=(1, 0), size=(360, 140), clip=ckpt[1], text=text)
    negative = g.add("CLIPTextEncode", "Negative prompt", at=(1, 3), size=(360, 140), clip=ckpt[1], text=NEGATIVE)
    empty = g.add("EmptyLatentImage", at=(1, 6), size=(320, 110), width=512, height=512, batch_size=1)
    first = g.add("KSampler", "Generate", at=(2, 0), size=(320, 270), model=ckpt[0], seed=42, steps=30, cfg=7.5,
                  sampler_name="euler", scheduler="normal", positive=prompt[0], negative=negative[0],
                  latent_image=empty[0], denoise=1.0)
    picture = g.add("VAEDecode", at=(2, 5), size=(220, 50), samples=first[0], vae=ckpt[2])
    where = g.add("CrossAttentionMask", at=(3, 0), size=(340, 330), model=ckpt[0], clip=ckpt[1], text=text,
                  words="hand", latent=first[0], noise_level=0.5, seed=0, threshold=0.3, image=picture[0])
    g.add("SaveImage", "Heatmap of 'hand'", at=(3, 6), size=(320, 330), images=where[1],
          filename_prefix=f"consistent-synthesis/{name}_heatmap")
    masked = g.add("SetLatentNoiseMask", at=(4, 0), size=(240, 50), samples=first[0], mask=where[0])
    refined = g.add("CLIPTextEncode", "Prompt for the masked region", at=(4, 2), size=(360, 140), clip=ckpt[1],
                    text="a photo of a woman waving her hand, detailed hand with five fingers, city park")
    sampler = g.add("RePaintKSampler", at=(5, 0), size=(320, 380), model=ckpt[0], seed=7, steps=50, cfg=7.5,
                    sampler_name="euler_ancestral", scheduler="normal", positive=refined[0], negative=negative[0],
                    latent_image=masked[0], denoise=1.0, jump_length=10, jump_n_sample=10,
                    resample_start=0.0, resample_end=1.0)
    decode = g.add("VAEDecode", at=(6, 0), size=(220, 50), samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", at=(6, 2), size=(420, 400), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


def particle_outpaint(name: str) -> Graph:
    """(c') The pose-edited outpaint with the particle sampler: the cropped person is padded below and
    its skeleton completed (Pose Edit Outpaint), an openpose ControlNet shapes the new body, and
    Particle Inpaint KSampler (SMCDiff: 8 particles weighted by the known region, one drawn by weight)
    completes the canvas so the new part continues what the known part implies. Every particle is
    saved too, heaviest first, to choose from."""
    g = Graph(name, "Particle outpainting: the cropped person continues below the frame in the completed pose; 8 "
                    "particles are weighted by how well they agree with the known pixels and one is drawn by "
                    "weight, so the new body follows the known part. All particles are saved too, heaviest first.")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name="v1-5-pruned-emaonly.safetensors")
    image = g.add("LoadImage", "Person (cropped)", at=(0, 3), size=(320, 320), image=PERSON_IMAGE)
    pose = g.add("PoseEditOutpaint", at=(1, 0), size=(340, 330), image=image[0], pad_left=0, pad_top=0,
                 pad_right=0, pad_bottom=256, feathering=40, completion="auto", edits="")
    positive = g.add("CLIPTextEncode", "Prompt", at=(1, 6), size=(360, 140), clip=ckpt[1],
                     text="a photo of a woman in a red jacket and blue jeans, full body, standing")
    negative = g.add("CLIPTextEncode", "Negative prompt", at=(1, 9), size=(360, 140), clip=ckpt[1], text=NEGATIVE)
    controlnet = g.add("ControlNetLoader", at=(2, 8), size=(320, 60),
                       control_net_name="control_v11p_sd15_openpose_fp16.safetensors")
    control = g.add("ControlNetApplyAdvanced", at=(2, 4), size=(320, 190), positive=positive[0],
                    negative=negative[0], control_net=controlnet[0], image=pose[2], strength=1.0, start_percent=0.0,
                    end_percent=1.0)
    encode = g.add("VAEEncode", at=(2, 0), size=(220, 50), pixels=pose[0], vae=ckpt[2])
    canvas = g.add("SetLatentNoiseMask", "Canvas (mask = new area)", at=(2, 2), size=(240, 50), samples=encode[0],
                   mask=pose[1])
    sampler = g.add("ParticleInpaintKSampler", at=(3, 0), size=(320, 400), model=ckpt[0], seed=42, steps=20, cfg=7.5,
                    sampler_name="euler_ancestral", scheduler="normal", positive=control[0], negative=control[1],
                    latent_image=canvas[0], denoise=1.0, particles=8, resample_threshold=0.0, resample_below=1.0,
                    twisted=False)
    decode = g.add("VAEDecode", at=(4, 0), size=(220, 50), samples=sampler[0], vae=ckpt[2])
    keep = g.add("ImageCompositeMasked", "Composite original pixels", at=(4, 2), size=(320, 160),
                 destination=pose[0], source=decode[0], x=0, y=0, resize_source=False, mask=pose[1])
    g.add("SaveImage", at=(5, 0), size=(420, 400), images=keep[0], filename_prefix=f"consistent-synthesis/{name}")
    every = g.add("VAEDecode", "VAE Decode (every particle)", at=(4, 6), size=(220, 50), samples=sampler[1],
                  vae=ckpt[2])
    g.add("SaveImage", "Save Image (particles, heaviest first)", at=(5, 7), size=(420, 300), images=every[0],
          filename_prefix=f"consistent-synthesis/{name}_particles")
    return g


STORY_SETTINGS = "sitting in the beach\nstanding in the snow\nplaying in the park\nin the circus"


def consistory(name: str, checkpoint: str, size: int, family: str, sdxl: bool, injection: bool = False,
               save: bool = False) -> Graph:
    """(e) ConsiStory: one subject across a batch of prompts, from text alone. Story Prompts types the
    story once (official CLI: style + subject + one setting per line); the first two images are the
    anchors whose subject every image attends to; 50 DDIM steps. SDXL as the official run: CFG 5,
    a zero negative (diffusers' SDXL zeroes an empty negative prompt) and FreeU (s1 0.6, s2 0.4,
    b1 1.1, b2 1.2); SD1.5 has no official settings: CFG 7.5 with an empty negative prompt, no FreeU.
    ``injection``: the official second pass (feature injection) after the shared attention, as the
    official run script does by default; ``save``: the anchors are also written as a reusable subject."""
    description = (f"ConsiStory ({family}): the same subject in every setting line of Story Prompts, from text "
                   "alone. The first two images are the anchors that define the subject's identity (keep their "
                   "settings simple); lower mask_dropout for a closer identity, raise it for more varied poses.")
    if injection:
        description += (" Feature Injection runs the sampler twice (the official second pass): in the second, each "
                        "image's subject takes its nearest anchor's features, so textures and small parts match.")
    if save:
        description += (" Save Subject writes the anchors to models/consistory_subjects when the sampler ends; "
                        "consistory_subject_reuse draws new settings of this subject from that file.")
    g = Graph(name, description)
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name=checkpoint)
    story = g.add("StoryPrompts", at=(1, 0), size=(350, 330), clip=ckpt[1], style="A photo of ",
                  subject="a cute dog", settings=STORY_SETTINGS, subject_words="dog")
    model, negative = _consistory_model(g, ckpt, story, sdxl)
    empty = g.add("EmptyLatentImage", "Empty Latent Image (one per setting)", at=(2, 0), size=(320, 110),
                  width=size, height=size, batch_size=story[2])
    patch = g.add("ConsiStoryAttentionPatch", at=(2, 3), size=(340, 300), model=model, anchors=2,
                  mask_dropout=0.5, seed=40, start_step=1, end_step=-1, blocks="up", share_queries=True,
                  subject_tokens=story[1], token_sharing="consistory")
    model = patch[0]
    if injection:
        model = g.add("ConsiStoryFeatureInjection", at=(2, 9.5), size=(340, 60), model=model, alpha=0.8)[0]
    if save:
        model = g.add("ConsiStorySaveSubject", at=(2, 11.5), size=(340, 60), model=model,
                      filename_prefix=SUBJECT_PREFIX)[0]
    _consistory_sampling(g, name, model, story[0], negative, empty, ckpt[2], cfg=5.0 if sdxl else 7.5)
    return g


SUBJECT_PREFIX = "consistory_subject"  # ConsiStory Save Subject appends _00001, _00002, ...
REUSE_SETTINGS = "reading a book in a library\nsailing on a small boat"


def consistory_reuse(name: str, checkpoint: str, size: int, family: str, sdxl: bool) -> Graph:
    """(e') A saved ConsiStory subject in new settings (the official cached mode, ``run_extra_generation``,
    both stages as its default ``perform_injection``): the batch holds only the new settings; every
    image attends to the anchors saved by ``consistory_subject_save`` and, in the second pass, takes
    their injected features; the same model, size, steps and scheduler as the saving run."""
    g = Graph(name, f"ConsiStory ({family}) with a saved subject: run consistory_subject_save once, then draw new "
                    "settings of its subject here; the anchors are read from the file instead of being generated "
                    "again, and Feature Injection takes their details from the file too. Keep the model, size, steps, "
                    "scheduler and ConsiStory Attention Patch's blocks and steps of the saving run (a mismatch is "
                    "refused).")
    ckpt = g.add("CheckpointLoaderSimple", at=(0, 0), size=(320, 100), ckpt_name=checkpoint)
    story = g.add("StoryPrompts", at=(1, 0), size=(350, 330), clip=ckpt[1], style="A photo of ",
                  subject="a cute dog", settings=REUSE_SETTINGS, subject_words="dog")
    model, negative = _consistory_model(g, ckpt, story, sdxl)
    empty = g.add("EmptyLatentImage", "Empty Latent Image (one per setting)", at=(2, 0), size=(320, 110),
                  width=size, height=size, batch_size=story[2])
    patch = g.add("ConsiStoryAttentionPatch", "ConsiStory Attention Patch (as when saved)", at=(2, 3),
                  size=(340, 300), model=model, anchors=2, mask_dropout=0.5, seed=40, start_step=1, end_step=-1,
                  blocks="up", share_queries=True, subject_tokens=story[1], token_sharing="consistory")
    injection = g.add("ConsiStoryFeatureInjection", at=(2, 9.5), size=(340, 60), model=patch[0], alpha=0.8)
    load = g.add("ConsiStoryLoadSubject", at=(2, 11.5), size=(340, 60), model=injection[0],
                 subject=f"{SUBJECT_PREFIX}_00001.safetensors")
    _consistory_sampling(g, name, load[0], story[0], negative, empty, ckpt[2], cfg=5.0 if sdxl else 7.5)
    return g


def _consistory_model(g: Graph, ckpt: Node, story: Node, sdxl: bool) -> tuple:
    """The model and negative of the official run: SDXL with FreeU and a zero negative, SD1.5 plain."""
    if sdxl:
        negative = g.add("ConditioningZeroOut", "Negative (zero, as the official SDXL run)", at=(1, 6.5),
                         size=(350, 30), conditioning=story[0])
        model = g.add("FreeU", "FreeU (official ConsiStory settings)", at=(0, 3), size=(320, 130), model=ckpt[0],
                      b1=1.1, b2=1.2, s1=0.6, s2=0.4)[0]
        return model, negative[0]
    negative = g.add("CLIPTextEncode", "Negative prompt (empty)", at=(1, 6.5), size=(350, 100), clip=ckpt[1], text="")
    return ckpt[0], negative[0]


def _consistory_sampling(g: Graph, name: str, model, positive, negative, latent: Node, vae, cfg: float) -> None:
    """The official sampling (50 DDIM steps, seed 40), decoded and saved."""
    sampler = g.add("KSampler", at=(3, 0), size=(320, 270), model=model, seed=40, steps=50, cfg=cfg,
                    sampler_name="ddim", scheduler="ddim_uniform", positive=positive, negative=negative,
                    latent_image=latent[0], denoise=1.0)
    decode = g.add("VAEDecode", at=(4, 0), size=(220, 50), samples=sampler[0], vae=vae)
    g.add("SaveImage", at=(4, 2), size=(520, 400), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")


def consistory_flux(name: str) -> Graph:
    """(e'') ConsiStory on FLUX.1-dev (no official Flux setting exists): shared attention over the image
    tokens of the single-stream blocks (the decoder's analogue), from step 1, the official anchors,
    dropout and vanilla queries; FLUX.1-dev's own sampling (28 euler steps, guidance 3.5, cfg 1).
    Story Prompts' token indices follow Flux's T5 context."""
    g = Graph(name, "ConsiStory on FLUX.1-dev: the same subject in every setting line of Story Prompts, from text "
                    "alone. The image tokens of Flux's single-stream blocks attend to the anchors' subject (text "
                    "tokens are never shared). Guidance is set once for the batch, after Story Prompts.")
    unet = g.add("UNETLoader", at=(0, 0), size=(320, 90), unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", at=(0, 2.5), size=(320, 130), clip_name1="clip_l.safetensors",
                 clip_name2="t5xxl_fp8_e4m3fn.safetensors", type="flux")
    vae = g.add("VAELoader", at=(0, 6), size=(320, 60), vae_name="ae.safetensors")
    story = g.add("StoryPrompts", at=(1, 0), size=(350, 330), clip=clip[0], style="A photo of ",
                  subject="a cute dog", settings=STORY_SETTINGS, subject_words="dog")
    guided = g.add("FluxGuidance", at=(1, 6.5), size=(350, 60), conditioning=story[0], guidance=3.5)
    # cfg 1: FLUX.1-dev is guidance-distilled, so the negative is never evaluated
    negative = g.add("ConditioningZeroOut", "Negative (unused at cfg 1)", at=(1, 8.5), size=(350, 30),
                     conditioning=story[0])
    empty = g.add("EmptySD3LatentImage", "Empty Latent Image (one per setting)", at=(2, 0), size=(320, 110),
                  width=1024, height=1024, batch_size=story[2])
    patch = g.add("ConsiStoryAttentionPatch", at=(2, 3), size=(340, 300), model=unet[0], anchors=2,
                  mask_dropout=0.5, seed=40, start_step=1, end_step=-1, blocks="up", share_queries=True,
                  subject_tokens=story[1], token_sharing="consistory")
    sampler = g.add("KSampler", at=(3, 0), size=(320, 270), model=patch[0], seed=40, steps=28, cfg=1.0,
                    sampler_name="euler", scheduler="simple", positive=guided[0], negative=negative[0],
                    latent_image=empty[0], denoise=1.0)
    decode = g.add("VAEDecode", at=(4, 0), size=(220, 50), samples=sampler[0], vae=vae[0])
    g.add("SaveImage", at=(4, 2), size=(520, 400), images=decode[0], filename_prefix=f"consistent-synthesis/{name}")
    return g


INPUT_IMAGE = "consistent_synthesis_room.png"
PERSON_IMAGE = "consistent_synthesis_person.png"


def write_person_image(path: Path) -> None:
    """A small procedural 'photo' of a person cropped at the waist (256 x 256)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), (180, 200, 220))
    draw = ImageDraw.Draw(img)
    draw.ellipse((100, 30, 156, 96), fill=(230, 190, 160))  # head
    draw.rectangle((92, 20, 164, 44), fill=(70, 50, 30))  # hair
    draw.rectangle((118, 94, 138, 110), fill=(220, 180, 150))  # neck
    draw.polygon([(70, 116), (186, 116), (176, 256), (80, 256)], fill=(190, 30, 40))  # jacket
    draw.polygon([(70, 116), (52, 200), (66, 206), (84, 130)], fill=(180, 25, 35))  # arms
    draw.polygon([(186, 116), (204, 200), (190, 206), (172, 130)], fill=(180, 25, 35))
    path.parent.mkdir(exist_ok=True)
    img.save(path, optimize=True)


def write_input_image(path: Path) -> None:
    """A small procedural RGBA picture with a transparent hole (LoadImage's MASK: 1 = generate)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (256, 256), (214, 198, 170, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 176, 255, 255), fill=(120, 86, 60, 255))  # floor
    draw.rectangle((24, 110, 150, 180), fill=(70, 90, 140, 255))  # sofa
    draw.rectangle((24, 96, 44, 180), fill=(60, 78, 122, 255))
    draw.ellipse((180, 60, 236, 116), fill=(60, 130, 70, 255))  # plant
    draw.rectangle((200, 116, 216, 180), fill=(110, 70, 40, 255))
    draw.rectangle((96, 40, 160, 96), fill=(0, 0, 0, 0))  # the area to inpaint
    path.parent.mkdir(exist_ok=True)
    img.save(path, optimize=True)


WORKFLOWS = {
    "masactrl_sd15": lambda: masactrl_synthesis("masactrl_sd15", "v1-5-pruned-emaonly.safetensors", 512, 10, "SD1.5"),
    "masactrl_sdxl": lambda: masactrl_synthesis("masactrl_sdxl", "sd_xl_base_1.0.safetensors", 1024, 44, "SDXL"),
    "masactrl_flux": lambda: masactrl_flux("masactrl_flux"),
    "consistent_character": lambda: consistent_character("consistent_character"),
    "masactrl_real_image": lambda: masactrl_real_image("masactrl_real_image"),
    "repaint_inpaint": lambda: repaint("repaint_inpaint", outpaint=False),
    "repaint_outpaint": lambda: repaint("repaint_outpaint", outpaint=True),
    "word_inpaint": lambda: word_inpaint("word_inpaint"),
    "particle_outpaint": lambda: particle_outpaint("particle_outpaint"),
    "consistory_sd15": lambda: consistory("consistory_sd15", "v1-5-pruned-emaonly.safetensors", 512, "SD1.5", False),
    "consistory_sdxl": lambda: consistory("consistory_sdxl", "sd_xl_base_1.0.safetensors", 1024, "SDXL", True),
    "consistory_sdxl_injection": lambda: consistory("consistory_sdxl_injection", "sd_xl_base_1.0.safetensors", 1024,
                                                    "SDXL", True, injection=True),
    "consistory_flux": lambda: consistory_flux("consistory_flux"),
    "consistory_subject_save": lambda: consistory("consistory_subject_save", "v1-5-pruned-emaonly.safetensors", 512,
                                                  "SD1.5", False, injection=True, save=True),
    "consistory_subject_reuse": lambda: consistory_reuse("consistory_subject_reuse", "v1-5-pruned-emaonly.safetensors",
                                                         512, "SD1.5", False),
}


def render(graph: Graph) -> dict[Path, str]:
    """File path -> text of the two files of one workflow."""
    return {HERE / f"{graph.name}.json": _dump(graph.ui()), API_DIR / f"{graph.name}.json": _dump(graph.api())}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a file differs from the description")
    args = parser.parse_args(argv)
    stale = []
    for name, write in ((INPUT_IMAGE, write_input_image), (PERSON_IMAGE, write_person_image)):
        image = HERE / "input" / name
        if not image.is_file():
            if args.check:
                stale.append(image)
            else:
                write(image)
    for make in WORKFLOWS.values():
        for path, text in render(make()).items():
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(path)
            else:
                path.parent.mkdir(exist_ok=True)
                path.write_text(text)
    if stale:
        sys.stderr.write("out of date (run python workflows/build.py): " + ", ".join(map(str, stale)) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
