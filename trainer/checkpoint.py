"""Atomic, verified checkpoints with rotation and fall-back.

Layout of one checkpoint, `checkpoints/ckpt-<step>/`:
  Accelerate's save_state files: model weights (safetensors), optimizer, scaler, every rank's RNG
    state (loaded back with weights_only=True); under DeepSpeed, every rank's shard.
  ema-<name>.safetensors   the EMA weights
  state.json               step, images seen, the data stream position, counters
  checkpoint.json          written last: size and sha256 of every file above

Every rank calls save (DeepSpeed writes a shard per rank, and save_state on rank 0 alone hangs).
Files go to a temporary directory that is renamed into place only when complete, so a crash mid-save
leaves the previous checkpoints untouched.

On load, a checkpoint is used only if every file is there with its recorded size and hash AND loads as what it
must be: weights with the modules' tensor names and shapes, optimizer states with their parameter groups,
every rank's random-number states, the engine's state.json. Accelerate itself would skip random states it
cannot read, and a forged file with a rewritten checksum would otherwise load, and the resume would no longer
be the run it claims to continue. So everything is read and checked first, on every rank (the same files, the
same verdict), and only then loaded: a checkpoint is never partly loaded. A failing one is named in one warning
and the previous one is used. (DeepSpeed's own shard files are checked by hash only: DeepSpeed reads them.)
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from shards.atomic import make_readable, sha256_file, write_atomically
from shards.errors import CheckpointError


def _write_json(path: Path, obj) -> None:
    write_atomically(path, json.dumps(obj, indent=1).encode())


class Checkpointer:
    def __init__(self, directory: Path, accelerator, keep: int = 2, log=print):
        self.dir = Path(directory)
        self.acc = accelerator
        self.keep = max(2, keep)
        self.log = log

    def complete(self) -> list[Path]:
        """Renamed-into-place checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("ckpt-*"), reverse=True)

    def has(self, step: int) -> bool:
        """Whether a complete checkpoint of this step is in place (a stop right after a periodic checkpoint
        need not write it again)."""
        return (self.dir / f"ckpt-{step:09d}").is_dir()

    def save(self, step: int, state: dict, emas: dict) -> Path:
        final = self.dir / f"ckpt-{step:09d}"
        tmp = self.dir / f".tmp-ckpt-{step:09d}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)
        if self.acc.is_main_process:
            for name, module in emas.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp / f"ema-{name}.safetensors")
            _write_json(tmp / "state.json", state)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            for rel in files:  # safetensors writes 0600 files
                make_readable(tmp / rel)
            _write_json(tmp / "checkpoint.json", {"step": step, "files": files})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def verify(self, path: Path) -> str | None:
        """None if every file is present with its recorded size and hash, else what is wrong."""
        index = path / "checkpoint.json"
        try:
            files = json.loads(index.read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{index}: unreadable ({e.__class__.__name__})"
        for rel, meta in files.items():
            p = path / rel
            if not p.is_file():
                return f"{p} is missing"
            if p.stat().st_size != meta["size"]:
                return f"{p} is truncated ({p.stat().st_size} of {meta['size']} bytes)"
            if sha256_file(p) != meta["sha256"]:
                return f"{p} is corrupt (sha256 mismatch)"
        return None

    def problem(self, path: Path, emas: dict, state_keys) -> str | None:
        """None if the checkpoint can be loaded whole, else what is wrong with it, naming the file."""
        wrong = self.verify(path)
        if wrong:
            return wrong
        models = [self.acc.unwrap_model(m) for m in self.acc._models]
        optimizers = [getattr(o, "optimizer", o) for o in self.acc._optimizers]
        expected = {**{f"model{'' if i == 0 else f'_{i}'}.safetensors": m.state_dict() for i, m in enumerate(models)},
                    **{f"ema-{name}.safetensors": m.state_dict() for name, m in emas.items()}}
        if self.acc.distributed_type.value == "DEEPSPEED":
            expected = {k: v for k, v in expected.items() if k.startswith("ema-")}
        for name, tensors in expected.items():
            wrong = _check(path / name, lambda f, want=tensors: _same_tensors(load_file(f), want))
            if wrong:
                return wrong
        if self.acc.distributed_type.value != "DEEPSPEED":
            for i, optimizer in enumerate(optimizers):
                wrong = _check(path / f"optimizer{'' if i == 0 else f'_{i}'}.bin",
                               lambda f, want=optimizer: _same_groups(accelerate_load(f), want))
                if wrong:
                    return wrong
        for rank in range(self.acc.num_processes):
            wrong = _check(path / f"random_states_{rank}.pkl", lambda f: _random_states(accelerate_load(f)))
            if wrong:
                return wrong
        return _check(path / "state.json", lambda f: _state(json.loads(f.read_text()), state_keys))

    def load_latest(self, emas: dict, state_keys=()) -> dict | None:
        """Restore the newest usable checkpoint into the prepared objects; its state.json, or None."""
        for path in self.complete():
            wrong = self.problem(path, emas, state_keys)
            if wrong:
                self.log(f"warning: skipping checkpoint {path.name}: {wrong}; trying the previous one")
                continue
            return self._restore(path, emas)
        if self.complete():
            raise CheckpointError(f"no usable checkpoint in {self.dir}: every one failed its checks "
                                  "(see the warnings above); move the directory away to start over")
        return None

    def load(self, path: Path, emas: dict, state_keys=()) -> dict:
        """Restore the checkpoint `path` (train.resume=PATH), checked first; its state.json."""
        wrong = self.problem(Path(path), emas, state_keys)
        if wrong:
            raise CheckpointError(f"train.resume: checkpoint {path} cannot be used: {wrong}")
        return self._restore(Path(path), emas)

    def _restore(self, path: Path, emas: dict) -> dict:
        self.acc.load_state(str(path))
        for name, module in emas.items():
            module.load_state_dict(load_file(Path(path) / f"ema-{name}.safetensors"))
        state = json.loads((Path(path) / "state.json").read_text())
        self.log(f"resumed from {path} (step {state['step']}, {state['nimg'] / 1000:.1f} kimg)")
        return state


def _check(path: Path, test) -> str | None:
    """None if `test(path)` passes, else one line naming the file and what it is not."""
    try:
        wrong = test(path)
    except Exception as error:  # torch.load, safetensors and json each fail with their own types
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return f"{path} cannot be loaded ({type(error).__name__}{': ' + reason if reason else ''})"
    return f"{path} {wrong}" if wrong else None


def _same_tensors(got: dict, want: dict) -> str | None:
    if set(got) != set(want):
        return f"holds other tensors than the model ({len(set(got) ^ set(want))} names differ)"
    shapes = [k for k in want if tuple(got[k].shape) != tuple(want[k].shape) or got[k].dtype != want[k].dtype]
    return f"has other shapes or types than the model ({shapes[0]})" if shapes else None


def _same_groups(state, optimizer) -> str | None:
    if not isinstance(state, dict) or not {"state", "param_groups"} <= state.keys():
        return "is not an optimizer state"
    counts = [len(g["params"]) for g in state["param_groups"]]
    if counts != [len(g["params"]) for g in optimizer.param_groups]:
        return f"has parameter groups {counts}, the optimizer {[len(g['params']) for g in optimizer.param_groups]}"
    return None


def _random_states(states) -> str | None:
    """Each generator's state must be one it accepts: set them on fresh generators, not on the real ones."""
    if not isinstance(states, dict):
        return "is not a set of random-number states"
    random.Random().setstate(states["random_state"])
    np.random.RandomState().set_state(states["numpy_random_seed"])
    torch.Generator().set_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" not in states:
        return "has no CUDA random states"
    return None


def _state(state, keys) -> str | None:
    missing = [k for k in keys if not isinstance(state.get(k) if isinstance(state, dict) else None, (int, float))]
    return f"lacks {', '.join(missing)}" if missing else None
