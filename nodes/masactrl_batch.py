"""Put a MasaCtrl source and its targets into one batch for a stock KSampler."""

from __future__ import annotations

import logging

import torch

import comfy.patcher_extension
from comfy_api.latest import io

from ..attention import cross_attention
from . import checks

BATCHED_KEYS = ("pooled_output",)
# Per-prompt settings one batched conditioning holds once: Flux's distilled guidance scale.
SHARED_KEYS = ("guidance",)
# T5-XXL text embeddings (Flux, SD3): there the text tokens join the image tokens' attention.
JOINT_TEXT_WIDTH = 4096
# How many prompts a stacked entry holds (source first), written by stack_conditioning: a run whose latent
# batch has more targets gives each extra target the target prompt (prompts_to_batch).
PROMPT_ROWS = "masactrl_prompt_rows"
WRAPPER_KEY = "consistent_synthesis.masactrl_prompt_rows"


def stack_conditioning(source: list, target: list, node: str = "MasaCtrlConditioningBatch") -> list:
    """CONDITIONING whose batch is the source's prompts followed by the target's."""
    if len(source) != len(target):
        raise ValueError(f"{node}: input 'target' has {len(target)} conditioning entries and 'source' "
                         f"{len(source)}; stack prompts made the same way (one CLIP Text Encode each).")
    out = []
    for (c_s, d_s), (c_t, d_t) in zip(source, target):
        if c_s.shape[-1] != c_t.shape[-1]:
            raise ValueError(f"{node}: input 'target' has text embeddings of width {c_t.shape[-1]} and 'source' "
                             f"{c_s.shape[-1]}; encode both with the same CLIP model.")
        d = dict(d_s)
        for key in BATCHED_KEYS:
            if (key in d_s) != (key in d_t):
                raise ValueError(f"{node}: only one of 'source' and 'target' carries '{key}'; encode both "
                                 "with the same CLIP model.")
            if key in d_s:
                d[key] = torch.cat([d_s[key], d_t[key]])
        for key in SHARED_KEYS:
            if key in d_t and d_t[key] != d_s.get(key):
                logging.warning("%s: the target's %s (%s) differs from the source's (%s); the batch uses the "
                                "source's, so set it after batching.", node, key, d_t[key], d_s.get(key))
        if c_s.shape[1] != c_t.shape[1] and c_s.shape[-1] == JOINT_TEXT_WIDTH:
            logging.warning("%s: the source has %d text tokens and the target %d; in Flux and SD3 the shorter "
                            "prompt is repeated, which weighs its text more than it would alone. Shorten the "
                            "longer prompt to match for exact results.", node, c_s.shape[1], c_t.shape[1])
        ignored = sorted(k for k in d_t if k not in BATCHED_KEYS and k not in d_s and k != PROMPT_ROWS)
        if ignored:
            logging.warning("%s: the target's %s are not carried over; apply them after batching.", node, ignored)
        stacked = torch.cat(cross_attention.repeat_to_common_length([c_s, c_t]))
        d[PROMPT_ROWS] = stacked.shape[0]
        out.append([stacked, d])
    return out


def prompts_to_batch(conds: dict, batch: int) -> None:
    """Fit the stacked prompts of a sampling run to its latent batch of ``batch`` images.

    ComfyUI repeats a conditioning to the latent batch: [source, target] over a source and three
    targets would be [source, target, source, target], the second target drawn with the source's
    prompt. A stack of one source and one target prompt becomes [source, target, target, target]
    instead; a stack of several targets must match the batch. ``conds`` are the run's own cond lists
    (the guider's per-run copies, prompt rows under ``cross_attn``); entries are replaced, not changed.
    """
    for entries in conds.values():
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            rows = entry.get(PROMPT_ROWS) if isinstance(entry, dict) else None
            context = entry.get("cross_attn") if rows is not None else None
            if not isinstance(context, torch.Tensor) or context.shape[0] != rows or rows == batch:
                continue  # not ours, changed since stacking, or already one prompt per image
            if rows == 2 and batch > 2:
                index = torch.tensor([0] + [1] * (batch - 1))
                entry = dict(entry)
                for key in ("cross_attn",) + BATCHED_KEYS:
                    value = entry.get(key)
                    if isinstance(value, torch.Tensor) and value.shape[0] == 2:
                        entry[key] = value.index_select(0, index.to(value.device))
                entries[i] = entry
            elif rows > 2:
                raise ValueError(
                    f"MasaCtrlConditioningBatch: input 'target': the conditioning stacks {rows} prompts (the source "
                    f"and {rows - 1} targets) but the latent batch holds {batch} images (the source and "
                    f"{batch - 1} targets, MasaCtrl Latent Batch 'targets'). Set MasaCtrl Latent Batch 'targets' to "
                    f"{rows - 1}, or give one target prompt for all targets (a single MasaCtrl Conditioning Batch).")


def _prompts_to_batch_wrapper(executor, *args, **kwargs):
    # guider.outer_sample(noise, latent_image, sampler, sigmas, ...): the guider's conds are per-run copies
    conds = getattr(executor.class_obj, "conds", None)
    if isinstance(conds, dict) and args and isinstance(args[0], torch.Tensor):
        prompts_to_batch(conds, args[0].shape[0])
    return executor(*args, **kwargs)


def attach_prompts_to_batch(model_patcher) -> None:
    """Make every sampling run of ``model_patcher`` (a clone the caller owns) fit stacked prompts to the
    latent batch (``prompts_to_batch``), before the host builds the model's conditioning from them."""
    wrappers = model_patcher.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    if _prompts_to_batch_wrapper not in wrappers.get(WRAPPER_KEY, []):
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                           _prompts_to_batch_wrapper)


class MasaCtrlConditioningBatch(io.ComfyNode):
    """Source prompt and target prompt(s) as one batched CONDITIONING."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MasaCtrlConditioningBatch",
            display_name="MasaCtrl Conditioning Batch",
            category="consistent synthesis/MasaCtrl",
            description=("Stacks the source prompt and the target prompt along the batch, so one KSampler "
                         "draws the source and its targets together. Sampled through MasaCtrl Attention Patch, "
                         "one target prompt serves every target of MasaCtrl Latent Batch; chain it for a prompt "
                         "per target. Apply ControlNet after batching."),
            inputs=[
                io.Conditioning.Input("source", tooltip=(
                    "Prompt of the source image (batch position 0), or an earlier batch to extend.")),
                io.Conditioning.Input("target", tooltip=(
                    "Prompt of the next target image(s), appended after the source.")),
            ],
            outputs=[io.Conditioning.Output(tooltip="The source's prompt, then the target prompt(s): one for all "
                                            "targets or one per target.")],
        )

    @classmethod
    def execute(cls, source, target) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(stack_conditioning(source, target))


def _target_rows(target: dict, targets: int, size: tuple, node: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target latents and their noise masks (1 = generate), ``targets`` rows of ``size``."""
    samples = target["samples"]
    if tuple(samples.shape[1:]) != size:
        raise ValueError(f"{node}: input 'target' is a {tuple(samples.shape[1:])} latent but the source is "
                         f"{size}; encode both images at the same size (e.g. scale the reference to the canvas).")
    if samples.shape[0] not in (1, targets):
        raise ValueError(f"{node}: input 'target' holds {samples.shape[0]} latents for {targets} targets; "
                         "give one latent for all targets or one for each.")
    mask = target.get("noise_mask")
    if mask is None:
        mask = torch.ones((samples.shape[0], 1) + size[1:])
    else:
        mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:])).float()
        if mask.shape[0] not in (1, targets):
            raise checks.error(node, "target", f"its noise_mask holds {mask.shape[0]} masks for {targets} "
                               f"target{'s' if targets != 1 else ''}; give one mask for all targets or one for each "
                               "(the mask given to Set Latent Noise Mask).")
        if tuple(mask.shape[-2:]) != size[1:]:
            mask = torch.nn.functional.interpolate(mask, size=size[1:], mode="bilinear")
    return samples.expand((targets,) + size), mask.expand((targets, 1) + size[1:])


def latent_batch(source: dict, targets: int, source_is_reference: bool, share_noise: bool,
                 target: dict | None = None, node: str = "MasaCtrlLatentBatch", inverted: bool = True) -> dict:
    """A LATENT of the source followed by ``targets`` target latents.

    Each row's ``noise_mask`` says what the sampler generates: a reference source is held known
    (0), a target given with its own mask (an inpainting or outpainting canvas) keeps that mask.
    A source from InvertLatent with ``inverted``: every row holds the inverted noise and the
    source is generated (1), driven along its path by MasaCtrlInvertedSource; without
    ``inverted`` its clean latent (the path's first) is the re-noised reference.
    """
    inversion = "inversion_path" in source
    if inversion and not source_is_reference:
        raise ValueError(f"{node}: input 'source' comes from Invert Latent (a real image); set "
                         "'source_is_reference' to true.")
    if inversion and not inverted:
        source = {"samples": source["inversion_path"][0]}
    samples = source["samples"]
    inverted = inversion and inverted
    if samples.shape[0] != 1:
        raise ValueError(f"{node}: input 'source' holds {samples.shape[0]} latents; give one (batch size 1).")
    if targets < 1:
        raise ValueError(f"{node}: input 'targets' is {targets}; MasaCtrl needs at least one target.")
    if "noise_mask" in source and not source_is_reference:
        raise ValueError(f"{node}: input 'source' carries a noise_mask; for a real image as the source set "
                         "'source_is_reference' to true, otherwise give an Empty Latent Image.")
    size = tuple(samples.shape[1:])
    checks.elements(node, "targets", (1 + targets) * samples.numel(), f"the batch of 1 + {targets} latents")
    if target is None:
        target_samples = samples.expand((targets,) + size) if inverted else torch.zeros((targets,) + size)
        target_mask = torch.ones((targets, 1) + size[1:])
    else:
        target_samples, target_mask = _target_rows(target, targets, size, node)
    source_samples = samples if source_is_reference else torch.zeros_like(samples)
    source_mask = torch.full((1, 1) + size[1:], 0.0 if source_is_reference and not inverted else 1.0)
    out = {"samples": torch.cat([source_samples, target_samples.to(samples.dtype)])}
    if share_noise:
        out["batch_index"] = [0] * (1 + targets)
    mask = torch.cat([source_mask, target_mask])
    if bool((mask < 1).any()):
        out["noise_mask"] = mask
    return out


class MasaCtrlLatentBatch(io.ComfyNode):
    """The latent batch for MasaCtrl: source at position 0, then the targets."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MasaCtrlLatentBatch",
            display_name="MasaCtrl Latent Batch",
            category="consistent synthesis/MasaCtrl",
            description=("Builds the latent batch for MasaCtrl: the source first, then the targets. With a "
                         "reference image as the source, the source is held as known through noise_mask = 0 "
                         "and re-noised at every step; the targets (noise_mask = 1) are generated."),
            inputs=[
                io.Latent.Input("source", tooltip=(
                    "One latent: an Empty Latent Image to synthesize the source too, or the VAE-encoded "
                    "reference image (then set source_is_reference).")),
                io.Int.Input("targets", default=1, min=1, max=63, tooltip="Number of target images."),
                io.Boolean.Input("source_is_reference", default=False, tooltip=(
                    "True: the source is a real image, kept as known and re-noised each step "
                    "(use denoise 1.0). False: the source is generated along with the targets.")),
                io.Boolean.Input("share_noise", default=True, tooltip=(
                    "Give every image in the batch the same initial noise, as the MasaCtrl paper does.")),
                io.Latent.Input("target", optional=True, tooltip=(
                    "Optional start of the targets, e.g. an outpainting canvas from VAE Encode + Set Latent "
                    "Noise Mask: its noise_mask (1 = generate) is kept. Empty: targets are generated whole.")),
                io.Boolean.Input("inverted", default=True, optional=True, tooltip=(
                    "For a source from Invert Latent. True: the paper's real-image editing: every image starts "
                    "from the inverted noise and the source follows its inversion path (add MasaCtrl Inverted "
                    "Source to the model). False: the source's clean latent is the re-noised reference.")),
            ],
            outputs=[io.Latent.Output(tooltip="Source then targets, for a stock KSampler.")],
        )

    @classmethod
    def execute(cls, source, targets, source_is_reference, share_noise, target=None, inverted=None) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(latent_batch(source, targets, source_is_reference, share_noise, target,
                                          inverted=inverted is not False))
