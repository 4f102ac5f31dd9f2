"""The fuse stage's Gram pass at the paper's largest target (n = 16,384): images/s and peak memory, streamed from
the shards as the stage reads them (shards.stream.population_batches: one shard read at a time, one batch
decoded) against the same pass over the target read whole into memory first.

Writes an MNIST-shaped IDX set of random 28x28 grey images in a temporary directory, prepares it at 16x16 (the
tiny network's size; a target of n images), then times one pass of trainer.lambda_fit.accumulate_gram over K
`tiny` networks (untrained: the pass costs the same). Each variant runs in a fresh process; its peak memory is the process's resident set
(Linux /proc: VmHWM, reset through /proc/self/clear_refs once the networks are built), reported above the
resident set at the start of the pass.

    python bench/gram_pass.py                    # n = 16,384, K = 4, 1 draw per image, batch 512
    python bench/gram_pass.py --tiny             # smoke test: n = 64, batch 16 (no measurement)
"""
import argparse
import gzip
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from shards.prepare import prepare  # noqa: E402
from shards.sources import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC  # noqa: E402
from shards.spec import DataSpec, PopulationSpec, SourceSpec  # noqa: E402
from shards.stream import population_batches, read_population  # noqa: E402
from stages.fuse import target_batches  # noqa: E402
from trainer.edm import Denoiser  # noqa: E402
from trainer.fused_denoiser import FusedDenoiser  # noqa: E402
from trainer.lambda_fit import accumulate_gram, objective_of  # noqa: E402
from trainer.spec import EDMSpec  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

SIZE, IMAGE_SIZE, CLASSES = 28, 16, 10  # IDX images as MNIST's; prepared at the tiny network's size
UNIFORM = {str(c): 1 / CLASSES for c in range(CLASSES)}


def write_idx_set(directory: Path, train: int, test: int) -> None:
    """Random images, labels cycling through the classes: the four gzipped files of an IDX set."""
    rng = np.random.default_rng(0)
    for (images_name, labels_name), count in zip(IDX_FILES.values(), (train, test)):
        images = rng.integers(0, 256, size=(count, SIZE, SIZE), dtype=np.uint8)
        labels = (np.arange(count) % CLASSES).astype(np.uint8)
        for name, magic, array in ((images_name, IDX_IMAGES_MAGIC, images), (labels_name, IDX_LABELS_MAGIC, labels)):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (directory / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))


def memory_kib(field: str) -> int:
    """A line of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(label: str, batches_of, fused, draws: int, n: int) -> str:
    """One Gram pass over `batches_of()`; its table row (images/s, peak resident memory above the start)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    start = memory_kib("VmRSS")
    edm = EDMSpec()
    objective = objective_of("edm", edm.p_mean, edm.p_std, edm.sigma_data)
    t0 = time.perf_counter()
    stats = accumulate_gram(fused, target_batches(batches_of(), seed=0), draws, objective)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(stats.A).all()
    peak = memory_kib("VmHWM")
    return (f"| {label} | {n} | {n / seconds:.0f} | {seconds:.1f} | {(peak - start) / 1024:.1f} | "
            f"{peak / 1024:.0f} |")


def fused_networks(k: int) -> FusedDenoiser:
    torch.manual_seed(0)
    return FusedDenoiser([Denoiser(build_unet("tiny", IMAGE_SIZE, 1)) for _ in range(k)], torch.full((k,), 1 / k),
                         batched=False)


VARIANTS = {  # label -> the pass's batches, from the data directory and the batch size
    "streamed from the shards (the fuse stage)": lambda data, batch: population_batches(data, "target", batch),
    "read whole first": lambda data, batch: enumerate(read_population(data, "target")[0].split(batch)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="target images")
    p.add_argument("--k", type=int, default=4, help="auxiliary networks (the paper's four)")
    p.add_argument("--draws", type=int, default=1, help="(sigma, noise) draws per image")
    p.add_argument("--batch", type=int, default=512, help="fuse.batch")
    p.add_argument("--tiny", action="store_true", help="smoke test: n = 64, batch 16")
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # a variant's own process: its index in VARIANTS
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.n, args.batch = 64, 16
    if args.measure is not None:
        label, batches = list(VARIANTS.items())[args.measure]
        print(measure(label, lambda: batches(args.data, args.batch), fused_networks(args.k), args.draws, args.n))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "idx").mkdir()
        write_idx_set(tmp / "idx", train=args.n + CLASSES, test=CLASSES)
        spec = DataSpec(source=SourceSpec(kind="idx", path=str(tmp / "idx"), image_size=IMAGE_SIZE),
                        aux=[PopulationSpec(name="aux", mixture=UNIFORM, count=CLASSES, seed=1)],
                        reference=PopulationSpec(name="reference", mixture=UNIFORM, count=CLASSES, seed=2,
                                                 split="test"),
                        target=PopulationSpec(name="target", mixture=UNIFORM, count=args.n, seed=3),
                        min_shards=8, max_shard_images=1000)
        t0 = time.perf_counter()
        prepare(spec, tmp / "data", log=lambda line: None)
        prepared = time.perf_counter() - t0
        # each variant in a fresh process, so that neither inherits the other's allocations
        settings = ["--data", str(tmp / "data"), "--n", str(args.n), "--k", str(args.k), "--draws", str(args.draws),
                    "--batch", str(args.batch)]
        rows = [subprocess.run([sys.executable, __file__, "--measure", str(i), *settings], check=True,
                               stdout=subprocess.PIPE, text=True).stdout.strip() for i in range(len(VARIANTS))]
    print(f"\nGram pass: K = {args.k} tiny networks, {args.draws} draw(s) per image, batch {args.batch}, "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} grey (the target: {args.n * IMAGE_SIZE ** 2 / 2 ** 20:.1f} MiB as uint8), "
          f"torch threads {torch.get_num_threads()}; prepare of the target took {prepared:.1f} s"
          + (" (--tiny: a smoke test, not a measurement)" if args.tiny else ""))
    print("| pass | n | images/s | seconds | peak memory above the start, MiB | peak resident, MiB |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
