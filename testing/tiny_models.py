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

from consistent_synthesis.runner.random_models import UNET_CONFIGS as RELEASED

CONTEXT_DIM = 32

# The released models' topology (blocks, transformer depths, attention layout) at a tiny width.
_TINY = {"model_channels": 32, "context_dim": CONTEXT_DIM}
UNET_CONFIGS = {
    "sd15": RELEASED["sd15"] | _TINY,
    "sd21": RELEASED["sd21"] | _TINY | {"num_head_channels": 16},
    "sdxl": RELEASED["sdxl"] | _TINY | {"num_head_channels": 16},
}

MODEL_CONFIG_CLASSES = {
    "sd15": comfy.supported_models.SD15,
    "sd21": comfy.supported_models.SD21UnclipL.__mro__[1],  # SD20: SD2.x base class
    "sdxl": comfy.supported_models.SDXL,
}

SELF_ATTENTION_LAYERS = {"sd15": 16, "sd21": 16, "sdxl": 70}


def tiny_model(kind: str = "sd15", model_type=comfy.model_base.ModelType.EPS, seed: int = 0,
               full_size: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over a random-weight UNet of the given family (tiny unless ``full_size``)."""
    config = dict(RELEASED[kind] if full_size else UNET_CONFIGS[kind]) | {"dtype": dtype}
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
    width = RELEASED[kind]["context_dim"] if full_size else CONTEXT_DIM
    return [[torch.randn(batch, tokens, width, generator=gen), extra]]
