"""RePaint cost and benefit, with ratios against ComfyUI's plain masked KSampler in the same process.

1. Model evaluations and wall time of RePaintKSampler against the host's masked KSampler at
   equal steps and at equal evaluations (time per evaluation), on a full-size random SD1.5 UNet,
   on CUDA when there is one (fp16 there), with the host synchronisations each run makes
   (``torch.cuda.set_sync_debug_mode`` warnings on CUDA, testing/sync_counter.py on the CPU).
2. The sampler's own overhead per model evaluation, measured with a model that costs almost
   nothing (the analytic Gaussian denoiser), next to one UNet evaluation.
3. Distance (W2) of inpainted samples to the exact conditional of a Gaussian, against the
   number of evaluations, for several jump settings.

    python3 benchmarks/repaint_bench.py --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testing"))

import host  # noqa: E402
from sync_counter import count_host_syncs  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--jump-length", type=int, default=10)
    parser.add_argument("--jump-n-sample", type=int, default=10)
    parser.add_argument("--skip-unet", action="store_true", help="only the overhead and analytic tables")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default=None,
                        help="UNet precision (default: fp16 on CUDA, fp32 on the CPU)")
    args = parser.parse_args()

    host.prepare(use_gpu=True)

    import comfy.model_management
    import comfy.sample

    import analytic as A
    import tiny_models as tm
    from consistent_synthesis.nodes.repaint import repaint_ksampler
    from consistent_synthesis.samplers import repaint as R

    counter = []

    def counting(model):
        model = model.clone()

        def wrapper(apply_model, a):
            counter.append(1)
            return apply_model(a["input"], a["timestep"], **a["c"])
        model.set_model_unet_function_wrapper(wrapper)
        return model

    def plain(model, latent, positive, negative, steps, sampler="euler"):
        noise = comfy.sample.prepare_noise(latent["samples"], 0)
        return comfy.sample.sample(model, noise, steps, 1.0, sampler, "karras", positive, negative,
                                   latent["samples"], noise_mask=latent["noise_mask"], disable_pbar=True, seed=0)

    def ours(model, latent, positive, negative, steps, jump_length, jump_n_sample, sampler="euler", start=0.0):
        return repaint_ksampler(model, 0, steps, 1.0, sampler, "karras", positive, negative, latent, 1.0,
                                jump_length, jump_n_sample, start, 1.0)["samples"]

    unet_eval = None
    if not args.skip_unet:
        device = comfy.model_management.get_torch_device()
        dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
        dtype = torch.float16 if dtype_name == "fp16" else torch.float32
        model = counting(tm.tiny_model("sd15", full_size=True, device=device, dtype=dtype))
        side = args.size // 8
        mask = torch.zeros(1, 1, side, side)
        mask[..., side // 2:] = 1.0
        latent = {"samples": torch.randn(1, 4, side, side), "noise_mask": mask}
        pos, neg = tm.conditioning("sd15", full_size=True), tm.conditioning("sd15", seed=1, full_size=True)
        plain(model, latent, pos, neg, 2)  # weights loaded, kernels warm
        print(f"\n1. {args.size}px outpainting, full-size SD1.5 UNet (random weights), {args.steps} euler steps, "
              f"cfg 1, {device}, {dtype_name}")
        print(f"{'run':<44} {'evals':>6} {'x evals':>8} {'time s':>8} {'x time':>7} {'ms/eval':>8} {'syncs':>6}")
        counter.clear()
        _, base = timed(lambda: plain(model, latent, pos, neg, args.steps))
        base_evals = len(counter)
        unet_eval = base / base_evals
        jumped = R.model_steps(R.jump_schedule(args.steps, args.jump_length, args.jump_n_sample))
        runs = [("ComfyUI masked KSampler", ("plain", args.steps)),
                (f"ComfyUI masked KSampler, {jumped} steps", ("plain", jumped)),
                (f"RePaint {args.jump_length}/{args.jump_n_sample}", (args.jump_length, args.jump_n_sample, 0.0)),
                (f"RePaint {args.jump_length}/{args.jump_n_sample}, window 0.5-1",
                 (args.jump_length, args.jump_n_sample, 0.5)),
                ("RePaint jump_n_sample 1", (args.jump_length, 1, 0.0))]
        per_eval = {}
        for name, settings in runs:
            if settings[0] == "plain":
                def run(steps=settings[1]):
                    return plain(model, latent, pos, neg, steps)
            else:
                def run(settings=settings):
                    return ours(model, latent, pos, neg, args.steps, settings[0], settings[1], start=settings[2])
            counter.clear()
            _, t = timed(run)
            evals = len(counter)
            per_eval[name] = t / evals
            syncs = count_host_syncs(run, device)
            print(f"{name:<44} {evals:6d} {evals / base_evals:8.2f} {t:8.2f} {t / base:7.2f} "
                  f"{t / evals * 1e3:8.2f} {syncs:6d}")
        stock = per_eval[f"ComfyUI masked KSampler, {jumped} steps"]
        repainted = per_eval[f"RePaint {args.jump_length}/{args.jump_n_sample}"]
        print(f"time per evaluation at equal evaluations ({jumped}): RePaint / ComfyUI masked KSampler = "
              f"{repainted / stock:.3f}")

    # 2. Overhead: the analytic model costs almost nothing, so the time per evaluation is the loop's
    # own. Compare at equal evaluations (RePaint 50 steps 10/10 = 410 against a 410-step KSampler), so
    # the fixed cost of a run (conds, model loading) is the same on both sides; best of 3.
    model, mu, cov = A.gaussian_model()
    small = {"samples": mu.float().reshape(1, *A.SHAPE).repeat(4, 1, 1, 1),
             "noise_mask": torch.ones(4, 1, 2, 2)}
    small["noise_mask"][..., 0] = 0.0
    cond = [[torch.zeros(1, 1, 768), {}]]
    model = counting(model)
    steps = 50
    evaluations = R.model_steps(R.jump_schedule(steps, 10, 10))

    def best(fn):
        times = []
        for _ in range(3):
            counter.clear()
            times.append(timed(fn)[1])
        return min(times), len(counter)

    t_plain, plain_evals = best(lambda: plain(model, small, cond, cond, evaluations))
    t_ours, ours_evals = best(lambda: ours(model, small, cond, cond, steps, 10, 10))
    assert plain_evals == ours_evals == evaluations
    per_plain, per_ours = t_plain / plain_evals, t_ours / ours_evals
    print(f"\n2. time per model evaluation around a near-free model: ComfyUI masked KSampler {evaluations} steps "
          f"against RePaint {steps} steps 10/10 ({evaluations} evaluations each), best of 3")
    print(f"ComfyUI masked KSampler: {per_plain * 1e3:.3f} ms, RePaint: {per_ours * 1e3:.3f} ms, RePaint's own "
          f"overhead {(per_ours - per_plain) * 1e3:+.3f} ms per evaluation"
          + (f" = {(per_ours - per_plain) / unet_eval:.4%} of one UNet evaluation above" if unet_eval else ""))

    # 3. Distance to the exact conditional against evaluations.
    model, mu, cov = A.gaussian_model()
    n = 2000
    x0 = mu + torch.linalg.cholesky(cov) @ torch.randn(A.DIM, generator=torch.Generator().manual_seed(3),
                                                       dtype=torch.float64)
    unknown = torch.zeros(A.SHAPE, dtype=torch.bool)
    unknown[:, :, 1] = True
    unknown = unknown.reshape(-1)
    latent = {"samples": x0.float().reshape(1, *A.SHAPE).repeat(n, 1, 1, 1),
              "noise_mask": unknown.float().reshape(1, *A.SHAPE)[:, :1].repeat(n, 1, 1, 1)}
    mean, cov_u = A.conditional(mu, cov, x0[~unknown], unknown)
    draws = torch.distributions.MultivariateNormal(mean, cov_u).sample((n,))
    print(f"\n3. analytic Gaussian inpainting, {n} samples, euler_ancestral, karras; W2 to the exact conditional "
          f"(exact samples: {A.w2_gaussian(draws.mean(0), torch.cov(draws.T), mean, cov_u):.3f})")
    print(f"{'steps':>5} {'jump_length':>11} {'jump_n_sample':>13} {'evals':>6} {'W2':>7}")
    fixed = plain(model, latent, cond, cond, 30, "euler_ancestral").reshape(n, -1)[:, unknown].double()
    print(f"{30:5d} {'ComfyUI masked KSampler':>25} {30:6d} "
          f"{A.w2_gaussian(fixed.mean(0), torch.cov(fixed.T), mean, cov_u):7.3f}")
    for steps, length, r in [(30, 5, 1), (100, 5, 1), (30, 1, 3), (30, 5, 3), (30, 10, 3), (30, 5, 10),
                             (30, 10, 10), (60, 10, 10)]:
        out = ours(model, latent, cond, cond, steps, length, r, "euler_ancestral")
        got = out.reshape(n, -1)[:, unknown].double()
        evals = R.model_steps(R.jump_schedule(steps, length, r))
        print(f"{steps:5d} {length:11d} {r:13d} {evals:6d} "
              f"{A.w2_gaussian(got.mean(0), torch.cov(got.T), mean, cov_u):7.3f}")


if __name__ == "__main__":
    main()
