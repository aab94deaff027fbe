"""Particle inpainting (ParticleInpaintKSampler) against RePaintKSampler and the host's masked KSampler.

1. Cost at equal total evaluations (model rows per output): evaluations, wall time and peak memory of
   ParticleInpaintKSampler (K particles x S steps) against RePaintKSampler (jumps giving the same
   number of evaluations) and the masked KSampler (K x S steps), on a full-size random SD1.5 UNet
   (CUDA when there is one; peak memory from torch.cuda, or the process's peak RSS growth on the CPU).
2. Quality on the closed-form mixture-hard problem (testing/analytic_mixture.py; exact component weights
   1/3, 2/3, 0, 0): TV of 512 outputs at 60, 120 and 240 total evaluations for the three samplers, and
   the particle sampler with in-run resampling.

    python3 benchmarks/particle_inpaint_bench.py --skip-unet
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testing"))

import host  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # growth only, MiB
    return out, time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--outputs", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-unet", action="store_true", help="only the closed-form table")
    args = parser.parse_args()
    host.prepare(use_gpu=True)

    import comfy.model_management
    import comfy.sample

    import analytic_mixture as M
    import tiny_models as tm
    from consistent_synthesis.nodes.particle_inpaint import particle_inpaint_ksampler
    from consistent_synthesis.nodes.repaint import repaint_ksampler
    from consistent_synthesis.samplers import repaint as R

    rows = []

    def counting(model):
        model = model.clone()

        def wrapper(apply_model, a):
            rows.append(a["input"].shape[0])
            return apply_model(a["input"], a["timestep"], **a["c"])
        model.set_model_unet_function_wrapper(wrapper)
        return model

    def masked(model, latent, pos, neg, steps, seed=0):
        noise = comfy.sample.prepare_noise(latent["samples"], seed)
        return comfy.sample.sample(model, noise, steps, 1.0, "euler_ancestral", "karras", pos, neg, latent["samples"],
                                   noise_mask=latent["noise_mask"], disable_pbar=True, seed=seed)

    def repainted(model, latent, pos, neg, steps, jump_length, jump_n_sample, seed=0):
        return repaint_ksampler(model, seed, steps, 1.0, "euler_ancestral", "karras", pos, neg, latent, 1.0,
                                jump_length, jump_n_sample)["samples"]

    def particles(model, latent, pos, neg, k, steps, threshold=0.0, seed=0):
        return particle_inpaint_ksampler(model, seed, steps, 1.0, "euler_ancestral", "karras", pos, neg, latent, 1.0,
                                         k, threshold, 1.0)[0]["samples"]

    def repaint_for(total):  # 15 steps with jumps of 5 levels, jump_n_sample giving about `total` evaluations
        best = min(((n, abs(R.model_steps(R.jump_schedule(15, 5, n)) - total)) for n in range(1, 30)),
                   key=lambda t: t[1])[0]
        return 15, 5, best, R.model_steps(R.jump_schedule(15, 5, best))

    if not args.skip_unet:
        device = comfy.model_management.get_torch_device()
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        model = counting(tm.tiny_model("sd15", full_size=True, device=device, dtype=dtype))
        side = args.size // 8
        mask = torch.zeros(1, 1, side, side)
        mask[..., side // 2:] = 1.0
        latent = {"samples": torch.randn(1, 4, side, side), "noise_mask": mask}
        pos, neg = tm.conditioning("sd15", full_size=True), tm.conditioning("sd15", seed=1, full_size=True)
        masked(model, latent, pos, neg, 2)  # weights loaded, kernels warm
        print(f"\n1. {args.size}px outpainting, full-size SD1.5 UNet (random weights), cfg 1, {device}")
        print(f"{'run':<40} {'rows':>6} {'calls':>6} {'time s':>8} {'x time':>7} {'peak MiB':>9}")
        for k, steps in ((4, 15), (8, 15)):
            total = k * steps
            s, length, n, evals = repaint_for(total)
            runs = [(f"particles {k} x {steps}", lambda: particles(model, latent, pos, neg, k, steps)),
                    (f"RePaint 15 steps 5/{n} ({evals})", lambda: repainted(model, latent, pos, neg, s, length, n)),
                    (f"masked KSampler {total} steps", lambda: masked(model, latent, pos, neg, total))]
            base = None
            for name, fn in runs:
                rows.clear()
                _, t, peak = timed(fn)
                base = base or t
                print(f"{name:<40} {sum(rows):6d} {len(rows):6d} {t:8.2f} {t / base:7.2f} {peak:9.0f}")

    # 2. Closed-form mixture-hard at 60, 120 and 240 total evaluations per output
    model, mix = M.mixture_model()
    model = counting(model)
    x0 = M.known_sample(mix, 0, seed=args.seed)
    n = args.outputs
    latent = {"samples": x0.float().reshape(1, *M.SHAPE).repeat(n, 1, 1, 1), "noise_mask": M.noise_mask(n)}
    cond = [[torch.zeros(1, 1, 768), {}]]
    known = x0[M.known_mask()]
    print(f"\n2. mixture-hard (exact weights 1/3, 2/3, 0, 0), {n} outputs, seed {args.seed}, euler_ancestral, karras, "
          "cfg 1, CPU")
    print(f"{'method':<44} {'evals/output':>12} {'TV':>6} {'time s':>7}")
    for total in (60, 120, 240):
        k = total // 15
        s, length, r, evals = repaint_for(total)
        runs = [(f"ParticleInpaintKSampler {k} x 15", lambda: particles(model, latent, cond, cond, k, 15, seed=args.seed)),
                (f"ParticleInpaintKSampler {k} x 15, resample 0.5 <1",
                 lambda: particles(model, latent, cond, cond, k, 15, 0.5, seed=args.seed)),
                (f"RePaintKSampler 15 steps, jumps 5/{r}", lambda: repainted(model, latent, cond, cond, s, length, r,
                                                                              seed=args.seed)),
                (f"masked KSampler {total} steps", lambda: masked(model, latent, cond, cond, total, seed=args.seed))]
        for name, fn in runs:
            rows.clear()
            out, t, _ = timed(fn)
            print(f"{name:<44} {sum(rows) / n:12.0f} {M.total_variation(mix, out, known):6.3f} {t:7.2f}", flush=True)


if __name__ == "__main__":
    main()
