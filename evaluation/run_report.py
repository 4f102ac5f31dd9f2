"""The run report, report.md and report.json, as a view of the measurements (evaluation/measurements.py): the
verdict (evaluation/verdict.py), a row per model and floor, the comparisons (fusion against the baselines and
the controls, one Holm family), the mixture router's calibration by noise level, the populations,
and notes that say how each number was measured. Every number is the measurements'; this module rounds and
lays out, and evaluation/report.py writes."""
from pathlib import Path

import numpy as np

from evaluation.comparison import ALPHA
from evaluation.measurements import class_tv_interval
from evaluation.labels import (CHECKPOINT_MERGE, FUSED_HYBRID, FUSED_MIXTURE, FUSED_UNIFORM, HALVES,
                               SEED_ENSEMBLE, TARGET_AS_SAMPLES, TARGET_FINETUNE)
from evaluation.report import write_report
from evaluation.verdict import verdict

# The columns the sweep's tables share with the report's rows (stages/sweep.py), and the Fréchet distance's,
# named by its metric and what it compares with: fd_column.
NLL, LOSS, KID, COPIES = "NLL bits/dim", "held-out loss", "KID", "copies %"
COMPARISONS = "Fusion against the baselines and the controls"
BY_CLASS = "Held-out NLL by class"
ROUTER = "The mixture's router by noise level"


def write_run_report(path: Path, measurements: dict) -> None:
    run = measurements["run"]
    title = f"scorefuse report: {run['name']}" + (f", sweep run at target size n = {run['sweep_n']}"
                                                   if run["sweep_n"] else "") \
        + (f", replicate {run['replicate']}" if run["replicate"] else "")
    rows = [model_row(label, entry, measurements)
            for label, entry in [*measurements["models"].items(), *measurements["floors"].items()]]
    populations = [{"population": p["name"], "role": p["role"], "images": p["images"], "shards": p["shards"],
                    "class mixture": format_mixture(p["mixture"])} for p in measurements["populations"]]
    by_class = class_rows(measurements)
    router = calibration_rows(measurements)
    write_report(path, title, [("Verdict", verdict(measurements)), ("Models and floors", rows),
                               *([(BY_CLASS, by_class)] if by_class else []),
                               (COMPARISONS, comparison_rows(measurements)),
                               *([(ROUTER, router)] if router else []),
                               ("Populations", populations)], notes(measurements))


def calibration_rows(measurements: dict) -> list[dict]:
    """A row per sigma band of the mixture's router (none without mixture fusion)."""
    return [{"sigma": "{:.3g} to {:.3g}".format(band["sigma_low"], band["sigma_high"]), "images": band["images"],
             "cross-entropy, nats": None if band["cross_entropy"] is None else round(band["cross_entropy"], 3),
             "accuracy": None if band["accuracy"] is None else round(band["accuracy"], 3),
             "calibration error": None if band["ece"] is None else round(band["ece"], 3)}
            for band in measurements.get("router_calibration") or []]


def fd_column(measurements: dict) -> str:
    """The Fréchet distance's column, e.g. "fd_clf2k vs reference", "fid50k vs train"."""
    settings = measurements["settings"]
    return f"{settings['fd_metric']} vs {settings['fd_reference']}"


def model_row(label: str, entry: dict, measurements: dict) -> dict:
    """The report's row of a model or floor: estimates as {"mean", "se"}, the Fréchet distance as
    {"value", "low", "high"} (its value alone without bootstrap rounds), the rest rounded to what it means."""
    settings, fd = measurements["settings"], entry["fd"]
    row = {"model": label, NLL: _mean_se(entry["nll"]),
           **({"NLL step error": _mean_se(entry["nll_step_error"])} if entry.get("nll_step_error") else {}),
           LOSS: _mean_se(entry["loss"]),
           fd_column(measurements): {k: fd[k] for k in ("value", "low", "high")} if fd["low"] is not None else fd["value"],
           KID: dict(entry["kid"]),
           COPIES: round(100 * entry["copy_share"], 1), "NN train": round(entry["nn_train"], 2),
           "NN held-out": round(entry["nn_held_out"], 2),
           **{f"copies {name} %": round(100 * share, 1) for name, share in entry.get("copy_share_of", {}).items()}}
    if entry["class_proportions"] is not None:
        tv = class_tv_interval(entry)
        row["class TV"] = round(entry["class_tv"], 3) if tv is None else \
            {"value": round(tv.value, 3), "low": round(tv.low, 3), "high": round(tv.high, 3)}
        row["class proportions"] = format_mixture(entry["class_proportions"])
    if entry["fd_classifier"] is not None:  # FID is the main distance: the classifier's feature space beside it
        row[f"{settings['fd_classifier_metric']} vs {settings['fd_reference']}"] = round(entry["fd_classifier"], 3)
    if entry.get("fd_at_floor_size") is not None:
        row["FD at floor size"] = round(entry["fd_at_floor_size"], 3)
    if entry["fd_own_population"] is not None:
        row[f"{fd_column(measurements)} own population"] = round(entry["fd_own_population"], 3)
    if entry["early_stopping"] is not None:
        row["kept kimg"] = round(entry["early_stopping"]["kimg"], 2)
    weights, rate, minutes = entry["weights"], entry["samples_per_second"], entry["fit_minutes"]
    row.update({"NFE": entry["nfe"], "samples/s": None if rate is None else round(rate, 1),
                "fit minutes": None if minutes is None else round(minutes, 2),
                "weights": None if weights is None else " | ".join(format_mixture(r) for r in np.atleast_2d(weights)),
                "fit gap %": entry["fit_gap_percent"], "what": entry["description"]})
    return row


def class_rows(measurements: dict) -> list[dict]:
    """The table of held-out NLL by class: a row per model that has it, a column per class, mean ± SE."""
    return [{"NLL of": label, **{name: _mean_se(e) for name, e in zip(measurements["class_names"], entry["nll_by_class"])}}
            for label, entry in measurements["models"].items() if entry["nll_by_class"] is not None]


def comparison_rows(measurements: dict) -> list[dict]:
    """The comparisons table: the measurements' comparisons, each difference with its Holm-adjusted p."""
    rows = []
    for c in measurements["comparisons"]:
        nll, fd, tv = c["nll_difference"], c["fd_difference"], c.get("tv_difference")
        rows.append({"fused": c["model"], "against": c["against"],
                     "NLL difference": None if nll is None else {"mean": nll["mean"], "se": nll["se"]},
                     "NLL p (Holm)": None if nll is None else nll["p_holm"], "NLL": c["nll"],
                     "FD difference": None if fd is None else {k: fd[k] for k in ("value", "low", "high")},
                     "FD p (Holm)": None if fd is None else fd["p_holm"], "FD": c["fd"],
                     **({} if tv is None else {"class TV difference": {k: tv[k] for k in ("value", "low", "high")},
                                               "class TV p (Holm)": tv["p_holm"], "class TV": c["tv"]})})
    return rows


def _resolution(s: dict) -> str:
    """What the NLL note says of images upsampled from the source's own resolution."""
    size, native = s.get("image_size"), s.get("native_size")
    if native is None or size is None or size <= native:
        return ""
    return (f" The images are the source's {native}x{native} upsampled to {size}x{size}: {size * size - native * native} "
            f"of every {size * size} dimensions are near-deterministic functions of the other {native * native}, so "
            "the NLL per dimension mostly measures how a model interpolates; data.source.image_size="
            f"{native} measures the images themselves.")


def notes(measurements: dict) -> list[str]:
    s, floor_tv = measurements["settings"], measurements["reference"]["classifier_tv"]
    extractor = s["extractor"]
    lines = [
        f"NLL bits/dim: probability-flow ODE{_sigma_span(s.get('nll_sigma'))} ({s['nll_steps']} Heun steps, "
        f"{s['nll_probes']} Rademacher probe(s) per "
        f"image, uniform dequantisation in bins of width 2/255 centred on the training values) on the first {s['nll_images']} held-out images `{s['held_out']}`, "
        "mean ± standard error over images; the same images and draws for every model, so differences are paired "
        "(the verdict's ± are paired standard errors)." + _resolution(s),
        *([f"NLL step error: the first {min(s['nll_doubling_images'], s['nll_images'])} of those images again at "
           f"{2 * s['nll_steps']} steps (the same draws); Heun's error falls as steps^-2, so the reported value "
           "exceeds the extrapolated one by 4/3 x (its value - the doubled one's): mean ± standard error. Where "
           "it differs between two models by as much as their NLL difference, raise eval.nll_steps."]
          if s.get("nll_doubling_images") and s["nll_images"] else []),
        "Comparisons are paired tests: the NLL per held-out image (normal p-value of the mean difference), the "
        "Fréchet distance per bootstrap round (both models' distances in a round use the same reference resample "
        "and the same sample indices, whose samples share their latents: the difference's interval and its "
        "standard error, whose normal p-value is shown). 'better' / 'worse' where Holm's adjusted p is at most "
        f"{ALPHA:g}, within each family: the verdict's tests, and the comparisons table's; else 'indistinguishable'.",
        f"controls: {FUSED_UNIFORM} is the barycenter with lambda = 1/K, an ensemble fitted to nothing (fusion "
        f"should beat it to show that lambda matters, not only averaging); {SEED_ENSEMBLE}, where the run has it, "
        "averages the best auxiliary with copies of it trained on its population with other seeds (what ensembling "
        "gains with no other population); the best single auxiliary is "
        f"{measurements['best_auxiliary'] or 'not known (no fuse stage)'}, the one with the lowest denoising loss "
        "on the n target images (chosen without the held-out images).",
        f"held-out loss: EDM-weighted denoising loss on the held-out images, {s['test_draws_per_image']} "
        "(sigma, noise) draws per image, the same draws for every model; mean ± standard error. It is the loss "
        "lambda minimises on the target images, so the fitted barycenter is favoured on it by construction.",
        f"{fd_column(measurements)}: Fréchet distance of {s['num_samples']} samples to the population "
        f"`{s['fd_reference']}` in {extractor} feature "
        f"space{'' if extractor == 'inception' else ' (not FID)'}, [95% bootstrap interval, {s['bootstrap']} rounds "
        "resampling samples and held-out images]; KID: unbiased MMD^2 (cubic kernel) in the same features' units, "
        f"mean ± std over {s['kid_subsets']} subsets of min({s['kid_subset_size']}, the smaller set) images (where "
        "both sets are that small, every subset is all of them and the std is 0).",
        f"copies: share of samples whose nearest target training image (pixel L2) is nearer than "
        f"{s['copy_threshold']:.2f} x the second nearest; NN train / NN held-out: mean distance of a sample to its "
        "nearest training image / to the nearest of as many held-out images, as a root-mean-square pixel difference "
        f"(0..255). Pictures of each model's most-copied samples: {s['copies_figures']}/. copies aux %: the same "
        "ratio test against the auxiliaries' training images (all trained auxiliaries' populations); copies "
        "teacher %: the one-step generator's against its teacher's fixed samples.",
        f"floors: '{HALVES}' compares two halves of the held-out images (what real data scores at that size); "
        f"'{TARGET_AS_SAMPLES}' uses the n target images as samples (what copying them scores). The Fréchet "
        "distance's small-sample bias grows as the sets shrink, so a model's distance is also given at the halves' "
        "sizes ('at floor size': its first half-many samples against the floor's second half), the column to "
        "read against that floor.",
    ]
    if any(entry["nll_by_class"] is not None for entry in measurements["models"].values()):
        lines.append(f"{BY_CLASS}: the NLL over the held-out images of each class (by their labels), mean ± standard "
                     f"error. A class label is worth at most log2({len(measurements['class_names'])}) bits per image, "
                     "so a difference between models that is the same in every class is about pixels, not about "
                     "the population mixture.")
    if measurements.get("router_calibration"):
        k = len(measurements["models"][FUSED_MIXTURE]["weights"]) if FUSED_MIXTURE in measurements["models"] else None
        lines.append(f"{ROUTER}: the router of {FUSED_MIXTURE} on images of the auxiliary populations it trained on, "
                     "with noise of their own, sigma log-uniform within each band: its cross-entropy"
                     + (f" (chance: ln {k} = {np.log(k):.3f})" if k else "") + ", accuracy, and expected "
                     "calibration error (10 bins of its top posterior: the bins' share of the images times "
                     "|accuracy - mean top posterior|, 0 when its posteriors can be taken at their word). The mixture "
                     "uses its posteriors at every sampler step; on its training images, overfitting does not show.")
    if FUSED_HYBRID in measurements["models"]:
        lines.append(f"{FUSED_HYBRID}: an ablation of the two rules, {FUSED_MIXTURE}'s weights at sigma at or above "
                     "fuse.hybrid_sigma and the barycenter's lambda below it (its weights: pi, then lambda). The "
                     "comparisons table tests it against both: where it beats the barycenter, the mixture's choice "
                     "of population at large sigma matters; where it beats the mixture, lambda's averaging at small "
                     "sigma does.")
    if floor_tv is not None:
        lines.append(f"class TV: total variation between the feature classifier's class proportions of the samples "
                     f"and its proportions on the held-out images [95% bootstrap interval, over the Fréchet distance's "
                     f"rounds: the same resamples, so two models' TVs are compared in pairs, as their distances are]; "
                     f"the classifier itself is {floor_tv:.3f} from the true target mixture on the held-out images.")
    lines.append(f"NFE: network evaluations per sample (at most, for {FUSED_MIXTURE}: networks may be skipped); "
                 "samples/s: sampling and feature extraction, when first measured; weights: lambda of a barycenter "
                 f"(per sigma bin) or of {CHECKPOINT_MERGE}, pi of the mixture, 1/copies of {SEED_ENSEMBLE}.")
    lines.append(f"kept kimg: target-scratch and target-finetune train on {1 - s['validation_share']:.0%} of the "
                 f"target images and keep the EMA weights with the lowest denoising loss on the other "
                 f"{s['validation_share']:.0%} (measured at the start, periodically and at the end): the kimg of those "
                 "weights (0: the starting weights, for a fine-tune the auxiliary itself)."
                 + (f" Each trains until its lowest held-out loss is {s['patience_kimg']:g} kimg old "
                    "(fuse.patience_kimg), at most its fuse.scratch_kimg or fuse.finetune_kimg."
                    if s.get("patience_kimg") else "")
                 + _rate_search(s, measurements)
                 + " The SGD fit of lambda (fused-sgd) trains on the same part and keeps the lambda with the lowest "
                 "loss on the same held-out images, measured every epoch."
                 if s["validation_share"] else
                 "target-scratch and target-finetune train on all the target images for a fixed length and keep the "
                 "last EMA weights (fuse.validation_share=0): they may be over-trained.")
    lines.append(f"fit gap %: how far the lambda fit's loss is above the exact optimum on the same Gram statistics "
                 f"({s['fit_objective']} objective; the paper's SGD: its loss summed over pixels, N(0, 1) logits, "
                 f"lr {s['sgd_lr']}, momentum {s['sgd_momentum']}, {s['sgd_epochs']} epochs).")
    return lines


def _rate_search(s: dict, measurements: dict) -> str:
    """The note's sentence on the fine-tune's rate search (fuse.finetune_lr), if it had several rates."""
    rates = s.get("finetune_lr") or []
    finetune = measurements["models"].get(TARGET_FINETUNE)
    if len(rates) < 2 or finetune is None or finetune["early_stopping"] is None:
        return ""
    return (f" {TARGET_FINETUNE} is the fine-tune with the lowest held-out loss of those at learning rates "
            f"{', '.join(f'{r:g}' for r in rates)}: lr {finetune['early_stopping']['learning_rate']:g}.")


def _sigma_span(limits) -> str:
    """" from sigma a to b" (measurements written before the ODE's range was recorded: nothing)."""
    return "" if limits is None else " from sigma {:.4g} to {:.4g}".format(*limits)


def format_mixture(p) -> str:
    return " ".join(f"{x:.2f}" for x in p)


def _mean_se(estimate: dict | None) -> dict | None:
    return None if estimate is None else {"mean": estimate["mean"], "se": estimate["se"]}
