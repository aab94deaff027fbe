"""Cost of real-image editing by inversion, against plain sampling in the same process.

1. InvertLatent's time per step against one step of the stock KSampler (same model, size, cfg 1,
   one image): an inversion step is one model evaluation plus the DDIM update, so the ratio should
   be about 1.
2. The editing run (source + one target, cfg 7.5) with MasaCtrl Inverted Source on the model, against
   the same run without it: the wrapper's cost per step (path lookup and row copy on the device),
   with the host synchronisations each run makes.

Full-size random SD1.5 UNet, on CUDA when there is one (fp16 there).

    python3 benchmarks/inversion_bench.py --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testing"))
sys.path.insert(0, str(REPO / "benchmarks"))

import host  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny test UNet instead of the full-size one")
    args = parser.parse_args()

    host.prepare(use_gpu=True)

    import comfy.model_management
    import comfy.sample

    import tiny_models as tm
    from consistent_synthesis.nodes import inversion as N
    from consistent_synthesis.nodes.masactrl_batch import latent_batch
    from repaint_bench import timed
    from sync_counter import count_host_syncs

    device = comfy.model_management.get_torch_device()
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    model = tm.tiny_model("sd15", full_size=not args.tiny, device=device, dtype=dtype)
    side = args.size // 8
    source = {"samples": torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))}
    pos = tm.conditioning("sd15", full_size=not args.tiny)
    neg = tm.conditioning("sd15", seed=1, full_size=not args.tiny)
    steps = args.steps

    def sample(run_model, latent, cfg):
        noise = comfy.sample.prepare_noise(latent["samples"], 0, latent.get("batch_index"))
        return comfy.sample.sample(run_model, noise, steps, cfg, "euler", "normal", pos, neg, latent["samples"],
                                   noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=0)

    def invert():
        return N.invert_latent(model, pos, neg, source, steps, "normal", 1.0, 1.0)

    def best(fn):
        return min(timed(fn)[1] for _ in range(args.repeats))

    sample(model, source, 1.0)  # weights loaded, kernels warm
    inverted = invert()
    print(f"\n{args.size}px, {'tiny' if args.tiny else 'full-size'} SD1.5 UNet (random weights), {steps} steps, {device}, {dtype_name}, "
          f"best of {args.repeats}")
    plain_step = best(lambda: sample(model, source, 1.0)) / steps
    invert_step = best(invert) / steps
    print(f"1. {'run (1 image, cfg 1)':<40} {'ms/step':>9} {'x sampling':>11}")
    print(f"   {'KSampler euler':<40} {plain_step * 1e3:9.1f} {1.0:11.2f}")
    print(f"   {'InvertLatent':<40} {invert_step * 1e3:9.1f} {invert_step / plain_step:11.2f}")

    batch = latent_batch(inverted, 1, True, True)
    driven = N.inverted_source_patch(model, inverted)
    sample(driven, batch, 7.5)
    plain_edit = best(lambda: sample(model, batch, 7.5)) / steps
    driven_edit = best(lambda: sample(driven, batch, 7.5)) / steps
    print(f"2. {'run (source + 1 target, cfg 7.5)':<40} {'ms/step':>9} {'x plain':>11} {'syncs':>6}")
    print(f"   {'KSampler euler':<40} {plain_edit * 1e3:9.1f} {1.0:11.2f} "
          f"{count_host_syncs(lambda: sample(model, batch, 7.5), device):6d}")
    print(f"   {'with MasaCtrl Inverted Source':<40} {driven_edit * 1e3:9.1f} {driven_edit / plain_edit:11.2f} "
          f"{count_host_syncs(lambda: sample(driven, batch, 7.5), device):6d}")


if __name__ == "__main__":
    main()
