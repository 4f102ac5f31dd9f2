"""What `evaluate` measured, as one machine-readable file (runs/<name>/measurements.json). The verdict
(evaluation/verdict.py), report.md and report.json (evaluation/run_report.py) and the sweep's summary
(stages/sweep.py) are views of it: none of them computes from another one's tables.

Schema 2, a JSON object (null wherever a number does not apply; an "estimate" is {"mean", "se", "n"}: the mean
over n held-out images and its standard error):

    schema        2
    run           {"name", "sweep_n": the target size n of a sweep's run, else null, "replicate": which draw of
                  the n target images (0 outside a sweep)}
    barycenter    the label of fuse.method's fused model: the verdict's "fusion"
    best_auxiliary  the label of the auxiliary with the lowest denoising loss on the n target images (the fuse
                  stage's choice, made without the held-out images), or null before the fuse stage
    class_names   the classes, in the order of every class_proportions and mixture below
    settings      how the numbers were measured (the report's notes): held_out (the population of NLL, loss
                  and NN held-out), nll_images, nll_steps, nll_sigma (the ODE's [sigma_min, sigma_max]: edm's,
                  within the pretrained auxiliaries' ranges), nll_probes, test_draws_per_image, num_samples,
                  extractor, fd_metric (e.g. fd_clf2k, fid50k), fd_classifier_metric, fd_reference (the
                  population FD and KID compare with), bootstrap, kid_subsets, kid_subset_size,
                  copy_threshold, copies_figures (the pictures' directory, relative to the run), validation_share
                  (the share of the target images the baselines hold out for early stopping), patience_kimg
                  (their training ends once the lowest held-out loss is that old; 0: never), finetune_lr (the
                  fine-tune's rates: several are a search on the held-out loss), fit_objective,
                  sgd_lr, sgd_momentum, sgd_epochs
    reference     {"class_proportions": the classifier's on the held-out images, "classifier_tv": their total
                  variation to the true target mixture, the floor of every class_tv}
    populations   [{"name", "role", "images", "shards", "mixture": proportion per class}], aux, target, reference
    models        {label: entry}, every finished model in report order (labels: evaluation/labels.py)
    floors        {label: entry}, real data in the place of samples (labels.HALVES, labels.TARGET_AS_SAMPLES)
    comparisons   [{"model", "against", "nll_difference": {"mean", "se", "p", "p_holm"} of model - against, paired
                  per image, "nll": "better" | "worse" | "indistinguishable", "fd_difference": {"value", "low",
                  "high", "se", "p", "p_holm"} of the Fréchet distances, paired per bootstrap round, "fd",
                  "tv_difference" of the class TVs as fd_difference, "tv"}]: each fused model against each baseline
                  and each control (the best auxiliary, fused-uniform), then fused-mixture against the barycenter
                  and fused-hybrid against both; one family, Holm-adjusted (evaluation/comparison.py)
    router_calibration  the mixture's router per band of ln sigma (trainer/router.py's calibration): [{"sigma_low",
                  "sigma_high", "images", "cross_entropy" (nats), "accuracy", "ece"}], or null without mixture fusion

An entry:

    description          what the model or floor is
    nll                  estimate of the NLL in bits/dim, and "per_image": image i's value, for paired differences
                         (every model is measured on the same images with the same draws); null for a model
                         without a denoiser, or with fewer than 2 images (no standard error)
    nll_by_class         the NLL's estimate over the held-out images of each class (in class_names' order; null
                         for a class with fewer than 2 of them), where the held-out images have labels; else null
    nll_step_error       estimate of the NLL's discretisation error per image (the reported value minus the value
                         extrapolated from eval.nll_doubling_images images at twice the steps); null when off
    loss                 estimate of the held-out denoising loss
    fd                   {"value", "low", "high", "rounds"}: the Fréchet distance, its 95% bootstrap interval and
                         the bootstrap rounds' values in round order, for paired differences (low, high and rounds
                         null when eval.bootstrap gives no rounds)
    fd_classifier        beside FID, the Fréchet distance in the feature classifier's space
    fd_own_population    an auxiliary's Fréchet distance to its own training population
    fd_at_floor_size     the Fréchet distance at the sizes of the held-out halves floor: the first half-many samples
                         against the floor's second half (the floor's own fd there; null for fewer samples)
    kid                  {"mean", "std"} over subsets
    copy_share           share of samples that copy a target training image (the ratio test)
    copy_share_of        the same against other images the model learnt from: {"aux": the auxiliaries' training
                         images, "teacher": the distillation teacher's samples (the one-step generator's only)}
    nn_train             mean distance of a sample to its nearest training image, as an RMS pixel difference (0..255)
    nn_held_out          ... to the nearest of as many held-out images
    class_proportions    the classifier's class proportions of the samples
    class_tv             their total variation to reference.class_proportions
    class_tv_rounds      ... in each bootstrap round, resampled as fd's rounds are (null without rounds)
    nfe, samples_per_second, fit_minutes
    weights              lambda (a row per sigma bin) of a barycenter or of checkpoint-merge, pi of the mixture
    fit_gap_percent      how far the lambda fit's loss lies above the exact optimum
    early_stopping       of an early-stopped baseline, the EMA weights it kept: {"kimg", "step", "loss" (the held-out
                         loss on the target images it did not train on), "held_out_images", "training_images"}

A file of another schema is refused with a message, never read as if it were this one.
"""
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evaluation.intervals import Interval, bootstrap_interval, mean_se
from shards.atomic import write_atomically
from shards.errors import ModelError

SCHEMA = 2


def write_measurements(path: Path, measurements: dict) -> None:
    """Write `measurements` (without "schema": this adds it) atomically."""
    document = {"schema": SCHEMA, **measurements}
    write_atomically(Path(path), (json.dumps(document, indent=1) + "\n").encode())


def read_measurements(path: Path) -> dict:
    """The measurements of a file write_measurements wrote (without "schema")."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no {path}: run `scorefuse evaluate` first")
    document = json.loads(path.read_text())
    schema = document.pop("schema", None)
    if schema != SCHEMA:
        raise ModelError(f"{path} has measurements schema {schema}, this version reads {SCHEMA}: run "
                         "`scorefuse evaluate` again to rewrite it (its cache makes that quick)")
    return document


def estimate(values: torch.Tensor, per_image: bool = False) -> dict:
    """{"mean", "se", "n"} of per-image values (and the values themselves, for paired differences)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "n": len(values), **({"per_image": values.tolist()} if per_image else {})}


def entry(description: str, *, fd: Interval | float, kid: tuple[float, float], copies: dict, pixels: int,
          fd_rounds: Sequence[float] | None = None, nll: torch.Tensor | None = None,
          nll_doubled: torch.Tensor | None = None, loss: torch.Tensor | None = None, classes=None, reference_classes=None,
          fd_classifier: float | None = None, fd_own_population: float | None = None,
          fd_at_floor_size: float | None = None, nfe: int | None = None,
          samples_per_second: float | None = None, fit_minutes: float | None = None, weights=None,
          fit_gap_percent: float | None = None, early_stopping: dict | None = None,
          nll_labels: Sequence[int] | None = None, class_count: int | None = None,
          copies_of: dict[str, float] | None = None, class_tv_rounds: Sequence[float] | None = None) -> dict:
    """One model's or floor's entry from the raw results: fd an Interval (or the bare value without bootstrap
    rounds) and fd_rounds the rounds' values it was computed from, nll_labels the class of each NLL image (of
    class_count classes; None or negative labels: no per-class NLL), kid (mean, std), copies evaluation.memorisation's dict for images of `pixels` values each,
    copies_of the copy share against other sets the model learnt from ({what they are: share}),
    nll and loss per held-out image (nll_doubled: the first of them at twice the ODE steps), classes and
    reference_classes class proportions, class_tv_rounds their total variation in each bootstrap round."""
    interval = fd if isinstance(fd, Interval) else Interval(fd, None, None)
    rms = pixels ** 0.5  # memorisation's distances are L2 over all pixels: per pixel they read on the 0..255 scale
    return {
        "description": description,
        "nll": estimate(nll, per_image=True) if nll is not None and len(nll) > 1 else None,
        "nll_by_class": by_class(nll, nll_labels, class_count) if nll is not None and len(nll) > 1 and
        nll_labels is not None and min(nll_labels) >= 0 else None,
        "nll_step_error": step_error(nll, nll_doubled) if nll_doubled is not None and len(nll_doubled) > 1 else None,
        "loss": estimate(loss) if loss is not None else None,
        "fd": {"value": float(interval.value), "low": _float(interval.low), "high": _float(interval.high),
               "rounds": None if fd_rounds is None else [float(r) for r in fd_rounds]},
        "fd_classifier": _float(fd_classifier),
        "fd_own_population": _float(fd_own_population),
        "fd_at_floor_size": _float(fd_at_floor_size),
        "kid": {"mean": float(kid[0]), "std": float(kid[1])},
        "copy_share": float(copies["copy_share"]),
        "copy_share_of": {name: float(share) for name, share in (copies_of or {}).items()},
        "nn_train": copies["train_distance"] / rms,
        "nn_held_out": copies["held_out_distance"] / rms,
        "class_proportions": None if classes is None else np.asarray(classes, dtype=float).tolist(),
        "class_tv": None if classes is None else total_variation(classes, reference_classes),
        "class_tv_rounds": None if classes is None or not class_tv_rounds else [float(r) for r in class_tv_rounds],
        "nfe": nfe,
        "samples_per_second": _float(samples_per_second),
        "fit_minutes": _float(fit_minutes),
        "weights": weights,
        "fit_gap_percent": _float(fit_gap_percent),
        "early_stopping": early_stopping,
    }


def step_error(coarse, fine) -> dict:
    """estimate() of the NLL's discretisation error per image, from the first len(fine) images at the reported
    steps (coarse) and at twice as many (fine), with the same draws: Heun's error falls as steps^-2, so the
    extrapolated value is fine + (fine - coarse) / 3, and the reported value exceeds it by 4/3 (coarse - fine)."""
    fine = torch.as_tensor(fine, dtype=torch.float64).flatten()
    coarse = torch.as_tensor(coarse, dtype=torch.float64).flatten()[:len(fine)]
    return estimate(4 / 3 * (coarse - fine))


def by_class(values, labels: Sequence[int], class_count: int) -> list[dict | None]:
    """estimate() of the values of each class 0 .. class_count - 1 (None for a class with fewer than 2)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten()
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} values")
    return [estimate(values[labels == k]) if int((labels == k).sum()) > 1 else None for k in range(class_count)]


def class_tv_interval(entry: dict) -> Interval | None:
    """An entry's class TV with its 95% bootstrap interval, or None without rounds."""
    rounds = entry.get("class_tv_rounds")
    return None if not rounds else bootstrap_interval(entry["class_tv"], rounds)


def fd_interval(entry: dict) -> Interval | None:
    """An entry's Fréchet distance as an Interval, or None without bootstrap rounds."""
    fd = entry["fd"]
    return None if fd["low"] is None else Interval(fd["value"], fd["low"], fd["high"])


def total_variation(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _float(value) -> float | None:
    return None if value is None else float(value)
