"""Real-image editing by inversion (MasaCtrl Sec. 4.3): InvertLatent and MasaCtrlInvertedSource.

``InvertLatent`` runs the deterministic sampler backwards from a VAE-encoded image (math in
``samplers/inversion.py``) and returns the inverted noise as ``samples`` with the whole path:

* ``inversion_path``: ``steps + 1`` latents, clean first, each shaped like ``samples`` and in its
  units (the LATENT units of VAE Encode: the host's ``process_latent_out`` of the sampler space);
* ``inversion_sigmas``: the noise levels they sit at, ascending from 0: the run's sigmas reversed;
* ``inversion_settings``: the steps, scheduler and denoise, for the messages below.

``MasaCtrlInvertedSource`` puts three keyed wrappers on a clone of the model, so a stock KSampler
draws MasaCtrl from the real image as the paper does:

* OUTER_SAMPLE, once a run: checks that the run's sigmas are the inversion's (else a ValueError
  that says which steps, scheduler and denoise to use), that row 0 of the sampled latent is this
  inversion's noise (MasaCtrl Latent Batch with ``inverted`` on; otherwise the run is left alone),
  converts the path into the sampler's space once, and sets row 0 of the result to the clean latent;
* SAMPLER_SAMPLE: replaces the run's noise so every row starts at the inverted noise;
* APPLY_MODEL, every model call: sets the source row of every cond/uncond chunk to the path's latent
  at the call's sigma, chosen on the device (no host sync), so heun's second evaluation and RePaint's
  jumps back up read the right level too.
"""

from __future__ import annotations

import logging

import torch

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..samplers import inversion, run_context
from . import checks, host_compat
from . import run_context as run_context_nodes

WRAPPER_KEY = "consistent_synthesis.inverted_source"
PATH_KEYS = ("inversion_path", "inversion_sigmas", "inversion_settings")
# KSampler drops the penultimate level for these samplers, so their runs never match an inversion.
SHORTENED_SCHEDULE = frozenset(getattr(comfy.samplers.KSampler, "DISCARD_PENULTIMATE_SIGMA_SAMPLERS", ()))
INVERSION_SAMPLER = "euler"  # any sampler that keeps every level gives the same sigmas


def schedule(model, steps: int, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas a KSampler with these settings runs (descending, to 0)."""
    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=INVERSION_SAMPLER,
                                   scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas


def invert_latent(model, positive, negative, latent: dict, steps: int, scheduler: str, cfg: float,
                  denoise: float, node: str = "InvertLatent") -> dict:
    """The inverted LATENT of ``latent`` (see the module docstring)."""
    samples = latent["samples"]
    sigmas = schedule(model, steps, scheduler, denoise).cpu()
    if len(sigmas) < 2:
        raise ValueError(f"{node}: input 'denoise' is {denoise}, which leaves no step to invert; use a denoise "
                         "above 0 (1.0 inverts to pure noise, as the paper does).")
    ascending = sigmas.flip(0)
    found = {}

    model_sampling = model.get_model_object("model_sampling")

    def input_scale(sigma):  # c_in of the model type: 1 / sqrt(1 + sigma^2) for EPS and V, 1 for flow
        return model_sampling.calculate_input(sigma, torch.ones_like(sigma))

    def invert_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        steps_done = (lambda i, x0_hat, x: callback({"i": i, "denoised": x0_hat, "x": x})) if callback else None
        noise, path = inversion.invert(lambda x, sigma: model_k(x, sigma, **extra_args), x, sigmas, steps_done,
                                       input_scale)
        found["path"] = path
        return noise

    x = host_compat.fix_empty_latent_channels(model, latent)
    # sigma 0 first: the host starts the sampler at noise_scaling(0, 0, latent) = the latent itself
    comfy.sample.sample_custom(model, torch.zeros_like(x), cfg, comfy.samplers.KSAMPLER(invert_sampler), ascending,
                               positive, negative, x, callback=latent_preview.prepare_callback(model, steps),
                               disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
    path = found["path"]
    base = model.model
    clean = x if torch.count_nonzero(x) > 0 else None  # the host leaves an all-zero latent unscaled
    levels = [base.process_latent_out(p) if clean is not None else p for p in path[1:]]
    path = torch.stack([x.to(path)] + [p.to(path) for p in levels]).to(samples.dtype).cpu()
    settings = {"steps": steps, "scheduler": scheduler, "denoise": denoise, "cfg": cfg}
    logging.info("%s: inverted %d steps (%s, denoise %s, cfg %s) to sigma %.4g.", node, steps, scheduler,
                 denoise, cfg, float(ascending[-1]))
    return {"samples": path[-1].clone(), "inversion_path": path, "inversion_sigmas": ascending.float(),
            "inversion_settings": settings}


class InvertLatent(io.ComfyNode):
    """DDIM inversion of a VAE-encoded image, keeping every level's latent."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InvertLatent",
            display_name="Invert Latent (DDIM inversion)",
            category="consistent synthesis/MasaCtrl",
            description=("Runs the deterministic sampler backwards from a VAE-encoded image to the noise that "
                         "gives it back (DDIM inversion; Euler on the velocity for flow models), keeping the "
                         "latent of every level. Feed it to MasaCtrl Latent Batch as the source and to MasaCtrl "
                         "Inverted Source, and sample with the same steps, scheduler and denoise."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model to invert with: the plain checkpoint (with your LoRAs), not the MasaCtrl-patched one.")),
                io.Conditioning.Input("positive", tooltip=(
                    "The source image's prompt (the paper inverts with it, cfg 1).")),
                io.Conditioning.Input("negative", tooltip="The negative prompt; unused at cfg 1."),
                io.Latent.Input("latent", tooltip="The real image, from VAE Encode (one image or a batch)."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip=(
                    "Steps of the inversion; the KSampler that edits must use the same steps.")),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Noise schedule; the KSampler must use the same one."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=(
                    "Guidance while inverting. 1 (the paper's default) inverts best; higher values follow the "
                    "prompt more and reconstruct worse.")),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Fraction of the schedule to invert (1.0: up to pure noise). The KSampler must use the same.")),
            ],
            outputs=[io.Latent.Output(tooltip=(
                "The inverted noise as samples, with the path of latents (clean first) and its noise levels."))],
        )

    @classmethod
    def validate_inputs(cls, scheduler=None):
        # ComfyUI 0.3.x does not check a V3 combo's value itself
        return checks.combo_problem("InvertLatent", "scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS) or True

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, scheduler, cfg, denoise) -> io.NodeOutput:
        checks.inputs(cls, locals())
        checks.latent_for_model("InvertLatent", "latent", latent, model)
        return io.NodeOutput(invert_latent(model, positive, negative, latent, steps, scheduler, cfg, denoise))


class _RunState:
    """One sampling run's inverted source: the path in sampler space, on the run's device."""

    __slots__ = ("path", "sigmas", "batch")

    def __init__(self, path: torch.Tensor, sigmas: torch.Tensor, batch: int):
        self.path, self.sigmas, self.batch = path, sigmas, batch


def _run_state(transformer_options: dict) -> _RunState | None:
    context = run_context.current(transformer_options)
    return None if context is None else context.peek(WRAPPER_KEY)


def _mismatch(node: str, run: torch.Tensor, settings: dict) -> str:
    return (f"{node}: the sampler's {len(run) - 1} steps from sigma {float(run[0]):.4g} are not the inversion's "
            f"{settings['steps']} steps ({settings['scheduler']} scheduler, denoise {settings['denoise']}). Set the "
            f"KSampler to steps {settings['steps']}, scheduler {settings['scheduler']}, denoise {settings['denoise']} "
            f"(and a sampler other than {', '.join(sorted(SHORTENED_SCHEDULE))}, which drop a level), or "
            "invert again with the KSampler's settings.")


def check_sigmas(run: torch.Tensor, ascending: torch.Tensor, settings: dict, node: str) -> None:
    """Raise unless the run's sigmas (descending) are the inversion's reversed."""
    if not inversion.same_levels(run, ascending):
        raise ValueError(_mismatch(node, run.detach().float().cpu(), settings))


def source_row(latent_image: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor, node: str) -> str:
    """What row 0 of the sampled latent is: this inversion's noise (``"inverted"``), its clean image
    (``"reference"``: MasaCtrl Latent Batch with 'inverted' off), or else a ValueError: a latent of
    another size or another image would be edited without the real photo's keys and values."""
    row = inversion.source_row(latent_image, noise, clean)
    if row == "other size":
        size, inverted_size = tuple(latent_image.shape[2:]), tuple(noise.shape[2:])
        raise ValueError(
            f"{node}: input 'inverted' is the inversion of a {'x'.join(map(str, inverted_size))} latent "
            f"({noise.shape[1]} channels), but the KSampler samples {'x'.join(map(str, size))} latents "
            f"({latent_image.shape[1]} channels). Connect the same Invert Latent output to MasaCtrl Latent Batch "
            "'source' and to this node's 'inverted' (the batch is built from the inverted image's size).")
    if row != "other image":
        return row
    raise ValueError(
        f"{node}: row 0 of the sampled latent is neither the noise of input 'inverted' nor its image: the "
        "batch was made from another image (or another Invert Latent run), so the source would not be the real "
        "photo. Connect the same Invert Latent output to MasaCtrl Latent Batch 'source' and to this node's "
        "'inverted'.")


def inverted_source_patch(model, inverted: dict, node: str = "MasaCtrlInvertedSource"):
    """A clone of ``model`` whose runs start from ``inverted``'s noise and drive row 0 along its path."""
    missing = [key for key in PATH_KEYS if key not in inverted]
    if missing:
        raise ValueError(f"{node}: input 'inverted' has no {missing[0]}; connect the output of Invert Latent.")
    path_latent = inverted["inversion_path"]
    ascending = inverted["inversion_sigmas"]
    settings = inverted["inversion_settings"]
    noise = inverted["samples"]
    if noise.shape[0] != 1:
        raise ValueError(f"{node}: input 'inverted' holds {noise.shape[0]} latents; invert one image for the source.")

    def outer_sample(executor, noise_in, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        if source_row(latent_image, noise, path_latent[0], node) == "reference":
            logging.info("%s: row 0 of the sampled latent is the clean reference (MasaCtrl Latent Batch with "
                         "'inverted' off): it is re-noised, not driven along the inversion.", node)
            return executor(noise_in, latent_image, sampler, sigmas, *args, **kwargs)
        check_sigmas(sigmas, ascending, settings, node)
        base = guider.model_patcher.model
        device = sigmas.device
        # the sampler's space, once a run: the host applies process_latent_in to the whole latent batch
        path = base.process_latent_in(path_latent[:, 0].to(device))
        state = _RunState(path, sigmas.flip(0).to(device), latent_image.shape[0])
        with run_context_nodes.opened(guider.model_options.setdefault("transformer_options", {})) as context:
            context.state(WRAPPER_KEY, lambda: state)
            out = executor(noise_in, latent_image, sampler, sigmas, *args, **kwargs)
        out = out.clone()
        out[:1] = path_latent[0].to(out)  # the source row is the real image, exactly
        return out

    def sampler_sample(executor, guider, sigmas, extra_args, callback, noise_in, latent_image=None, *args, **kwargs):
        state = _run_state(extra_args["model_options"].get("transformer_options", {}))
        if state is not None:
            model_sampling = guider.inner_model.model_sampling
            max_denoise = executor.class_obj.max_denoise(guider, sigmas)
            start = state.path[-1:].expand_as(noise_in)
            noise_in = inversion.start_noise(model_sampling.noise_scaling, sigmas[0], start.to(noise_in),
                                             latent_image, max_denoise)
        return executor(guider, sigmas, extra_args, callback, noise_in, latent_image, *args, **kwargs)

    def apply_model(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        state = _run_state(options)
        if state is not None and x.shape[0] % state.batch == 0:
            latent = inversion.path_latent(state.path, state.sigmas, t[:1])
            x = inversion.drive_rows(x, latent, state.batch)
        return executor(x, t, *args, **kwargs)

    patched = model.clone()
    for wrapper_type, fn in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample),
                             (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, sampler_sample),
                             (comfy.patcher_extension.WrappersMP.APPLY_MODEL, apply_model)):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
    return patched


class MasaCtrlInvertedSource(io.ComfyNode):
    """Drives the MasaCtrl source row along a real image's inversion path during a stock KSampler run."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MasaCtrlInvertedSource",
            display_name="MasaCtrl Inverted Source",
            category="consistent synthesis/MasaCtrl",
            description=("For MasaCtrl from a real image (the paper's editing): every image of the batch starts "
                         "from the inverted noise, and before each model call the source (batch position 0) is "
                         "set to the inversion's latent at that noise level, so its keys and values are the real "
                         "image's own. The result's source is the real image. Put it on the model before the "
                         "KSampler; the KSampler must use the inversion's steps, scheduler and denoise."),
            inputs=[
                io.Model.Input("model", tooltip="The model (e.g. after MasaCtrl Attention Patch)."),
                io.Latent.Input("inverted", tooltip="The output of Invert Latent (one image)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the source row driven along the inversion path.")],
        )

    @classmethod
    def execute(cls, model, inverted) -> io.NodeOutput:
        checks.inputs(cls, locals())
        return io.NodeOutput(inverted_source_patch(model, inverted))
