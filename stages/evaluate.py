"""evaluate: did fusion help the target? Every finished model (stages/catalogue.py) is measured on the
held-out reference images of the target mixture, with its uncertainty, next to floors that real data set.
The numbers go to one file, measurements.json (evaluation/measurements.py); report.md and report.json are its
view (evaluation/run_report.py), opening with a verdict computed from it (evaluation/verdict.py).

Per model:
- NLL in bits/dim by the probability-flow ODE (evaluation/likelihood.py) on the first eval.nll_images held-out
  images, mean ± standard error over images; the same images and draws for every model, so differences are
  paired. Every model with a denoiser has one (the fused models through their fused denoiser).
- the held-out denoising loss, per image, likewise paired;
- the Fréchet distance of eval.num_samples samples to the held-out images with a 95% bootstrap interval that
  resamples both sets, and KID (unbiased) mean ± std over subsets (evaluation/intervals.py);
- memorisation (evaluation/memorisation.py): the share of samples that copy a target training image (ratio
  test), and the mean nearest-neighbour distance to the training images against held-out images of the same
  number; a picture of the most-copied samples beside their nearest training images;
- the class proportions of the samples (the feature classifier), as total variation to the classifier's
  proportions on the held-out images, whose own distance to the true mixture is printed as the floor.
Floors: the held-out images split in two halves (the best a model can score at that sample count), and the n
target training images themselves used as samples (what pure copying scores).

Samples, features and per-image values are cached (evaluation/cache.py) by the model's weights and the
settings, so re-running a finished evaluate only recomputes the statistics. All the work is spread over the
ranks: sampling, the per-image values (gathered by image index), and the report's statistics, as tasks
(a model's Fréchet distance, each of its bootstrap rounds, its KID, memorisation, class proportions...) dealt
one per rank per collective (Ranks.map), on each rank's device. The main process then only writes the
measurements and formats the report: see report_statistics for the bound on how long any rank waits at a
collective.
"""
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from evaluation.cache import ResultCache
from evaluation.classifier import class_indicators
from evaluation.features import Ranks, frechet, metric_name
from evaluation.comparison import comparisons
from evaluation.intervals import bootstrap_interval, bootstrap_round, frechet_on, kernel_distance
from evaluation.labels import DISTILL, HALVES, TARGET_AS_SAMPLES, auxiliary, fused
from evaluation.likelihood import nll_bits_per_dim
from evaluation.memorisation import copies_figure, copy_share, memorisation
from evaluation.measurements import entry, read_measurements, total_variation, write_measurements
from evaluation.run_report import write_run_report
from evaluation.score_matching import held_out_loss
from evaluation.spec import EvalSpec
from shards.manifest import MANIFEST_NAME, population_entry
from shards.stream import read_population
from stages.catalogue import Model, best_auxiliary, finished_models, load_fit, load_mixture, sigma_limits
from stages.config import RunConfig
from shards.pixels import to_unit
from shards.seeds import Stream, generator
from stages.context import StageContext
from stages.rundir import TEACHER_POPULATION, is_finished
from trainer.edm import sigma_bounds

ROLES = ["aux", "target", "reference"]


@dataclass
class Measured:
    """What was measured of one model (or one floor): the raw material of its measurements entry."""
    label: str
    description: str
    images: torch.Tensor                # uint8 samples
    features: torch.Tensor
    nll: torch.Tensor | None = None     # bits/dim per held-out image
    nll_doubled: torch.Tensor | None = None  # ... of the first eval.nll_doubling_images of them, at twice the steps
    loss: torch.Tensor | None = None    # held-out denoising loss per image
    seconds: float | None = None        # sampling + feature extraction
    nfe: int | None = None
    facts: dict = field(default_factory=dict)
    reference: torch.Tensor | None = None  # features it is compared with (a floor's own other half) ...
    held_out: torch.Tensor | None = None   # ... and images that are held out from it
    # other images it learnt from, checked for copies too (the ratio test): {what they are: uint8 images}
    copy_sets: dict = field(default_factory=dict)


def gather_by_index(ranks: Ranks, values: torch.Tensor, indices: torch.Tensor, total: int, device) -> torch.Tensor:
    """Per-image values computed by each rank for its own `indices` (at most ceil(total / world) of them; a
    rank may have none, when there are more ranks than images), gathered and put back in image order: float64
    [total] on the CPU, on every rank."""
    share = rank_share(values, indices, math.ceil(total / ranks.world), device)
    gathered = (ranks.gather(share) if ranks.world > 1 else share).cpu()
    present = gathered[:, 1] >= 0
    ordered = torch.empty(total, dtype=torch.float64)
    ordered[gathered[present, 1].long()] = gathered[present, 0]
    return ordered


def rank_share(values: torch.Tensor, indices: torch.Tensor, slots: int, device) -> torch.Tensor:
    """What a rank hands the all-gather of gather_by_index: rows (value, image index) float64 [slots, 2], padded
    with index -1 so that every rank hands the same shape, on `device`, the accelerator's: NCCL refuses CPU
    tensors, and a rank without images must not make an exception."""
    share = torch.full((slots, 2), -1.0, dtype=torch.float64, device=device)
    share[:len(values), 0] = values.to(device, torch.float64)
    share[:len(indices), 1] = indices.to(device, torch.float64)
    return share


def measure(ctx: StageContext, cache: ResultCache, model: Model, reference: torch.Tensor, reference_hash: str) -> Measured:
    """Sample, extract features, and run the per-image measurements of one model (cached)."""
    cfg, e, ev = ctx.cfg, ctx.cfg.edm, ctx.cfg.eval
    network = model.load().to(ctx.device)
    weights = model.fingerprint()
    low, high = sigma_bounds(network, e.sigma_min, e.sigma_max)  # what a pretrained model is valid at
    sampler = {"steps": e.sampler_steps, "sigma_min": low, "sigma_max": high, "rho": e.rho}
    key = {"model": weights, "n": ev.num_samples, "seed": cfg.train.seed, "features": ctx.features().fingerprint,
           **({} if model.one_step else sampler),
           **({"precision": ev.sample_precision} if ev.sample_precision != "no" else {})}

    def sample():
        started = time.perf_counter()
        features, images = ctx.features().sample(model.sampler(network, cfg), ctx.shape, ev.num_samples,
                                                  cfg.train.seed, keep_images=True)
        return {"features": features, "images": images, "seconds": torch.tensor(time.perf_counter() - started)}
    samples = cache.get("samples", key, sample, ctx.acc.is_main_process, ctx.acc.wait_for_everyone)
    measured = Measured(model.label, model.description, samples["images"], samples["features"],
                        seconds=float(samples["seconds"]), nfe=model.nfe(network, cfg), facts=model.facts)
    if model.one_step:
        return measured
    rank, world = ctx.acc.process_index, ctx.acc.num_processes
    nll_indices = torch.arange(min(ev.nll_images, len(reference)))
    if len(nll_indices):
        sigma_min, sigma_max = sigma_limits(cfg)  # one ODE for every model: within every pretrained one's range
        nll_key = {"model": weights, "images": reference_hash, "count": len(nll_indices), "steps": ev.nll_steps,
                   "probes": ev.nll_probes, "seed": cfg.train.seed, "sigma_min": sigma_min, "sigma_max": sigma_max,
                   "bins": "centred"}  # the dequantisation bins are part of what a cached value means

        def nll(count: int, steps: int) -> torch.Tensor:
            """bits/dim of the first `count` NLL images at `steps` ODE steps (each rank its share, gathered)."""
            mine = nll_indices[:count][rank::world]
            return cache.get("nll", {**nll_key, "count": count, "steps": steps}, lambda: {
                "bits_per_dim": gather_by_index(ctx.ranks, nll_bits_per_dim(
                    network, reference[mine], mine.tolist(), cfg.train.seed, steps=steps, probes=ev.nll_probes,
                    sigma_min=sigma_min, sigma_max=sigma_max, rho=e.rho, batch_size=ev.nll_batch,
                    device=ctx.device), mine, count, ctx.device)},
                ctx.acc.is_main_process, ctx.acc.wait_for_everyone)["bits_per_dim"]
        measured.nll = nll(len(nll_indices), ev.nll_steps)
        doubled = min(ev.nll_doubling_images, len(nll_indices))
        if doubled:
            measured.nll_doubled = nll(doubled, 2 * ev.nll_steps)
    all_indices = torch.arange(len(reference))
    mine = all_indices[rank::world]
    loss_key = {"model": weights, "images": reference_hash, "draws": cfg.eval.test_draws_per_image,
                "seed": cfg.train.seed, "p_mean": e.p_mean, "p_std": e.p_std}
    measured.loss = cache.get("loss", loss_key, lambda: {"loss": gather_by_index(ctx.ranks, held_out_loss(
        network, reference[mine], mine.tolist(), cfg.eval.test_draws_per_image, e.p_mean, e.p_std, e.sigma_data,
        seed=cfg.train.seed, batch_size=ev.batch, device=ctx.device), mine, len(all_indices), ctx.device)},
        ctx.acc.is_main_process, ctx.acc.wait_for_everyone)["loss"]
    return measured


def floors(ctx: StageContext, reference: torch.Tensor, reference_features: torch.Tensor,
           target: torch.Tensor) -> list[Measured]:
    """Real data in the place of samples: the Fréchet reference population (images and their features) split
    in two halves (one half compared with the other: the best any model can score with that many images),
    and the target training images (pure copying)."""
    order = torch.randperm(len(reference), generator=generator(ctx.cfg.train.seed, Stream.SPLIT))
    a, b = order[: len(order) // 2], order[len(order) // 2:]
    return [Measured(HALVES, f"{len(a)} held-out images against the other {len(b)}", reference[a],
                     reference_features[a], reference=reference_features[b], held_out=reference[b][: len(target)]),
            Measured(TARGET_AS_SAMPLES, f"the {len(target)} target training images against the held-out ones",
                     target, ctx.features().extract(target))]


def run(cfg: RunConfig) -> dict:
    ctx = StageContext.open(cfg)
    cache = ResultCache(ctx.run.eval_cache)
    reference_name, target_name = cfg.data.reference.name, cfg.data.target.name
    reference, reference_labels = read_population(ctx.run.data, reference_name, cfg.data.max_bad_samples)
    target = read_population(ctx.run.data, target_name, cfg.data.max_bad_samples)[0]
    reference_features = ctx.reference(ctx.fd_reference)
    fd_images = reference if ctx.fd_reference == reference_name else \
        read_population(ctx.run.data, ctx.fd_reference, cfg.data.max_bad_samples)[0]
    reference_hash = population_entry(ctx.manifest, reference_name)["hash"]
    measured = []
    for model in finished_models(cfg):
        measured.append(measure(ctx, cache, model, reference, reference_hash))
        ctx.log(f"evaluate: measured {model.label}")
    for m, sets in zip(measured, learnt_from(ctx, measured)):
        m.copy_sets = sets
    # Reference features are collective (the main process computes, the others wait): every rank asks here.
    own = {m.facts["population"]: ctx.reference(m.facts["population"]) for m in measured if "population" in m.facts}
    domain = None
    if ctx.features().extractor != "classifier" and ctx.run.classifier.is_file():
        domain = (ctx.features("classifier").extract, ctx.reference(ctx.fd_reference, "classifier"))
    classifier = ctx.classifier() if ctx.run.classifier.is_file() else None
    classify = None if classifier is None else lambda images: class_indicators(classifier, to_unit(images))
    floor_rows = floors(ctx, fd_images, reference_features, target)
    started = time.perf_counter()
    stats, reference_props, slowest = report_statistics(
        [*measured, *floor_rows], reference, reference_features, target, own, cfg.eval, cfg.train.seed, ctx.ranks,
        ctx.device, classify=classify, domain=domain)
    ctx.log(f"evaluate: report statistics in {time.perf_counter() - started:.0f} s over {ctx.acc.num_processes} "
            f"rank(s); its slowest task, which bounds any rank's wait at a collective, took {slowest:.1f} s "
            f"(launch.timeout_minutes={cfg.launch.timeout_minutes})")
    if ctx.acc.is_main_process:  # the measurements first; the report is a view of them
        write_measurements(ctx.run.measurements,
                           measurements(ctx, measured, floor_rows, stats, reference_props, reference, reference_labels))
        write_run_report(ctx.run.report, read_measurements(ctx.run.measurements))
        for m in measured:  # floors have no picture: their "copies" are real images
            copies_figure(m.images, target, stats[m.label]["copies"], ctx.run.copies_figure(m.label))
        ctx.log(f"evaluate: measurements in {ctx.run.measurements}, report in {ctx.run.report}")
    ctx.acc.wait_for_everyone()
    return {"models": [m.label for m in measured]}


def learnt_from(ctx: StageContext, measured: list[Measured]) -> list[dict]:
    """For each model, the images besides the target's it learnt from, to be checked for copies: the auxiliaries'
    training images (every trained auxiliary's population; a fused model learnt from all of them, and an
    auxiliary's copies of its own population show here), and for the one-step generator its teacher's fixed
    samples."""
    cfg = ctx.cfg
    trained = [a.name for a in cfg.data.aux if a.pretrained is None]
    sets = {"aux": torch.cat([read_population(ctx.run.data, name, cfg.data.max_bad_samples)[0]
                              for name in trained])} if trained else {}
    teacher = ctx.run.teacher
    if any(m.label == DISTILL for m in measured) and (teacher / MANIFEST_NAME).is_file():
        return [{**sets, "teacher": read_population(teacher, TEACHER_POPULATION, cfg.data.max_bad_samples)[0]}
                if m.label == DISTILL else sets for m in measured]
    return [sets for _ in measured]


def report_statistics(rows: list[Measured], reference: torch.Tensor, reference_features: torch.Tensor,
                      target: torch.Tensor, own: dict, ev: EvalSpec, seed: int, ranks: Ranks, device, *,
                      classify: Callable | None = None, domain: tuple | None = None) -> tuple[dict, object, float]:
    """The heavy numbers of the report, on every rank: (per row label {"fd": Interval or None (no bootstrap),
    "fd value", "fd rounds": the bootstrap rounds' values in round order or None, "matched": the Fréchet distance
    at the sizes of the floor that has a reference of its own (None for fewer samples), "kid": (mean, std), "copies":
    memorisation's dict, "classes", "domain", "own": or None}, the class proportions of the reference images or
    None, the seconds of the slowest task).

    rows are compared with reference_features (or their own .reference) and with `target`, the training images
    (memorisation, against as many held-out images: `reference`'s first, or the row's .held_out). own: features
    of the auxiliary populations, for rows with a "population" fact; classify: uint8 images -> their classes as
    one-hot rows (evaluation.classifier.class_indicators; "classes" is then their proportions, "class tv rounds"
    the total variation to the reference's in each bootstrap round); domain: (extract: uint8 images -> features, reference features) of a second feature space.

    Every statistic is a task that gives the same number on any rank, the bootstrap rounds seeded by their
    index (evaluation/intervals.py), so the result does not depend on the number of ranks (bit for bit on
    CPUs; on GPUs frechet_float64 differs from the CPU's by at most 1e-7 of the covariances' traces). The
    Fréchet distances and nearest neighbours run on `device`.

    The bound on waiting: tasks are dealt one per rank per collective (Ranks.map), so no rank waits at a
    collective longer than the slowest single task takes, however many models and rounds there are. At
    CIFAR-10 scale (50,000 samples, 2048-d features, 10,000 reference images), on one CPU core, the slowest
    are a Fréchet distance or a bootstrap round (5-10 s), a row's KID (100 subsets of 1,000: ~10 s) and its
    memorisation (~12 s); on a GPU the distances and neighbours take under a second. After the last collective
    the main process only formats (report() and the copies pictures: seconds). Both stay orders of magnitude
    below launch.timeout_minutes (60), which the whole report on the main process (~5 hours) did not.
    """
    held_out = reference[: len(target)]  # as many as the training images: nearest-neighbour distances compare
    distance = frechet_on(device)
    # the floor with a reference of its own (the held-out halves): each model is also measured at its sizes, its
    # first samples against that floor's reference, so that the two carry the same small-sample bias
    floor = next((m for m in rows if m.reference is not None), None)
    tasks = {}
    reference_classes = None if classify is None else classify(reference)
    for m in rows:
        compared = m.reference if m.reference is not None else reference_features
        features, compared_here = m.features.to(device), compared.to(device)
        tasks[m.label, "fd value"] = partial(distance, features, compared_here)
        if floor is not None and m.reference is None and len(features) >= len(floor.features):
            tasks[m.label, "matched"] = partial(distance, features[:len(floor.features)], floor.reference.to(device))
        tasks.update({(m.label, "round", r): partial(bootstrap_round, features, compared_here, seed, r, distance)
                      for r in range(ev.bootstrap)})
        tasks[m.label, "kid"] = partial(kernel_distance, m.features, compared, ev.kid_subsets, ev.kid_subset_size,
                                        seed)
        tasks[m.label, "copies"] = partial(memorisation, m.images, target,
                                           held_out if m.held_out is None else m.held_out, ev.copy_threshold,
                                           device=device)
        for name, images in m.copy_sets.items():
            tasks[m.label, "copies of", name] = partial(copy_share, m.images, images, ev.copy_threshold, device=device)
        if classify is not None:
            tasks[m.label, "classes"] = partial(class_statistics, classify, m.images, reference_classes, seed,
                                                ev.bootstrap)
        if domain is not None:
            tasks[m.label, "domain"] = partial(_frechet_in, domain[0], m.images, domain[1])
        if "population" in m.facts:
            tasks[m.label, "own"] = partial(distance, features, own[m.facts["population"]].to(device))
    done = dict(zip(tasks, ranks.map(_timed, list(tasks.values()))))
    results = {key: result for key, (result, _) in done.items()}
    stats = {}
    for m in rows:
        value = results[m.label, "fd value"]
        draws = [results[m.label, "round", r] for r in range(ev.bootstrap)]
        stats[m.label] = {"fd": bootstrap_interval(value, draws) if draws else None, "fd value": value,
                          "fd rounds": draws or None,
                          "matched": value if m is floor else results.get((m.label, "matched")),
                          "copies of": {name: results[m.label, "copies of", name] for name in m.copy_sets},
                          **{what: results.get((m.label, what)) for what in ("kid", "copies", "domain", "own")}}
        classes = results.get((m.label, "classes"))
        stats[m.label].update(classes=None if classes is None else classes["proportions"],
                              **{"class tv rounds": None if classes is None else classes["rounds"]})
    return stats, None if reference_classes is None else reference_classes.mean(0).numpy(), \
        max((seconds for _, seconds in done.values()), default=0.0)


def class_statistics(classify: Callable, images: torch.Tensor, reference_classes: torch.Tensor, seed: int,
                     rounds: int) -> dict:
    """The class proportions of `images` and their total variation to the reference's in each bootstrap round,
    resampled as the Fréchet distance's round r is (evaluation.intervals.bootstrap_round: the same reference rows
    and sample indices), so that two models' rounds pair, with each other and with their FD rounds."""
    classes = classify(images)
    return {"proportions": classes.mean(0).numpy(),
            "rounds": [bootstrap_round(classes, reference_classes, seed, r, class_tv) for r in range(rounds)]}


def class_tv(classes: torch.Tensor, reference_classes: torch.Tensor) -> float:
    """The total variation between the class proportions of two sets of one-hot class rows."""
    return total_variation(classes.mean(0).numpy(), reference_classes.mean(0).numpy())


def _timed(task: Callable):
    started = time.perf_counter()
    return task(), time.perf_counter() - started


def _frechet_in(extract: Callable, images: torch.Tensor, reference_features: torch.Tensor) -> float:
    return frechet(extract(images), reference_features)


# ---- the measurements ------------------------------------------------------------------------------------------

def measurements(ctx, measured: list[Measured], floor_rows: list[Measured], stats: dict, reference_props,
                 reference: torch.Tensor, reference_labels: torch.Tensor) -> dict:
    """The measurements file's content (evaluation/measurements.py) from report_statistics' numbers, on the main
    process. The NLL's images are the first of the reference, so their labels are the first of reference_labels."""
    cfg, ev = ctx.cfg, ctx.cfg.eval
    classes = ctx.manifest["class_names"]

    def entries(rows: list[Measured]) -> dict:
        return {m.label: _entry(m, stats[m.label], reference_props, reference[0].numel(), reference_labels,
                                len(classes)) for m in rows}
    models, barycenter = entries(measured), fused(cfg.fuse.method)
    best = auxiliary(best_auxiliary(load_fit(cfg))) if is_finished(ctx.run.fuse) else None
    floor_tv = (total_variation(reference_props, _mixture_vector(cfg.data.target.mixture, classes))
                if reference_props is not None else None)
    settings = {"held_out": cfg.data.reference.name, "nll_images": ev.nll_images, "nll_steps": ev.nll_steps, "nll_doubling_images": ev.nll_doubling_images,
                "nll_sigma": list(sigma_limits(cfg)),
                "image_size": ctx.manifest["image_size"], "native_size": ctx.manifest.get("native_size"),
                "nll_probes": ev.nll_probes, "test_draws_per_image": cfg.eval.test_draws_per_image,
                "num_samples": ev.num_samples, "extractor": ctx.features().extractor,
                "fd_metric": ctx.features().metric(ev.num_samples),
                "fd_classifier_metric": metric_name("classifier", ev.num_samples), "fd_reference": ctx.fd_reference,
                "bootstrap": ev.bootstrap, "kid_subsets": ev.kid_subsets, "kid_subset_size": ev.kid_subset_size,
                "copy_threshold": ev.copy_threshold,
                "copies_figures": str(ctx.run.copies_figure("MODEL").parent.relative_to(ctx.run.root)),
                "validation_share": cfg.fuse.validation_share, "patience_kimg": cfg.fuse.patience_kimg,
                "finetune_lr": list(cfg.fuse.finetune_lr), "fit_objective": cfg.fuse.objective,
                "sgd_lr": cfg.fuse.sgd_lr, "sgd_momentum": cfg.fuse.sgd_momentum, "sgd_epochs": cfg.fuse.sgd_epochs}
    populations = [{"name": p, "role": e["role"], "images": e["count"], "shards": len(e["shards"]),
                    "mixture": _mixture_vector(e["mixture"], classes).tolist()}
                   for p, e in sorted(ctx.manifest["populations"].items(), key=lambda pe: ROLES.index(pe[1]["role"]))]
    return {"run": {"name": cfg.name, "sweep_n": cfg.sweep.n, "replicate": cfg.sweep.replicate},
            "barycenter": barycenter, "best_auxiliary": best,
            "class_names": classes,
            "settings": settings,
            "reference": {"class_proportions": None if reference_props is None else
                          np.asarray(reference_props, dtype=float).tolist(), "classifier_tv": floor_tv},
            "populations": populations, "models": models, "floors": entries(floor_rows),
            "comparisons": comparisons(models, barycenter, best),
            "router_calibration": (load_mixture(cfg).get("router_calibration") if ctx.run.mixture_file.is_file()
                                   else None)}


def _entry(m: Measured, s: dict, reference_props, pixels: int, labels: torch.Tensor, class_count: int) -> dict:
    """One entry of the measurements: what measure() and report_statistics found of m."""
    return entry(m.description, fd=s["fd"] or s["fd value"], fd_rounds=s["fd rounds"], kid=s["kid"],
                 copies=s["copies"], copies_of=s["copies of"], pixels=pixels,
                 nll=m.nll, nll_doubled=m.nll_doubled, loss=m.loss, classes=s["classes"], reference_classes=reference_props,
                 class_tv_rounds=s["class tv rounds"],
                 fd_classifier=s["domain"], fd_own_population=s["own"], fd_at_floor_size=s["matched"], nfe=m.nfe,
                 samples_per_second=len(m.images) / m.seconds if m.seconds else None,
                 fit_minutes=m.facts.get("minutes"), weights=m.facts.get("weights"),
                 fit_gap_percent=m.facts.get("fit gap %"), early_stopping=m.facts.get("early_stopping"),
                 nll_labels=None if m.nll is None else labels[:len(m.nll)].tolist(), class_count=class_count)


def _mixture_vector(mixture: dict, class_names: list[str]) -> np.ndarray:
    return np.array([float(mixture.get(c, 0.0)) for c in class_names])
