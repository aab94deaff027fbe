"""ConsiStory cost: sampling time and peak memory of the patched model against the unpatched one.

A batch of N images (one prompt each, cond + uncond) sampled with a full-size random SD1.5 or SDXL
UNet of ComfyUI's own class:

- ``unpatched``: the model as the user loaded it;
- ``consistory``: ConsiStoryAttentionPatch as shipped (2 anchors, mask_dropout 0.5, from step 1,
  decoder, automatic masks from the subject token's cross-attention, vanilla queries in the first
  tenth of the steps: one extra model call per step there);
- ``no_queries``: the same without vanilla-query mixing (``share_queries`` off);
- ``storydiffusion``: ``token_sharing = storydiffusion``;
- ``injection``: ``consistory`` + ConsiStoryFeatureInjection (the official second pass: the sampling
  runs twice, the first recording DIFT features, the second injecting);
- ``cached``: the N - 2 non-anchor images alone, attending to the anchors saved once before the timed
  runs by ConsiStorySaveSubject (the official cached mode); compare its time per image.

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
    parser.add_argument("--runs", default="consistory,no_queries,storydiffusion,injection,cached",
                        help="comma-separated patched runs to compare with the unpatched one")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA)")
    args = parser.parse_args()
    fix_mmap_threshold()

    host.prepare(use_gpu=True)

    import comfy.model_management
    import comfy.sample

    import tiny_models as tm
    from consistent_synthesis.nodes import consistory_injection
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
        "injection": dict(subject_tokens=tokens),
        "cached": dict(subject_tokens=tokens),
    }
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(wanted) - set(patches)
    if unknown:
        parser.error(f"--runs: unknown {sorted(unknown)}; choose from {sorted(patches)}")
    every, anchors = slice(0, args.images), 2
    if "cached" in wanted and args.images <= anchors:
        parser.error(f"--runs cached: --images must exceed the {anchors} anchors")

    def run(config):
        m, rows = config
        c = [[[t[rows], dict(e)] for t, e in conditioning] for conditioning in (positive, negative)]
        return comfy.sample.sample(m, noise[rows], args.steps, 5.0, "ddim", "ddim_uniform", *c, latent[rows],
                                   disable_pbar=True, seed=0)

    configs = {"unpatched": (model, every)}
    for name in wanted:
        if name == "cached":
            configs[name] = (_cached_subject(model, patches[name], anchors, run), slice(anchors, args.images))
            continue
        patched = patch_model(model, anchors=anchors, **patches[name])
        if name == "injection":
            patched = consistory_injection.patch_model(patched)
        configs[name] = (patched, every)

    results = measure_runs(configs, run, device, args.repeats)

    base_time, base_mem, _, _ = results["unpatched"]
    print(f"{args.model} on {device}, {dtype}, {args.size}px, N = {args.images} images x cond/uncond, "
          f"{args.steps} ddim steps, cfg 5")
    print(f"{'run':<15} {'images':>6} {'time s':>8} {'x time':>7} {'x time/image':>13} {'peak MiB':>9} {'x peak':>7} "
          f"{'host syncs':>11}")
    for name, (t, mib, _, syncs) in results.items():
        rows = configs[name][1]
        images = rows.stop - rows.start
        ratio_mem = mib / base_mem if base_mem > 0 else float("nan")
        per_image = (t / images) / (base_time / args.images)
        print(f"{name:<15} {images:6d} {t:8.2f} {t / base_time:7.2f} {per_image:13.2f} {mib:9.0f} {ratio_mem:7.2f} "
              f"{syncs:11d}")


def _cached_subject(model, settings: dict, anchors: int, run):
    """``model`` behind the patch and ConsiStoryLoadSubject, with the anchors (rows 0 .. anchors-1 of the
    batch, their own subject tokens) sampled once through ConsiStorySaveSubject into a temporary folder."""
    import tempfile

    import folder_paths

    from consistent_synthesis.nodes import consistory_subject as subject_node
    from consistent_synthesis.nodes.consistory import patch_model

    folder = tempfile.mkdtemp(prefix="consistory_bench_")
    folder_paths.folder_names_and_paths[subject_node.FOLDER] = ([folder], {".safetensors"})
    tokens = settings["subject_tokens"].split(" | ")
    anchor_patch = patch_model(model, anchors=anchors, **(settings | {"subject_tokens": " | ".join(tokens[:anchors])}))
    run((subject_node.save_subject(anchor_patch, filename_prefix="bench"), slice(0, anchors)))
    (name,) = subject_node.subject_files()
    subject = subject_node.read_subject(folder_paths.get_full_path(subject_node.FOLDER, name), name)
    new = patch_model(model, anchors=anchors, **(settings | {"subject_tokens": " | ".join(tokens[anchors:])}))
    return subject_node.load_subject(new, subject)


if __name__ == "__main__":
    main()
