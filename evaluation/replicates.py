"""Estimates pooled over replicates: the same comparison measured on R independent draws of the n target images
(the sweep's sweep.replicates), every replicate on the same held-out images.

A replicate's difference d_r carries two noises: the target draw's (and the training's that follows from it),
independent between replicates, and the held-out images' (its paired standard error se_r), which the replicates
share, since they measure the same images. So the mean over replicates has the variance s^2 / R + mean(se_r^2),
s^2 the replicates' sample variance: the first term shrinks with R, the second does not (the images are not
redrawn). s^2 itself holds some image noise too, so the sum errs on the safe side. With R = 1 it is the
replicate's own standard error.

With few replicates s^2 is itself uncertain (R - 1 degrees of freedom: 2 for the usual 3), and a normal p-value
would overstate the evidence. So the p-value is Student's t with the Welch-Satterthwaite degrees of freedom of the
sum, (s^2/R + w)^2 (R - 1) / (s^2/R)^2 with w = mean(se_r^2) counted as known (it rests on many images): R - 1
where the replicates' spread dominates, the normal's where the images' noise does.
"""
import math
from typing import Sequence

from evaluation.significance import student_p


def pooled(values: Sequence[float], standard_errors: Sequence[float]) -> tuple[float, float, float]:
    """(mean over replicates, its standard error, their degrees of freedom: math.inf where the replicates' spread
    adds nothing) of per-replicate estimates with their own standard errors."""
    r = len(values)
    if r == 0 or len(standard_errors) != r:
        raise ValueError(f"need one standard error per replicate, got {r} values and {len(standard_errors)}")
    mean = sum(values) / r
    between = sum((v - mean) ** 2 for v in values) / (r - 1) / r if r > 1 else 0.0
    within = sum(se ** 2 for se in standard_errors) / r
    dof = math.inf if between == 0 else (between + within) ** 2 * (r - 1) / between ** 2
    return mean, math.sqrt(between + within), dof


def pooled_comparison(comparisons: Sequence[dict]) -> dict:
    """The replicates' comparisons of one model against another (evaluation/comparison.py's, one per replicate)
    pooled: {"nll_difference": {"mean", "se", "dof", "p", "replicates"}, "fd_difference" and "tv_difference":
    {"value", "se", "dof", "p", "replicates"}}, each over the replicates that have it (None where none has; dof
    None: the normal's), undecided."""
    result = {}
    for metric, value in (("nll", "mean"), ("fd", "value"), ("tv", "value")):
        tests = [c[f"{metric}_difference"] for c in comparisons if c.get(f"{metric}_difference") is not None]
        result[f"{metric}_difference"] = None
        if tests:
            mean, se, dof = pooled([t[value] for t in tests], [t["se"] for t in tests])
            result[f"{metric}_difference"] = {value: mean, "se": se, "dof": None if math.isinf(dof) else dof,
                                              "p": student_p(mean, se, dof), "replicates": len(tests)}
    return result
