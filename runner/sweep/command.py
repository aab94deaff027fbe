"""The sweep's command line: read the workflow and the ``--vary`` dimensions, skip the cells already
done, run the others on the server pool, then write the report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

from .. import client, workflow
from ..startup import SMOKE_HEIGHT, SMOKE_STEPS, SMOKE_WIDTH, sizes
from . import SweepError
from .axes import Axis, check_against_server, parse_axes
from .cells import Cell, load_done, make_cells
from .graph import method_off
from .pool import Progress, State, answering, run_cells, short, start_local
from .report import draw, measure, write_csv


def parser() -> argparse.ArgumentParser:
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



def _fit_to_stand_ins(todo: list[Cell], missing: list[workflow.ModelRef]) -> None:
    """Move a varied block list too onto a reduced-depth stand-in (one log line for all cells)."""
    from .. import random_models

    fitted = 0
    for c in todo:
        before, c.prompt = c.prompt, random_models.fit_to_stand_ins(c.prompt, missing, log=False)
        fitted += before != c.prompt
    if fitted:
        logging.warning("REDUCED-DEPTH Flux stand-in: the block lists of %d cell(s) are moved onto "
                        "its %d blocks.", fitted, sum(random_models.FLUX_STAND_IN_DEPTH.values()))


def _run(todo: list[Cell], args: argparse.Namespace, prompt: dict, axes: list[Axis],
         state: State) -> tuple[float, list[workflow.ModelRef]]:
    """Run ``todo`` on the given servers, or on local ones started (and stopped) here;
    (wall seconds, model refs given random stand-ins)."""
    servers, missing = [], []
    urls = [u.rstrip("/") for u in args.server]
    try:
        if urls:
            urls = answering(urls, workflow.model_refs(prompt))
        else:
            servers, missing = start_local(workflow.model_refs(prompt), args.local, args.cpu, args.no_random)
            urls = [s.url for s in servers]
            if missing:
                _fit_to_stand_ins(todo, missing)
        check_against_server(urls[0], prompt, axes)
        logging.info("running %d cell(s) on %d server(s): %s", len(todo), len(urls), ", ".join(urls))
        state.progress = Progress(len(todo), urls)
        started = time.monotonic()
        try:
            asyncio.run(run_cells(urls, todo, state))
        finally:
            state.progress.close()
        return time.monotonic() - started, missing
    finally:
        for s in servers:
            s.stop()


def run(args: argparse.Namespace) -> int:
    path = workflow.resolve(args.workflow)
    prompt = workflow.load(path)
    prompt = workflow.override(prompt, seed=args.seed, **sizes(args.width, args.height, args.steps, args.smoke))
    axes = parse_axes(prompt, args.vary)  # fails before any server is touched
    name = path.stem
    folder = Path(args.out) / f"{name}-sweep"
    cells, references = make_cells(prompt, axes, name)

    everything = references + cells
    todo = [c for c in everything if load_done(folder / "cells" / c.key) is None]
    state = State(folder, None, args.timeout)
    wall, missing = 0.0, []
    logging.info("%s: %d cell(s) (%s), %d reference cell(s) with %s; %d already done, %d to run",
                 name, len(cells), " x ".join(str(len(a.values)) for a in axes), len(references),
                 method_off(prompt) if references else "no patch off", len(everything) - len(todo), len(todo))
    if todo:  # a finished sweep is redrawn without starting or asking any server
        wall, missing = _run(todo, args, prompt, axes, state)

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
                 - len(state.failed), wall, ", ".join(f"{short(u)}: {n}" for u, n in by_server.items()) or "none",
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
