"""API-format prompts: load one, find the model files it names, shrink it for a smoke run."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
API_DIR = REPO / "workflows" / "api"

# Inputs that name a model file, and the models folder the server looks it up in.
DETECTOR_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
MODEL_INPUTS = {
    "ckpt_name": "checkpoints",
    "control_net_name": "controlnet",
    "vae_name": "vae",
    "lora_name": "loras",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
}


@dataclass(frozen=True)
class ModelRef:
    folder: str
    name: str
    node: str


def resolve(path_or_name: str) -> Path:
    """A workflow file, or the name of a shipped API workflow (``masactrl_sd15``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = API_DIR / f"{path.stem if path.suffix == '.json' else path_or_name}.json"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in API_DIR.glob("*.json")))
    raise FileNotFoundError(f"no workflow file {path_or_name!r}; shipped API workflows: {names}")


def load(path: Path) -> dict:
    """The API prompt in ``path``; a UI-format file is refused with a pointer to its API twin."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # a saved /prompt request body
    if not isinstance(data, dict) or "nodes" in data or not all(
            isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path} is not an API-format workflow (a UI-format file has 'nodes' and 'links'); "
                         f"use the file of the same name in workflows/api/, or 'Export (API)' in ComfyUI.")
    return data


def model_refs(prompt: dict) -> list[ModelRef]:
    """Every model file the prompt names, in node order, without duplicates."""
    refs: dict[tuple[str, str], ModelRef] = {}
    for node_id, node in prompt.items():
        for name, value in node.get("inputs", {}).items():
            if name in MODEL_INPUTS and isinstance(value, str):
                refs.setdefault((MODEL_INPUTS[name], value), ModelRef(MODEL_INPUTS[name], value, node_id))
        if node.get("class_type") == "PoseEditOutpaint" and "pose" not in node.get("inputs", {}):
            for name in DETECTOR_FILES:  # no pose connected: the node runs the OpenPose detector
                refs.setdefault(("openpose", name), ModelRef("openpose", name, node_id))
    return list(refs.values())


def override(prompt: dict, width: int | None = None, height: int | None = None, steps: int | None = None,
             seed: int | None = None) -> dict:
    """A copy of ``prompt`` with every literal width/height, steps and seed input set as given."""
    prompt = copy.deepcopy(prompt)
    values = {"width": width, "height": height, "steps": steps, "seed": seed, "noise_seed": seed}
    for node in prompt.values():
        inputs = node.get("inputs", {})
        for name, value in values.items():
            if value is not None and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
    return prompt
