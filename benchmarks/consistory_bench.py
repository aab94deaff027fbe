"""ConsiStory cost: sampling time and peak memory of the patched model against the unpatched one.

A batch of N images (one prompt each, cond + uncond) sampled with a full-size random SD1.5 or SDXL
UNet of ComfyUI's own class:

- ``unpatched``: the model as the user loaded it;
- ``consistory``: ConsiStoryAttentionPatch as shipped (2 anchors, mask_dropout 0.5, from step 1,
  decoder, automatic masks from the subject token's cross-attention, vanilla queries in the first
  tenth of the steps: one extra model call per step there);
- ``no_queries``: the same without vanilla-query mixing (``share_queries`` off);
- ``storydiffusion``: ``token_sharing = storydiffusion``.

Peak memory and host synchronisations are measured as in ``masactrl_bench.py`` (CUDA allocator
peak or the CPU's peak resident set; ``set_sync_debug_mode`` or the tests' counter). Ratios are
against ``unpatched`` in the same process.

    python3 benchmarks/consistory_bench.py --model sd15 --size 512 --images 4 --steps 50 --fp16   # on a GPU
    python3 benchmarks/consistory_bench.py --model sdxl --size 1024 --images 8 --steps 50 --fp16
    python3 benchmarks/consistory_bench.py --model sd15 --size 256 --images 4 --steps 10            # CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testing"))

import host  # noqa: E402
from masactrl_bench import fix_mmap_threshold, measure_runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--images", type=int, default=4, help="N, the batch of prompts")
    parser.add_argument("--steps", type=int, default=10, help="10 or more, so the first tenth has a step")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (best is kept)")
    parser.add_argument("--runs", default="consistory,no_queries,storydiffusion",
                        help="comma-separated patched runs to compare with the unpatched one")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA)")
    args = parser.parse_args()
    fix_mmap_threshold()

    host.prepare(use_gpu=True)

    import comfy.model_management
    import comfy.sample

    import tiny_models as tm
    from consistent_synthesis.nodes.consistory import patch_model

    device = comfy.model_management.get_torch_device()
    dtype = torch.float16 if args.fp16 else torch.float32
    model = tm.tiny_model(args.model, full_size=True, device=device, dtype=dtype)
    side = args.size // 8
    latent = torch.zeros((args.images, 4, side, side))
    noise = comfy.sample.prepare_noise(latent, 0)
    positive = tm.conditioning(args.model, batch=args.images, full_size=True)
    negative = tm.conditioning(args.model, batch=args.images, seed=1, full_size=True)
    tokens = " | ".join(str(2 + i % 3) for i in range(args.images))  # the subject word's index per prompt
    patches = {
        "consistory": dict(subject_tokens=tokens),
        "no_queries": dict(subject_tokens=tokens, share_queries=False),
        "storydiffusion": dict(token_sharing="storydiffusion"),
    }
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(wanted) - set(patches)
    if unknown:
        parser.error(f"--runs: unknown {sorted(unknown)}; choose from {sorted(patches)}")
    configs = {"unpatched": model} | {name: patch_model(model, **patches[name]) for name in wanted}

    def run(m):
        return comfy.sample.sample(m, noise, args.steps, 5.0, "ddim", "ddim_uniform", positive, negative, latent,
                                   disable_pbar=True, seed=0)

    results = measure_runs(configs, run, device, args.repeats)

    base_time, base_mem, _, _ = results["unpatched"]
    print(f"{args.model} on {device}, {dtype}, {args.size}px, N = {args.images} images x cond/uncond, "
          f"{args.steps} ddim steps, cfg 5")
    print(f"{'run':<15} {'time s':>8} {'x time':>7} {'peak MiB':>9} {'x peak':>7} {'host syncs':>11}")
    for name, (t, mib, _, syncs) in results.items():
        ratio_mem = mib / base_mem if base_mem > 0 else float("nan")
        print(f"{name:<15} {t:8.2f} {t / base_time:7.2f} {mib:9.0f} {ratio_mem:7.2f} {syncs:11d}")


if __name__ == "__main__":
    main()
