"""The fuse stage: fit the ScoreFusion weights lambda of K frozen auxiliaries on the n target images.

Two fits, on the same target images and the same loss (METHODS.md §1):
- exact (the default): one pass of forward evaluations accumulates the float64 Gram statistics
  A_ij = E[w <D_i, D_j>], b_i = E[w <D_i, x0>] (summed over ranks), then the quadratic program on the
  simplex is solved exactly, per sigma bin. No backpropagation through any network.
- sgd (the paper's): lambda = softmax(logits) trained by SGD with momentum through the training
  engine, so it checkpoints and resumes like every other stage.
Both are written to fuse/lambda.json; fuse.method says which one is *the* fused model. Each fit is
judged on the same Gram statistics, so their losses compare exactly.
"""
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from shards.files import write_atomically
from shards.stream import read_population, train_loader
from trainer.barycenter import accumulate_gram, fit_barycenter_weights, sgd_fit_parts
from trainer.checkpoint import CheckpointError
from trainer.engine import Engine
from trainer.export import load_denoiser
from trainer.fusion import FusedDenoiser, FusionError
from trainer.spec import EDMSpec, FuseSpec, TrainSpec

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def load_auxiliaries(aux_dirs: dict[str, Path]) -> list:
    """The EMA denoisers of the finished auxiliaries; a clear error naming any that is missing."""
    denoisers = []
    for name, directory in aux_dirs.items():
        try:
            denoisers.append(load_denoiser(directory)[0])
        except CheckpointError:
            raise FusionError(f"auxiliary {name}: no finished model in {directory}; "
                              f"run `scorefuse train-aux aux={name}` first") from None
    return denoisers


def load_fused(fuse_dir: Path, aux_dirs: dict[str, Path], which: str | None = None) -> FusedDenoiser:
    """The fused model of a finished fuse stage: `which` = exact | sgd, or None for fuse.method's."""
    path = Path(fuse_dir) / "lambda.json"
    if not path.is_file():
        raise FusionError(f"no {path}: run `scorefuse fuse` first")
    fit = json.loads(path.read_text())
    lam = fit[which or fit["method"]]["lambda"]
    return FusedDenoiser(load_auxiliaries(aux_dirs), torch.tensor(lam, dtype=torch.float64),
                         sigma_edges=fit["sigma_edges"], names=list(aux_dirs))


def best_auxiliary(fit: dict) -> str:
    """The auxiliary with the lowest target loss on its own (the best vertex of the exact fit), from
    lambda.json."""
    losses = fit["exact"]["vertex_losses"]
    return min(losses, key=losses.get)


def single_lambda(fit: dict) -> list[float]:
    """One lambda for every sigma, from lambda.json: the exact fit's, or with sigma bins the single-lambda
    fit on the same draws."""
    exact = fit["exact"]
    return exact.get("single_lambda", {}).get("lambda") or exact["lambda"][0]


def target_batches(images: torch.Tensor, batch: int, seed: int, rank: int, world: int):
    """This rank's share of the target images as (x0, generator) pairs, batch i to rank i % world,
    each batch's draws seeded by its global index: the Gram sums do not depend on the world size."""
    x0 = images.float().div(127.5).sub(1)
    for index, chunk in enumerate(x0.split(batch)):
        if index % world == rank:
            yield chunk, torch.Generator().manual_seed(seed * 1_000_003 + index)


def fit_fusion(accelerator, fuse_dir: Path, aux_dirs: dict[str, Path], data_dir: Path, target: str,
               fuse: FuseSpec, edm: EDMSpec, train: TrainSpec, log=print) -> dict:
    fuse_dir = Path(fuse_dir)
    names = list(aux_dirs)
    device = accelerator.device
    fused = FusedDenoiser(load_auxiliaries(aux_dirs), torch.full((len(names),), 1 / len(names)),
                          names=names).to(device)
    images, _ = read_population(data_dir, target)
    if len(images) == 0:
        raise FusionError(f"target population {target} has no images")
    edges = list(fuse.sigma_bins) or None
    autocast = AUTOCAST[train.precision]
    rank, world = accelerator.process_index, accelerator.num_processes

    t0 = time.perf_counter()
    batches = ((x.to(device), g) for x, g in target_batches(images, fuse.batch, train.seed, rank, world))
    stats = accumulate_gram(fused, batches, fuse.draws_per_image, edm.p_mean, edm.p_std, edm.sigma_data,
                            sigma_edges=edges, autocast_dtype=autocast,
                            reduce=(lambda t: accelerator.reduce(t, "sum")) if world > 1 else None)
    exact = fit_barycenter_weights(stats, names)
    exact_seconds = time.perf_counter() - t0
    log(f"fuse (exact): lambda {_fmt(exact['lambda'])}, loss {exact['report']['loss']:.5f} "
        f"in {exact_seconds:.1f} s ({fuse.draws_per_image} draws x {len(images)} images)")

    # The paper's fit, through the engine: one epoch = one pass over the n target images.
    spec = replace(train, batch=fuse.batch, accum=1, lr=fuse.sgd_lr, lr_rampup_kimg=0,
                   total_kimg=fuse.sgd_epochs * len(images) / 1000, eval_every_kimg=0, snapshot_every_kimg=0,
                   log_every_kimg=max(fuse.sgd_epochs * len(images) / 20000, 1e-3),
                   checkpoint_every_kimg=max(fuse.sgd_epochs * len(images) / 4000, 1e-3))
    modules, optimizers, updates = sgd_fit_parts(fused, edm.p_mean, edm.p_std, edm.sigma_data,
                                                 sigma_edges=edges, momentum=fuse.sgd_momentum,
                                                 autocast_dtype=autocast)
    micro = fuse.batch // world

    def target_stream(start_batch):
        loader = train_loader(data_dir, target, batch_size=micro, seed=train.seed, rank=rank, world_size=world,
                              num_workers=0, start_batch=start_batch)
        for x, _ in loader:
            yield x.to(device)

    torch.manual_seed(train.seed * 7919 + rank)  # the SGD draws: per rank, saved in its checkpoints
    engine = Engine(accelerator, spec, fuse_dir / "sgd", modules=modules, optimizers=optimizers,
                    updates=updates, batches=target_stream)
    engine.run()
    sgd_lam = accelerator.unwrap_model(engine.modules["weights"]).weights().detach().double().cpu()
    sgd = {"lambda": sgd_lam.tolist(), "loss": float(stats.loss(sgd_lam)), "seconds": engine.seconds,
           "steps": engine.step, "epochs": fuse.sgd_epochs}
    log(f"fuse (sgd): lambda {_fmt(sgd_lam)}, loss {sgd['loss']:.5f} in {engine.seconds:.1f} s")

    result = {"method": fuse.method, "names": names, "sigma_edges": edges, "target": target,
              "target_images": len(images),
              "exact": {"lambda": exact["lambda"].tolist(), "seconds": exact_seconds, **exact["report"]},
              "sgd": sgd}
    if accelerator.is_main_process:
        write_atomically(fuse_dir / "lambda.json", json.dumps(result, indent=1).encode())  # last: it marks the stage finished
    accelerator.wait_for_everyone()
    return result


def _fmt(lam) -> str:
    return " | ".join(" ".join(f"{v:.3f}" for v in row) for row in torch.as_tensor(lam).reshape(-1, lam.shape[-1]).tolist())
