"""The report of a sweep, from the cells' images on disk: pixel-space metrics per cell, ``cells.csv``
(and ``reference.csv``), and a labelled grid and a plot of the metrics per value of the dimensions
past the second."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

from .. import grid, metrics
from .axes import Axis
from .cells import Cell, safe
from .graph import MASK_SAVE_NODE, consistory_patches, main_output, masactrl_patches, method_off


def _cell_images(folder: Path, record: dict, node: str | None) -> list[Path]:
    names = record["files"].get(node) if node else None
    if names is None:  # every image but the sweep's mask
        names = [f for n, fs in record["files"].items() if n != MASK_SAVE_NODE for f in fs]
    return [folder / f for f in names]


def measure(prompt: dict, folder: Path, records: dict[str, dict]) -> dict[str, dict]:
    """Metrics per cell key (references included), from the images on disk."""
    main = main_output(prompt)
    patches = masactrl_patches(prompt)
    source_index = prompt[patches[0]]["inputs"].get("source_index", 0) if patches else None
    if not isinstance(source_index, int):
        source_index = 0
    out: dict[str, dict] = {}
    for key, record in records.items():
        cell_dir = folder / "cells" / key
        images = [metrics.load_rgb(p) for p in _cell_images(cell_dir, record, main)]
        row: dict[str, float] = {}
        targets = [i for i in range(len(images)) if i != source_index] if patches else list(range(len(images)))
        if patches and len(images) > source_index:
            source = images[source_index]
            row["ssim_to_source"] = _mean(metrics.ssim(images[t], source) for t in targets)
            row["histdist_to_source"] = _mean(metrics.histogram_distance(images[t], source) for t in targets)
            ref = records.get(record.get("reference") or "")
            if ref is not None:
                ref_images = [metrics.load_rgb(p) for p in _cell_images(folder / "cells" / ref["cell"], ref, main)]
                pairs = [(images[t], ref_images[t]) for t in targets if t < len(ref_images)]
                row["ssim_to_masactrl_off"] = _mean(metrics.ssim(a, b) for a, b in pairs)
                row["histdist_to_masactrl_off"] = _mean(metrics.histogram_distance(a, b) for a, b in pairs)
        row.update(_consistory_metrics(prompt, images, records, record, folder, main))
        masks = record["files"].get(MASK_SAVE_NODE)
        if masks and images:
            seams, ratios = [], []
            for t in targets:
                m = metrics.load_mask(cell_dir / masks[min(t, len(masks) - 1)], images[t].shape[1::-1])
                s, r = metrics.seam_error(images[t], m)
                seams.append(s)
                ratios.append(r)
            row["seam_error"], row["seam_ratio"] = _mean(seams), _mean(ratios)
        out[key] = row
    return out


def _consistory_metrics(prompt: dict, images: list, records: dict, record: dict, folder: Path,
                        main: str | None) -> dict[str, float]:
    """For a ConsiStory graph: how far each non-anchor image is from the anchors in colour (measured in
    the reference cells too, as the baseline), and how far the patch moved every image."""
    patches = consistory_patches(prompt)
    if not patches:
        return {}
    anchors = prompt[patches[0]]["inputs"].get("anchors", 2)
    anchors = anchors if isinstance(anchors, int) and not isinstance(anchors, bool) else 2
    row = {}
    if len(images) > anchors:
        row["histdist_to_anchors"] = _mean(metrics.histogram_distance(images[t], images[a])
                                           for t in range(anchors, len(images)) for a in range(anchors))
    ref = records.get(record.get("reference") or "")
    if ref is not None:
        ref_images = [metrics.load_rgb(p) for p in _cell_images(folder / "cells" / ref["cell"], ref, main)]
        pairs = list(zip(images, ref_images))
        row["ssim_to_consistory_off"] = _mean(metrics.ssim(a, b) for a, b in pairs)
        row["histdist_to_consistory_off"] = _mean(metrics.histogram_distance(a, b) for a, b in pairs)
    return row


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(values) / len(values)) if values else float("nan")


def write_csv(path: Path, axes: list[Axis], records: list[dict], measured: dict[str, dict]) -> list[str]:
    metric_names = sorted({m for r in records for m in measured.get(r["cell"], {})}, key=_metric_order)
    labels = [a.label for a in axes if any(a.label in r["settings"] for r in records)]
    columns = ["cell", *labels, "seed", "server", "seconds", "evaluations", *metric_names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            m = measured.get(r["cell"], {})
            w.writerow([r["cell"], *(r["settings"].get(lbl, "") for lbl in labels), r["seed"], r["server"],
                        r["seconds"], r["evaluations"], *(_fmt(m.get(n)) for n in metric_names)])
    return metric_names


def _metric_order(name: str):
    order = ["ssim_to_source", "histdist_to_source", "ssim_to_masactrl_off", "histdist_to_masactrl_off",
             "histdist_to_anchors", "ssim_to_consistory_off", "histdist_to_consistory_off", "seam_error", "seam_ratio"]
    return order.index(name) if name in order else len(order)


def _fmt(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def draw(prompt: dict, axes: list[Axis], folder: Path, name: str, records: dict[str, dict],
         measured: dict[str, dict], cells: list[Cell], tile_side: int) -> tuple[list[Path], list[Path]]:
    """A grid and a plot per value of the dimensions past the second."""
    main = main_output(prompt)
    patches = masactrl_patches(prompt)
    source_index = prompt[patches[0]]["inputs"].get("source_index", 0) if patches else None
    consistory = bool(consistory_patches(prompt))
    rows_axis = axes[0]
    cols_axis = axes[1] if len(axes) > 1 else None
    further = axes[2:]
    grids, plots = [], []
    for extra in itertools.product(*(a.values for a in further)):
        suffix = "__".join(safe(a.key(v)) for a, v in zip(further, extra))
        chosen = [c for c in cells if all(c.settings[a.label] == v for a, v in zip(further, extra))]
        tiles, header = {}, []
        for c in chosen:
            r = rows_axis.values.index(c.settings[rows_axis.label])
            col = cols_axis.values.index(c.settings[cols_axis.label]) if cols_axis else 0
            record = records.get(c.key)
            if record is None:
                continue
            paths = _cell_images(folder / "cells" / c.key, record, main)
            if patches:  # the source is the same in every cell: show it once, above the grid
                shown = [p for i, p in enumerate(paths) if i != source_index]
                if not header and source_index < len(paths):
                    header.append(("source", grid.tile([paths[source_index]], tile_side)))
                    ref = records.get(c.reference or "")
                    if ref is not None and len({x.reference for x in chosen}) == 1:
                        ref_paths = _cell_images(folder / "cells" / ref["cell"], ref, main)
                        header.append(("MasaCtrl off", grid.tile(
                            [p for i, p in enumerate(ref_paths) if i != source_index], tile_side)))
                paths = shown
            elif consistory and not header:  # the whole batch without the patch, once above the grid
                ref = records.get(c.reference or "")
                if ref is not None and len({x.reference for x in chosen}) == 1:
                    header.append((method_off(prompt), grid.tile(
                        _cell_images(folder / "cells" / ref["cell"], ref, main), tile_side)))
            tiles[(r, col)] = grid.tile(paths, tile_side)
        title = f"{name}: rows {rows_axis.label}" + (f", columns {cols_axis.label}" if cols_axis else "")
        if further:
            title += " (" + ", ".join(f"{a.label}={v}" for a, v in zip(further, extra)) + ")"
        picture = folder / (f"grid__{suffix}.png" if suffix else "grid.png")
        layout = grid.draw_grid(picture, title, rows_axis.label, list(rows_axis.values),
                                cols_axis.label if cols_axis else "", list(cols_axis.values) if cols_axis else [""],
                                tiles, header)
        keys = {(rows_axis.values.index(c.settings[rows_axis.label]),
                 cols_axis.values.index(c.settings[cols_axis.label]) if cols_axis else 0): c.key for c in chosen}
        for place in layout:
            place["cell"] = keys[(place["row"], place["col"])]
        picture.with_suffix(".json").write_text(json.dumps(layout, indent=1))  # where each cell's tile is
        grids.append(picture)
        metric_names = sorted({m for c in chosen for m in measured.get(c.key, {})}, key=_metric_order)
        series: dict[str, dict] = {m: {} for m in [*metric_names, "seconds", "evaluations"]}
        for c in chosen:
            if c.key not in records:
                continue
            xi = rows_axis.values.index(c.settings[rows_axis.label])
            li = cols_axis.values.index(c.settings[cols_axis.label]) if cols_axis else 0
            for m in metric_names:
                series[m][(xi, li)] = measured[c.key].get(m)
            series["seconds"][(xi, li)] = records[c.key]["seconds"]
            series["evaluations"][(xi, li)] = records[c.key]["evaluations"]
        refs = {c.reference for c in chosen}
        baselines = {}
        if len(refs) == 1 and None not in refs and refs.pop() in measured:
            ref_metrics = measured[chosen[0].reference]
            baselines = {m: v for m, v in ref_metrics.items() if m.endswith(("_to_source", "_to_anchors"))}
        plot = grid.plot_metrics(folder / (f"plot__{suffix}.png" if suffix else "plot.png"), title,
                                 rows_axis.label, list(rows_axis.values),
                                 cols_axis.label if cols_axis else "", list(cols_axis.values) if cols_axis else [""],
                                 series, baselines, method_off(prompt))
        if plot is not None:
            plots.append(plot)
    return grids, plots
