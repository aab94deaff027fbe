"""MasaCtrl cost: sampling time and peak memory of the patched model against the unpatched one.

Runs on the same batch (one source and its targets, cond + uncond) with a full-size random
SD1.5 or SDXL UNet of ComfyUI's own class:

- ``unpatched``: the model as the user loaded it;
- ``mutual``, ``union``, ``mask`` (mask-guided with given masks), ``auto`` (masks from the
  cross-attention maps): MasaCtrlAttentionPatch over
  ComfyUI's optimized attention (SDPA, xformers, sub-quadratic on CPU), as the pack ships it;
- ``naive``: mutual over attention that materializes the (queries x keys) matrix, as the
  official MasaCtrl code does (``sim = q @ k.T * scale; sim.softmax(-1) @ v``).

Each run also counts host synchronisations: ``torch.cuda.set_sync_debug_mode`` warnings on a GPU,
the CPU-side ``HostSyncCounter`` of the tests otherwise.

Peak memory is CUDA ``max_memory_allocated`` on a GPU, and on CPU the rise of the process's peak
resident set (``VmHWM``, reset between runs through ``/proc/self/clear_refs``) above what it held
before the run, with glibc's mmap threshold fixed so freed blocks leave the process. Ratios are against ``unpatched`` in the same process.

    python3 benchmarks/masactrl_bench.py --model sd15 --size 512 --steps 4 --targets 1
    python3 benchmarks/masactrl_bench.py --model sdxl --size 1024 --steps 20 --targets 3 --fp16   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testing"))

import host  # noqa: E402


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory a block adds, in MiB: CUDA allocator peak, or CPU peak RSS rise."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _vm_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _vm_kib("VmHWM") * 1024
        self.mib = (peak - self.base) / 2**20


def fix_mmap_threshold() -> None:
    """Re-run this script with glibc's mmap threshold fixed, so freed large blocks leave the process and
    the CPU's resident-set peaks are per run."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable] + sys.argv, os.environ | {"MALLOC_MMAP_THRESHOLD_": "1048576"})


def measure_runs(configs: dict, run, device, repeats: int) -> dict:
    """name -> (best time s, peak MiB, the last output, host syncs) of ``run(model)`` for every model in
    ``configs``; the first is run once more before, to load the weights and warm up kernels."""
    from sync_counter import count_host_syncs

    run(next(iter(configs.values())))
    results = {}
    for name, m in configs.items():
        run(m)
        times = []
        for _ in range(repeats):
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                out = run(m)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        results[name] = (min(times), mem.mib, out, count_host_syncs(lambda: run(m), device))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--mode", choices=("all", "mutual", "union", "mask", "auto", "naive"), default="all",
                        help="which patched runs to compare with the unpatched one")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--targets", type=int, default=1, help="target images next to the one source")
    parser.add_argument("--start-step", type=int, default=0, help="0 patches every step, the worst case")
    parser.add_argument("--start-layer", type=int, default=None, help="default: 10 for SD1.5, 44 for SDXL")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (best is kept)")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA)")
    args = parser.parse_args()
    fix_mmap_threshold()

    host.prepare(use_gpu=True)

    import comfy.model_management
    import comfy.sample

    import tiny_models as tm
    from consistent_synthesis.attention.masactrl import naive_attention
    from consistent_synthesis.nodes.masactrl import patch_model

    device = comfy.model_management.get_torch_device()
    dtype = torch.float16 if args.fp16 else torch.float32
    kind = args.model
    start_layer = args.start_layer if args.start_layer is not None else (10 if kind == "sd15" else 44)
    model = tm.tiny_model(kind, full_size=True, device=device, dtype=dtype)
    batch = 1 + args.targets
    side = args.size // 8
    latent = torch.zeros((batch, 4, side, side))
    noise = comfy.sample.prepare_noise(latent, 0)
    positive, negative = tm.conditioning(kind, full_size=True), tm.conditioning(kind, seed=1, full_size=True)
    settings = dict(start_step=args.start_step, start_layer=start_layer)
    source_mask = torch.zeros(1, side, side)
    source_mask[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    target_mask = torch.roll(source_mask, side // 8, dims=-1)

    def naive(q, k, v, heads, mask=None):
        return naive_attention(q, k, v, heads, key_bias=mask)

    patches = {
        "mutual": lambda: patch_model(model, **settings),
        "union": lambda: patch_model(model, **settings, mode="union"),
        "mask": lambda: patch_model(model, **settings, source_mask=source_mask, target_mask=target_mask),
        "auto": lambda: patch_model(model, **settings, auto_mask=True),
        "naive": lambda: patch_model(model, **settings, attention=naive),
    }
    configs = {"unpatched": model} | {name: make() for name, make in patches.items()
                                      if args.mode in ("all", name)}

    def run(m):
        return comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=0)

    results = measure_runs(configs, run, device, args.repeats)

    base_time, base_mem, _, _ = results["unpatched"]
    print(f"{kind} on {device}, {dtype}, {args.size}px, batch {batch} (1 source + {args.targets} targets) x "
          f"cond/uncond, {args.steps} euler steps, MasaCtrl from step {args.start_step} layer {start_layer}")
    print(f"{'run':<10} {'time s':>8} {'x time':>7} {'peak MiB':>9} {'x peak':>7} {'host syncs':>11}")
    for name, (t, mib, _, syncs) in results.items():
        ratio_mem = mib / base_mem if base_mem > 0 else float("nan")
        print(f"{name:<10} {t:8.2f} {t / base_time:7.2f} {mib:9.0f} {ratio_mem:7.2f} {syncs:11d}")
    if "mutual" in results and "naive" in results:
        diff = (results["mutual"][2] - results["naive"][2]).abs().max().item()
        print(f"max |mutual - naive| over the output latents: {diff:.2e}")
    layer_table(device, dtype, args.size, batch, args.repeats)


def layer_table(device, dtype, size: int, batch: int, repeats: int) -> None:
    """One SD1.5 self-attention layer at the largest resolution (320 channels, 8 heads), alone."""
    import comfy.ldm.modules.attention as host_attention

    from consistent_synthesis.attention.masactrl import mutual_self_attention, naive_attention, sdpa_attention

    tokens = (size // 8) ** 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * batch, tokens, 320, generator=gen).to(device, dtype) for _ in range(3))
    variants = {
        "host attention, unpatched": lambda: host_attention.optimized_attention(q, k, v, 8),
        "masactrl over host attention": lambda: mutual_self_attention(
            q, k, v, 8, chunks=2, attention=lambda *a, **kw: host_attention.optimized_attention(*a, **kw)),
        "masactrl over torch SDPA": lambda: mutual_self_attention(q, k, v, 8, chunks=2, attention=sdpa_attention),
        "masactrl over naive (official)": lambda: mutual_self_attention(
            q, k, v, 8, chunks=2, attention=lambda q, k, v, h, mask=None: naive_attention(q, k, v, h, mask)),
    }
    rows = {}
    for name, fn in variants.items():
        fn()
        times = []
        for _ in range(repeats + 1):
            with PeakMemory(device) as mem, torch.no_grad():
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        rows[name] = (min(times), mem.mib)
    base_time, base_mem = rows["host attention, unpatched"]
    print(f"\none self-attention layer: {2 * batch} rows x {tokens} tokens x 320 channels, 8 heads")
    print(f"{'attention':<32} {'time ms':>8} {'x time':>7} {'peak MiB':>9} {'x peak':>7}")
    for name, (t, mib) in rows.items():
        ratio_mem = mib / base_mem if base_mem > 0 else float("nan")
        print(f"{name:<32} {t * 1e3:8.1f} {t / base_time:7.2f} {mib:9.0f} {ratio_mem:7.2f}")


if __name__ == "__main__":
    main()
