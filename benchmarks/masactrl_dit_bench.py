"""MasaCtrl on Flux / SD3: sampling time of the patched model against the unpatched one.

The models are the tests' random-weight Flux (FLUX.1's 19 double + 38 single blocks) and SD3
(SD3.5 Medium's 24 joint blocks) at a tiny width; the batch is one source and its targets. Runs:

- ``unpatched``: the model as loaded;
- ``mutual``, ``union``: patch_dit_model on every block (``--layers all``, the worst case) or on the
  given blocks, from step 0, over the host's optimized attention.

Each variant runs once to warm up, then ``--repeats`` rounds of one run of each; the minimum and
the median are printed, with ratios against ``unpatched`` in the same process.

    python3 benchmarks/masactrl_dit_bench.py --model flux --size 512 --steps 4 --targets 1
    python3 benchmarks/masactrl_dit_bench.py --model flux --layers 0,1,2,17,18,25,28,53,54,56
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testing"))

import host  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("flux", "sd3"), default="flux")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side x 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--targets", type=int, default=1, help="target images next to the one source")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated block numbers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--gpu", action="store_true", help="use CUDA when available")
    args = parser.parse_args()

    host.prepare(use_gpu=args.gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.model_management
    import comfy.sample
    import tiny_dit_models as td
    from consistent_synthesis.nodes import masactrl_dit

    device = comfy.model_management.get_torch_device()
    model = td.tiny_dit(args.model, device=str(device))
    count = masactrl_dit.block_count(model)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    batch = 1 + args.targets
    latent = torch.zeros(batch, 16, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    cfg = 1.0 if args.model == "flux" else 4.0
    positive = td.conditioning(args.model, batch=batch, seed=1)
    negative = td.conditioning(args.model, batch=batch, seed=2)

    def run(m):
        out = comfy.sample.sample(m, noise, args.steps, cfg, "euler", "simple", positive, negative, latent,
                                  disable_pbar=True, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    runs = {"unpatched": model}
    for mode in ("mutual", "union"):
        runs[mode] = masactrl_dit.patch_dit_model(model, start_step=0, start_layer=0, end_layer=-1, layers=layers,
                                                  mode=mode)
    print(f"{args.model}: {count} blocks, patched {'all' if layers is None else layers}; "
          f"{args.size} px, {batch} images, {args.steps} steps, cfg {cfg}, {device}, "
          f"{torch.get_num_threads()} threads")
    # Runs interleave (one of each variant per round) and the minimum is reported next to the
    # median: on a shared machine the minimum is the figure least moved by other jobs.
    samples = {name: [] for name in runs}
    for m in runs.values():
        run(m)  # warm-up
    for _ in range(args.repeats):
        for name, m in runs.items():
            start = time.perf_counter()
            run(m)
            samples[name].append(time.perf_counter() - start)
    best = {name: min(s) for name, s in samples.items()}
    middle = {name: statistics.median(s) for name, s in samples.items()}
    for name in runs:
        print(f"{name:10s} min {best[name]:8.3f} s  x{best[name] / best['unpatched']:.2f}   "
              f"median {middle[name]:8.3f} s  x{middle[name] / middle['unpatched']:.2f}")

if __name__ == "__main__":
    main()
