"""The verdict that opens the report: a few sentences computed from the measurements (evaluation/measurements.py)
alone. Who is lowest on held-out NLL, and whether it beats the runner-up; who is lowest on the Fréchet distance,
and which models it beats; how fusion (the barycenter) compares with target-scratch, target-finetune and the two
controls (the best single auxiliary, the uniform ensemble fused-uniform, and the seed ensemble where the run has
it), and mixture fusion with the
barycenter; who copies its training images; and how many tests that took.

Every test is paired (evaluation/comparison.py) and the verdict's tests are one family: their p-values are
Holm-adjusted together, so the chance that any "better" or "worse" in the verdict is false is at most ALPHA.
Choosing the lowest model and then testing it on the same images would favour it: the lowest NLL is chosen on
the even-numbered held-out images and tested against the runner-up on the odd-numbered ones. The lowest Fréchet
distance has no such split (a distance is one number of all samples and reference images), and the verdict says
so.
"""
from evaluation.comparison import ALPHA, BETTER, WORSE, decide, difference, tests_in
from evaluation.intervals import Interval, paired_difference
from evaluation.labels import FUSED_MIXTURE, FUSED_UNIFORM, SEED_ENSEMBLE, TARGET_FINETUNE, TARGET_SCRATCH
from evaluation.measurements import class_tv_interval, fd_interval
from evaluation.significance import normal_p

COPYING = 0.1  # a model copies when at least this share of its samples pass the ratio test


def verdict(measurements: dict) -> list[str]:
    """The verdict's sentences, over the models (not the floors) of `measurements`."""
    models = measurements["models"]
    nll, frechet, fusion = _nll_winner(models), _frechet_winner(models), _fusion_pairs(measurements)
    family = decide([*nll, *frechet, *fusion])  # one family: Holm over all of its tests
    nll, frechet, fusion = family[:len(nll)], family[len(nll):len(nll) + len(frechet)], family[len(nll) + len(frechet):]
    return [*_nll(models, nll), *_frechet(models, frechet), *_fusion(models, fusion),
            *_copying(models, measurements["settings"]["copy_threshold"]), *_multiplicity(family)]


def _nll_winner(models: dict) -> list[dict]:
    """The lowest and the runner-up on the even-numbered held-out images, their paired difference on the
    odd-numbered ones (undecided); with fewer than 4 images (no standard error on a half), the ranking alone."""
    with_nll = {label: m["nll"]["per_image"] for label, m in models.items() if m["nll"] is not None}
    if not with_nll:
        return []
    halves = min(len(values) for values in with_nll.values()) >= 4
    ranked = sorted(with_nll, key=lambda label: _mean(with_nll[label][0::2] if halves else with_nll[label]))
    comparison = {"model": ranked[0], "against": None, "nll_difference": None, "fd_difference": None}
    if halves and len(ranked) > 1:
        mean, se = paired_difference(with_nll[ranked[0]][1::2], with_nll[ranked[1]][1::2])
        comparison.update(against=ranked[1], nll_difference={"mean": mean, "se": se, "p": normal_p(mean, se)})
    return [comparison]


def _frechet_winner(models: dict) -> list[dict]:
    """The lowest Fréchet distance against every other model with bootstrap rounds (undecided)."""
    with_rounds = [label for label, m in models.items() if m["fd"]["rounds"] is not None]
    if not with_rounds:
        return []
    best, *others = sorted(with_rounds, key=lambda label: models[label]["fd"]["value"])
    return [{"model": best, "against": other, "nll_difference": None,
             "fd_difference": difference(models[best], models[other])["fd_difference"]} for other in others] or \
        [{"model": best, "against": None, "nll_difference": None, "fd_difference": None}]


def _fusion_pairs(measurements: dict) -> list[dict]:
    models, barycenter, auxiliary = measurements["models"], measurements["barycenter"], measurements["best_auxiliary"]
    pairs = [(f"Fusion ({barycenter}) against {baseline}", barycenter, baseline)
             for baseline in (TARGET_SCRATCH, TARGET_FINETUNE)]
    pairs += [(f"Fusion ({barycenter}) against the best single auxiliary ({auxiliary}, the lowest loss on the "
               "target images)", barycenter, auxiliary),
              (f"Fusion ({barycenter}) against the uniform ensemble ({FUSED_UNIFORM}, lambda = 1/K)", barycenter,
               FUSED_UNIFORM),
              (f"Fusion ({barycenter}) against the seed ensemble ({SEED_ENSEMBLE}: one auxiliary and copies of it "
               "trained with other seeds)", barycenter, SEED_ENSEMBLE),
              (f"Mixture fusion against the barycenter ({barycenter})", FUSED_MIXTURE, barycenter)]
    return [{"title": title, "model": a, "against": b, **difference(models[a], models[b])}
            for title, a, b in pairs if a in models and b in models]


def _nll(models: dict, family: list[dict]) -> list[str]:
    if not family:
        return []
    c = family[0]
    best, nll = c["model"], models[c["model"]]["nll"]
    line = f"Held-out NLL: {best} is lowest at {nll['mean']:.3f} ± {nll['se']:.3f} bits/dim"
    if c["nll_difference"] is not None:
        d, other = c["nll_difference"], c["against"]
        relation = {BETTER: f"{best} lower", WORSE: f"{best} higher"}.get(c["nll"], c["nll"])
        line += (f"; chosen on the even-numbered held-out images, on the odd-numbered ones NLL {best} - {other} "
                 f"(the runner-up) = {d['mean']:+.3f} ± {d['se']:.3f} bits/dim paired ({relation}, {_p(d)})")
    return [line + "."]


def _frechet(models: dict, family: list[dict]) -> list[str]:
    if not family:
        return []
    best = family[0]["model"]
    line = f"Fréchet distance: {best} is lowest at {_interval(fd_interval(models[best]))}"
    by = {relation: [c["against"] for c in family if c["fd"] == relation] for relation in (BETTER, "indistinguishable")}
    parts = [f"lower than {', '.join(by[BETTER])}" if by[BETTER] else "",
             f"indistinguishable from {', '.join(by['indistinguishable'])}" if by["indistinguishable"] else ""]
    if any(parts):
        line += (", and paired over bootstrap rounds " + " and ".join(p for p in parts if p)
                 + " (chosen on the samples it is tested on, so its lead is optimistic)")
    return [line + "."]


def _fusion(models: dict, family: list[dict]) -> list[str]:
    lines = []
    for c in family:
        parts = []
        if c["nll_difference"] is not None:
            d = c["nll_difference"]
            parts.append(f"NLL difference {d['mean']:+.3f} ± {d['se']:.3f} bits/dim, paired ({c['nll']}, {_p(d)})")
        if c["fd_difference"] is not None:
            d = c["fd_difference"]
            parts.append(f"Fréchet distance {_interval(fd_interval(models[c['model']]))} vs "
                         f"{_interval(fd_interval(models[c['against']]))}, difference {d['value']:+.3g} "
                         f"[{d['low']:.3g}, {d['high']:.3g}] paired ({c['fd']}, {_p(d)})")
        if c.get("tv_difference") is not None:
            d = c["tv_difference"]
            parts.append(f"class TV {_interval(class_tv_interval(models[c['model']]))} vs "
                         f"{_interval(class_tv_interval(models[c['against']]))}, difference {d['value']:+.3f} "
                         f"[{d['low']:.3f}, {d['high']:.3f}] paired ({c['tv']}, {_p(d)})")
        if parts:
            lines.append(f"{c['title']}: " + "; ".join(parts) + ".")
    return lines


def _copying(models: dict, threshold: float) -> list[str]:
    return _copying_target(models, threshold) + [
        f"Copying of what a model learnt from besides the target: {label} ({100 * share:.0f}% of samples copy the "
        f"{name} images)." for label, m in models.items() for name, share in m.get("copy_share_of", {}).items()
        if share >= COPYING]


def _copying_target(models: dict, threshold: float) -> list[str]:
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


def _multiplicity(family: list[dict]) -> list[str]:
    count = tests_in(family)
    total = sum(count.values())
    if not total:
        return []
    tv = f", {count['tv']} on the class TV" if count["tv"] else ""
    return [f"How sure: the verdict makes {total} paired test{'s' if total > 1 else ''} ({count['nll']} on NLL, "
            f"{count['fd']} on the Fréchet distance{tv}); each p above is Holm-adjusted over all of them, so the chance "
            f"that any 'better', 'worse', 'lower' or 'higher' here is wrong is at most {ALPHA:.0%}."]


def _p(test: dict) -> str:
    p = test["p_holm"]
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _interval(i: Interval) -> str:
    return f"{i.value:.3g} [{i.low:.3g}, {i.high:.3g}]"
