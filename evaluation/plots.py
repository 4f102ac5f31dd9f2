"""Charts a person looks at, drawn with matplotlib (Agg, no display) and written atomically as PNG: the fitted
ScoreFusion weights lambda, and a metric against the target size n for every method of a sweep."""
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shards.atomic import write_atomically  # noqa: E402


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    write_atomically(Path(path), buffer.getvalue())


def lambda_chart(weights, names: list[str], group_labels: list[str], path: Path, title: str = "lambda") -> None:
    """weights [groups, K] (one group per sigma bin, or a single group): grouped bars with value labels."""
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    groups, k = weights.shape
    figure, axes = plt.subplots(figsize=(1.2 + groups * (0.5 * k + 0.6), 3.2))
    width = 0.8 / k
    for i, name in enumerate(names):
        x = np.arange(groups) + (i - (k - 1) / 2) * width
        bars = axes.bar(x, weights[:, i], width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(np.arange(groups), group_labels)
    axes.set_ylim(min(0.0, weights.min() * 1.15), max(1.0, weights.max() * 1.15))
    axes.set_ylabel("lambda")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    _save(figure, path)


def metric_vs_n(series: dict[str, list[tuple[int, float, float, float]]], path: Path, metric: str, title: str,
                aux_images: float | None = None) -> None:
    """One line per method: series[method] = [(n, value, low, high)], the interval drawn as a band, over n on a
    log axis (the sizes double); with `aux_images` (N_aux, an auxiliary population's size) a second axis on top
    reads n / N_aux, where the paper places its crossover."""
    figure, axes = plt.subplots(figsize=(6.4, 4.4 if aux_images else 4.0))
    for method, points in series.items():
        points = sorted(p for p in points if p[1] is not None)
        if not points:
            continue
        n, value, low, high = (np.array(column, dtype=float) for column in zip(*points))
        line, = axes.plot(n, value, marker="o", label=method)
        axes.fill_between(n, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xscale("log", base=2)
    sizes = sorted({p[0] for points in series.values() for p in points})
    axes.set_xticks(sizes)
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("target size n")
    if aux_images:
        top = axes.secondary_xaxis("top", functions=(lambda n: n / aux_images, lambda r: r * aux_images))
        top.set_xticks([size / aux_images for size in sizes])
        top.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        top.set_xlabel(f"n / N_aux (N_aux = {aux_images:g} images per auxiliary)")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, path)
