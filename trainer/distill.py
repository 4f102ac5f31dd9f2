"""The distill stage: a one-step generator G trained by Score Mismatching (METHODS.md §2) with the fused
ScoreFusion model as the teacher.

Three parts:

* Teacher data. N samples of the fused teacher (deterministic Heun, distill.teacher_steps) are drawn once
  and written as WebDataset shards + manifest.json under distill/teacher/, in the format `prepare` writes
  (uint8 PNG, read back by shards.stream.train_loader like real data). Chunk i of the sample set has
  latents seeded by (seed, i) and is sampled by rank i % world, so the shards do not depend on the world
  size. Each shard is written atomically, so an interrupted sampling pass continues where it stopped; the
  manifest is written last and marks the set complete; later calls (resume) reuse it.

* Networks. G(z) = Dn_G(sigma_max * z; sigma_max): an EDM-preconditioned UNet evaluated once at sigma_max
  (warm start: with the teacher-side weights, so that G starts as the teacher's first denoising step;
  scratch: fresh weights, same wrapper). The score network predicts eps at the 10 SMM levels
  sigma_t = sqrt(1 - prod_{s<=t}(1 - beta_s)), beta = linspace(1e-4, 0.02, 10); it is parametrised
  through an EDM denoiser, eps(x, t) = (x - Dn_D(x; sigma_t)) / sigma_t, so sigma_t enters as the
  UNet's noise label ln(sigma_t)/4 and aux weights (score_init=aux) are a ready-made eps predictor; with
  EDM's preconditioning the network's output reaches eps with a coefficient of about 1 at every level.

* Losses (METHODS.md §2), two engine Updates per iteration, D then G, each with its own Adam:
    D:  L_real + L_fake (+ lazily every r1_every D steps r1_every * R1)
        L_real = |D(x0 + s_t eps, t) - eps|^2,  x0 ~ teacher samples (target images with prob real_mix)
        L_fake = |D(G(z) + s_t eps, t) - eps'|^2, eps' fresh noise independent of eps, G(z) made under
                 no_grad (no graph, no gradient into G)
        R1     = (gamma / 2) |grad_{x_t} sum D(x_t, t)|^2 on the real x_t
    G:  L_G = |D(G(z) + s_t eps, t) - eps|^2 with D's parameters frozen (requires_grad False while the
        graph is built): the gradient reaches G through D's input only.
  Normalisation: the official code sums over batch and pixels; here every term is a mean over batch and
  pixels (R1 included: the squared input gradient is averaged over the same B*C*H*W entries), i.e. every
  term is the official one divided by the same constant B*C*H*W. Relative weights (L_real : L_fake : R1)
  are therefore exactly the official ones, and Adam is invariant to the common scale.
"""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch import nn

from shards.files import sha256_file, sha256_text
from shards.manifest import MANIFEST_NAME, MANIFEST_VERSION, image_shape, load_manifest
from shards.prepare import canonical_json, write_manifest, write_shard
from shards.stream import train_loader
from trainer.edm import Denoiser, heun_sample
from trainer.engine import Engine, Update
from trainer.export import build_denoiser, read_model, write_model
from trainer.samples import chunk_latents, to_uint8
from trainer.spec import DistillSpec, EDMSpec, TrainSpec
from trainer.unet import build_unet

TEACHER_POPULATION = "teacher"
TEACHER_CHUNK = 250      # teacher samples per chunk = per shard
TEACHER_SEED_WORD = 7    # second seed word of the teacher latents: not the evaluation's latents
SMM_LEVELS = 10


class DistillError(ValueError):
    """The distill stage cannot run as asked (no finished fuse stage, networks that do not fit the data,
    teacher shards made with other settings); the message says what to do."""


def smm_sigmas(levels: int = SMM_LEVELS, beta_min: float = 1e-4, beta_max: float = 0.02) -> torch.Tensor:
    """The SMM noise levels, float32 [levels]: sigma_t = sqrt(1 - abar_t), abar = cumprod(1 - beta)."""
    beta = torch.linspace(beta_min, beta_max, levels, dtype=torch.float64)
    return (1 - torch.cumprod(1 - beta, 0)).sqrt().float()


class OneStepGenerator(nn.Module):
    """x = G(z) = Dn(sigma_max * z; sigma_max), z ~ N(0, I) of the image shape: one network call."""

    def __init__(self, denoiser: Denoiser, sigma_max: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_max = float(sigma_max)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z * self.sigma_max, self.sigma_max)


class ScoreNet(nn.Module):
    """eps(x, t) = (x - Dn(x; sigma_t)) / sigma_t for integer levels t [B]; float32 output."""

    def __init__(self, denoiser: Denoiser, sigmas: torch.Tensor | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("sigmas", smm_sigmas() if sigmas is None else sigmas.float())

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t].reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t)
        return (x.float() - self.denoiser(x, sigma)) / sigma


# ---- the losses, with the noise passed in (the stage draws it; tests choose it) ----------------------

def _sigma(D, t, ndim: int) -> torch.Tensor:
    """sigma_t of levels t, shaped to broadcast over a batch of `ndim` dims (any score net with `sigmas`)."""
    return D.sigmas[t].reshape(-1, *([1] * (ndim - 1)))


def real_loss(D, x0, t, eps) -> torch.Tensor:
    """L_real = mean |D(x0 + sigma_t eps, t) - eps|^2 (ordinary denoising on real data)."""
    return (D(x0 + _sigma(D, t, x0.dim()) * eps, t) - eps).square().mean()


def fake_loss(D, x_fake, t, eps, eps_target) -> torch.Tensor:
    """L_fake = mean |D(x_fake + sigma_t eps, t) - eps'|^2 with eps' independent of eps; x_fake must carry
    no graph into G (detached or made under no_grad)."""
    return (D(x_fake + _sigma(D, t, x_fake.dim()) * eps, t) - eps_target).square().mean()


def generator_loss(D, x_fake, t, eps) -> torch.Tensor:
    """L_G = mean |D(x_fake + sigma_t eps, t) - eps|^2, D's parameters frozen, gradient through its input."""
    requires = [p.requires_grad for p in D.parameters()]
    D.requires_grad_(False)  # the graph is built now: D's parameters are constants of it
    try:
        return (D(x_fake + _sigma(D, t, x_fake.dim()) * eps, t) - eps).square().mean()
    finally:
        for p, r in zip(D.parameters(), requires):
            p.requires_grad_(r)


def r1_penalty(D, x_t, t, gamma: float) -> torch.Tensor:
    """(gamma/2) |grad_{x_t} sum D(x_t, t)|^2, averaged over the batch and pixel entries (see the module
    docstring); differentiable in D's parameters (create_graph)."""
    x_t = x_t.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_t, t).sum(), x_t, create_graph=True)
    return gamma / 2 * grad.square().mean()


def d_noise(real: torch.Tensor, levels: int):
    """The draws of one D step, from the global RNG: levels and added noise for the real and the fake
    half, and the fake half's target eps', drawn independently of the noise that was added to it."""
    batch = real.shape[0]
    t_real = torch.randint(levels, (batch,), device=real.device)
    t_fake = torch.randint(levels, (batch,), device=real.device)
    eps_real, eps_fake, eps_target = (torch.randn(real.shape, device=real.device) for _ in range(3))
    return t_real, t_fake, eps_real, eps_fake, eps_target


def d_step_loss(D, G, real, gamma: float, r1_scale: float, noise=d_noise) -> torch.Tensor:
    """The score network's loss of one step: L_real + L_fake (+ r1_scale * R1 when r1_scale > 0), noise
    from the global RNG (seeded per rank, checkpointed). G runs under no_grad. Real and fake halves go
    through D in one batched call (one forward per step, which DDP handles like any other; the UNet
    treats samples independently), the same numbers as real_loss + fake_loss + r1_penalty."""
    sigmas = getattr(D, "module", D).sigmas  # D may be a DDP wrapper
    with torch.no_grad():
        fake = G(torch.randn(real.shape, device=real.device)).float()
    real = real.float()
    t_real, t_fake, eps_real, eps_fake, eps_target = noise(real, len(sigmas))
    shape = (-1,) + (1,) * (real.dim() - 1)
    x_in = torch.cat([real + sigmas[t_real].reshape(shape) * eps_real, fake + sigmas[t_fake].reshape(shape) * eps_fake])
    if r1_scale > 0:
        x_in = x_in.requires_grad_(True)
    out = D(x_in, torch.cat([t_real, t_fake]))
    batch = real.shape[0]
    loss = (out[:batch] - eps_real).square().mean() + (out[batch:] - eps_target).square().mean()
    if r1_scale > 0:
        (grad,) = torch.autograd.grad(out[:batch].sum(), x_in, create_graph=True)
        loss = loss + r1_scale * gamma / 2 * grad[:batch].square().mean()
    return loss


def g_step_loss(D, G, batch: int, shape, device) -> torch.Tensor:
    z = torch.randn((batch, *shape), device=device)
    fake = G(z)
    t = torch.randint(len(D.sigmas), (batch,), device=device)
    return generator_loss(D, fake, t, torch.randn_like(fake))


# ---- teacher data ------------------------------------------------------------------------------------

def teacher_fingerprint(info: dict) -> str:
    return sha256_text(canonical_json(info))


def sample_teacher(acc, teacher, out_dir: Path, n: int, shape, steps: int, edm: EDMSpec, seed: int,
                   info: dict, class_names: list, log=print) -> dict:
    """Draw n samples of `teacher` (a callable (x, sigma) -> x0) into shards + manifest under out_dir,
    once. `info` describes the teacher (lambda, steps...); a manifest made from another teacher is an
    error, not silently reused. Returns the manifest."""
    out_dir = Path(out_dir)
    info = {**info, "samples": n, "steps": steps, "seed": seed, "shape": list(shape)}
    fingerprint = teacher_fingerprint(info)
    if (out_dir / MANIFEST_NAME).is_file():
        manifest = load_manifest(out_dir)
        if manifest.get("fingerprint") != fingerprint:
            raise DistillError(f"{out_dir} holds teacher samples made with other settings "
                               f"({manifest.get('teacher')}); delete {out_dir.parent} to distill again")
        log(f"teacher samples: reusing {n} in {out_dir}")
        return manifest
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    chunks = math.ceil(n / TEACHER_CHUNK)
    rank, world = acc.process_index, acc.num_processes
    mine = [i for i in range(rank, chunks, world) if not (out_dir / f"shard-{i:06d}.tar").is_file()]
    if mine:
        log(f"teacher samples: {n} in {chunks} chunks of {TEACHER_CHUNK} ({steps}-step Heun)"
            + (f", {chunks - len(mine)} already written" if len(mine) < len(range(rank, chunks, world)) else ""))
    for i in mine:
        size = min(TEACHER_CHUNK, n - i * TEACHER_CHUNK)
        z = chunk_latents(seed * 1000 + TEACHER_SEED_WORD, i, size, shape).to(acc.device)
        images = to_uint8(heun_sample(teacher, z, steps, edm.sigma_min, edm.sigma_max, edm.rho))
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        write_shard(out_dir / f"shard-{i:06d}.tar",
                    ((f"teacher-{i * TEACHER_CHUNK + j:07d}", image, -1) for j, image in enumerate(images)))
    acc.wait_for_everyone()
    manifest = None
    if acc.is_main_process:
        shards = []
        for i in range(chunks):
            path = out_dir / f"shard-{i:06d}.tar"
            shards.append({"file": path.name, "count": min(TEACHER_CHUNK, n - i * TEACHER_CHUNK),
                           "sha256": sha256_file(path)})
        manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "teacher": info,
                    "image_size": shape[-1], "channels": shape[0], "class_names": class_names,
                    "populations": {TEACHER_POPULATION: {"role": "teacher", "split": "generated", "count": n,
                                                         "mixture": {}, "class_histogram": {},
                                                         "shards": shards}}}
        manifest["populations"][TEACHER_POPULATION]["hash"] = fingerprint
        write_manifest(out_dir, manifest)  # last: the set is complete
    acc.wait_for_everyone()
    return manifest or load_manifest(out_dir)


# ---- networks ----------------------------------------------------------------------------------------

def build_networks(spec: DistillSpec, network_preset: str, dropout, shape, edm: EDMSpec,
                   warm_state: dict | None) -> tuple[OneStepGenerator, ScoreNet]:
    """G and D as the spec says; warm_state is the teacher-side Denoiser state dict (init=warm and/or
    score_init=aux)."""
    channels, size = shape[0], shape[-1]

    def denoiser(preset, state):
        try:
            net = build_unet(preset, size, channels, dropout)
        except ValueError as e:
            raise DistillError(f"distill: preset {preset} does not fit {channels}x{size}x{size} images: {e}") from None
        d = Denoiser(net, sigma_data=edm.sigma_data)
        if state is not None:
            d.load_state_dict(state)
        return d

    g_preset, d_preset = spec.g_preset or network_preset, spec.d_preset or network_preset
    G = OneStepGenerator(denoiser(g_preset, warm_state if spec.init == "warm" else None), spec.g_sigma or edm.sigma_max)
    D = ScoreNet(denoiser(d_preset, warm_state if spec.score_init == "aux" else None))
    return G, D


def check_shapes(G: nn.Module, D: nn.Module, shape, device="cpu") -> None:
    """A clear error when G's or D's output does not have the data's image shape."""
    shape = tuple(shape)
    with torch.no_grad():
        z = torch.zeros((2, *shape), device=device)
        try:
            x = G(z)
        except Exception as e:  # a UNet at the wrong resolution or channel count fails inside
            raise DistillError(f"distill: the generator cannot take {shape} inputs: {type(e).__name__}: {e}") from None
        if tuple(x.shape) != (2, *shape):
            raise DistillError(f"distill: the generator makes images of shape {tuple(x.shape[1:])}, "
                               f"the data has {shape}")
        try:
            e = D(x, torch.zeros(2, dtype=torch.long, device=device))
        except Exception as err:
            raise DistillError(f"distill: the score network cannot take {shape} inputs: "
                               f"{type(err).__name__}: {err}") from None
        if tuple(e.shape) != (2, *shape):
            raise DistillError(f"distill: the score network outputs shape {tuple(e.shape[1:])} for "
                               f"{shape} images")


# ---- the exported generator --------------------------------------------------------------------------

def export_generator(directory: Path, G: OneStepGenerator, meta: dict) -> None:
    write_model(directory, G, meta, "generator.safetensors", "generator.json")


def load_generator(directory: Path) -> tuple[OneStepGenerator, dict]:
    """The EMA one-step generator of a finished distill stage (eval mode, no grad) and generator.json."""
    state, meta = read_model(directory, "generator.safetensors", "generator.json", "generator",
                             "run `scorefuse distill` first")
    G = OneStepGenerator(build_denoiser(meta), meta["sigma_max"])
    G.load_state_dict(state)
    G.image_shape = image_shape(meta)
    return G.eval().requires_grad_(False), meta


# ---- the stage ---------------------------------------------------------------------------------------

def distill_train_spec(train: TrainSpec, spec: DistillSpec) -> TrainSpec:
    """The engine's TrainSpec for the distill stage: its lr is G's (D's through Update.lr_scale)."""
    def pick(own, default):
        return default if own is None else own
    return replace(train, batch=spec.batch, lr=spec.lr, lr_rampup_kimg=spec.lr_rampup_kimg,
                   adam_betas=list(spec.adam_betas), total_kimg=spec.total_kimg,
                   ema_halflife_kimg=spec.ema_halflife_kimg,
                   eval_every_kimg=pick(spec.eval_every_kimg, train.eval_every_kimg),
                   snapshot_every_kimg=pick(spec.snapshot_every_kimg, train.snapshot_every_kimg),
                   checkpoint_every_kimg=pick(spec.checkpoint_every_kimg, train.checkpoint_every_kimg))


def train_distill(acc, stage_dir: Path, teacher, warm_state: dict | None, teacher_info: dict,
                  data_dir: Path, target: str, spec: DistillSpec, network_preset: str, dropout,
                  edm: EDMSpec, train: TrainSpec, workers: int = 0, max_bad_samples: int = 10,
                  hooks=lambda engine_spec: (), log=print) -> Engine:
    """Sample the teacher (once), then train G and D with the engine; exports the EMA generator.
    `hooks(train_spec) -> tuple[Hook]` builds the periodic evaluation hooks."""
    stage_dir = Path(stage_dir)
    manifest = load_manifest(data_dir)
    shape = image_shape(manifest)
    teacher_shape = getattr(teacher, "image_shape", None)
    if teacher_shape is not None and tuple(teacher_shape) != shape:
        raise DistillError(f"distill: the teacher was trained on {tuple(teacher_shape)} images, the data are {shape}")
    steps = spec.teacher_steps or edm.sampler_steps
    if spec.real_population:  # the paper's setting: real images, no teacher
        real_dir, real_name = Path(data_dir), spec.real_population
    else:
        real_dir, real_name = stage_dir / "teacher", TEACHER_POPULATION
        sample_teacher(acc, teacher, real_dir, spec.teacher_samples, shape, steps, edm, train.seed, teacher_info,
                       manifest["class_names"], log=log)

    engine_spec = distill_train_spec(train, spec)
    set_seed(train.seed)  # the same initial weights (and EMA copy) on every rank
    G, D = build_networks(spec, network_preset, dropout, shape, edm, warm_state)
    check_shapes(G, D, shape)
    betas = tuple(float(b) for b in spec.adam_betas)
    opt_g = torch.optim.Adam(G.parameters(), lr=spec.lr, betas=betas, eps=train.adam_eps)
    opt_d = torch.optim.Adam(D.parameters(), lr=spec.lr_d or spec.lr, betas=betas, eps=train.adam_eps)
    set_seed(train.seed, device_specific=True)  # noise differs between ranks

    rank, world = acc.process_index, acc.num_processes
    micro = spec.batch // (world * train.accum)
    device = acc.device

    def batches(start_batch: int):
        # Both updates take micro-batches from this stream (the G step only uses its size). The target
        # images are mixed in per sample with probability real_mix, from a generator seeded by position.
        loader = train_loader(real_dir, real_name, batch_size=micro, seed=train.seed, rank=rank,
                              world_size=world, num_workers=workers, start_batch=start_batch,
                              max_bad_samples=max_bad_samples)
        mix = None
        if spec.real_mix > 0:
            mix = iter(train_loader(data_dir, target, batch_size=micro, seed=train.seed + 1, rank=rank,
                                    world_size=world, num_workers=workers, start_batch=start_batch,
                                    max_bad_samples=max_bad_samples))
        for index, (images, _) in enumerate(loader, start=start_batch):
            if mix is not None:
                real, _ = next(mix)
                g = torch.Generator().manual_seed(int(np.random.SeedSequence([train.seed, rank, index])
                                                      .generate_state(1, np.uint64)[0]))
                pick = torch.rand(len(images), generator=g) < spec.real_mix
                images = torch.where(pick[:, None, None, None], real, images)
            yield images.to(device, non_blocking=True)

    state = {"engine": None}

    def loss_d(modules, real):
        step = state["engine"].step
        r1 = spec.r1_every * (spec.r1_every > 0 and spec.r1_gamma > 0 and step % spec.r1_every == 0)
        return d_step_loss(modules["D"], acc.unwrap_model(modules["G"]), real, spec.r1_gamma, float(r1))

    def loss_g(modules, real):
        return g_step_loss(acc.unwrap_model(modules["D"]), modules["G"], real.shape[0], shape, device)

    lr_scale_d = (spec.lr_d or spec.lr) / spec.lr
    engine = Engine(acc, engine_spec, stage_dir, modules={"G": G, "D": D}, optimizers={"adam_g": opt_g, "adam_d": opt_d},
                    updates=[Update("adam_d", "D", loss_d, lr_scale=lr_scale_d), Update("adam_g", "G", loss_g)],
                    batches=batches, ema=("G",), hooks=tuple(hooks(engine_spec)), log=log)
    state["engine"] = engine
    engine.run()
    if acc.is_main_process:
        meta = {"kind": "one-step-generator", "preset": spec.g_preset or network_preset, "dropout": dropout,
                "image_size": shape[-1], "channels": shape[0], "sigma_max": spec.g_sigma or edm.sigma_max,
                "sigma_data": edm.sigma_data, "init": spec.init,
                "warm_from": spec.warm_from if spec.init == "warm" else None, "score_init": spec.score_init,
                "teacher": teacher_info}
        export_generator(stage_dir, engine.ema["G"], meta)
    acc.wait_for_everyone()
    return engine
