"""The GPU check: one script a person with one GPU runs (at most ~8 minutes on an H100/H200), printing one
table and writing it to the file named by --out.

    python bench/gpu_check.py --out gpu_check.md          # on a GPU node
    python bench/gpu_check.py --out /tmp/check.md --cpu   # the same code paths, tiny sizes, on the CPU (a test runs this)

Rows, each measured side by side in this run:
1. training (the real engine, synthetic 32x32x3 batches in memory, so the network is what is timed):
   ddpmpp-cifar10 in bf16, images/s and peak GPU memory, DDP and DeepSpeed ZeRO-2 on one process, and
   DDP with torch.compile and channels_last on and off. Each case is its own `accelerate launch` process,
   so that its peak memory is its own.
2. the Gram pass of the fuse stage (K = 3 perturbed ddpmpp-cifar10 denoisers): float32 against bf16
   autocast, time and the largest relative difference of the Gram matrix A.
3. fused sampling, K = 3, 18-step Heun: the vmapped batched call against the loop over the networks, time
   and the largest difference of the samples.
4. one-step generator against 18-step Heun at 32x32: samples/s.
5. train.deterministic: a train-aux run stopped half-way and resumed ends bit-identical to an uninterrupted
   one (digits), and images/s with deterministic kernels on and off.
6. the tiny digits pipeline (prepare -> train-aux -> fuse -> distill -> evaluate) on this device: it must
   finish; its wall time.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from trainer.edm import Denoiser, denoising_loss, heun_sample  # noqa: E402
from trainer.engine import Engine, Update, adam, make_accelerator  # noqa: E402
from trainer.fused_denoiser import FusedDenoiser  # noqa: E402
from trainer.lambda_fit import accumulate_gram, edm_objective  # noqa: E402
from trainer.rundir import DONE  # noqa: E402
from trainer.score_mismatch import OneStepGenerator  # noqa: E402
from trainer.spec import TrainSpec  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

DIGITS = ROOT / "configs" / "digits.yaml"
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
# The digits pipeline in about a minute: a few steps per model, few samples, a 4-step sampler.
TINY_RUN = ["train.batch=32", "train.lr_rampup_kimg=0.1", "train.log_every_kimg=0.32", "train.total_kimg=0.32",
            "train.checkpoint_every_kimg=0.16", "train.eval_every_kimg=0", "train.snapshot_every_kimg=0",
            "eval.num_samples=32", "eval.grid_images=4", "edm.sampler_steps=4", "fuse.scratch_kimg=0.16",
            "fuse.finetune_kimg=0.16", "fuse.draws_per_image=2", "fuse.sgd_epochs=2", "fuse.test_draws_per_image=1",
            "distill.teacher_samples=32", "distill.teacher_steps=2", "distill.batch=32", "distill.total_kimg=0.064",
            "distill.eval_every_kimg=0", "distill.snapshot_every_kimg=0", "distill.checkpoint_every_kimg=0.064",
            "eval.nll_images=8", "eval.nll_steps=4", "eval.bootstrap=10", "eval.kid_subsets=4",
            "eval.sample_batch=32", "fuse.router_kimg=0.192", "fuse.router_draws=2"]


class Sizes:
    """What a check runs at: the real sizes on a GPU, tiny ones with --cpu."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.preset, self.shape = ("tiny", (1, 16, 16)) if cpu else ("ddpmpp-cifar10", (3, 32, 32))
        self.train_batch, self.train_steps = (8, 2) if cpu else (128, 40)
        self.sample_batch, self.heun_steps = (4, 3) if cpu else (256, 18)
        self.gram_images, self.gram_batch = (8, 4) if cpu else (1024, 256)
        self.precision = "bf16"


def perturbed_denoisers(sizes: Sizes, k: int) -> list[Denoiser]:
    """k denoisers of one architecture with random weights everywhere (a fresh UNet's zero-initialised
    output layers would make them all the same function)."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        d = Denoiser(build_unet(sizes.preset, sizes.shape[-1], sizes.shape[0]))
        with torch.no_grad():
            for p in d.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        models.append(d.eval().requires_grad_(False).to(sizes.device))
    return models


def timed(fn, sizes: Sizes):
    if sizes.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sizes.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


# ---- 1. training, one case per process -----------------------------------------------------------------

def train_case(args) -> None:
    """Runs inside `accelerate launch`: the engine on synthetic batches; prints one JSON line."""
    sizes = Sizes(args.cpu)
    spec = TrainSpec(batch=sizes.train_batch, precision=sizes.precision if not args.cpu else "no", lr=1e-4,
                     lr_rampup_kimg=0, total_kimg=sizes.train_batch * sizes.train_steps / 1000,
                     log_every_kimg=sizes.train_batch * sizes.train_steps / 2000, checkpoint_every_kimg=0,
                     compile=args.compile, channels_last=args.channels_last)
    acc = make_accelerator(spec)
    torch.manual_seed(0)
    net = Denoiser(build_unet(sizes.preset, sizes.shape[-1], sizes.shape[0]))
    x0 = torch.rand(sizes.train_batch, *sizes.shape, device=acc.device) * 2 - 1

    def batches(start):
        while True:
            yield x0
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(acc, spec, Path(tmp), modules={"net": net}, optimizers={"adam": adam(net.parameters(), 1e-4, (0.9, 0.999), 1e-8)},
                        updates=[Update("adam", "net", lambda m, x, s: denoising_loss(m["net"], x, None).mean())],
                        batches=batches, ema=("net",), log=lambda m: None)
        engine.run()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if acc.device.type == "cuda" else float("nan")
    print("RESULT " + json.dumps({"images_per_s": rows[-1]["images_per_s"], "peak_gib": peak}), flush=True)


def training_rows(args) -> list[tuple[str, str]]:
    cases = [("DDP", False, False), ("DDP", False, True), ("DDP", True, False), ("DDP", True, True), ("ZeRO-2", False, False)]
    if args.cpu:  # each case is a process start and, with compile, a compilation: the combined one covers both levers
        cases = [("DDP", False, False), ("DDP", True, True), ("ZeRO-2", False, False)]
    rows = []
    for launcher, compile_, channels_last in cases:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", "--main_process_port", str(args.port)]
        cmd += ["--config_file", str(ZERO2)] if launcher == "ZeRO-2" else ["--mixed_precision", "no"]
        cmd += [__file__, "--case", "train"] + (["--cpu"] if args.cpu else []) + \
            (["--compile"] if compile_ else []) + (["--channels-last"] if channels_last else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"DS_ACCELERATOR": "cpu"} if args.cpu else {})}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.case_timeout)
        name = f"train {launcher}, compile {'on' if compile_ else 'off'}, channels_last {'on' if channels_last else 'off'}"
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            rows.append((name, f"FAILED (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}"))
            continue
        r = json.loads(result[0][7:])
        peak = "" if args.cpu else f", peak {r['peak_gib']:.2f} GiB"
        rows.append((name, f"{r['images_per_s']:.0f} img/s{peak}"))
    return rows


# ---- 2-4. in-process checks ---------------------------------------------------------------------------------

def gram_rows(sizes: Sizes) -> list[tuple[str, str]]:
    models = perturbed_denoisers(sizes, 3)
    fused = FusedDenoiser(models, torch.full((3,), 1 / 3)).to(sizes.device)
    images = torch.rand(sizes.gram_images, *sizes.shape, device=sizes.device) * 2 - 1

    def gram(dtype):
        batches = [(x, torch.Generator().manual_seed(i)) for i, x in enumerate(images.split(sizes.gram_batch))]
        return accumulate_gram(fused, batches, 2, edm_objective(-1.2, 1.2, 0.5), autocast_dtype=dtype)
    full, t_full = timed(lambda: gram(None), sizes)
    half, t_half = timed(lambda: gram(torch.bfloat16), sizes)
    difference = float(((half.A - full.A).abs() / full.A.abs().clamp(min=1e-12)).max())
    return [("Gram pass float32", f"{t_full:.2f} s ({sizes.gram_images} images x 2 draws, K = 3)"),
            ("Gram pass bf16 autocast", f"{t_half:.2f} s ({t_full / t_half:.2f}x float32); max relative difference "
                                        f"of A {difference:.2e}")]


def fused_sampling_rows(sizes: Sizes) -> list[tuple[str, str]]:
    models = perturbed_denoisers(sizes, 3)
    z = torch.randn(sizes.sample_batch, *sizes.shape, generator=torch.Generator().manual_seed(0)).to(sizes.device)
    rows, outputs = [], {}
    for batched in (True, False):
        fused = FusedDenoiser(models, torch.tensor([0.5, 0.3, 0.2]), batched=batched).to(sizes.device)
        heun_sample(fused, z[:2], num_steps=2)  # warm-up (the stacked copy, kernels)
        outputs[batched], seconds = timed(lambda: heun_sample(fused, z, num_steps=sizes.heun_steps), sizes)
        rows.append((f"fused sampling K = 3, {'vmapped' if batched else 'loop'}",
                     f"{sizes.sample_batch / seconds:.1f} samples/s ({sizes.heun_steps}-step Heun)"))
    rows.append(("fused sampling vmapped vs loop", f"max |difference| {float((outputs[True] - outputs[False]).abs().max()):.2e}"))
    return rows


def one_step_rows(sizes: Sizes) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    denoiser = Denoiser(build_unet(sizes.preset, sizes.shape[-1], sizes.shape[0])).eval().to(sizes.device)
    generator = OneStepGenerator(denoiser, 80.0)
    z = torch.randn(sizes.sample_batch, *sizes.shape, device=sizes.device)
    with torch.no_grad():
        generator(z[:2])
        _, one = timed(lambda: generator(z), sizes)
    _, heun = timed(lambda: heun_sample(denoiser, z, num_steps=sizes.heun_steps), sizes)
    return [("one-step generator", f"{sizes.sample_batch / one:.0f} samples/s"),
            (f"{sizes.heun_steps}-step Heun ({2 * sizes.heun_steps - 1} NFE)",
             f"{sizes.sample_batch / heun:.1f} samples/s (one-step is {heun / one:.0f}x faster)")]


# ---- 5-6. the real stages --------------------------------------------------------------------------------

def scorefuse(*args, timeout=600) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, time.perf_counter() - t0


def determinism_rows(tmp: Path) -> list[tuple[str, str]]:
    from safetensors.torch import load_file
    base = ["--config", DIGITS, "aux=aux-low", "train.batch=32", "train.lr_rampup_kimg=0.1", "train.log_every_kimg=0.16",
            "train.checkpoint_every_kimg=0.16", "train.eval_every_kimg=0", "train.snapshot_every_kimg=0",
            "data.workers=0"]
    proc, _ = scorefuse("prepare", "--config", DIGITS, f"root={tmp / 'data'}")
    if proc.returncode:
        return [("train.deterministic resume", f"FAILED: prepare: {proc.stderr.strip().splitlines()[-1:]}")]
    rates, finals = {}, {}
    for name, deterministic, stops in (("straight", True, [0.96]), ("resumed", True, [0.48, 0.96]), ("off", False, [0.96])):
        run = tmp / name
        shutil.copytree(tmp / "data", run)
        stage = run / "digits" / "aux" / "aux-low"
        for total in stops:
            (stage / DONE).unlink(missing_ok=True)  # the first leg finished its (shorter) run: continue it
            proc, seconds = scorefuse("train-aux", *base, f"root={run}", f"train.total_kimg={total}",
                                      f"train.deterministic={str(deterministic).lower()}")
            if proc.returncode:
                return [("train.deterministic resume", f"FAILED ({name}): {proc.stderr.strip().splitlines()[-1:]}")]
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        rates[name] = statistics.median(r["images_per_s"] for r in rows if "images_per_s" in r)
        finals[name] = load_file(stage / "ema.safetensors")
    same = all(torch.equal(finals["straight"][k], finals["resumed"][k]) for k in finals["straight"])
    return [("train.deterministic: stop at half, resume", "bit-identical to the uninterrupted run" if same else "DIFFERENT"),
            ("train.deterministic cost (digits)", f"{rates['straight']:.0f} img/s on vs {rates['off']:.0f} off")]


def pipeline_rows(tmp: Path) -> list[tuple[str, str]]:
    proc, seconds = scorefuse("run", "--config", DIGITS, f"root={tmp}", *TINY_RUN, timeout=900)
    if proc.returncode:
        return [("tiny digits pipeline", f"FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")]
    report = json.loads((tmp / "digits" / "report.json").read_text())
    models = [row["model"] for section in report["sections"] for row in section.get("rows", []) if "model" in row]
    return [("tiny digits pipeline (5 stages)", f"finished in {seconds:.0f} s, {len(models)} models in the report")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the table to this file as well")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: train,gram,fused,onestep,determinism,pipeline")
    p.add_argument("--port", type=int, default=29571)
    p.add_argument("--case-timeout", type=int, default=240)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case == "train":
        return train_case(args)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --cpu for the tiny CPU version")
    sizes, skip = Sizes(args.cpu), set(args.skip.split(","))
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    sections = [("train", lambda: training_rows(args)), ("gram", lambda: gram_rows(sizes)),
                ("fused", lambda: fused_sampling_rows(sizes)), ("onestep", lambda: one_step_rows(sizes))]
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sections += [("determinism", lambda: determinism_rows(Path(tmp) / "determinism")),
                     ("pipeline", lambda: pipeline_rows(Path(tmp) / "pipeline"))]
        for name, section in sections:
            if name in skip:
                continue
            started = time.perf_counter()
            rows += section()
            print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    table = [f"GPU check on {device} ({'tiny CPU sizes' if args.cpu else sizes.preset + ', bf16'}), "
             f"torch {torch.__version__}, {time.perf_counter() - t0:.0f} s in all", "",
             "| check | result |", "|---|---|", *[f"| {name} | {result} |" for name, result in rows]]
    text = "\n".join(table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if any("FAILED" in result or "DIFFERENT" in result for _, result in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
