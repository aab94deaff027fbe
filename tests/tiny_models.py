"""Random-weight UNets built with ComfyUI's own model classes, small but with the real topology.

The configurations are the host's detected SD1.5 / SD2.1 / SDXL UNet configs with only the
widths shrunk, so block layout, transformer depths (16 self-attention layers for SD1.x/2.x,
70 for SDXL) and the SDXL adm input are those of the real models.
"""

from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

CONTEXT_DIM = 32

_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "dtype": torch.float32,
    "model_channels": 32, "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

UNET_CONFIGS = {
    "sd15": _COMMON | {
        "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False, "num_heads": 8, "num_head_channels": -1,
    },
    "sd21": _COMMON | {
        "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16,
    },
    "sdxl": _COMMON | {
        "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16,
    },
}

MODEL_CONFIG_CLASSES = {
    "sd15": comfy.supported_models.SD15,
    "sd21": comfy.supported_models.SD21UnclipL.__mro__[1],  # SD20: SD2.x base class
    "sdxl": comfy.supported_models.SDXL,
}

SELF_ATTENTION_LAYERS = {"sd15": 16, "sd21": 16, "sdxl": 70}

# The released models' widths, for benchmarks and the full-size end-to-end tier.
FULL_SIZE = {
    "sd15": {"model_channels": 320, "context_dim": 768, "num_heads": 8, "num_head_channels": -1},
    "sd21": {"model_channels": 320, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64},
    "sdxl": {"model_channels": 320, "context_dim": 2048, "num_heads": -1, "num_head_channels": 64},
}


def tiny_model(kind: str = "sd15", model_type=comfy.model_base.ModelType.EPS, seed: int = 0,
               full_size: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over a random-weight UNet of the given family (tiny unless ``full_size``)."""
    config = dict(UNET_CONFIGS[kind]) | (FULL_SIZE[kind] if full_size else {}) | {"dtype": dtype}
    model_config = MODEL_CONFIG_CLASSES[kind](config)
    # the family's class forces its head layout (64 channels a head); keep the shrunk one
    for key in ("num_heads", "num_head_channels"):
        model_config.unet_config[key] = config[key]
    if kind == "sdxl":
        model = comfy.model_base.SDXL(model_config, model_type=model_type)
    else:
        model = comfy.model_base.BaseModel(model_config, model_type=model_type)
    randomize(model, seed)
    model.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled random weights, unit norms: activations stay O(1) through the whole UNet,
    so every layer (attention included) visibly shapes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)


def conditioning(kind: str, batch: int = 1, seed: int = 0, tokens: int = 77, full_size: bool = False) -> list:
    """A CONDITIONING of random text embeddings (with an SDXL pooled vector when needed)."""
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if kind == "sdxl":
        extra["pooled_output"] = torch.randn(batch, 1280, generator=gen)
    width = FULL_SIZE[kind]["context_dim"] if full_size else CONTEXT_DIM
    return [[torch.randn(batch, tokens, width, generator=gen), extra]]
