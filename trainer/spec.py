"""Typed description of the model and the training recipe: the `network`, `edm` and `train`
sections of the run config (OmegaConf structured config)."""
from dataclasses import dataclass, field
from typing import List, Optional

from shards.ranges import at_least, choice, positive, within, zero_or_more

# The models fusion is compared with, built by the fuse stage (stages/fuse.py): the values of fuse.baselines,
# owned here because the config's default needs them, and the models' labels (evaluation/labels.py takes them).
# The last, seed-ensemble, is a control rather than a baseline, and not a default: it trains fuse.ensemble_copies
# more auxiliaries.
BASELINES = ("target-scratch", "target-finetune", "checkpoint-merge", "seed-ensemble")


@dataclass
class NetworkSpec:
    preset: str = "tiny"          # tiny | ddpmpp-cifar10 | ddpmpp-28 | ddpmpp-64 (trainer/unet.py)
    dropout: Optional[float] = within("[0, 1)", None)  # None keeps the preset's value


@dataclass
class EDMSpec:
    """EDM (Karras et al. 2022) constants; the defaults are the paper's."""
    sigma_data: float = positive(0.5)
    p_mean: float = -1.2
    p_std: float = positive(1.2)
    sigma_min: float = positive(0.002)
    sigma_max: float = 80.0
    rho: float = positive(7.0)
    sampler_steps: int = at_least(2, 18)


@dataclass
class TrainSpec:
    """Schedules are counted in thousands of images seen (kimg), as EDM does, so that they mean the
    same thing for any number of processes."""
    batch: int = positive(256)     # global batch: all ranks x accum micro-batches
    accum: int = positive(1)       # gradient accumulation rounds per optimizer step
    lr: float = positive(1e-3)
    lr_rampup_kimg: float = zero_or_more(10.0)  # linear warm-up of the learning rate
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = positive(1e-8)
    grad_clip: float = zero_or_more(0.0, "off")  # max gradient norm
    precision: str = choice("no", "bf16", "fp16")  # fp16 uses a dynamic loss scaler
    total_kimg: float = positive(200.0)
    ema_halflife_kimg: float = positive(50.0)
    ema_rampup_ratio: Optional[float] = positive(0.05)  # half-life <= ratio x images seen, early on
    seed: int = zero_or_more(0)
    log_every_kimg: float = positive(2.0)
    checkpoint_every_kimg: float = zero_or_more(20.0, "only at the end")
    keep_checkpoints: int = at_least(2, 2, "the newest may be half-written")
    eval_every_kimg: float = zero_or_more(0.0, "off")      # periodic Frechet distance
    eval_samples: int = at_least(2, 1000)
    snapshot_every_kimg: float = zero_or_more(0.0, "off")  # periodic sample grid
    max_nonfinite_steps: int = positive(100)  # stop when this many steps in a row had NaN/Inf gradients
    log_with: str = choice("none", "tensorboard", "wandb", "all")  # Accelerate's trackers, beside metrics.jsonl
    resume: str = "latest"         # latest checkpoint | none (start the stage afresh) | a checkpoint directory
    # GPU throughput and reproducibility levers, off until measured (bench/gpu_check.py):
    deterministic: bool = False    # deterministic kernels: bit-identical resume on a GPU, at a cost
    compile: bool = False          # torch.compile the trained networks
    channels_last: bool = False    # NHWC memory format for the networks and their inputs
    cudnn_benchmark: bool = True   # cuDNN autotuning of convolutions (off under deterministic)


@dataclass
class FuseSpec:
    """ScoreFusion: fit the barycenter weights lambda on the target population (docs/METHODS.md §1)."""
    method: str = choice("exact", "sgd")     # Gram statistics + simplex QP | the paper's softmax SGD
    objective: str = choice("edm", "paper")  # training's sigma law and weighting | ScoreFusion's VE SDE loss
    sigma_bins: List[float] = field(default_factory=list)  # sigma edges of piecewise-constant lambda; [] = one lambda
    draws_per_image: int = positive(64)  # (sigma, noise) draws per target image in the Gram pass
    # Evaluate the K auxiliaries in one vmapped call (true), one by one (false), or null: vmapped on CUDA only.
    batched: Optional[bool] = None
    batch: int = positive(64)        # target images per forward batch (x K networks)
    sgd_epochs: float = positive(128)  # the paper's SGD fit: passes over the target images
    sgd_lr: float = positive(0.1)
    sgd_momentum: float = within("[0, 1)", 0.9)
    # Baselines trained or built in the same run: target-scratch | target-finetune | checkpoint-merge, and the
    # control seed-ensemble
    baselines: List[str] = field(default_factory=lambda: list(BASELINES[:3]))
    scratch_kimg: float = positive(60.0)  # target-scratch: the auxiliary recipe on the n target images
    finetune_kimg: float = positive(10.0)  # target-finetune: the best auxiliary, fine-tuned on the n target images
    # its learning rate; several: a fine-tune per rate, and the one with the lowest held-out loss is the baseline
    finetune_lr: List[float] = field(default_factory=lambda: [2e-4])
    # seed-ensemble: the best auxiliary and this many copies of it, trained with other seeds, averaged uniformly
    ensemble_copies: int = positive(2)
    # Early stopping of target-scratch and target-finetune: this share of the n target images is held out from
    # their training, and the EMA weights with the lowest loss on it (measured every validation_every_kimg, at
    # the start and at the end) are the ones kept (stages/early_stopping.py); 0: train on all n, keep the last.
    validation_share: float = within("[0, 1)", 0.25)
    validation_every_kimg: float = positive(1.0)
    # training ends once the lowest held-out loss is this old (scratch_kimg and finetune_kimg are then caps)
    patience_kimg: float = zero_or_more(0.0, "off")
    # Mixture fusion (trainer/mixture.py): a router trained on the auxiliary populations, mixture weights pi by
    # EM on the n target images, and the fused model "fused-mixture".
    mixture: bool = True
    router_kimg: float = positive(20.0)  # the router's training length (the auxiliary populations in equal shares)
    router_preset: str = "tiny"      # the width of its encoder (trainer/unet.py presets): a classifier needs little
    router_batch: int = positive(96)  # global batch: a multiple of processes x accum x the number of auxiliaries
    router_lr: float = positive(1e-3)
    router_sigma: float = positive(0.05)  # the small noise level at which its posteriors give the density ratios
    router_draws: int = positive(8)  # noise draws per target image averaged for them
    # samples of each pretrained auxiliary (which has no population) drawn once for the router to train on in its
    # place, with the run's sampler: router_samples x (2 x edm.sampler_steps - 1) network evaluations each
    router_samples: int = positive(1000)
    mixture_weights: str = choice("router", "nll")  # the EM fit the fused-mixture model uses
    nll_check: bool = True           # also fit pi by EM on each auxiliary's PF-ODE likelihood of the n images
    # a network whose weight is below it for a whole batch is not run (0: exact)
    mixture_skip: float = within("[0, 1)", 0.0)
    # The hybrid rule, an ablation row "fused-hybrid" beside the two (trainer/mixture.py HybridDenoiser): the
    # mixture's weights at sigma >= hybrid_sigma, the barycenter's lambda below; null (the default): no such row,
    # which costs a fused model's evaluation. sigma_data (0.5) is the natural value: below it the noise is
    # smaller than the images' own spread, and an image's population is settled (configs/digits_disjoint.yaml).
    hybrid_sigma: Optional[float] = positive(None)
    # The lambda fit's forward passes (Gram statistics and the SGD fit): no (float32, TF32 off) | bf16. It is
    # forward-only and cheap, and lambda is compared at 1e-3, so float32 unless measured otherwise.
    precision: str = choice("no", "bf16")


@dataclass
class DistillSpec:
    """Score Mismatching (docs/METHODS.md §2): a one-step generator G trained against a score network D,
    with samples of the fused ScoreFusion teacher as the "real" data. Learning rates, betas and the
    R1 settings default to the paper's; schedules are in kimg of generated images (one kimg = 1000 z)."""
    teacher_samples: int = at_least(2, 2000)  # N samples drawn once from the fused teacher (written as shards)
    teacher_steps: int = zero_or_more(0, "edm.sampler_steps")  # Heun steps of the teacher sampler
    teacher_precision: str = choice("no", "bf16")  # autocast of the teacher's sampling (no: float32)
    teacher_fit: str = choice("", "exact", "sgd", "mixture")  # which fused model; "" = fuse.method's barycenter
    real_mix: float = within("[0, 1]", 0.0)  # probability that a "real" sample is one of the n target images
    # The paper's from-scratch setting: the "real" side is this prepared population (e.g. all CIFAR-10
    # training images) instead of teacher samples; no teacher, no fuse stage (init/score_init scratch).
    real_population: Optional[str] = None
    init: str = choice("warm", "scratch")  # G: warm (G(z) = D_teacher(sigma_max z; sigma_max)) | scratch
    warm_from: str = choice("best", "merge")  # warm G from: the lowest target loss auxiliary | lambda-merged weights
    score_init: str = choice("aux", "scratch")  # D: the warm_from weights as an eps-predictor | scratch
    g_preset: Optional[str] = None   # UNet preset of G; None = network.preset
    # G(z) = Dn(g_sigma z; g_sigma); None = edm.sigma_max (the spec). A warm G at sigma_max starts as the
    # teacher's first denoising step, about the data mean for every z; a smaller g_sigma starts it diverse.
    g_sigma: Optional[float] = positive(None)
    d_preset: Optional[str] = None   # UNet preset of D; None = network.preset
    batch: int = positive(64)        # global batch of both steps (generated and real images per step)
    lr: float = positive(0.002)      # generator learning rate (paper: about 0.002)
    lr_d: Optional[float] = positive(None)  # score network learning rate; None = lr
    lr_rampup_kimg: float = zero_or_more(0.0)
    adam_betas: List[float] = field(default_factory=lambda: [0.0, 0.99])
    r1_gamma: float = zero_or_more(0.01)
    r1_every: int = zero_or_more(16, "off")  # lazy R1: every r1_every D steps, not scaled by r1_every (the official code)
    ema_halflife_kimg: float = positive(500.0)
    total_kimg: float = positive(20000.0)
    # None: the train.* value (the metric over train.eval_samples)
    eval_every_kimg: Optional[float] = zero_or_more(None, "off")
    snapshot_every_kimg: Optional[float] = zero_or_more(None, "off")
    checkpoint_every_kimg: Optional[float] = zero_or_more(None)
