"""``python -m runner WORKFLOW ...`` runs one workflow (``cli``); ``python -m runner sweep WORKFLOW ...``
runs a grid of them (``sweep.command``)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"] and not Path("sweep").is_file():  # a workflow file called "sweep" is run as one
        from .sweep.command import main as sweep

        return sweep(argv[1:])
    from .cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
