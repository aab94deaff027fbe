"""The cells of a sweep: one prompt per combination of the axes' values (and the MasaCtrl-off
references), the folder each leaves its images and record in, and which of them a re-run skips."""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .axes import Axis
from .graph import attention_patches, bypass_patches, id_order, method_off, with_mask_saved



@dataclass
class Cell:
    key: str  # folder name under cells/
    settings: dict  # axis label -> value
    prompt: dict
    reference: str | None = None  # key of this cell's MasaCtrl-off reference
    is_reference: bool = False


def safe(text: str) -> str:
    """``text`` as a folder or file name."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


def _prefix_outputs(prompt: dict, folder: str) -> None:
    for node in prompt.values():
        if node["class_type"] == "SaveImage" and isinstance(node["inputs"].get("filename_prefix"), str):
            node["inputs"]["filename_prefix"] = f"{folder}/{Path(node['inputs']['filename_prefix']).name}"


def make_cells(prompt: dict, axes: list[Axis], name: str) -> tuple[list[Cell], list[Cell]]:
    """(grid cells in row-major order of the axes, reference cells with the attention patches off)."""
    prompt = with_mask_saved(prompt)
    patches = attention_patches(prompt)
    bypassed = bypass_patches(prompt) if patches else None
    off = safe(method_off(prompt).lower().replace(" and ", "-").replace(" ", "-"))  # 'masactrl-off' 
    cells, references = [], {}
    for combo in itertools.product(*(a.values for a in axes)):
        key = "__".join(safe(a.key(v)) for a, v in zip(axes, combo))
        p = copy.deepcopy(prompt)
        for a, v in zip(axes, combo):
            p[a.node]["inputs"][a.input] = v
        _prefix_outputs(p, f"consistent-synthesis/{name}-sweep/{key}")
        cell = Cell(key, {a.label: v for a, v in zip(axes, combo)}, p)
        if bypassed is not None:
            kept = [(a, v) for a, v in zip(axes, combo) if a.node in bypassed]
            ref_key = "__".join([off] + [safe(a.key(v)) for a, v in kept])
            if ref_key not in references:
                r = copy.deepcopy(bypassed)
                for a, v in kept:
                    r[a.node]["inputs"][a.input] = v
                _prefix_outputs(r, f"consistent-synthesis/{name}-sweep/{ref_key}")
                references[ref_key] = Cell(ref_key, {a.label: v for a, v in kept}, r, is_reference=True)
            cell.reference = ref_key
        cells.append(cell)
    return cells, list(references.values())


def seed_of(prompt: dict):
    """The first ``seed`` or ``noise_seed`` widget value in node order."""
    for i in sorted(prompt, key=id_order):
        for name in ("seed", "noise_seed"):
            v = prompt[i].get("inputs", {}).get(name)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def load_done(folder: Path) -> dict | None:
    """The record of a finished cell, when its cell.json and every file it names exist."""
    try:
        record = json.loads((folder / "cell.json").read_text())
    except (OSError, ValueError):
        return None
    files = [folder / f for names in record.get("files", {}).values() for f in names]
    return record if files and all(f.is_file() for f in files) else None


def save_record(folder: Path, cell: Cell, server: str, seconds: float, evaluations: int,
                files: dict[str, list[str]]) -> dict:
    """Write the record of a cell run on ``server`` (``files``: node id -> file names in ``folder``) as its
    ``cell.json``, last and atomically: a cell is done when its record exists."""
    record = dict(cell=cell.key, settings=cell.settings, reference=cell.reference, is_reference=cell.is_reference,
                  seed=seed_of(cell.prompt), server=server, seconds=round(seconds, 3), evaluations=evaluations,
                  files=files)
    tmp = folder / "cell.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / "cell.json")
    return record
