"""``python -m runner sweep WORKFLOW --vary NODE.INPUT=v1,v2 ...``: a grid of runs over one or more servers.

Every combination of the ``--vary`` values is one cell, one API prompt. The cells go to a queue
that one worker per server drains (each ComfyUI server runs its own queue, so N servers finish
about N times sooner); a server that drops has its cell put back for the others. Each finished
cell leaves its images and a ``cell.json`` in ``OUT/<workflow>-sweep/cells/<cell>/``, so a re-run
of the same command skips it. At the end the sweep writes ``cells.csv`` (settings, seed, server,
wall time, evaluations and pixel-space metrics), a labelled grid per value of any dimension past
the second, and a plot of the metrics.

Metrics (no model weights, see ``runner/metrics.py``):
- MasaCtrl graphs: each target against the source and against the same target with MasaCtrl
  bypassed (a reference cell the sweep adds: the patch node's model input wired straight to its
  consumers), by SSIM and a colour-histogram distance;
- RePaint graphs: the seam error across the border of the mask (the sweep saves the mask the
  sampler sees with an extra MaskToImage and SaveImage) and its ratio to the image's own texture.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import csv
import itertools
import json
import logging
import math
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

from . import client, workflow

MASACTRL_PATCHES = ("MasaCtrlAttentionPatch",)
REPAINT_NODES = ("RePaintKSampler", "RePaintSampler")
OUTPUT_IMAGE_NODES = ("SaveImage", "PreviewImage")
MASK_NODE, MASK_SAVE_NODE = "sweep_mask", "sweep_mask_save"
REFERENCE = "masactrl-off"


class SweepError(Exception):
    """A sweep that cannot start or finish; the message says what to change."""


# ----------------------------------------------------------------------------------------------------------
# The dimensions: --vary NODE.INPUT=v1,v2,...


@dataclass(frozen=True)
class Axis:
    node: str  # the node's id in the prompt
    input: str
    values: tuple
    label: str  # what the grid, the CSV and the plot call it

    def key(self, value) -> str:
        return f"{self.node}.{self.input}={value}"


def node_names(prompt: dict) -> str:
    return ", ".join(f"{i} ({n.get('_meta', {}).get('title') or n['class_type']})" for i, n in prompt.items())


def find_node(prompt: dict, name: str, spec: str) -> str:
    """The id of the node called ``name``: its id, else its title, else its class type (when unique)."""
    if name in prompt:
        return name
    for what in (lambda n: n.get("_meta", {}).get("title"), lambda n: n.get("class_type")):
        hits = [i for i, n in prompt.items() if what(n) == name]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise SweepError(f"--vary {spec}: {len(hits)} nodes are called {name!r} (ids {', '.join(hits)}); "
                             "name the node by its id instead.")
    raise SweepError(f"--vary {spec}: the workflow has no node {name!r}; its nodes (id and title): "
                     f"{node_names(prompt)}.")


def _range(text: str, cast):
    """``a..b`` (inclusive, step 1) or ``a..b:step``."""
    bounds, _, step = text.partition(":")
    lo, hi = (cast(x) for x in bounds.split(".."))
    step = cast(step) if step else cast(1)
    if step <= 0:
        raise ValueError(f"step {step} must be positive")
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    return [cast(lo + i * step) for i in range(max(n, 0))]


def _cast_for(current):
    if isinstance(current, bool):
        return lambda s: {"true": True, "false": False, "1": True, "0": False}[s.strip().lower()]
    if isinstance(current, int):
        return lambda s: int(s)
    if isinstance(current, float):
        return lambda s: float(s)
    return lambda s: s


def parse_values(text: str, current) -> tuple:
    """``v1,v2,...`` (each may be a range ``a..b`` or ``a..b:step``), typed like the current value."""
    cast = _cast_for(current)
    values = []
    for part in text.split(","):
        if ".." in part and isinstance(current, (int, float)) and not isinstance(current, bool):
            values += _range(part, cast)
        else:
            values.append(cast(part))
    return tuple(values)


def parse_axes(prompt: dict, specs: list[str]) -> list[Axis]:
    """The sweep's dimensions, checked against the workflow before any server is asked for anything."""
    axes: list[Axis] = []
    for spec in specs:
        target, eq, text = spec.partition("=")
        if not eq or not target or not text:
            raise SweepError(f"--vary {spec}: write NODE.INPUT=v1,v2,... (NODE is the node's id or title).")
        if "." in target:
            name, input_name = target.rsplit(".", 1)
            node_id = find_node(prompt, name, spec)
        else:  # a bare input name: the one node with that widget input
            input_name = target
            hits = [i for i, n in prompt.items() if input_name in n.get("inputs", {})
                    and not isinstance(n["inputs"][input_name], list)]
            if len(hits) != 1:
                raise SweepError(f"--vary {spec}: {len(hits) or 'no'} node(s) have a widget input {input_name!r}"
                                 + (f" (ids {', '.join(hits)})" if hits else "") + "; write NODE.INPUT=v1,v2,... "
                                 "(NODE is the node's id or title).")
            node_id = hits[0]
        node = prompt[node_id]
        inputs = node.get("inputs", {})
        if input_name not in inputs:
            widgets = ", ".join(k for k, v in inputs.items() if not isinstance(v, list))
            raise SweepError(f"--vary {spec}: node {node_id} ({node['class_type']}) has no input {input_name!r}; "
                             f"its widget inputs: {widgets or 'none'}.")
        if isinstance(inputs[input_name], list):
            raise SweepError(f"--vary {spec}: input {input_name!r} of node {node_id} ({node['class_type']}) is a "
                             "link from another node, not a widget value; vary a widget input.")
        try:
            values = parse_values(text, inputs[input_name])
        except (ValueError, KeyError) as e:
            raise SweepError(f"--vary {spec}: cannot read the values {text!r} as "
                             f"{type(inputs[input_name]).__name__} ({e}).") from None
        if not values:
            raise SweepError(f"--vary {spec}: no values.")
        if len(set(values)) != len(values):
            raise SweepError(f"--vary {spec}: a value is given twice.")
        if any(a.node == node_id and a.input == input_name for a in axes):
            raise SweepError(f"--vary {spec}: node {node_id} input {input_name!r} is varied twice.")
        axes.append(Axis(node_id, input_name, values, input_name))
    labels = [a.input for a in axes]
    return [a if labels.count(a.input) == 1 else Axis(a.node, a.input, a.values, f"{a.node}.{a.input}")
            for a in axes]


def check_against_server(url: str, prompt: dict, axes: list[Axis]) -> None:
    """Each varied value within the input's range or choices, as the server's /object_info declares them."""
    for axis in axes:
        class_type = prompt[axis.node]["class_type"]
        with urllib.request.urlopen(f"{url.rstrip('/')}/object_info/{quote(class_type)}", timeout=60) as r:
            info = json.loads(r.read()).get(class_type)
        if info is None:
            raise SweepError(f"the server at {url} has no node type {class_type} (node {axis.node}); "
                             "is the pack installed there?")
        declared = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
        spec = declared.get(axis.input)
        if spec is None:
            raise SweepError(f"--vary {axis.node}.{axis.input}: {class_type} on {url} has no input {axis.input!r}.")
        kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        for v in axis.values:
            if choices is not None and v not in choices:
                raise SweepError(f"--vary {axis.node}.{axis.input}: {v!r} is not one of {choices}.")
            if kind in ("INT", "FLOAT") and (("min" in options and v < options["min"])
                                             or ("max" in options and v > options["max"])):
                raise SweepError(f"--vary {axis.node}.{axis.input}: {v} is outside "
                                 f"[{options.get('min')}, {options.get('max')}].")


# ----------------------------------------------------------------------------------------------------------
# The graph: sinks, patch bypass, the mask RePaint sees


def links(node: dict):
    for name, value in node.get("inputs", {}).items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            yield name, value


def sinks(prompt: dict) -> list[str]:
    """Nodes no other node reads: the outputs of an API prompt."""
    used = {v[0] for n in prompt.values() for _, v in links(n)}
    return [i for i in prompt if i not in used]


def ancestors(prompt: dict, start: list[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        i = todo.pop()
        if i in seen or i not in prompt:
            continue
        seen.add(i)
        todo += [v[0] for _, v in links(prompt[i])]
    return seen


def descendants(prompt: dict, start: str) -> set[str]:
    return {i for i in prompt if start in ancestors(prompt, [i]) and i != start}


def masactrl_patches(prompt: dict) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] in MASACTRL_PATCHES]


def bypass_masactrl(prompt: dict) -> dict:
    """The prompt with every MasaCtrl patch node removed, its consumers reading the unpatched model."""
    prompt = copy.deepcopy(prompt)
    outputs = sinks(prompt)
    for patch in masactrl_patches(prompt):
        model = prompt[patch]["inputs"]["model"]
        for node in prompt.values():
            for name, value in list(links(node)):
                if value[0] == patch:
                    node["inputs"][name] = list(model)
        del prompt[patch]
    keep = ancestors(prompt, outputs)
    return {i: n for i, n in prompt.items() if i in keep}


def repaint_mask_link(prompt: dict) -> list | None:
    """The link of the mask that a RePaint sampler's latent carries (``SetLatentNoiseMask.mask`` and the like)."""
    samplers = [i for i, n in prompt.items() if n["class_type"] in REPAINT_NODES]
    for s in samplers:
        consumers = [i for i, n in prompt.items() if any(v[0] == s for _, v in links(n))]
        for start in [s] + consumers:
            latent = prompt[start]["inputs"].get("latent_image")
            todo, seen = [latent[0]] if isinstance(latent, list) else [], set()
            while todo:  # breadth first: the nearest node upstream that takes a mask
                i = todo.pop(0)
                if i in seen or i not in prompt:
                    continue
                seen.add(i)
                mask = prompt[i]["inputs"].get("mask")
                if isinstance(mask, list):
                    return list(mask)
                todo += [v[0] for _, v in links(prompt[i])]
    return None


def main_output(prompt: dict) -> str | None:
    """The image output the metrics read: the one fed by the MasaCtrl patch or the RePaint sampler."""
    for start in masactrl_patches(prompt) + [i for i, n in prompt.items() if n["class_type"] in REPAINT_NODES]:
        hits = [i for i in sorted(descendants(prompt, start), key=_id_order)
                if prompt[i]["class_type"] in OUTPUT_IMAGE_NODES]
        if hits:
            return hits[0]
    images = [i for i in sinks(prompt) if prompt[i]["class_type"] in OUTPUT_IMAGE_NODES and i != MASK_SAVE_NODE]
    return images[0] if images else None


def _id_order(i: str):
    return (0, int(i), "") if i.isdigit() else (1, 0, i)


# ----------------------------------------------------------------------------------------------------------
# Cells


@dataclass
class Cell:
    key: str  # folder name under cells/
    settings: dict  # axis label -> value
    prompt: dict
    reference: str | None = None  # key of this cell's MasaCtrl-off reference
    is_reference: bool = False


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


def _prefix_outputs(prompt: dict, folder: str) -> None:
    for node in prompt.values():
        if node["class_type"] == "SaveImage" and isinstance(node["inputs"].get("filename_prefix"), str):
            node["inputs"]["filename_prefix"] = f"{folder}/{Path(node['inputs']['filename_prefix']).name}"


def make_cells(prompt: dict, axes: list[Axis], name: str) -> tuple[list[Cell], list[Cell]]:
    """(grid cells in row-major order of the axes, MasaCtrl-off reference cells)."""
    prompt = copy.deepcopy(prompt)
    mask = repaint_mask_link(prompt)
    if mask is not None:  # save the mask the sampler works with, for the seam error
        prompt[MASK_NODE] = {"class_type": "MaskToImage", "inputs": {"mask": mask}, "_meta": {"title": "sweep mask"}}
        prompt[MASK_SAVE_NODE] = {"class_type": "SaveImage", "_meta": {"title": "sweep mask"},
                                  "inputs": {"images": [MASK_NODE, 0], "filename_prefix": "mask"}}
    patches = masactrl_patches(prompt)
    bypassed = bypass_masactrl(prompt) if patches else None
    cells, references = [], {}
    for combo in itertools.product(*(a.values for a in axes)):
        key = "__".join(_safe(a.key(v)) for a, v in zip(axes, combo))
        p = copy.deepcopy(prompt)
        for a, v in zip(axes, combo):
            p[a.node]["inputs"][a.input] = v
        _prefix_outputs(p, f"consistent-synthesis/{name}-sweep/{key}")
        cell = Cell(key, {a.label: v for a, v in zip(axes, combo)}, p)
        if bypassed is not None:
            kept = [(a, v) for a, v in zip(axes, combo) if a.node in bypassed]
            ref_key = "__".join([REFERENCE] + [_safe(a.key(v)) for a, v in kept])
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
    for i in sorted(prompt, key=_id_order):
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


# ----------------------------------------------------------------------------------------------------------
# Running the cells on the servers


class Progress:
    """One line on stderr: cells done of the total, and per server its cell and sampler step."""

    def __init__(self, total: int, servers: list[str]):
        self.total, self.done, self.failed = total, 0, 0
        self.status = {s: "idle" for s in servers}
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True, leave=True)
        except ImportError:
            self.bar = None

    def server(self, url: str, text: str) -> None:
        self.status[url] = text
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(f"{_short(s)}: {t}" for s, t in self.status.items()), refresh=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def cell_done(self, text: str) -> None:
        self.done += 1
        self.note(f"[{self.done}/{self.total}] {text}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


@dataclass
class State:
    folder: Path
    progress: Progress | None
    timeout: float
    failed: dict = field(default_factory=dict)  # cell key -> message
    lost: list = field(default_factory=list)


async def run_cell(url: str, cell: Cell, state: State) -> dict:
    """Queue one cell on ``url``, follow it, save its images as ``<node>_<n>.png``; its record."""
    evaluations: dict[str, int] = {}

    def on_event(kind, data):
        if kind == "progress" and data.get("node") is not None:
            node = str(data["node"])
            if "Sampler" in cell.prompt.get(node, {}).get("class_type", ""):
                evaluations[node] = max(evaluations.get(node, 0), int(data["max"]))
            state.progress.server(url, f"{cell.key[:40]} {data['value']}/{data['max']}")

    c = client.Client(url, state.timeout, on_event=on_event)
    state.progress.server(url, f"{cell.key[:40]} queued")
    started = time.monotonic()
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30)) as session:
        async with session.ws_connect(f"{c.url}/ws?clientId={c.client_id}", heartbeat=30, max_msg_size=0) as ws:
            prompt_id = await c.queue(session, cell.prompt)
            await asyncio.wait_for(c._follow(ws, prompt_id, cell.prompt), state.timeout)
        entry = await c._history(session, prompt_id)
        if entry.get("status", {}).get("status_str") == "error":
            raise client.PromptFailed(f"prompt {prompt_id} ended with an error: {entry['status'].get('messages')}")
        folder = state.folder / "cells" / cell.key
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, list[str]] = {}
        for node_id, output in sorted(entry.get("outputs", {}).items(), key=lambda kv: _id_order(kv[0])):
            for n, item in enumerate(output.get("images", [])):
                query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                   "type": item.get("type", "output")})
                async with session.get(f"{c.url}/view?{query}") as r:
                    r.raise_for_status()
                    data = await r.read()
                name = f"{node_id}_{n:02d}{Path(item['filename']).suffix or '.png'}"
                (folder / name).write_bytes(data)
                files.setdefault(node_id, []).append(name)
    record = dict(cell=cell.key, settings=cell.settings, reference=cell.reference, is_reference=cell.is_reference,
                  seed=seed_of(cell.prompt), server=url, seconds=round(time.monotonic() - started, 3),
                  evaluations=sum(evaluations.values()), files=files)
    tmp = folder / "cell.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / "cell.json")  # written last: a cell is done when its record exists
    return record


def _server_lost(e: BaseException) -> bool:
    """A connection problem (the cell goes to another server), not a failure of the cell itself."""
    import aiohttp

    if isinstance(e, (client.ServerLost, aiohttp.ClientError)):
        return True
    if isinstance(e, (client.PromptFailed, asyncio.TimeoutError)):  # a node failed, or the cell took too long
        return False
    return isinstance(e, OSError)  # refused, reset, unreachable


async def _worker(url: str, queue: asyncio.Queue, state: State) -> None:
    while True:
        cell = await queue.get()
        try:
            record = await run_cell(url, cell, state)
        except client.PromptRejected:
            queue.task_done()
            raise
        except Exception as e:
            if _server_lost(e):
                queue.put_nowait(cell)  # another server takes it
                queue.task_done()
                state.lost.append(url)
                state.progress.server(url, "LOST")
                state.progress.note(f"server {url} lost ({type(e).__name__}: {e}); cell {cell.key} goes back to "
                                    "the queue for the other servers")
                return
            if not isinstance(e, (client.PromptFailed, asyncio.TimeoutError)):
                raise
            state.failed[cell.key] = f"{type(e).__name__}: {e}"
            state.progress.note(f"cell {cell.key} FAILED on {url}: {e}")
        else:
            state.progress.cell_done(f"{cell.key} on {_short(url)}: {record['seconds']:.1f} s, "
                                     f"{record['evaluations']} evaluations")
        state.progress.server(url, "idle")
        queue.task_done()


async def run_cells(urls: list[str], cells: list[Cell], state: State) -> None:
    """Every cell on the first free server; cells of a lost server are run by the others."""
    queue: asyncio.Queue = asyncio.Queue()
    for cell in cells:
        queue.put_nowait(cell)
    workers = [asyncio.create_task(_worker(u, queue, state)) for u in urls]
    joined = asyncio.create_task(queue.join())
    pending = {joined, *workers}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if joined in done:
                return
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            if not any(w in pending for w in workers):
                raise SweepError(f"every server was lost ({', '.join(state.lost)}); {queue.qsize()} cell(s) did "
                                 "not run. Run the same command again (with servers that answer) to finish.")
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# ----------------------------------------------------------------------------------------------------------
# Metrics, CSV, grid and plot


def _cell_images(folder: Path, record: dict, node: str | None) -> list[Path]:
    names = record["files"].get(node) if node else None
    if names is None:  # every image but the sweep's mask
        names = [f for n, fs in record["files"].items() if n != MASK_SAVE_NODE for f in fs]
    return [folder / f for f in names]


def measure(prompt: dict, folder: Path, records: dict[str, dict]) -> dict[str, dict]:
    """Metrics per cell key (references included), from the images on disk."""
    from . import metrics

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
             "seam_error", "seam_ratio"]
    return order.index(name) if name in order else len(order)


def _fmt(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def draw(prompt: dict, axes: list[Axis], folder: Path, name: str, records: dict[str, dict],
         measured: dict[str, dict], cells: list[Cell], tile_side: int) -> tuple[list[Path], list[Path]]:
    """A grid and a plot per value of the dimensions past the second."""
    from . import grid

    main = main_output(prompt)
    patches = masactrl_patches(prompt)
    source_index = prompt[patches[0]]["inputs"].get("source_index", 0) if patches else None
    rows_axis = axes[0]
    cols_axis = axes[1] if len(axes) > 1 else None
    further = axes[2:]
    grids, plots = [], []
    for extra in itertools.product(*(a.values for a in further)):
        suffix = "__".join(_safe(a.key(v)) for a, v in zip(further, extra))
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
            baselines = {m: v for m, v in ref_metrics.items() if m.endswith("_to_source")}
        plot = grid.plot_metrics(folder / (f"plot__{suffix}.png" if suffix else "plot.png"), title,
                                 rows_axis.label, list(rows_axis.values),
                                 cols_axis.label if cols_axis else "", list(cols_axis.values) if cols_axis else [""],
                                 series, baselines)
        if plot is not None:
            plots.append(plot)
    return grids, plots


# ----------------------------------------------------------------------------------------------------------
# The command


def parser() -> argparse.ArgumentParser:
    from .cli import SMOKE_HEIGHT, SMOKE_STEPS, SMOKE_WIDTH

    p = argparse.ArgumentParser(
        prog="python -m runner sweep",
        description="Run a workflow once per combination of input values, spread over ComfyUI servers; "
                    "write the images, a labelled grid, cells.csv with pixel-space metrics and a plot.")
    p.add_argument("workflow", help="an API-format JSON, or a shipped workflow's name (e.g. masactrl_sd15)")
    p.add_argument("--vary", metavar="NODE.INPUT=V1,V2", action="append", required=True,
                   help="a dimension: the node (id, title or class type) and widget input, and its values; "
                        "a..b or a..b:step is a range (inclusive). Repeat for more dimensions: the first gives "
                        "the grid's rows, the second its columns, further ones one grid each")
    p.add_argument("--server", metavar="URL", action="append", default=[],
                   help="a running ComfyUI; repeat to spread the cells over several. Without any, the runner "
                        "starts --local servers itself")
    p.add_argument("--local", metavar="N", type=int, default=1,
                   help="servers to start when no --server is given (default 1; on a machine with several "
                        "GPUs, one per GPU in turn)")
    p.add_argument("--out", metavar="DIR", default="output", help="results go to DIR/<workflow>-sweep/")
    p.add_argument("--smoke", action="store_true", help=(
        f"random-weight stand-ins for missing models, {SMOKE_WIDTH}x{SMOKE_HEIGHT} px, {SMOKE_STEPS} steps"))
    p.add_argument("--no-random", action="store_true", help="fail instead of using random-weight stand-ins")
    p.add_argument("--width", type=int, help="override every width input")
    p.add_argument("--height", type=int, help="override every height input")
    p.add_argument("--steps", type=int, help="override every steps input")
    p.add_argument("--seed", type=int, help="override every seed input")
    p.add_argument("--tile", type=int, default=256, help="longest side of a grid tile in pixels (default 256)")
    p.add_argument("--cpu", action="store_true", default=None, help="start local servers with --cpu")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one cell may take")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _start_local(args, prompt: dict) -> tuple[list, list]:
    """Start ``--local`` servers (in parallel); (servers, missing model refs given random stand-ins)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import cli
    from .host import find_host
    from .server import LocalServer

    host, how = find_host()
    if host is None:
        raise SweepError(how)
    roots, missing = cli.local_model_roots(host, workflow.model_refs(prompt), args.no_random, SweepError)
    gpus = 0
    if not args.cpu:
        import torch

        gpus = torch.cuda.device_count()
    servers = [LocalServer(host, model_roots=roots, cpu=args.cpu,
                           extra_args=["--cuda-device", str(i % gpus)] if gpus > 1 else [])
               for i in range(max(1, args.local))]
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(s.start) for s in servers]
        errors = [f.exception() for f in futures]
    if any(errors):
        for s in servers:
            s.stop()
        raise SweepError(f"a local ComfyUI did not start: {next(e for e in errors if e)}")
    return servers, missing


def run(args: argparse.Namespace) -> int:
    from . import cli

    path = workflow.resolve(args.workflow)
    prompt = workflow.load(path)
    sizes = dict(width=args.width, height=args.height, steps=args.steps)
    if args.smoke:
        sizes = dict(width=args.width or cli.SMOKE_WIDTH, height=args.height or cli.SMOKE_HEIGHT,
                     steps=args.steps or cli.SMOKE_STEPS)
    prompt = workflow.override(prompt, seed=args.seed, **sizes)
    axes = parse_axes(prompt, args.vary)  # fails before any server is touched
    name = path.stem
    folder = Path(args.out) / f"{name}-sweep"
    cells, references = make_cells(prompt, axes, name)

    everything = references + cells
    todo = [c for c in everything if load_done(folder / "cells" / c.key) is None]
    servers, missing = [], []
    urls = [u.rstrip("/") for u in args.server]
    state = State(folder, None, args.timeout)
    wall = 0.0
    logging.info("%s: %d cell(s) (%s), %d reference cell(s) with MasaCtrl off; %d already done, %d to run",
                 name, len(cells), " x ".join(str(len(a.values)) for a in axes), len(references),
                 len(everything) - len(todo), len(todo))
    if todo:  # a finished sweep is redrawn without starting or asking any server
        try:
            if urls:
                answering = []
                for url in urls:
                    try:
                        lacking = cli._missing_on_server(url, workflow.model_refs(prompt))
                    except OSError as e:  # URLError included
                        logging.warning("the server at %s does not answer (%s); the sweep goes on without it", url, e)
                        continue
                    answering.append(url)
                    if lacking:
                        raise SweepError(f"the server at {url} has no "
                                         f"{', '.join(f'{r.folder}/{r.name}' for r in lacking)}; put the files in "
                                         "its models folders (random stand-ins only go to servers the runner starts).")
                if not answering:
                    raise SweepError(f"none of the servers answers: {', '.join(urls)}.")
                urls = answering
            else:
                servers, missing = _start_local(args, prompt)
                urls = [s.url for s in servers]
                if missing:
                    from . import random_models

                    fitted = 0
                    for c in todo:  # a varied block list too is moved onto a reduced-depth stand-in
                        before, c.prompt = c.prompt, random_models.fit_to_stand_ins(c.prompt, missing, log=False)
                        fitted += before != c.prompt
                    if fitted:
                        logging.warning("REDUCED-DEPTH Flux stand-in: the block lists of %d cell(s) are moved onto "
                                        "its %d blocks.", fitted, sum(random_models.FLUX_STAND_IN_DEPTH.values()))
            check_against_server(urls[0], prompt, axes)
            logging.info("running %d cell(s) on %d server(s): %s", len(todo), len(urls), ", ".join(urls))
            state.progress = Progress(len(todo), urls)
            started = time.monotonic()
            try:
                asyncio.run(run_cells(urls, todo, state))
            finally:
                state.progress.close()
            wall = time.monotonic() - started
        finally:
            for s in servers:
                s.stop()

    folder.mkdir(parents=True, exist_ok=True)
    records = {c.key: r for c in everything if (r := load_done(folder / "cells" / c.key)) is not None}
    measured = measure(prompt, folder, records)
    grid_records = [records[c.key] for c in cells if c.key in records]
    write_csv(folder / "cells.csv", axes, grid_records, measured)
    if references:
        write_csv(folder / "reference.csv", axes, [records[c.key] for c in references if c.key in records], measured)
    grids, plots = draw(prompt, axes, folder, name, records, measured, cells, args.tile)
    by_server: dict[str, int] = {}
    for c in todo:
        if c.key in records:
            by_server[records[c.key]["server"]] = by_server.get(records[c.key]["server"], 0) + 1
    logging.info("sweep of %s: %d cell(s) run in %.1f s (%s); results in %s: cells.csv, %s", name, len(todo)
                 - len(state.failed), wall, ", ".join(f"{_short(u)}: {n}" for u, n in by_server.items()) or "none",
                 folder, ", ".join(p.name for p in grids + plots))
    if missing:
        logging.warning("RANDOM WEIGHTS were used for %s: the images are noise.", ", ".join(r.name for r in missing))
    if state.failed:
        logging.error("%d cell(s) failed: %s", len(state.failed),
                      "; ".join(f"{k}: {v}" for k, v in state.failed.items()))
        return 1
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run(args)
    except SweepError as e:
        logging.error("sweep: %s", e)
        return 2
    except client.PromptRejected as e:
        logging.error("the server rejected a cell's prompt (nothing else was run):\n%s", e)
        return 2
