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

One module per job, each importing only those before it:
``axes`` (the ``--vary`` dimensions), ``graph`` (reading and rewiring the API prompt), ``cells``
(the cells, their folders and resuming), ``pool`` (the servers and the queue that feeds them),
``report`` (metrics, CSV, grid and plot), ``command`` (the command line).
"""


class SweepError(Exception):
    """A sweep that cannot start or finish; the message says what to change."""
