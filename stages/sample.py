"""sample: images of any finished model of a run, as the report scored them.

`out` says what to write by its suffix: .npz (uint8 NHWC array `images`), .png (one grid), anything else a
directory of one PNG per image. The default is runs/<name>/samples/<model>/.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.grid import save_png
from shards.atomic import write_atomically
from shards.errors import ConfigError
from shards.manifest import image_shape, load_manifest
from stages.catalogue import draw, find
from stages.config import RunConfig
from stages.rundir import RunDir


def command(cfg: RunConfig, args: dict, invocation) -> None:
    """`scorefuse sample model=LABEL n=N [out=...]`."""
    if not args["n"].isdigit():
        raise ConfigError(f"n={args['n']}: the number of images must be a positive whole number")
    run(cfg, args["model"], int(args["n"]), args.get("out"))


def run(cfg: RunConfig, model: str, n: int, out: str | None = None) -> Path:
    """n samples of `model` (a report label) -> `out`; returns the path written."""
    import torch
    if n < 1:
        raise ConfigError(f"n={n}: need at least one sample")
    run_dir = RunDir.of(cfg)
    entry = find(cfg, model)
    shape = image_shape(load_manifest(run_dir.data))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = entry.load().to(device)
    images = draw(entry.sampler(network, cfg), cfg, range(n), shape, device)
    path = Path(out) if out else run_dir.samples(model)
    if path.suffix == ".npz":
        import io
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images.permute(0, 2, 3, 1).numpy())
        write_atomically(path, buffer.getvalue())
    elif path.suffix == ".png":
        save_png(images, path, scale=max(1, 64 // shape[-1]))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path / f"{i:06d}.png")
    print(f"wrote {n} samples of {model} to {path}")
    return path
