"""The server pool of a sweep: the servers (given ones that answer, or local ones started here),
and the queue of cells that one worker per server drains; a lost server's cell goes to the others."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .. import client, workflow
from ..host import find_host
from ..server import LocalServer
from ..startup import local_model_roots, missing_on_server
from . import SweepError
from .cells import Cell, save_record
from .graph import id_order


def answering(urls: list[str], refs: list[workflow.ModelRef]) -> list[str]:
    """The given servers that answer; each must hold every model file (stand-ins go only to local servers)."""
    found = []
    for url in urls:
        try:
            lacking = missing_on_server(url, refs)
        except OSError as e:  # URLError included
            logging.warning("the server at %s does not answer (%s); the sweep goes on without it", url, e)
            continue
        found.append(url)
        if lacking:
            raise SweepError(f"the server at {url} has no "
                             f"{', '.join(f'{r.folder}/{r.name}' for r in lacking)}; put the files in "
                             "its models folders (random stand-ins only go to servers the runner starts).")
    if not found:
        raise SweepError(f"none of the servers answers: {', '.join(urls)}.")
    return found


def start_local(refs: list[workflow.ModelRef], count: int, cpu: bool | None,
                no_random: bool) -> tuple[list[LocalServer], list[workflow.ModelRef]]:
    """Start ``count`` servers (in parallel); (servers, missing model refs given random stand-ins)."""
    host, how = find_host()
    if host is None:
        raise SweepError(how)
    roots, missing = local_model_roots(host, refs, no_random, SweepError)
    gpus = 0
    if not cpu:
        import torch

        gpus = torch.cuda.device_count()
    servers = [LocalServer(host, model_roots=roots, cpu=cpu,
                           extra_args=["--cuda-device", str(i % gpus)] if gpus > 1 else [])
               for i in range(max(1, count))]
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(s.start) for s in servers]
        errors = [f.exception() for f in futures]
    if any(errors):
        for s in servers:
            s.stop()
        raise SweepError(f"a local ComfyUI did not start: {next(e for e in errors if e)}")
    return servers, missing


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
            self.bar.set_postfix_str(" | ".join(f"{short(s)}: {t}" for s, t in self.status.items()), refresh=True)

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


def short(url: str) -> str:
    """The URL without its scheme: what the progress line and the summary call a server."""
    return url.split("://", 1)[-1].rstrip("/")


@dataclass
class State:
    """What the workers share: the sweep's folder, the progress line, the time a cell may take,
    the cells that failed and the servers lost."""

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
    async with c.session() as session:
        _, outputs = await c.complete(session, cell.prompt)
        folder = state.folder / "cells" / cell.key
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, list[str]] = {}
        for node_id, output in sorted(outputs.items(), key=lambda kv: id_order(kv[0])):
            for n, item in enumerate(output.get("images", [])):
                name = f"{node_id}_{n:02d}{Path(item['filename']).suffix or '.png'}"
                (folder / name).write_bytes(await c.download(session, item))
                files.setdefault(node_id, []).append(name)
    return save_record(folder, cell, url, time.monotonic() - started, sum(evaluations.values()), files)


def _server_lost(e: BaseException) -> bool:
    """A connection problem (the cell goes to another server), not a failure of the cell itself."""
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
            state.progress.cell_done(f"{cell.key} on {short(url)}: {record['seconds']:.1f} s, "
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
