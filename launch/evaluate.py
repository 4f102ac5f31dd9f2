"""`scorefuse evaluate`: every finished model of the run, sampled once and scored; report.md/.json.

Models: each auxiliary; the fused model with the exact and with the SGD lambda; the baselines
(target-scratch, target-finetune, checkpoint-merge). Columns: the Fréchet distance to the held-out
reference population of the target mixture (and, for auxiliaries, to their own population), the target
test loss (EDM denoising score matching on the held-out images, the same draws for every model), the
class proportions of the samples (digit classifier) against the target mixture, and the time to fit.
"""
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from evaluation.digit_classifier import EXTRACTOR_NAME as DIGIT_CLASSIFIER, class_proportions
from evaluation.frechet import metric_name
from evaluation.report import write_report
from evaluation.score_matching import denoising_test_loss
from launch.config import RunConfig
from launch.rundir import RunDir
from launch.stages import frechet_evaluator, reference_statistics, sampler
from shards.manifest import image_shape, load_manifest
from shards.stream import read_population
from trainer.diffusion import is_finished
from trainer.distill import load_generator
from trainer.engine import make_accelerator
from trainer.export import load_denoiser
from trainer.scorefusion import load_fused

ROLES = ["aux", "target", "reference"]


def finished_models(cfg: RunConfig) -> list[tuple[str, Callable, dict]]:
    """(label, loader of the denoiser, facts for the report) of every finished model, in report order."""
    rd = RunDir.of(cfg)
    models = []
    for pop in cfg.data.aux:
        if is_finished(rd.aux(pop.name)):
            done = _json(rd.aux(pop.name) / "done.json")
            models.append((f"aux/{pop.name}", lambda d=rd.aux(pop.name): load_denoiser(d)[0],
                           {"population": pop, "kimg": done["kimg"], "minutes": done["seconds"] / 60}))
    if (rd.fuse / "lambda.json").is_file():
        fit = _json(rd.fuse / "lambda.json")
        for which in ("exact", "sgd"):
            models.append((f"fused ({which})", lambda w=which: load_fused(rd.fuse, rd.aux_dirs(cfg), w),
                           {"minutes": fit[which]["seconds"] / 60, "lambda": fit[which]["lambda"]}))
    for name in ("target-scratch", "target-finetune"):
        stage = rd.baseline(name)
        if is_finished(stage):
            done = _json(stage / "done.json")
            models.append((name, lambda d=stage: load_denoiser(d)[0], {"kimg": done["kimg"], "minutes": done["seconds"] / 60}))
    merge = rd.baseline("checkpoint-merge")
    if (merge / "model.json").is_file():
        models.append(("checkpoint-merge", lambda: load_denoiser(merge)[0],
                       {"minutes": 0.0, "lambda": _json(merge / "model.json")["lambda"]}))
    if is_finished(rd.root / "distill"):  # one call of G per sample, no denoiser (no test loss)
        done = _json(rd.root / "distill" / "done.json")
        models.append(("distill (one-step)", lambda: load_generator(rd.root / "distill")[0],
                       {"kimg": done["kimg"], "minutes": done["seconds"] / 60, "one_step": True}))
    return models


def evaluate_stage(cfg: RunConfig, log=print) -> dict:
    rd = RunDir.of(cfg)
    manifest = load_manifest(rd.data)
    acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes)
    evaluator = frechet_evaluator(cfg, acc.device)
    n = cfg.eval.num_samples
    name = metric_name(evaluator.extractor, n)
    shape = image_shape(manifest)
    reference = cfg.data.reference.name
    target_ref = reference_statistics(evaluator, cfg, reference)
    held_out = read_population(rd.data, reference)[0]
    classes = manifest["class_names"]
    target_mix = _mixture_vector(cfg.data.target.mixture, classes)
    digits = evaluator.extractor == DIGIT_CLASSIFIER
    rows = []
    for label, load, facts in finished_models(cfg):
        denoiser = load().to(acc.device)
        one_step = facts.get("one_step", False)
        sample = denoiser if one_step else sampler(denoiser, cfg)
        started = time.perf_counter()
        features, images = evaluator.sample_features(sample, shape, n, seed=cfg.train.seed, rank=acc.process_index,
                                                     world_size=acc.num_processes, gather=acc.gather,
                                                     keep_images=digits)
        row = {"model": label, "fit minutes": facts["minutes"], f"{name} target": evaluator.frechet(features, target_ref),
               "NFE/sample": 1 if one_step else (2 * cfg.edm.sampler_steps - 1) * getattr(denoiser, "networks_per_call", 1),
               "samples/s": n / (time.perf_counter() - started)}
        pop = facts.get("population")
        row[f"{name} own population"] = (evaluator.frechet(features, reference_statistics(evaluator, cfg, pop.name))
                                         if pop else None)
        if acc.is_main_process:
            row["target test loss"] = None if one_step else denoising_test_loss(
                denoiser, held_out, cfg.fuse.test_draws_per_image, cfg.edm.p_mean, cfg.edm.p_std,
                cfg.edm.sigma_data, seed=cfg.train.seed, device=acc.device)
            if digits:
                props = class_proportions(rd.digit_classifier, images.float() / 127.5 - 1)
                row["class TV target"] = _total_variation(props, target_mix)
                row["class TV own"] = _total_variation(props, _mixture_vector(pop.mixture, classes)) if pop else None
                row["sample class proportions"] = _format_mixture(props)
            if "lambda" in facts:
                row["lambda"] = " | ".join(_format_mixture(r) for r in np.atleast_2d(facts["lambda"]))
        rows.append(row)
        log(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    if acc.is_main_process:
        _write(cfg, rd, manifest, rows, name, evaluator.extractor, classes)
    return {"rows": rows}


def _write(cfg, rd, manifest, rows, name, extractor, classes):
    data_rows = [{"population": p, "role": e["role"], "images": e["count"], "shards": len(e["shards"]),
                  "class mixture": _format_mixture(_mixture_vector(e["mixture"], classes))}
                 for p, e in sorted(manifest["populations"].items(), key=lambda pe: ROLES.index(pe[1]["role"]))]
    notes = [f"{name}: Fréchet distance over {cfg.eval.num_samples} samples ({cfg.edm.sampler_steps}-step Heun, "
             f"{2 * cfg.edm.sampler_steps - 1} network evaluations) in {extractor} feature space"
             + ("" if extractor == "inception" else " (not FID)")
             + f"; 'target' is the held-out population `{cfg.data.reference.name}` of the target mixture.",
             "target test loss: EDM-weighted denoising score matching on the held-out target-mixture images, "
             f"{cfg.fuse.test_draws_per_image} (sigma, noise) draws per image, the same draws for every model.",
             "fit minutes: training time for trained models; for fused models the time to fit lambda.",
             "NFE/sample: network evaluations per sample: 2 x steps - 1 Heun evaluations, times K networks for a "
             "fused model (every auxiliary runs at every evaluation unless lambda is one-hot), 1 for the one-step generator; samples/s: "
             "sampling plus feature extraction, on this machine.",
             f"class order: {' '.join(classes)}; populations disjoint: {manifest['disjoint']}."]
    if extractor == DIGIT_CLASSIFIER:
        notes.insert(2, "class TV: total variation distance between the digit classifier's class proportions of "
                        "the samples and a population's mixture (0 = the same, 1 = disjoint).")
    if (rd.fuse / "lambda.png").is_file():
        notes.append("lambda chart: fuse/lambda.png; fused samples: fuse/samples.png.")
    write_report(rd.root, f"scorefuse report: {cfg.name}", [("Models", rows), ("Populations", data_rows)], notes)
    print(f"wrote {rd.root / 'report.md'}")


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _mixture_vector(mixture: dict, class_names: list[str]) -> np.ndarray:
    return np.array([float(mixture.get(c, 0.0)) for c in class_names])


def _total_variation(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _format_mixture(p) -> str:
    return " ".join(f"{x:.2f}" for x in p)
