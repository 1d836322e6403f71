"""Pictures of results: a captioned image grid (PIL) and line charts (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# PIL and matplotlib are imported where something is drawn, for start-up time.


def image_grid(images: np.ndarray, captions: Sequence[str], columns: int = 6, scale: int = 4,
               caption_lines: int = 3) -> PIL.Image.Image:  # noqa: F821
    """Images ``(N, H, W, 3)`` uint8, each enlarged ``scale`` times (nearest: the pixels stay honest)
    with its caption wrapped underneath, on a white sheet."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    font = ImageFont.load_default()
    cell_w, pad = w * scale, 6
    chars = max(8, cell_w // 6)
    line_h = 12
    cell_h = h * scale + caption_lines * line_h + pad
    rows = -(-n // columns)
    sheet = Image.new("RGB", (min(n, columns) * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + pad)
        sheet.paste(Image.fromarray(image).resize((cell_w, h * scale), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, chars)[:caption_lines]):
            draw.text((x, y + h * scale + 2 + j * line_h), line, fill="black", font=font)
    return sheet


def line_chart(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
               title: str) -> None:
    """One PNG: a line per series ``name -> (x, y)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
