"""Pictures of a sweep: a labelled grid of the cells' images and a plot of the metrics."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PAD, LABEL_SIZE, TITLE_SIZE = 6, 14, 16
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def tile(paths: list[Path], max_side: int) -> Image.Image:
    """The images side by side, scaled down (never up) so the tile's longer side is at most ``max_side``."""
    images = [Image.open(p).convert("RGB") for p in paths]
    if not images:
        return Image.new("RGB", (max_side, max_side), (200, 200, 200))
    height = max(im.height for im in images)
    strip = Image.new("RGB", (sum(im.width for im in images), height), BACKGROUND)
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    scale = min(1.0, max_side / max(strip.size))
    if scale < 1.0:
        strip = strip.resize((max(1, round(strip.width * scale)), max(1, round(strip.height * scale))),
                             Image.LANCZOS)
    return strip


def draw_grid(path: Path, title: str, row_label: str, rows: list, col_label: str, cols: list,
              tiles: dict[tuple[int, int], Image.Image], header: list[tuple[str, Image.Image]] = ()) -> list[dict]:
    """A grid: one tile per (row, column), rows labelled ``row_label=value`` and columns ``col_label=value``.

    ``header``: captioned images drawn above the grid (the source, the patch-disabled reference).
    Returns where each tile and label went: ``{"row", "col", "row_label", "col_label", "box",
    "row_label_box", "col_label_box"}`` with boxes as (left, top, right, bottom) pixels.
    """
    font, title_font = _font(LABEL_SIZE), _font(TITLE_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tw = max((t.width for t in tiles.values()), default=64)
    th = max((t.height for t in tiles.values()), default=64)
    row_texts = [f"{row_label}={v}" if row_label else "" for v in rows]
    col_texts = [f"{col_label}={v}" if col_label else "" for v in cols]
    label_w = max([_text_size(probe, t, font)[0] for t in row_texts] + [0]) + 2 * PAD
    tw = max([tw] + [_text_size(probe, t, font)[0] + PAD for t in col_texts])  # a column fits its label
    col_h = max([_text_size(probe, t, font)[1] for t in col_texts] + [0]) + 2 * PAD
    title_h = _text_size(probe, title, title_font)[1] + 2 * PAD
    header_h = (max(im.height for _, im in header) + LABEL_SIZE + 3 * PAD) if header else 0

    width = max(label_w + len(cols) * (tw + PAD) + PAD,
                _text_size(probe, title, title_font)[0] + 2 * PAD,
                sum(im.width + PAD for _, im in header) + PAD)
    height = title_h + header_h + col_h + len(rows) * (th + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill=INK, font=title_font)
    y = title_h
    x = PAD
    for caption, im in header:
        draw.text((x, y), caption, fill=INK, font=font)
        canvas.paste(im, (x, y + LABEL_SIZE + PAD))
        x += im.width + PAD
    y += header_h
    col_boxes = []
    for c, text in enumerate(col_texts):
        xy = (label_w + c * (tw + PAD) + PAD, y + PAD)
        draw.text(xy, text, fill=INK, font=font)
        col_boxes.append(draw.textbbox(xy, text, font=font) if text else None)
    y += col_h
    layout = []
    for r, text in enumerate(row_texts):
        top = y + r * (th + PAD)
        xy = (PAD, top + th // 2 - LABEL_SIZE // 2)
        draw.text(xy, text, fill=INK, font=font)
        row_box = draw.textbbox(xy, text, font=font) if text else None
        for c in range(len(cols)):
            t = tiles.get((r, c))
            if t is not None:
                left = label_w + c * (tw + PAD) + PAD
                canvas.paste(t, (left, top))
                layout.append(dict(row=r, col=c, row_label=text, col_label=col_texts[c],
                                   box=(left, top, left + t.width, top + t.height),
                                   row_label_box=row_box, col_label_box=col_boxes[c]))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return layout


def plot_metrics(path: Path, title: str, x_label: str, xs: list, line_label: str, lines: list,
                 metrics: dict[str, dict[tuple[int, int], float]], baselines: dict[str, float] = (),
                 baseline_label: str = "MasaCtrl off") -> Path | None:
    """One panel per metric: the metric against ``xs``, one line per value in ``lines``.

    ``metrics[name][(x index, line index)]`` is a value (missing or NaN points are left out);
    ``baselines[name]``, when given, is drawn as a dashed line (the patch-disabled reference).
    Returns None (and says so) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed, so no plot was drawn (python -m pip install matplotlib); "
                        "the numbers are in cells.csv.")
        return None
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    positions = list(xs) if numeric else list(range(len(xs)))
    n = max(1, len(metrics))
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, metrics.items()):
        for li, line in enumerate(lines):
            pts = [(positions[xi], values[(xi, li)]) for xi in range(len(xs))
                   if (xi, li) in values and values[(xi, li)] is not None and not math.isnan(values[(xi, li)])]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{line_label}={line}" if line_label else None)
        if name in dict(baselines):
            ax.axhline(dict(baselines)[name], color="grey", linestyle="--", label=baseline_label)
        ax.set_title(name)
        ax.set_xlabel(x_label)
        if not numeric:
            ax.set_xticks(positions, [str(x) for x in xs])
        elif len(xs) <= 16 and all(isinstance(x, int) for x in xs):
            ax.set_xticks(positions)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
