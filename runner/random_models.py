"""Random-weight model files of the real architectures, for smoke runs and end-to-end tests.

The key layout and shapes come from ComfyUI's own classes, built on the ``meta`` device (no
memory): ``comfy.model_detection`` picks the model config from a UNet config, the config builds
the UNet, its text encoder and the VAE, and ``state_dict_for_saving`` gives the original
single-file checkpoint layout that ``CheckpointLoaderSimple`` detects. The tensors are then drawn
one at a time and streamed into a safetensors file, so memory stays at one tensor, and files are
cached outside the repository (``CS_MODEL_CACHE`` or ``~/.cache/consistent-synthesis/models``).

The host must be importable (``runner.host.activate``) before these functions are called.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path

import torch

try:  # the pack's one reading of a typed-in number list, as its nodes read it
    from ..integer_list import parse_integer_list
except ImportError:  # ``python -m runner`` in the pack's folder: runner is a top-level package there
    from integer_list import parse_integer_list

FORMAT_VERSION = "1"
METADATA = {"consistent_synthesis": "random weights, not a trained model", "format": FORMAT_VERSION}

_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_resblock": False,
    "use_temporal_attention": False, "model_channels": 320,
}

# The released models' UNet configurations (as ComfyUI detects them from the real files).
UNET_CONFIGS = {
    "sd15": _UNET_COMMON | {
        "adm_in_channels": None, "context_dim": 768, "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False, "num_heads": 8, "num_head_channels": -1,
    },
    "sd21": _UNET_COMMON | {
        "adm_in_channels": None, "context_dim": 1024, "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64,
    },
    "sdxl": _UNET_COMMON | {
        "num_classes": "sequential", "adm_in_channels": 2816, "context_dim": 2048,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64,
    },
}

_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# What a model file name stands for: (models folder, kind). Names users download, see the README.
KNOWN_FILES = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints", "sd15"),
    "v1-5-pruned-emaonly-fp16.safetensors": ("checkpoints", "sd15"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", "sdxl"),
    "control_v11p_sd15_openpose_fp16.safetensors": ("controlnet", "controlnet_sd15"),
    "control_v11p_sd15_openpose.pth": ("controlnet", "controlnet_sd15"),
    "body_pose_model.pth": ("openpose", "openpose_detector"),
    "hand_pose_model.pth": ("openpose", "openpose_detector"),
    "facenet.pth": ("openpose", "openpose_detector"),
    # FLUX.1-dev as ComfyUI's Flux examples load it: diffusion model, two text encoders, autoencoder.
    # The diffusion model is a REDUCED-DEPTH stand-in (see FLUX_STAND_IN_DEPTH); the rest is full size.
    "flux1-dev.safetensors": ("diffusion_models", "flux_reduced"),
    "clip_l.safetensors": ("text_encoders", "clip_l"),
    "t5xxl_fp8_e4m3fn.safetensors": ("text_encoders", "t5xxl_fp8"),
    "ae.safetensors": ("vae", "flux_vae"),
}
# FLUX.1-dev has 19 double + 38 single blocks of width 3072 (12 B parameters, 24 GB in bf16), more than
# a 24 GB CPU machine can hold next to T5-XXL; ComfyUI fixes the width and counts the blocks from the
# file, so the stand-in keeps every block's real shape and has fewer of them (1.3 B parameters).
FLUX_STAND_IN_DEPTH = {"depth": 2, "depth_single_blocks": 4}
FLUX_DEV_CONFIG = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
RANDOM_MARK = "RANDOM_WEIGHTS.txt"  # beside random .pth files, which carry no metadata


def cache_dir() -> Path:
    """Where random models are kept: ``CS_MODEL_CACHE`` or ``~/.cache/consistent-synthesis/models``."""
    env = os.environ.get("CS_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "consistent-synthesis" / "models"


def guess_kind(folder: str, name: str) -> str:
    """The random model to stand in for a file a workflow names (by known name, else by its name)."""
    if name in KNOWN_FILES:
        return KNOWN_FILES[name][1]
    if folder in ("diffusion_models", "unet", "text_encoders", "clip", "vae"):
        raise ValueError(f"no random stand-in for {folder}/{name!r}; known: "
                         + ", ".join(n for n, (f, _) in KNOWN_FILES.items() if f == folder))
    if folder == "openpose":
        raise ValueError(f"no random stand-in for {name!r}; the OpenPose detector files are "
                         "body_pose_model.pth, hand_pose_model.pth and facenet.pth")
    xl = "xl" in name.lower()
    if folder == "controlnet":
        if xl:
            raise ValueError(f"no random stand-in for the SDXL ControlNet {name!r}; only SD1.5 ControlNets are built")
        return "controlnet_sd15"
    return "sdxl" if xl else "sd15"


def _unet_model_config(kind: str):
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[kind]))
    if config is None:
        raise RuntimeError(f"this ComfyUI does not recognise the {kind} UNet configuration")
    return config


def checkpoint_layout(kind: str) -> dict[str, torch.Tensor]:
    """Meta tensors keyed as in the original single-file checkpoint of ``kind`` (sd15, sdxl)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = _unet_model_config(kind)
    with torch.device("meta"):
        model = model_config.get_model({}, device="meta")
        clip = model_config.clip_target().clip(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig=dict(_VAE_CONFIG), embed_dim=4)
    return state_dict_for_saving(model, clip.state_dict(), vae.state_dict())


def state_dict_for_saving(model, clip_state_dict: dict, vae_state_dict: dict) -> dict[str, torch.Tensor]:
    """``BaseModel.state_dict_for_saving`` under both of its signatures.

    Up to ComfyUI 0.3.x it reads the UNet weights itself: ``(clip_state_dict=None, vae_state_dict=None,
    ...)``; newer hosts take them first: ``(unet_state_dict, clip_state_dict=None, ...)``, so a
    positional call would hand them the text encoder as the UNet and save a broken checkpoint.
    """
    parameters = inspect.signature(model.state_dict_for_saving).parameters
    extra = {"clip_state_dict": clip_state_dict, "vae_state_dict": vae_state_dict}
    if "unet_state_dict" in parameters:
        return model.state_dict_for_saving(unet_state_dict=model.diffusion_model.state_dict(), **extra)
    return model.state_dict_for_saving(**extra)


def controlnet_layout() -> dict[str, torch.Tensor]:
    """Meta tensors keyed as in the original ControlNet 1.1 SD1.5 files (``control_model.`` prefix)."""
    import comfy.cldm.cldm

    config = dict(_unet_model_config("sd15").unet_config)
    config.pop("out_channels")
    with torch.device("meta"):
        control = comfy.cldm.cldm.ControlNet(hint_channels=3, device="meta", **config)
    return {f"control_model.{k}": v for k, v in control.state_dict().items()}


def stand_in_layers(layers: list[int]) -> list[int]:
    """FLUX.1-dev block numbers moved onto the reduced-depth stand-in: each block to the block of its
    kind (double or single) at the same relative depth, so a published block set still patches both kinds."""
    depth, single = FLUX_DEV_CONFIG["depth"], FLUX_DEV_CONFIG["depth_single_blocks"]
    small_depth, small_single = FLUX_STAND_IN_DEPTH["depth"], FLUX_STAND_IN_DEPTH["depth_single_blocks"]
    return sorted({i * small_depth // depth if i < depth else small_depth + (i - depth) * small_single // single
                   for i in layers})


def fit_to_stand_ins(prompt: dict, built: list, log: bool = True) -> dict:
    """``prompt`` with MasaCtrl block lists moved onto the reduced-depth Flux stand-in, when ``built``
    (the model refs given random stand-ins) holds one; each change is logged unless ``log`` is False."""
    if not any(guess_kind(r.folder, r.name) == "flux_reduced" for r in built):
        return prompt
    prompt = json.loads(json.dumps(prompt))
    for node_id, node in prompt.items():
        text = node.get("inputs", {}).get("layers")
        if node.get("class_type") != "MasaCtrlAttentionPatch" or not isinstance(text, str) or not text.strip():
            continue
        try:  # read as the node reads it; a list the node would refuse reaches it unchanged
            layers = parse_integer_list(text, "MasaCtrlAttentionPatch", "layers", "10, 12, 14")
        except ValueError:
            continue
        moved = ",".join(map(str, stand_in_layers(layers)))
        if log:
            logging.warning("REDUCED-DEPTH Flux stand-in: node %s layers %s -> %s (its %d double + %d single "
                            "blocks).", node_id, text, moved, *FLUX_STAND_IN_DEPTH.values())
        node["inputs"]["layers"] = moved
    return prompt


# Flux parameters that newer hosts' detection adds (FLUX.1 values); given only where the host has them.
_NEWER_FLUX_PARAMS = {"txt_ids_dims": [], "yak_mlp": False, "txt_norm": False}


def flux_config(depth: dict | None = None) -> dict:
    """The Flux configuration the host detects from FLUX.1-dev (``depth``: other block counts)."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return FLUX_DEV_CONFIG | (depth or {}) | {k: v for k, v in _NEWER_FLUX_PARAMS.items() if k in fields}


def flux_layout() -> dict[str, torch.Tensor]:
    """Meta tensors of the reduced-depth FLUX.1-dev stand-in, keyed as ``diffusion_models/`` files are."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(flux_config(FLUX_STAND_IN_DEPTH))
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    return model.diffusion_model.state_dict()


def text_encoder_layout(kind: str) -> dict[str, torch.Tensor]:
    """Meta tensors of a stand-alone text encoder file: CLIP-L (fp16) or T5-XXL (fp8 e4m3, as
    ``t5xxl_fp8_e4m3fn.safetensors``; ComfyUI keeps the weights in the file's dtype)."""
    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip

    with torch.device("meta"):
        if kind == "clip_l":
            encoder = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        else:
            encoder = comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=torch.float8_e4m3fn)
    return encoder.transformer.state_dict()


def flux_vae_layout() -> dict[str, torch.Tensor]:
    """Meta tensors of FLUX.1's autoencoder (16 latent channels, no quant convs), as ``ae.safetensors``."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = dict(_VAE_CONFIG, z_channels=16)
    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return vae.state_dict()


def layout(kind: str) -> dict[str, torch.Tensor]:
    if kind == "controlnet_sd15":
        return controlnet_layout()
    if kind in UNET_CONFIGS:
        return checkpoint_layout(kind)
    if kind == "flux_reduced":
        return flux_layout()
    if kind in ("clip_l", "t5xxl_fp8"):
        return text_encoder_layout(kind)
    if kind == "flux_vae":
        return flux_vae_layout()
    raise ValueError(f"unknown random model kind {kind!r}; known: sd15, sdxl, controlnet_sd15, flux_reduced, "
                     "clip_l, t5xxl_fp8, flux_vae")


def _random_tensor(key: str, meta: torch.Tensor, seed: int) -> torch.Tensor:
    """Fan-in scaled normal weights and unit norm scales, so activations stay O(1) through the model."""
    if meta.ndim == 1 and key.endswith((".weight", ".scale")):  # 1-D weights and scales are norm scales
        return torch.ones(meta.shape, dtype=torch.float16)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    scale = 0.02 if meta.ndim <= 1 else meta[0].numel() ** -0.5
    return (torch.randn(meta.shape, generator=gen) * scale).to(torch.float16)


_FILE_DTYPES = {torch.float8_e4m3fn: "F8_E4M3"}  # meta tensors of these dtypes are written so; the rest fp16


def write_random_safetensors(path: Path, shapes: dict[str, torch.Tensor], seed: int = 0,
                             metadata: dict | None = None) -> None:
    """Stream random fp16 (or fp8, where the meta tensor is fp8) tensors of the given shapes into a
    safetensors file, one tensor in memory.

    The safetensors format: an 8-byte little-endian header length, a JSON header with each
    tensor's dtype, shape and byte range, then the raw little-endian data in that order.
    """
    header, offset = {}, 0
    for key, meta in shapes.items():
        dtype = _FILE_DTYPES.get(meta.dtype, "F16")
        size = meta.numel() * (1 if dtype == "F8_E4M3" else 2)
        header[key] = {"dtype": dtype, "shape": list(meta.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {k: str(v) for k, v in (metadata or {}).items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for key, meta in shapes.items():
                tensor = _random_tensor(key, meta, seed)
                if meta.dtype in _FILE_DTYPES:
                    tensor = tensor.to(meta.dtype).view(torch.uint8)
                f.write(tensor.contiguous().numpy().tobytes())
        os.replace(partial, path)  # atomic: a concurrent run sees the whole file or none
    finally:
        partial.unlink(missing_ok=True)


def is_random_model(path: Path) -> bool:
    """True for a file this module wrote (its safetensors metadata says so)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > 100_000_000:
                return False
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return False
    return header.get("__metadata__", {}).get("consistent_synthesis") == METADATA["consistent_synthesis"]


def ensure(folder: str, name: str, root: Path | None = None, seed: int = 0) -> Path:
    """The cached random stand-in for ``folder/name`` (e.g. checkpoints, v1-5-pruned-emaonly.safetensors),
    built once. The file carries the real name so that workflows run unchanged."""
    root = root or cache_dir()
    kind = guess_kind(folder, name)
    path = root / folder / name
    if kind == "openpose_detector":
        if not (path.is_file() and (path.parent / RANDOM_MARK).is_file()):
            write_openpose_detector(path.parent, seed)
        return path
    if path.is_file() and is_random_model(path):
        return path
    started = time.monotonic()
    logging.warning("Building a RANDOM-WEIGHT %s model as %s (smoke test only, not a trained model)...", kind, path)
    write_random_safetensors(path, layout(kind), seed, METADATA | {"kind": kind})
    logging.warning("Built %s (%.1f GB) in %.0f s.", path, path.stat().st_size / 1e9, time.monotonic() - started)
    return path


def write_openpose_detector(folder: Path, seed: int = 0) -> Path:
    """controlnet_aux's body, hand and face networks with random weights, saved as the
    lllyasviel/Annotators ``.pth`` files are (torch pickles of state dicts), in ``folder``."""
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    logging.warning("Writing a RANDOM-WEIGHT OpenPose detector to %s (smoke test only).", folder)
    for model, name in ((bodypose_model(), "body_pose_model.pth"), (handpose_model(), "hand_pose_model.pth")):
        # the Annotators files name layers without the stage prefix that the module tree adds
        torch.save({k.split(".", 1)[1]: v for k, v in model.state_dict().items()}, folder / name)
    torch.save(FaceNet().state_dict(), folder / "facenet.pth")
    (folder / RANDOM_MARK).write_text(METADATA["consistent_synthesis"] + "\n")
    return folder

