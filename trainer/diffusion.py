"""The diffusion training stage: an EDM denoiser trained on one population's shards.

Every auxiliary model is trained by this stage (and, later, the target-only baselines). It is the
engine plus three stage-specific parts: the network, the EDM loss, and the population's stream.
When it finishes, the EMA weights are exported (trainer/export.py) and `done.json` marks the stage
finished, so a re-run skips it.
"""
import json
from pathlib import Path

import torch
from accelerate.utils import set_seed

from shards.manifest import load_manifest, population_entry
from shards.spec import DataSpec
from shards.stream import train_loader
from trainer.edm import Denoiser, denoising_loss
from trainer.engine import Engine, Hook, Update
from trainer.export import export_denoiser
from trainer.spec import EDMSpec, NetworkSpec, TrainSpec
from trainer.unet import build_unet


def is_finished(stage_dir: Path) -> bool:
    return (Path(stage_dir) / "done.json").is_file()


def model_meta(manifest: dict, network: NetworkSpec, edm: EDMSpec, population: str) -> dict:
    return {"preset": network.preset, "dropout": network.dropout, "image_size": manifest["image_size"],
            "channels": manifest["channels"], "sigma_data": edm.sigma_data, "population": population}


def train_diffusion(accelerator, stage_dir: Path, data_dir: Path, population: str, data: DataSpec,
                    network: NetworkSpec, edm: EDMSpec, train: TrainSpec, hooks: tuple[Hook, ...] = (),
                    init: dict | None = None) -> Engine:
    """Train (or resume) one denoiser on `population`; `init` is a state dict to start from instead of
    random weights (fine-tuning). A resumed run takes its weights from the checkpoint either way."""
    manifest = load_manifest(data_dir)
    population_entry(manifest, population)  # a clear error for an unknown population, before any work
    meta = model_meta(manifest, network, edm, population)

    set_seed(train.seed)  # the same initial weights (and EMA copy) on every rank
    denoiser = Denoiser(build_unet(network.preset, meta["image_size"], meta["channels"], network.dropout),
                        sigma_data=edm.sigma_data)
    if init is not None:
        denoiser.load_state_dict(init)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps)
    set_seed(train.seed, device_specific=True)  # noise and dropout differ between ranks

    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = train.batch // (world * train.accum)
    device = accelerator.device

    def batches(start_batch: int):
        loader = train_loader(data_dir, population, batch_size=micro_batch, seed=train.seed, rank=rank,
                              world_size=world, num_workers=data.workers, start_batch=start_batch,
                              max_bad_samples=data.max_bad_samples)
        for images, _labels in loader:
            yield images.to(device, non_blocking=True)

    def loss(modules, x0):
        # Noise from the global RNG: it is seeded per rank and saved in every checkpoint.
        return denoising_loss(modules["net"], x0, None, p_mean=edm.p_mean, p_std=edm.p_std,
                              sigma_data=edm.sigma_data).mean()

    engine = Engine(accelerator, train, stage_dir, modules={"net": denoiser}, optimizers={"adam": optimizer},
                    updates=[Update("adam", "net", loss)], batches=batches, ema=("net",), hooks=hooks)
    engine.run()
    if accelerator.is_main_process:
        export_denoiser(stage_dir, engine.ema["net"], meta)
        (Path(stage_dir) / "done.json").write_text(json.dumps(
            {"kimg": engine.kimg, "steps": engine.step, "skipped_steps": engine.skipped,
             "seconds": round(engine.seconds, 1)}, indent=1))
    accelerator.wait_for_everyone()
    return engine
