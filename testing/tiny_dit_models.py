"""Random-weight Flux and SD3 models built with ComfyUI's own classes: real block structure, tiny width.

Flux keeps FLUX.1-dev's 19 double + 38 single blocks, its guidance embedding, RoPE axes layout
(three axes, theta 10000) and 16-channel latents; only the width shrinks (64 wide, 2 heads of 32).
SD3 keeps SD3.5 Medium's 24 joint blocks (the last one text-pre-only) with MMDiT-X image
self-attention in blocks 0-12 and RMS q/k norm; the host ties SD3's width to ``depth`` (64 per
head), so ``depth`` 2 gives 128 wide and ``num_blocks`` keeps the real block count.
"""

from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_patcher
import comfy.supported_models

from tiny_models import randomize

CONTEXT_DIM = 32
POOLED_DIM = {"flux": 768, "sd3": 2048}
BLOCKS = {"flux": 19 + 38, "sd3": 24}

FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
    "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [4, 14, 14], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}

SD3_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_blocks": 24, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "pos_embed_max_size": 48, "num_patches": 48 * 48,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM,
                                                                       "out_features": 128}},
    "qk_norm": "rms", "x_block_self_attn_layers": list(range(13)),
}


def tiny_dit(kind: str = "flux", seed: int = 0, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over a random-weight Flux (``"flux"``) or SD3 (``"sd3"``) model."""
    if kind == "flux":
        model_config = comfy.supported_models.Flux(dict(FLUX_CONFIG))
        model = comfy.model_base.Flux(model_config)
    else:
        model_config = comfy.supported_models.SD3(dict(SD3_CONFIG))
        model = comfy.model_base.SD3(model_config)
    randomize(model, seed)
    pos_embed = getattr(model.diffusion_model, "pos_embed", None)
    if isinstance(pos_embed, torch.Tensor):  # SD3's buffer, left as torch.empty by the host (a checkpoint fills it)
        with torch.no_grad():  # unset, it held whatever memory it got: NaN in some runs of the suite
            pos_embed.copy_(torch.randn(pos_embed.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    model.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))


def conditioning(kind: str, batch: int = 1, seed: int = 0, tokens: int = 8, guidance: float = 3.5) -> list:
    """A CONDITIONING of random text embeddings with a pooled vector (and Flux's guidance)."""
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(batch, POOLED_DIM[kind], generator=gen)}
    if kind == "flux":
        extra["guidance"] = guidance
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen), extra]]
