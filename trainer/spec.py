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
