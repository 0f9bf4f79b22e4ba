"""Turn scores into things people read: markdown tables, heatmaps (the paper's Figure 4), image grids."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

Matrix = Mapping[str, Mapping[str, float]]  # row (model) -> column (task) -> value


def markdown_table(
    matrix: Matrix,
    columns: Sequence[str] | None = None,
    fmt: str = "{:.1f}",
    higher_is_better: bool = True,
    bold_best: bool = True,
    extra: Mapping[str, Callable[[str], str]] | None = None,
    first_header: str = "model",
) -> str:
    """A markdown table; the best value of each column is bold. `extra` adds columns computed from the row name."""
    columns = list(columns or _columns(matrix))
    extra = dict(extra or {})
    best = {}
    for col in columns:
        values = [row[col] for row in matrix.values() if col in row and not math.isnan(row[col])]
        if values:
            best[col] = max(values) if higher_is_better else min(values)
    lines = [
        "| " + " | ".join([first_header, *columns, *extra]) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) + len(extra))) + "|",
    ]
    for name, row in matrix.items():
        cells = []
        for col in columns:
            value = row.get(col, float("nan"))
            text = "–" if math.isnan(value) else fmt.format(value)
            cells.append(f"**{text}**" if bold_best and col in best and value == best[col] else text)
        cells += [f(name) for f in extra.values()]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def heatmap(
    matrix: Matrix,
    path: Path,
    title: str,
    columns: Sequence[str] | None = None,
    fmt: str = "{:.0f}",
    cmap: str = "viridis",
    label: str = "",
) -> Path:
    """A models x tasks heatmap with the value in every cell, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(matrix)
    columns = list(columns or _columns(matrix))
    values = [[matrix[r].get(c, float("nan")) for c in columns] for r in rows]
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 3, 0.42 * len(rows) + 1.8))
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (max(finite) + min(finite)) / 2 if finite else 0
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                colour = "black" if value > middle else "white"
                ax.text(j, i, fmt.format(value), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(
    series: dict[str, dict[float, float]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    references: dict[str, float] | None = None,
    markers: dict[str, tuple[float, float, float, float]] | None = None,
) -> Path:
    """One line per series (x -> y), plus dashed horizontal reference lines and single marked points
    (label -> x, y, x low, x high: drawn with a horizontal bar from low to high), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    for (name, value), style in zip((references or {}).items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, linestyle=style, color="grey", label=name)
    for name, (x, y, low, high) in (markers or {}).items():
        ax.errorbar([x], [y], xerr=[[x - low], [high - x]], fmt="*", markersize=12, capsize=4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def labelled_grid(
    images: Mapping[str, Mapping[str, torch.Tensor]],
    path: Path,
    title: str = "",
    upscale: int = 4,
) -> Path:
    """One row per model, one block of images per task (images [k, 3, H, W] in [-1, 1]), with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featurefusion.toyworld.world import image_grid

    rows = list(images)
    columns = list(dict.fromkeys(c for row in images.values() for c in row))
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(1.5 * len(columns) + 1, 1.5 * len(rows) + 0.6), squeeze=False
    )
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if col in images[row]:
                batch = images[row][col]
                ax.imshow(image_grid(batch, nrow=int(math.ceil(math.sqrt(len(batch)))), upscale=upscale, pad=1))
            if i == 0:
                ax.set_title(col, fontsize=8)
            if j == 0:
                ax.set_ylabel(row, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    # tight_layout ignores the suptitle: keep half an inch above the column titles for it.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()) if title else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def captioned_grid(
    rows: Mapping[str, Sequence[Image.Image]],
    path: Path,
    cell: int = 192,
    caption_height: int = 16,
    pad: int = 2,
) -> Path:
    """PIL images in rows (one per caption, e.g. a prompt), each resized to fit `cell` pixels, caption above.

    Unlike `labelled_grid` this keeps images near their own resolution (real Stable Diffusion samples), and
    needs no matplotlib. Small images are enlarged with nearest-neighbour so their pixels stay visible.
    """
    from PIL import ImageDraw

    width = max((len(images) for images in rows.values()), default=1)
    canvas = Image.new("RGB", (pad + width * (cell + pad), pad + len(rows) * (caption_height + cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caption, images) in enumerate(rows.items()):
        top = pad + r * (caption_height + cell + pad)
        draw.text((pad, top + 2), _fit_caption(caption, canvas.width - 2 * pad), fill="black")
        for c, image in enumerate(images):
            thumb = _thumbnail(image, cell)
            x = pad + c * (cell + pad) + (cell - thumb.width) // 2
            y = top + caption_height + (cell - thumb.height) // 2
            canvas.paste(thumb, (x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _thumbnail(image: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def _fit_caption(text: str, pixels: int, char_width: int = 6) -> str:
    limit = max(8, pixels // char_width)  # PIL's default bitmap font is about 6 px per character
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _columns(matrix: Matrix) -> list[str]:
    return list(dict.fromkeys(c for row in matrix.values() for c in row))
