"""Bar charts drawn with PIL (no plotting library): the fitted ScoreFusion weights lambda."""
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shards.atomic import write_atomically

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def lambda_chart(weights, names: list[str], group_labels: list[str], path: Path, title: str = "lambda") -> None:
    """weights [groups, K] (one group per sigma bin, or a single group): grouped bars with value labels,
    a 0..1 axis and a legend, written atomically as PNG."""
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    groups, k = weights.shape
    font = ImageFont.load_default()
    bar, gap, left, top, plot_h = 28, 24, 50, 40, 220
    legend_w = 20 + max(len(n) for n in names) * 7
    width = left + groups * (k * bar + gap) + gap + legend_w
    height = top + plot_h + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), title, fill="black", font=font)
    base = top + plot_h
    for tick in np.linspace(0, 1, 6):  # y axis with a light grid
        y = base - tick * plot_h
        d.line([(left - 4, y), (width - legend_w - gap // 2, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{tick:.1f}", fill="black", font=font)
    for g in range(groups):
        x0 = left + gap + g * (k * bar + gap)
        for i in range(k):
            h = float(np.clip(weights[g, i], 0, 1)) * plot_h
            x = x0 + i * bar
            d.rectangle([x + 2, base - h, x + bar - 2, base], fill=COLORS[i % len(COLORS)])
            d.text((x + 2, base - h - 12), f"{weights[g, i]:.2f}", fill="black", font=font)
        d.text((x0, base + 8), group_labels[g], fill="black", font=font)
    d.line([(left - 4, base), (width - legend_w - gap // 2, base)], fill="black")
    lx = width - legend_w
    for i, name in enumerate(names):
        d.rectangle([lx, top + i * 16, lx + 10, top + i * 16 + 10], fill=COLORS[i % len(COLORS)])
        d.text((lx + 14, top + i * 16 - 1), name, fill="black", font=font)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    write_atomically(Path(path), buffer.getvalue())
