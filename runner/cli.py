"""``python -m runner WORKFLOW``: run an API workflow on ComfyUI and save its outputs."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import client, workflow
from .startup import SMOKE_HEIGHT, SMOKE_STEPS, SMOKE_WIDTH, local_model_roots, missing_on_server, sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner",
        description="Post an API-format workflow to ComfyUI, follow it, and save its images.",
        epilog="A grid of runs over input values, on one or more servers: python -m runner sweep --help")
    p.add_argument("workflow", help="an API-format JSON, or a shipped workflow's name (e.g. masactrl_sd15)")
    p.add_argument("--server", metavar="URL", help="a running ComfyUI (e.g. http://127.0.0.1:8188); "
                   "without it the host's main.py is started on a free loopback port")
    p.add_argument("--out", metavar="DIR", default="output", help="where the images go (default: ./output)")
    p.add_argument("--smoke", action="store_true", help=(
        f"smoke test: random-weight stand-ins for missing models, {SMOKE_WIDTH}x{SMOKE_HEIGHT} px, "
        f"{SMOKE_STEPS} steps (the output is noise; it proves the graph runs)"))
    p.add_argument("--no-random", action="store_true", help="fail instead of using random-weight stand-ins "
                   "for missing model files")
    p.add_argument("--width", type=int, help="override every width input")
    p.add_argument("--height", type=int, help="override every height input")
    p.add_argument("--steps", type=int, help="override every steps input")
    p.add_argument("--seed", type=int, help="override every seed input")
    p.add_argument("--cpu", action="store_true", default=None, help="start the server with --cpu "
                   "(the default when torch sees no GPU)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the prompt")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    path = workflow.resolve(args.workflow)
    prompt = workflow.load(path)
    prompt = workflow.override(prompt, seed=args.seed, **sizes(args.width, args.height, args.steps, args.smoke))
    refs = workflow.model_refs(prompt)
    out = Path(args.out) / path.stem

    if args.server:
        missing = missing_on_server(args.server, refs)
        if missing:
            names = ", ".join(f"{r.folder}/{r.name}" for r in missing)
            if not args.smoke and not args.no_random:
                raise SystemExit(f"the server at {args.server} has no {names}. Put the files in its models "
                                 "folders, or run without --server: the runner then starts ComfyUI itself with "
                                 "random-weight stand-ins for a smoke test.")
            raise SystemExit(f"the server at {args.server} has no {names}; random-weight stand-ins can only be "
                             "given to a server the runner starts (run without --server).")
        result = client.run_prompt(args.server, prompt, out, args.timeout)
    else:
        from .host import find_host
        from .server import LocalServer

        host, how = find_host()
        if host is None:
            raise SystemExit(how)
        logging.info("ComfyUI: %s (found by %s)", host, how)
        roots, missing = local_model_roots(host, refs, args.no_random)
        if missing:
            from . import random_models

            prompt = random_models.fit_to_stand_ins(prompt, missing)
        with LocalServer(host, model_roots=roots, cpu=args.cpu) as server:
            try:
                result = client.run_prompt(server.url, prompt, out, args.timeout)
            except (client.PromptFailed, client.PromptRejected):
                logging.error("server log (tail):\n%s", server.log()[-4000:])
                raise
    logging.info("%s finished in %.1f s: %d file(s) in %s", path.name, result.seconds, len(result.files), out)
    if missing:
        logging.warning("RANDOM WEIGHTS were used for %s: the images are noise.",
                        ", ".join(r.name for r in missing))
    return 0 if result.files else 1


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    started = time.monotonic()
    try:
        code = run(args)
    except client.PromptRejected as e:
        logging.error("the server rejected the workflow:\n%s", e)
        return 2
    except client.PromptFailed as e:
        logging.error("%s", e)
        return 1
    logging.info("total %.1f s", time.monotonic() - started)
    return code
