"""Pretrained auxiliaries: a model that exists already, in the place of one trained on a population.

`data.aux` entries with `pretrained:` name a diffusers model (a directory written by save_pretrained, in a
pipeline's layout with unet/ and scheduler/ or the model's own with scheduler_config.json beside it; or a hub id
with `revision` and `subfolder`, through diffusers' own from_pretrained) wrapped as an EDM denoiser
(trainer/pretrained.py), or a scorefuse export of any run (ema.safetensors + model.json). `train-aux` loads it
once, checks it against the run's images and records what it loaded in the auxiliary's directory (the source,
the sha256 of its weights, its schedule and sigma range); every later stage loads it through `load_recorded`,
which refuses weights that changed since. Refused, in one line: pickled networks (never unpickled), a model of
another image shape, a schedule or prediction type the wrapper does not handle, a directory that is no model,
a hub id that is not cached while the hub cannot be reached.
"""
import hashlib
import json
import os
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from shards.atomic import write_atomically
from shards.errors import CheckpointError, ConfigError, ModelError
from shards.spec import AuxSpec
from trainer.export import has_denoiser, load_denoiser
from trainer.pretrained import from_diffusers

# what torch.save, pickle and NVlabs' EDM write: loading any of them runs code
PICKLES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_CLASS = "UNet2DModel"


def load_pretrained(aux: AuxSpec, shape: tuple[int, int, int], layout: tuple | None = None) -> tuple[nn.Module, dict]:
    """(the denoiser in eval mode, its record) of a pretrained auxiliary whose images must be `shape` (C, H, W).
    `layout`: the (model, scheduler) subfolders of a diffusers model, when a record already found them."""
    where = f"data.aux {aux.name}: pretrained={aux.pretrained}"
    path = Path(aux.pretrained).expanduser()
    if path.suffix.lower() in PICKLES:
        raise ConfigError(f"{where} is a pickle, which runs code when loaded and is refused; export its weights "
                          "to safetensors (save_pretrained, or a scorefuse export)")
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent  # a scorefuse export's weights: its model.json is beside them
    if path.is_dir() and has_denoiser(path):
        denoiser, meta = load_denoiser(path)
        record = {"kind": "scorefuse", "model": meta, "sigma_range": None}
    elif path.is_dir() or (not path.exists() and HUB_ID.fullmatch(aux.pretrained)):
        denoiser, record = _diffusers(aux, where, local=path.is_dir(), layout=layout)
    elif path.exists():
        raise ConfigError(f"{where} is not a diffusers model directory, a scorefuse export or a hub id")
    else:
        raise ConfigError(f"{where}: no such file or directory, and not a hub id (owner/name)")
    if tuple(denoiser.image_shape) != tuple(shape):
        raise ConfigError(f"{where} makes {'x'.join(map(str, denoiser.image_shape))} images (channels x height x "
                          f"width) and the run's are {'x'.join(map(str, shape))}")
    record = {"name": aux.name, "pretrained": aux.pretrained, "revision": aux.revision, "timesteps": aux.timesteps,
              **record, "image_shape": list(shape), "parameters": sum(p.numel() for p in denoiser.parameters()),
              "weights_sha256": weights_sha256(denoiser)}
    return denoiser, record


def save_record(record: dict, path: Path) -> None:
    write_atomically(path, (json.dumps(record, indent=1) + "\n").encode())


def load_recorded(aux: AuxSpec, path: Path) -> nn.Module:
    """The recorded pretrained auxiliary, loaded again from its source; CheckpointError when there is no record
    or the weights are not the recorded ones."""
    if not Path(path).is_file():
        raise CheckpointError(f"auxiliary {aux.name}: no record of its pretrained model ({path}); "
                              f"run `scorefuse train-aux aux={aux.name}` first")
    record = json.loads(Path(path).read_text())
    recorded = [record[key] for key in ("pretrained", "revision", "timesteps")]
    if recorded != [aux.pretrained, aux.revision, aux.timesteps]:
        raise ConfigError(f"data.aux {aux.name}: pretrained={aux.pretrained}, revision={aux.revision}, timesteps="
                          f"{aux.timesteps}, but {path} recorded {', '.join(map(str, recorded))}; use another run "
                          f"name, or `scorefuse train-aux aux={aux.name} train.resume=none` (then fuse again)")
    layout = (record["subfolder"], record["scheduler_subfolder"]) if record["kind"] == "diffusers" else None
    denoiser, loaded = load_pretrained(aux, record["image_shape"], layout)
    if loaded["weights_sha256"] != record["weights_sha256"]:
        raise CheckpointError(f"auxiliary {aux.name}: the weights of {aux.pretrained} changed since they were "
                              f"recorded in {path}; run `scorefuse train-aux aux={aux.name} train.resume=none` "
                              "to record the new ones (the fits that used the old ones must be redone)")
    return denoiser


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a network's tensors (names, dtypes, shapes and values, in name order): the same for the same
    weights whatever file format, layout or cache they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- diffusers ------------------------------------------------------------------------------------------------

def _diffusers(aux: AuxSpec, where: str, local: bool, layout: tuple | None) -> tuple[nn.Module, dict]:
    """A diffusers UNet2DModel and its scheduler's config through diffusers' own loaders: from the directory, or
    from the hub (its local cache first, so that an offline node uses what was downloaded before)."""
    unreachable = (f"{where}: not in the local hub cache, and the hub ({_endpoint()}) could not be reached; download "
                   "it where there is internet (the same HF_HOME), or give the directory save_pretrained wrote")
    for local_files_only in ((True,) if local else (True, False)):
        try:
            with warnings.catch_warnings():
                # huggingface_hub's deprecation notices about the arguments diffusers passes it: not the user's
                warnings.filterwarnings("ignore", module="huggingface_hub")
                return _load_diffusers(aux, where, layout, local_files_only)
        except (_NotFound, OSError) as error:  # OSError: diffusers' (a file missing from the cache, a dropped
            if local_files_only and not local:  # connection, a gated model, a damaged file ...)
                if _hub_reachable():
                    continue  # not (all) in the hub cache: from the hub
                raise ConfigError(unreachable) from None
            if isinstance(error, _NotFound):
                raise ConfigError(f"{where}: {error}" + ("" if local else " on the hub")) from None
            if _connection_failed(error):
                raise ConfigError(unreachable) from None
            raise ConfigError(f"{where}: {str(error).strip().splitlines()[0]}") from None


class _NotFound(Exception):
    """No model, or no scheduler config, where one was looked for."""


def _load_diffusers(aux: AuxSpec, where: str, layout: tuple | None, local_files_only: bool):
    from diffusers import DDPMScheduler, UNet2DModel
    options = {"revision": aux.revision, "local_files_only": local_files_only}
    if layout is not None:
        model_folders, scheduler_folders = [layout[0]], [layout[1]]
    else:
        # the pipeline's layout (unet/, scheduler/) or the model's own (config.json, scheduler_config.json)
        model_folders = [aux.subfolder] if aux.subfolder else [None, "unet"]
        scheduler_folders = [*([aux.subfolder] if aux.subfolder else []), "scheduler", None]
    model_folder, config = _first_config(UNet2DModel, aux.pretrained, model_folders, options)
    if config is None:
        places = " or ".join(["in it" if f is None else f"in {f}/" for f in model_folders])
        raise _NotFound(f"not a diffusers model (no config.json {places}) nor a scorefuse export "
                        "(ema.safetensors + model.json)")
    if config.get("_class_name") != MODEL_CLASS:
        raise ModelError(f"{where} is a {config.get('_class_name')}; only {MODEL_CLASS} (unconditional DDPM) "
                         "models are handled")
    scheduler_folder, scheduler = _first_config(DDPMScheduler, aux.pretrained, scheduler_folders, options)
    if scheduler is None:
        raise _NotFound("no scheduler_config.json beside the model or in scheduler/: its noise schedule is unknown")
    try:
        denoiser = from_diffusers(UNet2DModel.from_pretrained(aux.pretrained, subfolder=model_folder, **options),
                                  scheduler, aux.timesteps)
    except ModelError as error:
        raise ModelError(f"{where}: {error}") from None
    schedule = {k: scheduler.get(k) for k in ("_class_name", "beta_schedule", "beta_start", "beta_end",
                                               "num_train_timesteps")}
    return denoiser, {"kind": "diffusers", "subfolder": model_folder, "scheduler_subfolder": scheduler_folder,
                      "class": MODEL_CLASS, "schedule": schedule, "prediction_type": denoiser.prediction,
                      "sigma_range": list(denoiser.sigma_range)}


def _first_config(cls, source: str, folders: list, options: dict):
    """(the first of `folders` holding a config of `cls`, that config), or (None, None) when none does."""
    for folder in folders:
        if Path(source).is_dir() and not (Path(source) / (folder or "") / cls.config_name).is_file():
            continue  # diffusers would take the directory's own config for a missing subfolder's
        try:
            return folder, dict(cls.load_config(source, subfolder=folder, **options))
        except (OSError, ValueError) as error:  # diffusers' "no file named ...", "... is not a local folder"
            if not options["local_files_only"] and _connection_failed(error):
                raise  # not a missing file: the hub could not be asked
            continue
    return None, None


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _connection_failed(error: BaseException) -> bool:
    """Whether an error of diffusers' loaders comes from not reaching the hub (huggingface_hub found the file
    neither there nor in its cache, or the connection failed), judged by the errors it was raised from."""
    while error is not None:
        if type(error).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError",
                                    "ConnectionError", "ConnectTimeout"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _hub_reachable() -> bool:
    """Whether a connection to the hub opens (within 5 s), unless HF_HUB_OFFLINE says it must not be tried. Behind
    a proxy the direct connection proves nothing: diffusers tries, and its error says what happened."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return True
    except OSError:
        return False
