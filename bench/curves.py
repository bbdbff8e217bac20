"""A small line chart as a PNG, drawn with Pillow (already a dependency): no plotting library needed.

`line_chart(series, path, ...)`: each series is a name, a colour and (x, y) points; x is drawn on a
log scale when asked (training schedules: 30 / 100 / 300 epochs), y in the data's own range with a
little margin, every point marked and labelled with its value, and a legend.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Series = tuple[str, tuple[int, int, int], list[tuple[float, float]]]


def line_chart(series: list[Series], path: Path, *, title: str, x_label: str, y_label: str, log_x: bool = False,
               size: tuple[int, int] = (900, 560), hlines: list[tuple[str, tuple[int, int, int], float]] = ()) -> Path:
    """Draw the series (and horizontal reference lines) into `path`; returns the path."""
    width, height = size
    left, right, top, bottom = 80, 220, 50, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts] + [y for _, _, y in hlines]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)  # noqa: E731
    x0, x1 = fx(min(xs)), fx(max(xs))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = 0.1 * max(1e-9, max(ys) - min(ys)) or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((10, 8), title, fill="black", font=font)
    draw.text(((width - right + left) / 2 - 40, height - 25), x_label, fill="black", font=font)
    draw.text((10, top - 18), y_label, fill="black", font=font)
    for k in range(6):  # y grid
        y = y0 + k * (y1 - y0) / 5
        _, py = at(min(xs), y)
        draw.line([left, py, width - right, py], fill=(225, 225, 225))
        draw.text((left - 45, py - 6), f"{y:.1f}", fill="black", font=font)
    for x in sorted(set(xs)):  # x ticks at the measured schedules
        px, _ = at(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{x:g}", fill="black", font=font)
    legend_y = top
    for name, colour, y in hlines:
        _, py = at(min(xs), y)
        for sx in range(left, width - right, 12):  # dashed
            draw.line([sx, py, min(sx + 6, width - right), py], fill=colour, width=2)
        draw.text((width - right + 10, legend_y), f"- - {name} ({y:.1f})", fill=colour, font=font)
        legend_y += 18
    for name, colour, pts in series:
        pts = sorted(pts)
        pixels = [at(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=3)
        for (x, y), (px, py) in zip(pts, pixels):
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            draw.text((px - 30 if px > width - right - 40 else px + 6, py - 14), f"{y:.1f}", fill=colour, font=font)
        draw.text((width - right + 10, legend_y), f"--- {name}", fill=colour, font=font)
        legend_y += 18
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
