"""Input checks shared by the pack's nodes, run at the top of ``execute`` before any work.

ComfyUI's prompt validation checks the range of a number typed into a widget, but not a value
that arrives through a link, not a NaN (every comparison with NaN is false), and not the type of
a literal given where a MODEL, MASK, IMAGE, LATENT or CONDITIONING belongs (an API prompt can put
a string there). Such values would fail deep inside torch with Python internals, or silently give
a black image. ``inputs(cls, values)`` checks every input a node declares against its own schema
(the same types, ranges and options the user sees), so a new input is covered without listing it
here, and raises ``ValueError("<Node>: input '<name>': ...")`` naming what to fix.
"""

from __future__ import annotations

import math

import torch

from ..integer_list import parse_integer_list

# One tensor a node of ours builds from its inputs (a latent batch, a padded canvas) may hold at most
# this many values: 1 GiB of float32, far above any real image (SDXL at 1024 px: 64 latents are 4M).
MAX_ELEMENTS = 2**28

# What the user connects for each type, said in the error (the canvas names, not Python's).
WHAT = {
    "MODEL": "a MODEL (from Load Checkpoint, a LoRA loader or another model node)",
    "MASK": "a MASK (a tensor of shape (batch, height, width) with values from 0 to 1)",
    "IMAGE": "an IMAGE (a tensor of shape (batch, height, width, channels) with values from 0 to 1)",
    "LATENT": "a LATENT (a dict with a 'samples' tensor, from Empty Latent Image or VAE Encode)",
    "CONDITIONING": "a CONDITIONING (from CLIP Text Encode or another conditioning node)",
    "SAMPLER": "a SAMPLER (from KSamplerSelect or another sampler node)",
    "SIGMAS": "SIGMAS (a 1-D tensor of noise levels, from a scheduler node)",
    "CLIP": "a CLIP (from Load Checkpoint or a CLIP loader)",
}


def error(node: str, name: str, message: str) -> ValueError:
    return ValueError(f"{node}: input '{name}': {message}")


def masactrl_batch(node: str, batch: int, source_index: int) -> None:
    """A MasaCtrl latent batch needs a target next to the source, and the source inside it."""
    if batch < 2:
        raise error(node, "model", "the latent batch holds one image, so there is no target to control. Put the "
                    "source and its targets in one batch (MasaCtrl Latent Batch, MasaCtrl Conditioning Batch).")
    if source_index >= batch:
        raise error(node, "source_index", f"{source_index} is outside the latent batch of {batch}; "
                    f"use 0 to {batch - 1}.")


def _type_name(value) -> str:
    return type(value).__name__


def _not_finite(tensor: torch.Tensor) -> str | None:
    """'NaN' or 'infinite' when the tensor holds such a value. One float32 sum, which a NaN or an
    infinity makes non-finite, so no mask of the tensor's size is allocated (once per node run)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return None
    if bool(torch.isnan(tensor).any()):
        return "NaN"
    if bool(torch.isinf(tensor).any()):
        return "infinite"
    return None  # finite values whose float32 sum overflows (above 3e38): not ours to refuse


def _wrong_type(node: str, name: str, kind: str, value) -> ValueError:
    return error(node, name, f"expected {WHAT[kind]}, got {_type_name(value)}. Connect the matching output "
                 "to this input instead of a typed-in value.")


def model(node: str, name: str, value) -> None:
    if not (callable(getattr(value, "clone", None)) and hasattr(value, "model_options")
            and callable(getattr(value, "get_model_object", None))):
        raise _wrong_type(node, name, "MODEL", value)


def mask(node: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise _wrong_type(node, name, "MASK", value)
    if value.ndim not in (2, 3) or min(value.shape[-2:]) < 1 or value.numel() == 0:
        raise error(node, name, f"expected a MASK of shape (batch, height, width), got a tensor of shape "
                    f"{tuple(value.shape)}.")
    bad = _not_finite(value)
    if bad:
        raise error(node, name, f"the mask holds {bad} values, which would give a black image. Check the node "
                    "that made it (a division by zero, an empty mask normalised, ...).")


def image(node: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise _wrong_type(node, name, "IMAGE", value)
    if value.ndim != 4 or value.numel() == 0 or not 1 <= value.shape[-1] <= 4:
        raise error(node, name, f"expected an IMAGE of shape (batch, height, width, channels), got a tensor of "
                    f"shape {tuple(value.shape)}.")
    bad = _not_finite(value)
    if bad:
        raise error(node, name, f"the image holds {bad} values, which would give a black image.")


def latent(node: str, name: str, value) -> None:
    if not isinstance(value, dict):
        raise _wrong_type(node, name, "LATENT", value)
    samples = value.get("samples")
    if not isinstance(samples, torch.Tensor):
        raise error(node, name, f"expected {WHAT['LATENT']}, got a {_type_name(value)} whose 'samples' is "
                    f"{_type_name(samples) if 'samples' in value else 'missing'}.")
    if samples.ndim not in (4, 5) or samples.numel() == 0:
        raise error(node, name, f"expected latent samples of shape (batch, channels, height, width), got "
                    f"{tuple(samples.shape)}.")
    bad = _not_finite(samples)
    if bad:
        raise error(node, name, f"the latent holds {bad} values, which would give a black image.")
    if "noise_mask" in value and value["noise_mask"] is not None:
        noise_mask = value["noise_mask"]
        if not isinstance(noise_mask, torch.Tensor) or noise_mask.numel() == 0:
            raise error(node, name, f"the latent's noise_mask must be a non-empty MASK tensor, got "
                        f"{_type_name(noise_mask)}.")
        bad = _not_finite(noise_mask)
        if bad:
            raise error(node, name, f"the latent's noise_mask holds {bad} values, which would give a black "
                        "image. Check the mask given to Set Latent Noise Mask.")


def conditioning(node: str, name: str, value) -> None:
    entries_ok = isinstance(value, list) and all(
        isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
        and isinstance(entry[1], dict) for entry in value)
    if not entries_ok:
        raise _wrong_type(node, name, "CONDITIONING", value)


def clip(node: str, name: str, value) -> None:
    if not (callable(getattr(value, "tokenize", None)) and callable(getattr(value, "encode_from_tokens", None))):
        raise _wrong_type(node, name, "CLIP", value)


def sampler(node: str, name: str, value) -> None:
    if not callable(getattr(value, "sample", None)):
        raise _wrong_type(node, name, "SAMPLER", value)


def sigmas(node: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 1:
        raise _wrong_type(node, name, "SIGMAS", value)


def integer(node: str, name: str, value, low=None, high=None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(node, name, f"expected a whole number, got {_type_name(value)} {value!r:.40}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(node, name, f"{value} is outside {low} to {high}.")


def number(node: str, name: str, value, low=None, high=None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise error(node, name, f"expected a number, got {_type_name(value)} {value!r:.40}.")
    if not math.isfinite(value):
        raise error(node, name, f"{value} is not a finite number; give a value from {low} to {high}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(node, name, f"{value} is outside {low} to {high}.")


def option(node: str, name: str, value, options) -> None:
    if not isinstance(value, str) or value not in options:
        shown = f"one of {list(options)}" if len(options) <= 30 else f"one of the {len(options)} listed options"
        raise error(node, name, f"{value!r:.60} is not {shown}.")


def boolean(node: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise error(node, name, f"expected true or false, got {_type_name(value)} {value!r:.40}.")


def text(node: str, name: str, value) -> None:
    if not isinstance(value, str):
        raise error(node, name, f"expected text, got {_type_name(value)}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone UTF-16 surrogate ("\ud800"), which JSON can carry
        raise error(node, name, f"holds a character that is not text (an unpaired surrogate, "
                    f"U+{ord(value[e.start]):04X}, at position {e.start}); retype the text or remove that "
                    "character.") from None


def integer_list(node: str, name: str, value: str, example: str) -> list[int]:
    """A typed-in list of whole numbers ("10, 12, 14"; blank is []), read by the pack's one rule
    (``integer_list.parse_integer_list``); a malformed list is an error naming node, input and value."""
    return parse_integer_list(value, node, name, example)


_BY_TYPE = {"MODEL": model, "MASK": mask, "IMAGE": image, "LATENT": latent, "CONDITIONING": conditioning,
            "SAMPLER": sampler, "SIGMAS": sigmas, "CLIP": clip, "BOOLEAN": boolean, "STRING": text}


def check(node: str, spec, value) -> None:
    """Check one value against one V3 input declaration (``io.Int.Input(...)`` and the like)."""
    kind = str(getattr(spec, "io_type", ""))
    name = spec.id
    if kind == "INT":
        integer(node, name, value, getattr(spec, "min", None), getattr(spec, "max", None))
    elif kind == "FLOAT":
        number(node, name, value, getattr(spec, "min", None), getattr(spec, "max", None))
    elif kind == "COMBO":
        option(node, name, value, getattr(spec, "options", None) or [])
    elif kind in _BY_TYPE:
        _BY_TYPE[kind](node, name, value)
    # other types (POSE_KEYPOINT, ...) are checked by the node itself where they are read


def inputs(cls, values: dict) -> None:
    """Check every input ``cls`` declares that is present in ``values`` (an optional input left
    unconnected arrives as None and is skipped). Call it first in ``execute``: ``inputs(cls, locals())``."""
    schema = cls.define_schema()
    for spec in schema.inputs:
        if spec.id in values and not (getattr(spec, "optional", False) and values[spec.id] is None):
            check(schema.node_id, spec, values[spec.id])


def combo_problem(node: str, name: str, value, options) -> str | None:
    """For ``validate_inputs``: the message when a typed-in combo value is not one of its options
    (ComfyUI 0.3.x does not check V3 combos itself; a linked value arrives later and is checked then)."""
    if value is None:  # linked, or missing (the host reports a missing input itself)
        return None
    if not isinstance(value, str) or value not in options:
        shown = f"one of {list(options)}" if len(options) <= 30 else f"one of the {len(options)} listed options"
        return f"{node}: input '{name}': {value!r:.60} is not {shown}."
    return None


def elements(node: str, name: str, count: int, what: str) -> None:
    """Refuse to build a tensor of ``count`` values past MAX_ELEMENTS, before allocating it."""
    if count > MAX_ELEMENTS:
        raise error(node, name, f"{what} would hold {count:,} values (more than {MAX_ELEMENTS:,}, about "
                    f"{MAX_ELEMENTS * 4 // 2**30} GiB as float32); use a smaller size or batch.")


# Latent channels of the VAE families a user is most likely to mix up.
_FAMILIES_BY_CHANNELS = {4: "SD1.x, SD2.x or SDXL", 16: "FLUX.1 or SD3"}


def _model_name(model) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return f"this model ({type(config).__name__})" if config is not None else "this model"


def latent_for_model(node: str, name: str, latent: dict, model, dims: tuple[int, ...] = (4,)) -> None:
    """Refuse a LATENT that belongs to another model than ``model`` (a MODEL): a 16-channel FLUX.1
    or SD3 latent for a 4-channel SD model, or a 5-D video latent where an image latent
    ``(batch, channels, height, width)`` belongs (``dims``: the ``ndim``s the node takes).

    The channels are the model's latent format's (``latent_channels``; the UNet's ``in_channels``
    when it has none). An all-zero latent of another channel count passes, as the host's samplers
    take it: ``comfy.sample.fix_empty_latent_channels`` gives it the model's channels (the node must
    call that). Call after ``inputs`` (which checked that ``latent`` is a LATENT)."""
    samples = latent["samples"]
    if samples.ndim not in dims:
        kind = "a 5-D video latent (batch, channels, frames, height, width)" if samples.ndim == 5 else \
            f"a {samples.ndim}-D latent"
        want = " or ".join(f"{d}-D" for d in dims)
        raise error(node, name, f"got {kind} of shape {tuple(samples.shape)}, but {_model_name(model)} takes "
                    f"{want} image latents (batch, channels, height, width); encode the image with this "
                    "checkpoint's VAE (VAE Encode) or use Empty Latent Image.")
    latent_format = model.get_model_object("latent_format")
    channels = getattr(latent_format, "latent_channels", None)
    if channels is None:
        channels = getattr(model.get_model_object("diffusion_model"), "in_channels", None)
    if channels is None or samples.shape[1] == channels:
        return
    if not bool(torch.count_nonzero(samples) == 0):  # once per node run; an empty latent is resized by the host
        got = samples.shape[1]
        family = _FAMILIES_BY_CHANNELS.get(got)
        origin = f" (a {family} VAE's)" if family else ""
        raise error(node, name, f"the latent has {got} channels{origin}, but {_model_name(model)} takes "
                    f"{channels}-channel latents; encode the image with this checkpoint's VAE, the one of "
                    "the MODEL connected here.")
