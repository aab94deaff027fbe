"""Where a ComfyUI UNet's self-attention layers are, in MasaCtrl's numbering."""

from __future__ import annotations

LayerKey = tuple[str, int, int]


def _groups(diffusion_model):
    return (
        ("input", getattr(diffusion_model, "input_blocks", None)),
        ("middle", [diffusion_model.middle_block] if getattr(diffusion_model, "middle_block", None) is not None else []),
        ("output", getattr(diffusion_model, "output_blocks", None)),
    )


def transformer_block(diffusion_model, key: LayerKey):
    """The transformer block (its ``attn1`` and ``attn2``) of layer ``key`` (from ``self_attention_layers``)."""
    name, block_id, index = key
    blocks = dict(_groups(diffusion_model))[name]
    for module in blocks[block_id]:
        transformer_blocks = getattr(module, "transformer_blocks", None)
        if transformer_blocks is not None:
            return transformer_blocks[index]
    raise KeyError(key)


def attn1_module(diffusion_model, key: LayerKey):
    """The self-attention module of layer ``key``."""
    return transformer_block(diffusion_model, key).attn1


def self_attention_layers(diffusion_model) -> list[LayerKey]:
    """Every transformer block of the UNet as ``(block_name, block_id, transformer_index)``.

    The list is in execution order (input blocks, middle block, output blocks), which is the
    layer numbering of the official MasaCtrl code: 16 layers for SD1.x/2.x, 70 for SDXL. The
    keys are those of ``ModelPatcher.set_model_attn1_replace``.
    """
    groups = _groups(diffusion_model)
    if groups[0][1] is None or groups[2][1] is None:
        return []
    layers = []
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            for module in block:
                transformer_blocks = getattr(module, "transformer_blocks", None)
                if transformer_blocks is not None:
                    layers.extend((name, block_id, i) for i in range(len(transformer_blocks)))
    return layers
