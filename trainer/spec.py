"""Typed description of the model and the training recipe: the `network`, `edm` and `train`
sections of the run config (OmegaConf structured config)."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class NetworkSpec:
    preset: str = "tiny"          # tiny | ddpmpp-cifar10 | ddpmpp-64 (trainer/unet.py)
    dropout: Optional[float] = None  # None keeps the preset's value


@dataclass
class EDMSpec:
    """EDM (Karras et al. 2022) constants; the defaults are the paper's."""
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sampler_steps: int = 18


@dataclass
class TrainSpec:
    """Schedules are counted in thousands of images seen (kimg), as EDM does, so that they mean the
    same thing for any number of processes."""
    batch: int = 256               # global batch: all ranks x accum micro-batches
    accum: int = 1                 # gradient accumulation rounds per optimizer step
    lr: float = 1e-3
    lr_rampup_kimg: float = 10.0   # linear warm-up of the learning rate
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 0.0         # max gradient norm; 0 disables clipping
    precision: str = "no"          # no | bf16 | fp16 (fp16 uses a dynamic loss scaler)
    total_kimg: float = 200.0
    ema_halflife_kimg: float = 50.0
    ema_rampup_ratio: Optional[float] = 0.05  # half-life <= ratio x images seen, early on
    seed: int = 0
    log_every_kimg: float = 2.0
    checkpoint_every_kimg: float = 20.0
    keep_checkpoints: int = 2      # >= 2: the newest may be the one a crash cut short
    eval_every_kimg: float = 0.0   # periodic Frechet distance; 0 disables
    eval_samples: int = 1000
    snapshot_every_kimg: float = 0.0  # periodic sample grid; 0 disables
    max_nonfinite_steps: int = 100     # stop when this many steps in a row had NaN/Inf gradients


@dataclass
class FuseSpec:
    """ScoreFusion: fit the barycenter weights lambda on the target population (METHODS.md §1)."""
    method: str = "exact"            # exact (Gram statistics + simplex QP) | sgd (the paper's softmax SGD)
    sigma_bins: List[float] = field(default_factory=list)  # sigma edges of piecewise-constant lambda; [] = one lambda
    draws_per_image: int = 64        # (sigma, noise) draws per target image in the Gram pass
    batch: int = 64                  # target images per forward batch (x K networks)
    sgd_epochs: float = 128          # the paper's SGD fit: passes over the target images
    sgd_lr: float = 0.1
    sgd_momentum: float = 0.9
    # Baselines trained or built in the same run: target-scratch | target-finetune | checkpoint-merge
    baselines: List[str] = field(default_factory=lambda: ["target-scratch", "target-finetune", "checkpoint-merge"])
    scratch_kimg: float = 60.0       # target-scratch: the auxiliary recipe on the n target images
    finetune_kimg: float = 10.0      # target-finetune: the best auxiliary, fine-tuned on the n target images
    finetune_lr: float = 2e-4
    test_draws_per_image: int = 16   # draws per held-out image for the target test loss in the report
