"""One model against another, from their measurement entries (evaluation/measurements.py), and a family of such
comparisons decided together: the measurements file's (each fused model against each baseline and each
control, then mixture fusion against the barycenter), the verdict's and the sweep's.

The tests are paired. The NLL: the per-image difference, every model measured on the same images with the same
draws (evaluation.intervals.paired_difference). The Fréchet distance: the difference of the two distances in
each bootstrap round, both from the same reference resample and the same sample indices
(evaluation.intervals.paired_rounds_interval); the reference's noise, most of each model's own interval,
cancels. The class TV (total variation of the classifier's class proportions to the held-out images'): the same,
over the same rounds. Each gives a two-sided p-value, and a family's p-values are adjusted by Holm's step-down
(evaluation/significance.py): a difference is "better" or "worse" when its adjusted p is at most ALPHA,
otherwise "indistinguishable" (which says these sample sizes cannot tell the two apart, not that they are equal).
"""
from evaluation.intervals import paired_difference, paired_rounds_interval
from evaluation.labels import (CHECKPOINT_MERGE, FUSED, FUSED_HYBRID, FUSED_MIXTURE, FUSED_UNIFORM, SEED_ENSEMBLE,
                               TARGET_FINETUNE, TARGET_SCRATCH)
from evaluation.significance import holm_adjusted, normal_p

BETTER, WORSE, INDISTINGUISHABLE = "better", "worse", "indistinguishable"
ALPHA = 0.05  # the family-wise error rate of every family of comparisons
METRICS = ("nll", "fd", "tv")


def difference(a: dict, b: dict) -> dict:
    """Entry a against entry b, undecided: {"nll_difference": {"mean", "se", "p"} of a - b, "fd_difference":
    {"value", "low", "high", "se", "p"} of a's Fréchet distance - b's, "tv_difference": the same of the class
    TVs}, each None where a or b lacks the measurement (no NLL; no bootstrap rounds; no classifier)."""
    result = {"nll_difference": None}
    if a["nll"] is not None and b["nll"] is not None:
        mean, se = paired_difference(a["nll"]["per_image"], b["nll"]["per_image"])
        result["nll_difference"] = {"mean": mean, "se": se, "p": normal_p(mean, se)}
    for metric, (value_a, rounds_a), (value_b, rounds_b) in (
            ("fd", (a["fd"]["value"], a["fd"]["rounds"]), (b["fd"]["value"], b["fd"]["rounds"])),
            ("tv", (a["class_tv"], a.get("class_tv_rounds")), (b["class_tv"], b.get("class_tv_rounds")))):
        result[f"{metric}_difference"] = None
        if rounds_a and rounds_b:
            interval, se = paired_rounds_interval(value_a, rounds_a, value_b, rounds_b)
            result[f"{metric}_difference"] = {"value": interval.value, "low": interval.low, "high": interval.high,
                                              "se": se, "p": normal_p(interval.value, se)}
    return result


def decide(family: list[dict], alpha: float = ALPHA) -> list[dict]:
    """The comparisons of `family` (each with the differences difference() gives, a missing one None) decided
    together: every p of every comparison is one test of the family, Holm-adjusted over all of them ("p_holm"),
    and each comparison gets "nll", "fd" and "tv", its relation on that metric (None without the test).
    Returns new dicts, in the family's order."""
    decided = [{**c, **{f"{m}_difference": None if c.get(f"{m}_difference") is None else dict(c[f"{m}_difference"])
                        for m in METRICS}} for c in family]
    tests = [c[f"{m}_difference"] for c in decided for m in METRICS if c[f"{m}_difference"] is not None]
    for test, adjusted in zip(tests, holm_adjusted([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    for c in decided:
        for m in METRICS:
            test = c[f"{m}_difference"]
            c[m] = None if test is None else INDISTINGUISHABLE if test["p_holm"] > alpha else \
                BETTER if test.get("mean", test.get("value")) < 0 else WORSE
    return decided


def tests_in(family: list[dict]) -> dict[str, int]:
    """How many tests of each metric a decided family holds."""
    return {m: sum(c[f"{m}_difference"] is not None for c in family) for m in METRICS}


def comparisons(models: dict[str, dict], barycenter: str, best_auxiliary: str | None) -> list[dict]:
    """The measurements' comparisons of the entries `models` (by label, in report order), one family: every
    fused model against every baseline, then against the controls (`best_auxiliary`, fused-uniform and
    seed-ensemble), then fused-mixture against `barycenter` (fuse.method's fused model), and fused-hybrid against
    both."""
    against = [b for b in (TARGET_SCRATCH, TARGET_FINETUNE, CHECKPOINT_MERGE, best_auxiliary, FUSED_UNIFORM,
                           SEED_ENSEMBLE) if b in models]
    pairs = [(fused, other) for fused in models if fused in FUSED for other in against]
    if FUSED_MIXTURE in models and barycenter in models:
        pairs.append((FUSED_MIXTURE, barycenter))
        if FUSED_HYBRID in models:  # the ablation against both of its parts
            pairs += [(FUSED_HYBRID, FUSED_MIXTURE), (FUSED_HYBRID, barycenter)]
    return decide([{"model": a, "against": b, **difference(models[a], models[b])} for a, b in pairs])


def find(comparisons: list[dict], model: str, against: str) -> dict | None:
    """The comparison of `model` against `against`, if the list holds it."""
    return next((c for c in comparisons if c["model"] == model and c["against"] == against), None)
