"""The verdict that opens the report: a few sentences computed from the measurements (evaluation/measurements.py)
alone. Who is lowest on held-out NLL and whether the runner-up is within 2 paired standard errors; who is
lowest on the Fréchet distance and whose 95% interval overlaps it; how fusion (the barycenter) compares with
target-scratch and target-finetune, and mixture fusion with the barycenter (evaluation/comparison.py); who
copies its training images."""
from evaluation.comparison import BETTER, WORSE, compare, find
from evaluation.intervals import Interval, separated
from evaluation.labels import FUSED_MIXTURE, TARGET_FINETUNE, TARGET_SCRATCH
from evaluation.measurements import fd_interval

COPYING = 0.1  # a model copies when at least this share of its samples pass the ratio test


def verdict(measurements: dict) -> list[str]:
    """The verdict's sentences, over the models (not the floors) of `measurements`."""
    models = measurements["models"]
    return [*_nll(models), *_frechet(models), *_fusion(measurements),
            *_copying(models, measurements["settings"]["copy_threshold"])]


def _nll(models: dict) -> list[str]:
    ranked = sorted((label for label, m in models.items() if m["nll"] is not None),
                    key=lambda label: models[label]["nll"]["mean"])
    if not ranked:
        return []
    best, nll = ranked[0], models[ranked[0]]["nll"]
    line = f"Held-out NLL: {best} is lowest at {nll['mean']:.3f} ± {nll['se']:.3f} bits/dim"
    if len(ranked) > 1:
        other = ranked[1]
        c = compare(models[best], models[other])
        d = c["nll_difference"]
        relation = {BETTER: f"{best} lower than {other}", WORSE: f"{best} higher than {other}"}.get(c["nll"], c["nll"])
        line += f"; NLL {best} - {other} = {d['mean']:+.3f} ± {d['se']:.3f} bits/dim paired ({relation})"
    return [line + "."]


def _frechet(models: dict) -> list[str]:
    intervals = {label: fd_interval(m) for label, m in models.items() if fd_interval(m) is not None}
    if not intervals:
        return []
    best, *others = sorted(intervals, key=lambda label: intervals[label].value)
    ties = [label for label in others if not separated(intervals[best], intervals[label])]
    return [f"Fréchet distance: {best} is lowest at {_interval(intervals[best])}"
            + (f", indistinguishable (overlapping 95% intervals) from {', '.join(ties)}." if ties
               else ", and its interval overlaps no other model's.")]


def _fusion(measurements: dict) -> list[str]:
    models, barycenter = measurements["models"], measurements["barycenter"]
    pairs = [(f"Fusion ({barycenter}) against {baseline}", barycenter, baseline)
             for baseline in (TARGET_SCRATCH, TARGET_FINETUNE)]
    pairs.append((f"Mixture fusion against the barycenter ({barycenter})", FUSED_MIXTURE, barycenter))
    lines = []
    for title, a, b in pairs:
        c = find(measurements["comparisons"], a, b)
        if c is None:
            continue
        parts = []
        if c["nll_difference"] is not None:
            d = c["nll_difference"]
            parts.append(f"NLL difference {d['mean']:+.3f} ± {d['se']:.3f} bits/dim, paired ({c['nll']})")
        if c["fd"] is not None:
            parts.append(f"Fréchet distance {_interval(fd_interval(models[a]))} vs "
                         f"{_interval(fd_interval(models[b]))} ({c['fd']})")
        if parts:
            lines.append(f"{title}: " + "; ".join(parts) + ".")
    return lines


def _copying(models: dict, threshold: float) -> list[str]:
    copying = [(label, m) for label, m in models.items() if m["copy_share"] >= COPYING]
    if copying:
        return ["Copying: " + "; ".join(
            f"{label} ({100 * m['copy_share']:.0f}% of samples are nearer than {threshold:.2f} x the second-nearest "
            f"training image; {m['nn_held_out'] / max(m['nn_train'], 1e-9):.1f}x closer to training than "
            f"to held-out images)" for label, m in copying) + "."]
    if not models:
        return []
    worst = max(models, key=lambda label: models[label]["copy_share"])
    return [f"No model copies its training images: at most {100 * models[worst]['copy_share']:.0f}% "
            f"of samples ({worst}) pass the ratio test."]


def _interval(i: Interval) -> str:
    return f"{i.value:.3g} [{i.low:.3g}, {i.high:.3g}]"
