"""What every stage runs on, built once when it starts: the config, the run directory, the manifest, the
accelerator and the log; and the pieces several stages share (the seeding of a training run, its data
stream and short-run TrainSpec, the feature space of the periodic Fréchet distance, sample grids, the
training hooks).
"""
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from accelerate.utils import set_seed

from evaluation.classifier import load_classifier
from evaluation.features import FeatureSpace, Ranks, frechet
from evaluation.grid import save_grid
from shards.manifest import image_shape, load_manifest, population_entry
from shards.stream import read_population, train_loader
from stages.config import RunConfig, extractor_for, record_config
from trainer.edm import heun_sample, sigma_bounds
from trainer.accelerator import make_accelerator
from trainer.engine import Hook
from trainer.precision import with_autocast
from trainer.progress import say
from trainer.spec import TrainSpec
from shards.errors import ConfigError
from stages.rundir import GRID, TENSORBOARD, RunDir, is_finished, mark_finished, set_aside
from shards.seeds import Stream, per_image_normal

Built = TypeVar("Built")


@dataclass
class StageContext:
    cfg: RunConfig
    run: RunDir
    acc: object                 # accelerate.Accelerator
    manifest: dict
    log: Callable[[str], None]
    _spaces: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, cfg: RunConfig, ddp_because: str = "") -> "StageContext":
        """The accelerator first (it decides the device and the process group), then the data directory's
        manifest (a clear "run prepare first"), then config.yaml on the main process."""
        acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes, ddp_because)
        run = RunDir.of(cfg)
        manifest = load_manifest(run.data)
        if acc.is_main_process:
            record_config(cfg, run)
        restart = os.environ.get("SLURM_RESTART_COUNT")
        log = say if acc.is_main_process else (lambda message: None)
        if restart:
            log(f"SLURM_RESTART_COUNT={restart}")
        return cls(cfg, run, acc, manifest, log)

    def begin(self, stage_dir: Path) -> bool:
        """Whether a stage runs: not when it already finished. train.resume=none starts it afresh, after
        moving its old directory aside (nothing is deleted)."""
        stage_dir = Path(stage_dir)
        own = self.run.root in stage_dir.parents  # a sweep's run never restarts its parent's models
        if self.cfg.train.resume == "none" and own and stage_dir.exists():
            if self.acc.is_main_process:
                self.log(f"train.resume=none: {stage_dir} moved to {set_aside(stage_dir)}")
            self.acc.wait_for_everyone()
            return True
        if is_finished(stage_dir):
            self.log(f"{stage_dir}: already finished, skipping")
            return False
        return True

    def finish(self, stage_dir: Path, info: dict, export: Callable[[], None] | None = None) -> None:
        """A stage's end: on the main process its model written (`export`), then its done.json, last; every
        rank returns together."""
        if self.acc.is_main_process:
            if export is not None:
                export()
            mark_finished(stage_dir, info)
        self.acc.wait_for_everyone()

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def pin_memory(self) -> bool:
        """Whether loaders pin their batches: for a GPU, so that non_blocking copies overlap compute."""
        return self.device.type == "cuda"

    def seeded(self, seed: int, build: Callable[[], Built]) -> Built:
        """`build()` (the trained networks) with the global RNGs seeded alike on every rank, so that every rank
        starts from the same weights (and EMA copy); then seeded per rank, so that the training noise and
        dropout differ between ranks (every checkpoint saves these states)."""
        set_seed(seed)
        built = build()
        set_seed(seed, device_specific=True)
        return built

    def training_images(self, population: str, batch_size: int, seed: int, start_batch: int,
                        data_dir: Path | None = None, workers: int | None = None) -> Iterator[torch.Tensor]:
        """This rank's micro-batches of `population`'s training stream (shards.stream.train_loader: a pure
        function of the seed, rank and position, so a resumed run sees the same stream) from `start_batch`
        on, on the device; labels dropped. From the run's data unless `data_dir`, read by data.workers
        processes unless `workers`."""
        loader = train_loader(data_dir or self.run.data, population, batch_size=batch_size, seed=seed,
                              rank=self.acc.process_index, world_size=self.acc.num_processes,
                              num_workers=self.cfg.data.workers if workers is None else workers,
                              start_batch=start_batch, max_bad_samples=self.cfg.data.max_bad_samples,
                              pin_memory=self.pin_memory)
        for images, _labels in loader:
            yield images.to(self.device, non_blocking=True)

    def short_run(self, batch: int, lr: float, kimg: float) -> TrainSpec:
        """The TrainSpec of a short auxiliary training (the SGD fit of lambda, the router): train.* with its own
        batch, rate and length, no warm-up, no periodic Fréchet distance or grid; about 20 log lines and 4
        checkpoints whatever its length."""
        return replace(self.cfg.train, batch=batch, lr=lr, lr_rampup_kimg=0, total_kimg=kimg, eval_every_kimg=0,
                       snapshot_every_kimg=0, log_every_kimg=max(kimg / 20, 1e-3),
                       checkpoint_every_kimg=max(kimg / 4, 1e-3))

    @property
    def shape(self) -> tuple[int, int, int]:
        return image_shape(self.manifest)

    @property
    def ranks(self) -> Ranks:
        return Ranks.of(self.acc)

    def sampler(self, denoiser, steps: int | None = None):
        """The run's Heun sampler around a denoiser: latents [B, C, H, W] -> images in [-1, 1]."""
        e = self.cfg.edm
        low, high = sigma_bounds(denoiser, e.sigma_min, e.sigma_max)  # within what a pretrained model is valid at
        return partial(heun_sample, denoiser, num_steps=steps or e.sampler_steps, sigma_min=low, sigma_max=high,
                       rho=e.rho)

    def features(self, extractor: str | None = None) -> FeatureSpace:
        """The feature space of the run's Fréchet distances, or of `extractor` (each built once)."""
        extractor = extractor or extractor_for(self.cfg)
        if extractor not in self._spaces:
            weights = str(self.run.classifier) if extractor == "classifier" else self.cfg.eval.inception_weights
            self._spaces[extractor] = FeatureSpace(extractor, weights, self.run.eval_cache, self.cfg.eval.batch,
                                                   self.device, self.ranks, self.cfg.eval.sample_batch)
        return self._spaces[extractor]

    @property
    def fd_reference(self) -> str:
        """The population Fréchet distances compare with (eval.fd_reference, by default data.reference)."""
        return self.cfg.eval.fd_reference or self.cfg.data.reference.name

    def reference(self, population: str, extractor: str | None = None) -> torch.Tensor:
        """Features of a population of the data directory (cached by its content hash)."""
        entry = population_entry(self.manifest, population)
        return self.features(extractor).reference(entry["hash"], lambda: read_population(self.run.data, population)[0])

    def trackers(self, stage_dir: Path) -> tuple:
        """Accelerate's trackers for one training run (train.log_with), on the main process: TensorBoard
        events in <stage>/tensorboard/ (so `tensorboard --logdir runs/<name>` shows every stage), W&B runs
        named after the stage in a project named after the run."""
        wanted = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",),
                  "all": ("tensorboard", "wandb")}[self.cfg.train.log_with]
        if not self.acc.is_main_process or not wanted:
            return ()
        from accelerate.tracking import TensorBoardTracker, WandBTracker
        from accelerate.utils import is_wandb_available
        stage = str(Path(stage_dir).relative_to(self.run.root))
        trackers = []
        for name in wanted:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(TENSORBOARD, stage_dir))
            elif is_wandb_available():
                trackers.append(WandBTracker(self.cfg.name, name=stage, dir=str(stage_dir)))
            elif self.cfg.train.log_with == "wandb":
                raise ConfigError("train.log_with=wandb needs the wandb package: pip install wandb")
        for tracker in trackers:
            tracker.start()
        return tuple(trackers)

    def classifier(self):
        return load_classifier(self.run.classifier).to(self.device)

    def save_grid(self, sample_fn, stage_dir: Path, name: str = GRID) -> None:
        """A grid of eval.grid_images samples, the same latents for every model and snapshot; main process."""
        latents = per_image_normal(0, Stream.GRID, range(self.cfg.eval.grid_images), self.shape).to(self.device)
        with torch.no_grad():
            images = sample_fn(latents)
        save_grid(images, Path(stage_dir) / name, scale=max(1, 64 // self.shape[-1]))

    def training_hooks(self, stage_dir: Path, population: str, spec, sample_fn_of) -> tuple[Hook, ...]:
        """Periodic Fréchet distance of the EMA model to `population` (named by its sample count, spread over
        the ranks, computed on the main process) and a sample grid. `sample_fn_of(engine)` is the EMA
        model's sampler; `spec` the engine's TrainSpec."""
        hooks = []
        if spec.eval_every_kimg > 0:
            reference = self.reference(population)
            name = self.features().metric(spec.eval_samples)

            def frechet_hook(engine):
                # at the precision evaluate samples at, so that one model's distance means one thing
                sample_fn = with_autocast(sample_fn_of(engine), self.cfg.eval.sample_precision)
                features, _ = self.features().sample(sample_fn, self.shape, spec.eval_samples, spec.seed)
                if not self.acc.is_main_process:
                    return None
                value = frechet(features, reference)
                engine.log(f"{Path(stage_dir).name}: {name} = {value:.3f} at {engine.kimg:.1f} kimg")
                return {name: value}
            hooks.append(Hook(spec.eval_every_kimg, frechet_hook))
        if spec.snapshot_every_kimg > 0:
            def snapshot(engine):
                if self.acc.is_main_process:
                    self.save_grid(sample_fn_of(engine), stage_dir)
            hooks.append(Hook(spec.snapshot_every_kimg, snapshot))
        return tuple(hooks)
