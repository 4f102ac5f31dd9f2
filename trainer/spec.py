"""Typed description of the model and the training recipe: the `network`, `edm` and `train`
sections of the run config (OmegaConf structured config)."""
from dataclasses import dataclass, field
from typing import List, Optional

# The models fusion is compared with, built by the fuse stage (stages/fuse.py).
BASELINES = ("target-scratch", "target-finetune", "checkpoint-merge")


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
    log_with: str = "none"         # none | tensorboard | wandb | all: Accelerate's trackers, beside metrics.jsonl
    resume: str = "latest"         # latest checkpoint | none (start the stage afresh) | a checkpoint directory
    # GPU throughput and reproducibility levers, off until measured (bench/gpu_check.py):
    deterministic: bool = False    # deterministic kernels: bit-identical resume on a GPU, at a cost
    compile: bool = False          # torch.compile the trained networks
    channels_last: bool = False    # NHWC memory format for the networks and their inputs
    cudnn_benchmark: bool = True   # cuDNN autotuning of convolutions (off under deterministic)


@dataclass
class FuseSpec:
    """ScoreFusion: fit the barycenter weights lambda on the target population (docs/METHODS.md §1)."""
    method: str = "exact"            # exact (Gram statistics + simplex QP) | sgd (the paper's softmax SGD)
    objective: str = "edm"           # edm (training's sigma law and weighting) | paper (ScoreFusion's VE SDE loss)
    sigma_bins: List[float] = field(default_factory=list)  # sigma edges of piecewise-constant lambda; [] = one lambda
    draws_per_image: int = 64        # (sigma, noise) draws per target image in the Gram pass
    # Evaluate the K auxiliaries in one vmapped call (true), one by one (false), or null: vmapped on CUDA only.
    batched: Optional[bool] = None
    batch: int = 64                  # target images per forward batch (x K networks)
    sgd_epochs: float = 128          # the paper's SGD fit: passes over the target images
    sgd_lr: float = 0.1
    sgd_momentum: float = 0.9
    # Baselines trained or built in the same run: target-scratch | target-finetune | checkpoint-merge
    baselines: List[str] = field(default_factory=lambda: list(BASELINES))
    scratch_kimg: float = 60.0       # target-scratch: the auxiliary recipe on the n target images
    finetune_kimg: float = 10.0      # target-finetune: the best auxiliary, fine-tuned on the n target images
    finetune_lr: float = 2e-4
    test_draws_per_image: int = 16   # draws per held-out image for the target test loss in the report
    # Mixture fusion (trainer/mixture.py): a router trained on the auxiliary populations, mixture weights pi by
    # EM on the n target images, and the fused model "fused-mixture".
    mixture: bool = True
    router_kimg: float = 20.0        # the router's training length (the auxiliary populations in equal shares)
    router_preset: str = "tiny"      # the width of its encoder (trainer/unet.py presets): a classifier needs little
    router_batch: int = 96           # global batch: a multiple of processes x accum x the number of auxiliaries
    router_lr: float = 1e-3
    router_sigma: float = 0.05       # the small noise level at which its posteriors give the density ratios
    router_draws: int = 8            # noise draws per target image averaged for them
    mixture_weights: str = "router"  # router | nll: the EM fit the fused-mixture model uses
    nll_check: bool = True           # also fit pi by EM on each auxiliary's PF-ODE likelihood of the n images
    mixture_skip: float = 0.0        # a network whose weight is below it for a whole batch is not run (0: exact)
    # The lambda fit's forward passes (Gram statistics and the SGD fit): no (float32, TF32 off) | bf16. It is
    # forward-only and cheap, and lambda is compared at 1e-3, so float32 unless measured otherwise.
    precision: str = "no"


@dataclass
class DistillSpec:
    """Score Mismatching (docs/METHODS.md §2): a one-step generator G trained against a score network D,
    with samples of the fused ScoreFusion teacher as the "real" data. Learning rates, betas and the
    R1 settings default to the paper's; schedules are in kimg of generated images (one kimg = 1000 z)."""
    teacher_samples: int = 2000      # N samples drawn once from the fused teacher (written as shards)
    teacher_steps: int = 0           # Heun steps of the teacher sampler; 0 = edm.sampler_steps
    teacher_precision: str = "no"    # no (float32) | bf16: autocast of the teacher's sampling
    teacher_fit: str = ""            # exact | sgd | mixture: which fused model; "" = fuse.method's barycenter
    real_mix: float = 0.0            # probability that a "real" sample is one of the n target images
    # The paper's from-scratch setting: the "real" side is this prepared population (e.g. all CIFAR-10
    # training images) instead of teacher samples; no teacher, no fuse stage (init/score_init scratch).
    real_population: Optional[str] = None
    init: str = "warm"               # G: warm (G(z) = D_teacher(sigma_max z; sigma_max)) | scratch
    warm_from: str = "best"          # warm G from: best (lowest target loss auxiliary) | merge (lambda-merged weights)
    score_init: str = "aux"          # D: aux (the warm_from weights as an eps-predictor) | scratch
    g_preset: Optional[str] = None   # UNet preset of G; None = network.preset
    # G(z) = Dn(g_sigma z; g_sigma); None = edm.sigma_max (the spec). A warm G at sigma_max starts as the
    # teacher's first denoising step, about the data mean for every z; a smaller g_sigma starts it diverse.
    g_sigma: Optional[float] = None
    d_preset: Optional[str] = None   # UNet preset of D; None = network.preset
    batch: int = 64                  # global batch of both steps (generated and real images per step)
    lr: float = 0.002                # generator learning rate (paper: about 0.002)
    lr_d: Optional[float] = None     # score network learning rate; None = lr
    lr_rampup_kimg: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.0, 0.99])
    r1_gamma: float = 0.01
    r1_every: int = 16               # lazy R1: every r1_every D steps, scaled by r1_every; 0 disables
    ema_halflife_kimg: float = 500.0
    total_kimg: float = 20000.0
    eval_every_kimg: Optional[float] = None      # None = train.eval_every_kimg (metric over train.eval_samples)
    snapshot_every_kimg: Optional[float] = None  # None = train.snapshot_every_kimg
    checkpoint_every_kimg: Optional[float] = None  # None = train.checkpoint_every_kimg
