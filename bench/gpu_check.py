"""The GPU check: the one prepared script for a GPU node, run in one go. On one H200 it takes about 5 minutes
(the estimates below add up to 335 s; 385 s on a machine with 2 or more GPUs, where the DDP and ZeRO-2 rows
also run), and never more than --max-seconds (540 s by default).

    python bench/gpu_check.py --out gpu_check.md                  # on a GPU node (make gpu-check)
    python bench/gpu_check.py --cpu --out /tmp/check.md           # the same cases at tiny sizes on the CPU
    python bench/gpu_check.py --only nll,sampling --out f.md      # some cases (names: --help)

Each case runs in a process of its own under a time limit of its own, so its peak GPU memory is its own and a
crash or a hang costs that case alone. Every row is appended to --out (a markdown table) and to its JSON-lines
twin (.jsonl, with the numbers) as soon as it is measured, so a run killed from outside keeps every finished row,
and each case's log goes to a .logs/ folder beside it. A case that fails or runs out of time leaves a FAILED or
TIMEOUT row with its last error line, and the check goes on. At the end the cases' wall times are appended
beside their estimates. Exit status: 0 when every case ran (SKIPPED rows included), 1 when any failed.

On a GPU the sizes are configs/cifar10.yaml's: ddpmpp-cifar10 (56M parameters) in bf16, its batches, loader
workers and NLL batch. With --cpu every case runs at tiny sizes with the fused paths forced onto the vmapped
(batched) call, as on CUDA, and one more case runs the device-placement tests; the CPU numbers mean nothing.
Where the estimates come from: ddpmpp-cifar10 trains at about 3.5k img/s in bf16 on an H100/H200, a forward
pass costs about a third of a training step, float32 with TF32 off about 3x bf16, and a process starts in about
5 s (Python, torch, the CUDA context, the network).
"""
import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from evaluation.labels import TARGET_FINETUNE, TARGET_SCRATCH  # noqa: E402
from evaluation.likelihood import nll_bits_per_dim  # noqa: E402
from evaluation.measurements import read_measurements  # noqa: E402
from shards.manifest import MANIFEST_VERSION  # noqa: E402
from shards.prepare import write_manifest, write_shard  # noqa: E402
from shards.stream import train_loader  # noqa: E402
from trainer.accelerator import is_deepspeed, make_accelerator  # noqa: E402
from trainer.checkpoint import Checkpointer  # noqa: E402
from stages.config import RunConfig  # noqa: E402
from trainer.edm import Denoiser, denoising_loss, heun_sample, sigma_bounds  # noqa: E402
from trainer.ema import make_ema, update_ema  # noqa: E402
from trainer.engine import Engine, Hook, Update, adam  # noqa: E402
from trainer.fused_denoiser import FusedDenoiser  # noqa: E402
from trainer.pretrained import from_diffusers  # noqa: E402
from trainer.lambda_fit import accumulate_gram, edm_objective, fit_barycenter_weights  # noqa: E402
from trainer.precision import autocast_dtype, full_fp32, with_autocast  # noqa: E402
from stages.rundir import CHECKPOINTS, METRICS, RunDir, engine_paths, finished_info, is_finished  # noqa: E402
from trainer.export import DENOISER_FILES  # noqa: E402
from trainer.score_mismatch import (build_networks, d_step_loss, g_step_loss, lazy_adam_scaling,  # noqa: E402
                                    r1_step_loss)
from shards.seeds import Stream, generator  # noqa: E402
from trainer.spec import DistillSpec, EDMSpec, TrainSpec  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

DIGITS = ROOT / "configs" / "digits.yaml"
CIFAR10 = ROOT / "configs" / "cifar10.yaml"
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
PLACEMENT_TESTS = ROOT / "tests" / "test_device_placement.py"
ROW = "ROW "  # how a case's process hands a row to the driver, one JSON object per stdout line
OK, FAILED, TIMEOUT, SKIPPED = "ok", "FAILED", "TIMEOUT", "SKIPPED"
# The digits pipeline in a few dozen CLI seconds: a few steps per model, few samples, a 4-step sampler.
TINY_RUN = ["train.batch=32", "train.lr_rampup_kimg=0.1", "train.log_every_kimg=0.32", "train.total_kimg=0.32",
            "train.eval_every_kimg=0", "train.snapshot_every_kimg=0", "train.deterministic=true",
            "eval.num_samples=32", "eval.grid_images=4", "edm.sampler_steps=4", "fuse.finetune_kimg=0.16",
            "fuse.draws_per_image=2", "fuse.sgd_epochs=2", "eval.test_draws_per_image=1",
            "distill.teacher_samples=32", "distill.teacher_steps=2", "distill.batch=32", "distill.total_kimg=0.064",
            "distill.eval_every_kimg=0", "distill.snapshot_every_kimg=0", "distill.checkpoint_every_kimg=0.064",
            "eval.nll_images=8", "eval.nll_steps=4", "eval.bootstrap=10", "eval.kid_subsets=4",
            "eval.sample_batch=32", "fuse.router_kimg=0.192", "fuse.router_draws=2"]


def cifar10(key: str):
    """A setting of configs/cifar10.yaml, or the schema's default where the file leaves it out; None where
    neither has the key."""
    value = OmegaConf.select(OmegaConf.load(CIFAR10), key)
    return value if value is not None else OmegaConf.select(OmegaConf.structured(RunConfig), key)


class Sizes:
    """What the cases run at: configs/cifar10.yaml's sizes on a GPU, tiny ones with --cpu."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.preset, self.shape = ("tiny", (1, 16, 16)) if cpu else (cifar10("network.preset"), (3, 32, 32))
        self.precision = "bf16"
        # None: FusedDenoiser's own choice, the vmapped call on CUDA; the CPU is forced onto that path too.
        self.batched = True if cpu else None
        self.window, self.windows = (2, 3) if cpu else (10, 4)  # training steps per logged window, windows
        self.ema_reps = 5 if cpu else 50
        self.gram_images, self.gram_batch = (8, 4) if cpu else (1024, 256)
        self.sample_batch, self.heun_steps = (4, 3) if cpu else (256, cifar10("edm.sampler_steps"))
        self.nll_steps = cifar10("eval.nll_steps")
        self.distill_batch, self.r1_every = (4, 2) if cpu else (cifar10("distill.batch"), cifar10("distill.r1_every"))
        self.workers = 2 if cpu else cifar10("data.workers")
        self.loader_batch, self.loader_batches, self.shards, self.shard_images = \
            (16, 10, 2, 64) if cpu else (128, 100, 8, 500)

    def batch(self, gpu_batch: int) -> int:
        """A training batch per device: the GPU's, or a tiny one in the same order on the CPU."""
        return {32: 4, 128: 8, 512: 16}[gpu_batch] if self.cpu else gpu_batch

    @property
    def unit(self) -> str:
        return "CPU process" if self.cpu else "GPU"


# ---- what a case process prints, and its small tools -------------------------------------------------------

def emit(what: str, result: str, status: str = OK, **numbers) -> None:
    """One row, handed to the driver on stdout; in a multi-process case rank 0 alone speaks."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(ROW + json.dumps({"what": what, "result": result, "status": status, **numbers}), flush=True)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device: torch.device) -> tuple[str, dict]:
    """The peak memory allocated since reset_peak, as text and as a number (nothing on the CPU)."""
    if device.type != "cuda":
        return "", {}
    gib = torch.cuda.max_memory_allocated() / 2 ** 30
    return f", peak {gib:.1f} GiB", {"peak_gib": round(gib, 2)}


def perturbed_denoisers(s: Sizes, k: int) -> list[Denoiser]:
    """k denoisers of one architecture with random weights everywhere (a fresh UNet's zero-initialised output
    layers would make them all the same function), frozen, on the device."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        d = Denoiser(build_unet(s.preset, s.shape[-1], s.shape[0]))
        with torch.no_grad():
            for p in d.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        models.append(d.eval().requires_grad_(False).to(s.device))
    return models


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(ROW)]
    return lines[-1][:300] if lines else "(no output)"


# ---- training through the engine: one configuration per process ------------------------------------------

class Measured(Exception):
    """Raised by the last hook of a timing run: the engine stops before its end-of-run checkpoint, which would
    write about 1 GB for ddpmpp-cifar10 and time nothing."""


def stop_after_last_window(engine):
    raise Measured


def steady_rate(stage_dir: Path) -> float:
    """images/s of the logged windows after the first (the first holds cuDNN autotuning and compilation)."""
    rows = [json.loads(line) for line in (stage_dir / METRICS).read_text().splitlines()]
    return statistics.median(row["images_per_s"] for row in rows[1:])


def train(s: Sizes, work: Path, batch: int, **levers) -> None:
    """train-aux's step (the engine: fused Adam, EMA, gradient clipping, non-finite check) on a synthetic batch
    held on the device, so that the network and the optimizer are what is timed; images/s and peak memory."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = s.batch(batch)
    total = batch * world
    spec = TrainSpec(batch=total, precision=s.precision, lr=1e-4, lr_rampup_kimg=0, checkpoint_every_kimg=0,
                     total_kimg=total * s.window * s.windows / 1000, log_every_kimg=total * s.window / 1000, **levers)
    acc = make_accelerator(spec)  # before any CUDA work: train.deterministic configures cuBLAS first
    torch.manual_seed(0)
    net = Denoiser(build_unet(s.preset, s.shape[-1], s.shape[0]))
    x0 = torch.rand(batch, *s.shape, device=acc.device) * 2 - 1
    reset_peak(acc.device)
    # sigma_data given: a DDP wrapper hides the denoiser's attribute
    update = Update("adam", "net", lambda m, x, step: denoising_loss(m["net"], x, None, sigma_data=0.5).mean())
    engine = Engine(acc, spec, engine_paths(work), modules={"net": net}, updates=[update], batches=lambda start: itertools.repeat(x0),
                    optimizers={"adam": adam(net.parameters(), spec.lr, spec.adam_betas, spec.adam_eps)},
                    ema=("net",), hooks=(Hook(0, stop_after_last_window),), log=lambda message: None)
    try:
        engine.run()
    except Measured:
        pass
    if not acc.is_main_process:
        return
    rate = steady_rate(work)
    where = f"{world} x {s.unit}" + (f", {'ZeRO-2' if is_deepspeed(acc) else 'DDP'}" if world > 1 else "")
    switches = "".join(f", train.{key}={str(value).lower()}" for key, value in levers.items())
    memory, numbers = peak(acc.device)
    per_device = f" ({rate / world:,.0f} per {s.unit})" if world > 1 else ""
    emit(f"train-aux step, {s.preset}, {where}, batch {batch} per {s.unit}, {s.precision}{switches}",
         f"{rate:,.0f} img/s{per_device}{memory}" + (" (rank 0)" if world > 1 and memory else ""),
         images_per_s=round(rate, 1), processes=world, batch=batch, **numbers)


# ---- the other cases -----------------------------------------------------------------------------------------

def update_ema_loop(ema, module, beta: float) -> None:
    """The per-tensor EMA update trainer/ema.py had before its one foreach op: a kernel launch per tensor."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), module.parameters()):
            p_ema.copy_(p.detach().float().lerp(p_ema, beta))
        for b_ema, b in zip(ema.buffers(), module.buffers()):
            b_ema.copy_(b)


def ema_case(s: Sizes, work: Path) -> None:
    torch.manual_seed(0)
    model = Denoiser(build_unet(s.preset, s.shape[-1], s.shape[0])).to(s.device)
    averages = {"foreach": make_ema(model), "loop": make_ema(model)}
    with torch.no_grad():  # so that an update moves every average
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    seconds = {}
    for (name, ema), update in zip(averages.items(), (update_ema, update_ema_loop)):
        update(ema, model, 0.999)  # warm-up
        _, spent = timed(lambda: [update(ema, model, 0.999) for _ in range(s.ema_reps)], s.device)
        seconds[name] = spent / s.ema_reps
    difference = max(float((a - b).abs().max()) for a, b in zip(averages["foreach"].parameters(),
                                                                 averages["loop"].parameters()))
    tensors, parameters = len(list(model.parameters())), sum(p.numel() for p in model.parameters())
    emit(f"EMA update, {s.preset} ({tensors} tensors, {parameters / 1e6:.1f}M parameters)",
         f"one foreach op {seconds['foreach'] * 1e3:.2f} ms vs per-tensor loop {seconds['loop'] * 1e3:.2f} ms "
         f"({seconds['loop'] / seconds['foreach']:.1f}x); max |difference| {difference:.1e}",
         foreach_ms=seconds["foreach"] * 1e3, loop_ms=seconds["loop"] * 1e3, max_difference=difference)


def gram_case(s: Sizes, work: Path) -> None:
    """fuse.precision: the Gram pass of the exact lambda fit in float32 (TF32 off, as the fuse stage runs it)
    against bf16 autocast."""
    fused = FusedDenoiser(perturbed_denoisers(s, 3), torch.full((3,), 1 / 3), batched=s.batched).to(s.device)
    images = torch.rand(s.gram_images, *s.shape, device=s.device) * 2 - 1
    objective = edm_objective(-1.2, 1.2, 0.5)

    def gram(precision: str, x: torch.Tensor, draws: int = 2):
        batches = [(chunk, generator(0, Stream.GRAM, i)) for i, chunk in enumerate(x.split(s.gram_batch))]
        with full_fp32() if precision == "no" else nullcontext():
            return accumulate_gram(fused, batches, draws, objective, autocast_dtype=autocast_dtype(precision))
    stats, seconds = {}, {}
    for precision in ("no", "bf16"):
        gram(precision, images[:s.gram_batch], draws=1)  # warm-up: cuDNN autotuning, the stacked weights
        stats[precision], seconds[precision] = timed(lambda: gram(precision, images), s.device)
    full, half = stats["no"].A, stats["bf16"].A
    relative = float(((half - full).abs() / full.abs().clamp(min=1e-12)).max())
    lam = [fit_barycenter_weights(stats[p])["lambda"] for p in ("no", "bf16")]
    how = f"{s.gram_images} images x 2 draws x K = 3, {'vmapped' if fused.uses_batched(s.device) else 'loop'}"
    emit("Gram pass, fuse.precision=no (float32, TF32 off)", f"{seconds['no']:.2f} s ({how})",
         seconds=seconds["no"])
    emit("Gram pass, fuse.precision=bf16", f"{seconds['bf16']:.2f} s ({seconds['no'] / seconds['bf16']:.2f}x "
         f"float32); max relative difference of A {relative:.1e}, of lambda {float((lam[0] - lam[1]).abs().max()):.1e}",
         seconds=seconds["bf16"], speedup=seconds["no"] / seconds["bf16"], max_relative_difference_A=relative)


def sample_rate(s: Sizes, denoiser, z: torch.Tensor, precision: str) -> tuple[torch.Tensor, float]:
    """(Heun samples of the latents z, img/s) at a precision, within the sigmas the denoiser declares valid."""
    low, high = sigma_bounds(denoiser, 0.002, 80.0)
    run = with_autocast(partial(heun_sample, denoiser, num_steps=s.heun_steps, sigma_min=low, sigma_max=high),
                        precision)
    with_autocast(partial(heun_sample, denoiser, num_steps=2, sigma_min=low, sigma_max=high), precision)(z)  # warm-up
    images, seconds = timed(lambda: run(z), s.device)
    return images, len(z) / seconds


def difference(a, b) -> float:
    return float((a - b).abs().max())


def sampling_case(s: Sizes, work: Path) -> None:
    """eval.sample_precision on one denoiser, then the fused K = 3 model vmapped against the loop, in float32 and
    under distill.teacher_precision=bf16 (the teacher's sampling is the same call)."""
    z = torch.randn(s.sample_batch, *s.shape, generator=torch.Generator().manual_seed(0)).to(s.device)
    how = f"{s.heun_steps}-step Heun, batch {s.sample_batch}"
    single = perturbed_denoisers(s, 1)[0]
    (full, rate_full), (half, rate_half) = sample_rate(s, single, z, "no"), sample_rate(s, single, z, "bf16")
    # "no" is float32 with PyTorch's default TF32 convolutions: the samplers do not turn TF32 off
    emit(f"Heun sampling, one {s.preset} denoiser, eval.sample_precision=no (float32, TF32 convolutions)",
         f"{rate_full:,.1f} img/s ({how})", images_per_s=rate_full)
    emit(f"Heun sampling, one {s.preset} denoiser, eval.sample_precision=bf16",
         f"{rate_half:,.1f} img/s ({rate_half / rate_full:.2f}x float32); "
         f"max |difference| {difference(full, half):.1e}",
         images_per_s=rate_half, max_difference=difference(full, half))
    fused_sampling_rows(s, perturbed_denoisers(s, 3), z, "")


def fused_sampling_rows(s: Sizes, models: list, z: torch.Tensor, what: str) -> None:
    """The fused K = 3 model of `models` sampled vmapped and in the loop, in float32 and bf16: a row each."""
    weights = torch.tensor([0.5, 0.3, 0.2])
    how = f"{s.heun_steps}-step Heun, batch {len(z)}"
    out, rate = {}, {}
    for batched in (True, False):
        fused = FusedDenoiser(models, weights, batched=batched).to(s.device)
        for precision in ("no", "bf16"):
            out[batched, precision], rate[batched, precision] = sample_rate(s, fused, z, precision)
    for precision, name in (("no", "float32 (TF32 convolutions)"), ("bf16", "bf16 (distill.teacher_precision=bf16)")):
        vmapped, loop = rate[True, precision], rate[False, precision]
        emit(f"fused sampling K = 3{what}, vmapped, {name}", f"{vmapped:,.1f} img/s ({how})" + (
             f"; {vmapped / rate[True, 'no']:.2f}x float32, max |difference| "
             f"{difference(out[True, 'no'], out[True, 'bf16']):.1e}" if precision == "bf16" else ""),
             images_per_s=vmapped)
        emit(f"fused sampling K = 3{what}, loop, {name}", f"{loop:,.1f} img/s; vmapped is {vmapped / loop:.2f}x the "
             f"loop, max |difference| {difference(out[True, precision], out[False, precision]):.1e}",
             images_per_s=loop, vmapped_speedup=vmapped / loop)


def pretrained_case(s: Sizes, work: Path) -> None:
    """Three pretrained DDPM UNets (diffusers' UNet2DModel as EDM denoisers, trainer/pretrained.py; the LSUN
    configuration's K = 3 of one architecture) fused and sampled as sampling_case does: google/ddpm-cifar10-32's
    architecture and schedule with random weights on a GPU (35.7M parameters each), a tiny UNet with --cpu."""
    from diffusers import DDPMScheduler, UNet2DModel
    if s.cpu:
        shape, unet = (1, 16, 16), dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                        layers_per_block=1, norm_num_groups=4,
                                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    else:
        shape, unet = (3, 32, 32), dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                          "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    schedule = dict(DDPMScheduler(beta_schedule="linear", clip_sample=False).config)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(from_diffusers(UNet2DModel(**unet), schedule).to(s.device))
    z = torch.randn(s.sample_batch, *shape, generator=torch.Generator().manual_seed(0)).to(s.device)
    size = sum(p.numel() for p in models[0].parameters()) / 1e6
    fused_sampling_rows(s, models, z, f" pretrained DDPM UNets ({size:.3g}M each)")


def nll_batch_setting(s: Sizes) -> tuple[int, str]:
    if s.cpu:
        return 4, "tiny"
    batch = cifar10("eval.nll_batch")
    if batch is None:
        return cifar10("eval.batch"), "eval.nll_batch absent from configs/cifar10.yaml and the schema: eval.batch"
    return batch, "eval.nll_batch"


def nll_case(s: Sizes, work: Path) -> None:
    """The PF-ODE NLL of a fused K = 2 model at configs/cifar10.yaml's eval.nll_batch: peak memory, and the cost
    of one ODE step (a 1-step warm-up, then 2 steps timed), projected to eval.nll_steps. Out of memory, the batch
    is halved and the row says so."""
    fused = FusedDenoiser(perturbed_denoisers(s, 2), torch.tensor([0.6, 0.4]), batched=s.batched).to(s.device)
    batch, source = nll_batch_setting(s)
    notes = []
    while True:
        images = torch.randint(0, 256, (batch, *s.shape), dtype=torch.uint8)

        def nll(steps: int):
            return nll_bits_per_dim(fused, images, range(batch), 0, steps=steps, probes=1, batch_size=batch,
                                    device=s.device)
        try:
            reset_peak(s.device)
            nll(1)  # warm-up: cuDNN autotuning at this batch, the stacked weights
            _, seconds = timed(lambda: nll(2), s.device)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            notes.append(f"out of memory at batch {batch}")
            batch //= 2
            torch.cuda.empty_cache()
    per_step = seconds / 2  # one ODE step of the batch: 2 evaluations of K networks, a VJP each
    rate = batch / (per_step * s.nll_steps)
    memory, numbers = peak(s.device)
    emit(f"NLL, fused K = 2 {s.preset}, batch {batch} ({source}), 1 probe, float32 (TF32 off)",
         f"{per_step / batch * 1e3:.2f} ms per image and ODE step: {rate:,.2f} img/s at eval.nll_steps = "
         f"{s.nll_steps}{memory}" + "".join(f"; {note}" for note in notes),
         images_per_s=rate, batch=batch, ms_per_image_step=per_step / batch * 1e3, **numbers)


def distill_case(s: Sizes, work: Path) -> None:
    """Score Mismatching's iteration as stages/distill.py builds it: a D step on real and generated images,
    R1 every r1_every iterations, a G step through the frozen D; real images are a synthetic batch in memory."""
    spec = DistillSpec(batch=s.distill_batch, r1_every=s.r1_every)
    engine_spec = TrainSpec(batch=spec.batch, precision=s.precision, lr=spec.lr, adam_betas=list(spec.adam_betas),
                            lr_rampup_kimg=0, checkpoint_every_kimg=0, ema_halflife_kimg=spec.ema_halflife_kimg,
                            total_kimg=spec.batch * s.r1_every * s.windows / 1000,
                            log_every_kimg=spec.batch * s.r1_every / 1000)  # each window holds one R1 step
    acc = make_accelerator(engine_spec)
    torch.manual_seed(0)
    G, D = build_networks(spec, s.preset, None, s.shape, EDMSpec(), None)
    c = lazy_adam_scaling(spec.r1_every)
    opt_g = adam(G.parameters(), spec.lr, spec.adam_betas, engine_spec.adam_eps)
    opt_d = adam(D.parameters(), spec.lr_d or spec.lr, [b ** c for b in spec.adam_betas], engine_spec.adam_eps)
    real = torch.rand(spec.batch, *s.shape, device=acc.device) * 2 - 1
    lr_scale_d = (spec.lr_d or spec.lr) / spec.lr * c
    updates = [Update("adam_d", "D", lambda m, x, step: d_step_loss(m["D"], m["G"], x), lr_scale=lr_scale_d,
                      name="score"),
               Update("adam_d", "D", lambda m, x, step: r1_step_loss(m["D"], x, spec.r1_gamma, spec.batch),
                      lr_scale=lr_scale_d, every=spec.r1_every, name="r1", double_backward=True),
               Update("adam_g", "G", lambda m, _, step: g_step_loss(m["D"], m["G"], spec.batch, s.shape, acc.device),
                      takes_batch=False, name="generator")]
    reset_peak(acc.device)
    engine = Engine(acc, engine_spec, engine_paths(work), modules={"G": G, "D": D}, optimizers={"adam_g": opt_g, "adam_d": opt_d},
                    updates=updates, batches=lambda start: itertools.repeat(real), ema=("G",),
                    hooks=(Hook(0, stop_after_last_window),), log=lambda message: None)
    try:
        engine.run()
    except Measured:
        pass
    rate = steady_rate(work)
    memory, numbers = peak(acc.device)
    emit(f"distill (Score Mismatching: D, R1 every {spec.r1_every}, G), {s.preset} G and D, batch {spec.batch}, "
         f"{s.precision}", f"{rate:,.0f} generated img/s ({rate / spec.batch:.1f} iterations/s){memory}",
         images_per_s=round(rate, 1), **numbers)


def synthetic_shards(s: Sizes, data: Path) -> None:
    """Shards + manifest in `prepare`'s format holding smooth random images (upsampled noise, so that PNG
    compresses them about as it does photographs)."""
    data.mkdir(parents=True)
    channels, size = s.shape[0], s.shape[-1]
    shards = []
    for index in range(s.shards):
        small = torch.rand(s.shard_images, channels, size // 4, size // 4,
                           generator=torch.Generator().manual_seed(index))
        images = torch.nn.functional.interpolate(small, size=size, mode="bilinear").mul(255).round().to(torch.uint8)
        shards.append(write_shard(data / f"shard-{index:06d}.tar", ((f"img-{index}-{i}", image, i % 10) for i, image in
                                                                   enumerate(images.permute(0, 2, 3, 1).numpy()))))
    write_manifest(data, {"version": MANIFEST_VERSION, "image_size": size, "channels": channels,
                          "class_names": [str(c) for c in range(10)],
                          "populations": {"synthetic": {"role": "aux", "count": s.shards * s.shard_images,
                                                        "shards": shards}}})


def loader_case(s: Sizes, work: Path) -> None:
    """shards/stream.py's train_loader with data.workers workers, each batch copied to the device as the stages
    do (non_blocking), pinned and not."""
    synthetic_shards(s, work / "data")
    c, size, _ = s.shape
    for pinned in (True, False):
        rate = loader_rate(s, work, pinned)
        emit(f"shard loader, {s.workers} workers (data.workers), batch {s.loader_batch}, {size}x{size}x{c} PNG, "
             f"pin_memory={str(pinned).lower()}", f"{rate:,.0f} img/s", images_per_s=round(rate, 1))


def loader_rate(s: Sizes, work: Path, pinned: bool) -> float:
    """Images/s of one loader after its workers have started; its persistent workers end with this call."""
    batches = iter(train_loader(work / "data", "synthetic", batch_size=s.loader_batch, seed=0, rank=0,
                                world_size=1, num_workers=s.workers, pin_memory=pinned))
    next(batches)  # the workers have started

    def read():
        for _ in range(s.loader_batches):
            next(batches)[0].to(s.device, non_blocking=True)
    _, seconds = timed(read, s.device)
    return s.loader_batches * s.loader_batch / seconds


def scorefuse(*args) -> float:
    """One CLI command to its end, its output into this case's log; its wall time. Raises with its last line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    sys.stderr.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"scorefuse {args[0]} exited {proc.returncode}: {last_line(proc.stderr)}")
    return time.perf_counter() - start


def newest_step(stage: Path) -> int:
    newest = Checkpointer(stage / CHECKPOINTS, None).complete()
    return int(newest[0].name.rsplit("-", 1)[1]) if newest else -1


def tensors_of(stage: Path) -> dict:
    """The exported EMA weights and every weight file of the newest checkpoint of a finished training stage."""
    newest = Checkpointer(stage / CHECKPOINTS, None).complete()[0]
    files = [stage / DENOISER_FILES[0], *sorted(newest.glob("*.safetensors"))]
    return {f"{newest.name}/{path.name}/{key}": value for path in files for key, value in load_file(path).items()}


def digits_case(s: Sizes, work: Path) -> None:
    """The tiny digits pipeline through the CLI on this device (prepare, train-aux, fuse with the router, EM and
    the baselines, distill, evaluate) with train.deterministic=true; then, in a copy of the run, the
    target-scratch baseline killed by SIGKILL mid-training and resumed, compared with the uninterrupted one bit
    for bit. The kill comes last, so that a failure there leaves the pipeline's rows standing."""
    steps, every, kill_at = (24, 4, 8) if s.cpu else (320, 16, 32)  # the baseline's steps of 32 images
    common = ["--config", DIGITS, *TINY_RUN, f"fuse.scratch_kimg={steps * 32 / 1000}",
              f"train.checkpoint_every_kimg={every * 32 / 1000}", *(["fuse.batched=true"] if s.cpu else [])]
    run = RunDir(work / "straight" / "digits")
    root = f"root={run.root.parent}"
    walls = {"prepare, train-aux": scorefuse("run", *common, root, "stages=prepare,train-aux")}
    trained = [finished_info(run.aux(aux.name))["seconds"] for aux in OmegaConf.load(DIGITS).data.aux]
    emit("prepare, train-aux (3 auxiliaries, a process each) on this device",
         f"{walls['prepare, train-aux']:.0f} s wall; training {', '.join(f'{t:.1f}' for t in trained)} s",
         seconds=walls["prepare, train-aux"])

    walls["fuse"] = scorefuse("fuse", *common, root)
    parts = {"fits": finished_info(run.fuse)["seconds"], "router": finished_info(run.router)["seconds"],
             "EM": json.loads(run.mixture_file.read_text())["seconds"],
             **{name: finished_info(run.baseline(name))["seconds"] for name in (TARGET_SCRATCH, TARGET_FINETUNE)}}
    emit("fuse (exact and SGD fit, router, EM on the router and the NLL, 3 baselines)",
         f"{walls['fuse']:.0f} s wall; " + ", ".join(f"{name} {sec:.1f} s" for name, sec in parts.items()),
         seconds=walls["fuse"], **{f"{name}_seconds": sec for name, sec in parts.items()})

    walls["distill, evaluate"] = scorefuse("run", *common, root, "stages=distill,evaluate")
    models = read_measurements(run.measurements)["models"]
    emit("distill, evaluate", f"{walls['distill, evaluate']:.0f} s wall; {len(models)} models in the report",
         seconds=walls["distill, evaluate"])
    emit("the pipeline end to end (5 stages)",
         f"{sum(walls.values()):.0f} s: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in walls.items()),
         seconds=sum(walls.values()))
    kill_and_resume(run, RunDir(work / "killed" / "digits"), common, kill_at, steps)


def kill_and_resume(straight: RunDir, killed: RunDir, common: list, kill_at: int, steps: int) -> None:
    """target-scratch trained again in a copy of `straight` without its baselines, SIGKILLed once a checkpoint
    at or after step `kill_at` is complete, resumed by a fresh process, compared tensor by tensor."""
    shutil.copytree(straight.root, killed.root, ignore=shutil.ignore_patterns(straight.baselines.name))
    stage = killed.baseline(TARGET_SCRATCH)
    fuse = ["fuse", *common, f"root={killed.root.parent}", f"fuse.baselines=[{TARGET_SCRATCH}]"]
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *map(str, fuse)], cwd=ROOT, stdout=sys.stderr,
                            stderr=subprocess.STDOUT, start_new_session=True)
    while newest_step(stage) < kill_at:
        if proc.poll() is not None:
            raise RuntimeError(f"the fuse to be killed ended (exit {proc.returncode}) before step {kill_at}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if is_finished(stage):
        raise RuntimeError(f"{TARGET_SCRATCH} finished before it was killed")
    stopped = newest_step(stage)
    scorefuse(*fuse)
    want, got = tensors_of(straight.baseline(TARGET_SCRATCH)), tensors_of(stage)
    differ = sorted(key for key in want.keys() | got.keys()
                    if key not in want or key not in got or not torch.equal(want[key], got[key]))
    what = (f"baseline {TARGET_SCRATCH} SIGKILLed after its step-{stopped} checkpoint (of {steps}), resumed, "
            "train.deterministic=true")
    if differ:
        emit(what, f"DIFFERENT from the uninterrupted run: {len(differ)} of {len(want)} tensors, first {differ[0]}",
             FAILED)
    else:
        emit(what, f"bit-identical to the uninterrupted run ({len(want)} tensors: the EMA export, the checkpoint)")


def placement_case(s: Sizes, work: Path) -> None:
    """The device-placement harness tests, as a pytest run of their own (bench/ imports no test module)."""
    name = str(PLACEMENT_TESTS.relative_to(ROOT))
    if not PLACEMENT_TESTS.is_file():
        return emit("device-placement tests", f"{name} does not exist yet", SKIPPED)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name], cwd=ROOT,
                          capture_output=True, text=True)
    sys.stderr.write(proc.stdout + proc.stderr)
    emit(f"device-placement tests ({name})", last_line(proc.stdout), FAILED if proc.returncode else OK)


# ---- the cases, in the order they run ------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    estimate: int  # seconds on one H200, the process start (~5 s) included
    limit: int     # seconds before the case is killed and becomes a TIMEOUT row
    body: Callable[[Sizes, Path], None]
    launcher: str = ""    # ddp | zero2: 2 processes under `accelerate launch` (needs 2 GPUs; gloo with --cpu)
    cpu_only: bool = False
    baseline: str = ""    # a case whose images/s its rows are compared with


CASES = [
    # 40 steps at batch 32 are launch-bound (~25 ms each): 1 s, + start and cuDNN autotuning
    Case("train-32", 8, 60, partial(train, batch=32)),
    # 40 x 128 images at ~3k img/s: 2 s, + 8 s
    Case("train-128", 10, 60, partial(train, batch=128)),
    # 40 x 512 images at ~3.5k img/s: 6 s, + 8 s
    Case("train-512", 14, 90, partial(train, batch=512)),
    # the train-128 work each; deterministic kernels may cost a few seconds more
    Case("train-128-cudnn-benchmark-off", 10, 60, partial(train, batch=128, cudnn_benchmark=False),
         baseline="train-128"),
    Case("train-128-channels-last", 10, 60, partial(train, batch=128, channels_last=True), baseline="train-128"),
    Case("train-128-deterministic", 12, 60, partial(train, batch=128, deterministic=True), baseline="train-128"),
    # 2 x 51 updates of 56M float32 parameters: well under a second, + start
    Case("ema", 7, 40, ema_case),
    # 6k forward images per precision (1024 images x 2 draws x K = 3): ~2 s in float32 with TF32 off, 0.6 s in
    # bf16, + warm-ups and start
    Case("gram", 12, 60, gram_case),
    # one denoiser: 2 x 9k forward images (256 x 35 evaluations); fused: 4 x 27k: ~12 s, + warm-ups and start
    Case("sampling", 20, 90, sampling_case),
    # fused: 4 x 27k forward images of a 36M UNet (about 2x ddpmpp-cifar10's cost per image): ~20 s, + start
    Case("pretrained", 30, 120, pretrained_case),
    # 8 evaluations x 256 images x K = 2 x (forward + VJP, ~3 forwards) = 12k forward-equivalents in float32
    # with TF32 off: ~4 s, + warm-up and start
    Case("nll", 12, 90, nll_case),
    # 48 iterations of ~4.3 x 64 forward-backward images (D on 128, G through D on 64) + 3 R1 steps: ~5 s, + 2
    # networks, warm-up, start
    Case("distill", 15, 90, distill_case),
    # 4,000 PNGs written (~1 s), then twice: 4 workers start (~2 s) and 12.8k images at >10k img/s
    Case("loader", 10, 60, loader_case, baseline="train-128"),
    # about 8 CLI processes of ~5 s start each (3 train-aux under accelerate launch, a killed and a resumed
    # fuse) and a few seconds of tiny work each
    Case("digits", 90, 240, digits_case),
    # 2 processes under accelerate launch, NCCL start-up, the train-128 work: ~20 s, ZeRO-2 ~30 s (SKIPPED rows,
    # and no time, on one GPU)
    Case("train-128-ddp-2gpu", 20, 120, partial(train, batch=128), launcher="ddp", baseline="train-128"),
    Case("train-128-zero2-2gpu", 30, 150, partial(train, batch=128), launcher="zero2", baseline="train-128"),
    Case("placement", 0, 300, placement_case, cpu_only=True),  # --cpu only
    # last, being the longest: inductor compiles ddpmpp-cifar10's forward and backward (~60 s), then the steps
    Case("train-128-compile", 75, 240, partial(train, batch=128, compile=True), baseline="train-128"),
]
BY_NAME = {case.name: case for case in CASES}


# ---- the driver ----------------------------------------------------------------------------------------------

class Table:
    """The markdown table at --out and its JSON-lines twin, appended row by row and flushed, so a run killed
    from outside keeps every finished row; each row is printed too."""

    def __init__(self, out: Path | None, title: str):
        self.md = out
        self.jsonl = out.with_suffix(".jsonl") if out else None
        self.rates: dict[str, float] = {}
        self.timings: list[tuple[Case, str, float]] = []
        self.failed = False
        self._write(f"{title}\n\n| case | what | result | status |\n|---|---|---|---|\n", "", mode="w")

    def _write(self, markdown: str, record: str, mode: str = "a") -> None:
        if self.md:
            with open(self.md, mode) as f:
                f.write(markdown)
            with open(self.jsonl, mode) as f:
                f.write(record)

    def add(self, case: Case, row: dict) -> None:
        rate = row.get("images_per_s")
        if rate is not None and case.baseline in self.rates:
            row["vs_baseline"] = rate / self.rates[case.baseline]
            row["result"] += f" [{row['vs_baseline']:.2f}x {case.baseline}]"
        if rate is not None:
            self.rates.setdefault(case.name, rate)
        self.failed |= row["status"] in (FAILED, TIMEOUT)
        cells = [case.name, row["what"], row["result"], row["status"]]
        self._write("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |\n",
                    json.dumps({"case": case.name, **row}) + "\n")
        print(f"{case.name}: {row['what']}: {row['result']} [{row['status']}]", flush=True)

    def case_done(self, case: Case, status: str, seconds: float) -> None:
        """The case's wall time, beside its estimate, to the JSON lines now and to the summary at the end."""
        self.timings.append((case, status, seconds))
        self._write("", json.dumps({"case": case.name, "case_status": status, "seconds": round(seconds, 1),
                                    "estimate": case.estimate, "limit": case.limit}) + "\n")

    def summary(self, seconds: float) -> None:
        estimate = sum(c.estimate for c, status, _ in self.timings if status != SKIPPED)
        lines = ["", f"{len(self.timings)} cases in {seconds:.0f} s (those run estimated at {estimate} s on one H200)",
                 "", "| case | status | seconds | estimate | limit |", "|---|---|---|---|---|",
                 *[f"| {c.name} | {status} | {spent:.0f} | {c.estimate} | {c.limit} |"
                   for c, status, spent in self.timings]]
        self._write("\n".join(lines) + "\n", "")
        print("\n".join(lines), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_command(case: Case, cpu: bool, work: Path) -> list[str]:
    own = [__file__, "--case", case.name, "--work", str(work), *(["--cpu"] if cpu else [])]
    if not case.launcher:
        return [sys.executable, *own]
    # as tests/test_ddp.py and tests/test_deepspeed.py launch; the run's precision comes from TrainSpec
    launcher = ["--config_file", str(ZERO2)] if case.launcher == "zero2" else ["--multi_gpu", "--mixed_precision", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2", "--num_machines",
            "1", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *own]


def run_case(case: Case, args, table: Table, work: Path, logs: Path, seconds_left: float) -> str:
    """The case in a process group of its own, its rows handed to the table as they come; returns its status."""
    limit = min(args.limits.get(case.name, case.limit * args.timeout_scale), seconds_left)
    if limit <= 0:
        table.add(case, {"what": case.name, "result": "--max-seconds spent before this case", "status": SKIPPED})
        return SKIPPED
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu:  # the CPU even on a GPU machine, and DeepSpeed told so before it probes for one
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    log_path = logs / f"{case.name}.log"
    statuses = []
    with open(log_path, "a", buffering=1) as log:  # appending: the process's stderr shares it
        proc = subprocess.Popen(case_command(case, args.cpu, work / case.name), cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)

        def pump():
            for line in proc.stdout:
                if line.startswith(ROW):
                    row = json.loads(line[len(ROW):])
                    statuses.append(row["status"])
                    table.add(case, row)
                else:
                    log.write(line)
        reader = threading.Thread(target=pump)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # the whole group: DataLoader workers, accelerate's ranks, CLI stages
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(timeout=10)
    reason = last_line(log_path.read_text(errors="replace"))
    if timed_out:
        table.add(case, {"what": case.name, "result": f"TIMEOUT after {limit:.0f} s; last line: {reason}",
                         "status": TIMEOUT})
        return TIMEOUT
    if proc.returncode or not statuses:
        table.add(case, {"what": case.name, "result": f"exit {proc.returncode}: {reason}", "status": FAILED})
        return FAILED
    return FAILED if FAILED in statuses else SKIPPED if set(statuses) == {SKIPPED} else OK


def skip_reason(case: Case, cpu: bool, gpus: int) -> str:
    if case.cpu_only and not cpu:
        return "runs with --cpu only"
    if case.launcher and not cpu and gpus < 2:
        return f"multi-GPU rows need more than 1 GPU; this machine has {gpus}"
    return ""


def parse_limits(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in BY_NAME or not seconds:
            raise SystemExit(f"--limit {item}: expected NAME=SECONDS with NAME one of {', '.join(BY_NAME)}")
        limits[name] = float(seconds)
    return limits


def main():
    cases = "\n".join(f"  {c.name} ({c.estimate} / {c.limit})" for c in CASES)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"cases, in order (estimated seconds on one H200 / limit):\n{cases}")
    p.add_argument("--out", type=Path, help="append the rows to this markdown file (and its .jsonl twin)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    p.add_argument("--only", help="comma-separated case names to run (in the usual order)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS", help="one case's time limit")
    p.add_argument("--timeout-scale", type=float, help="multiplies every case's limit (default 1; 3 with --cpu)")
    p.add_argument("--max-seconds", type=float, help="the whole check's wall-time budget; cases that would run "
                   "past it are cut short (default 540 on a GPU, none with --cpu)")
    p.add_argument("--case", choices=BY_NAME, help=argparse.SUPPRESS)  # inside a case's own process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        args.work.mkdir(parents=True, exist_ok=True)
        torch.backends.cudnn.benchmark = TrainSpec.cudnn_benchmark  # what every stage's accelerator sets
        return BY_NAME[args.case].body(Sizes(args.cpu), args.work)

    # SIGTERM (a scheduler's kill) as an exception, so that the running case's process group is killed too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and not gpus:
        raise SystemExit("no GPU: run with --cpu for the tiny CPU version")
    names = args.only.split(",") if args.only else [c.name for c in CASES if not c.cpu_only or args.cpu]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {', '.join(unknown)}; cases: {', '.join(BY_NAME)}")
    args.limits = parse_limits(args.limit)
    args.timeout_scale = args.timeout_scale or (3.0 if args.cpu else 1.0)
    budget = args.max_seconds or (float("inf") if args.cpu else 540.0)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    device = "CPU (tiny sizes)" if args.cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    table = Table(args.out, f"GPU check on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        logs = args.out.with_suffix(".logs") if args.out else Path(tmp) / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        for case in (c for c in CASES if c.name in names):
            began = time.perf_counter()
            reason = skip_reason(case, args.cpu, gpus)
            if reason:
                table.add(case, {"what": case.name, "result": reason, "status": SKIPPED})
                status = SKIPPED
            else:
                status = run_case(case, args, table, Path(tmp), logs, budget - (began - start))
            table.case_done(case, status, time.perf_counter() - began)
    table.summary(time.perf_counter() - start)
    raise SystemExit(1 if table.failed else 0)


if __name__ == "__main__":
    main()
