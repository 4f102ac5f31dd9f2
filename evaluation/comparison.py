"""One model against another, from their measurement entries (evaluation/measurements.py): the paired NLL
difference, and whether it and the Fréchet distance say better, worse or indistinguishable; and the pairs the
measurements file holds: each fused model against each baseline, then mixture fusion against the barycenter.

The rules: the NLL differs when the paired difference is more than 2 of its standard errors from 0 (the same
images and draws for every model, so the images' shared noise cancels); the Fréchet distance differs when
the 95% intervals do not overlap (evaluation.intervals.separated).
"""
from evaluation.intervals import paired_difference, separated
from evaluation.labels import BASELINES, FUSED, FUSED_MIXTURE
from evaluation.measurements import fd_interval

BETTER, WORSE, INDISTINGUISHABLE = "better", "worse", "indistinguishable"


def compare(a: dict, b: dict) -> dict:
    """Entry a against entry b: {"nll_difference": {"mean", "se"} of a - b, "nll": a's relation to b on the
    NLL, "fd": on the Fréchet distance}, each None where a or b lacks the measurement."""
    result = {"nll_difference": None, "nll": None, "fd": None}
    if a["nll"] is not None and b["nll"] is not None:
        difference, se = paired_difference(a["nll"]["per_image"], b["nll"]["per_image"])
        result["nll_difference"] = {"mean": difference, "se": se}
        result["nll"] = _relation(difference < -2 * se, difference > 2 * se)
    fa, fb = fd_interval(a), fd_interval(b)
    if fa is not None and fb is not None:
        apart = separated(fa, fb)
        result["fd"] = _relation(apart and fa.value < fb.value, apart and fa.value > fb.value)
    return result


def comparisons(models: dict[str, dict], barycenter: str) -> list[dict]:
    """The measurements' comparisons of the entries `models` (by label, in report order): every fused model
    against every baseline, then fused-mixture against `barycenter` (fuse.method's fused model)."""
    pairs = [(fused, baseline) for fused in models if fused in FUSED for baseline in BASELINES if baseline in models]
    if FUSED_MIXTURE in models and barycenter in models:
        pairs.append((FUSED_MIXTURE, barycenter))
    return [{"model": a, "against": b, **compare(models[a], models[b])} for a, b in pairs]


def find(comparisons: list[dict], model: str, against: str) -> dict | None:
    """The comparison of `model` against `against`, if the measurements hold it."""
    return next((c for c in comparisons if c["model"] == model and c["against"] == against), None)


def _relation(better: bool, worse: bool) -> str:
    return BETTER if better else WORSE if worse else INDISTINGUISHABLE
