"""Atomic, verified checkpoints with rotation and fall-back.

Layout of one checkpoint, `checkpoints/ckpt-<step>/`:
  Accelerate's save_state files: model weights (safetensors), optimizer, scaler, every rank's RNG
    state (loaded back with weights_only=True); under DeepSpeed, every rank's shard.
  ema-<name>.safetensors   the EMA weights
  state.json               step, images seen, the data stream position, counters
  checkpoint.json          written last: size and sha256 of every file above

Every rank calls save (DeepSpeed writes a shard per rank, and save_state on rank 0 alone hangs).
Files go to a temporary directory that is renamed into place only when complete, so a crash mid-save
leaves the previous checkpoints untouched. On load, a newest checkpoint that fails verification is
reported and the previous one is used.
"""
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from shards.atomic import sha256_file, write_atomically
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

    def load_latest(self, emas: dict) -> dict | None:
        """Restore the newest good checkpoint into the prepared objects; its state.json, or None."""
        for path in self.complete():
            problem = self.verify(path)
            if problem:
                self.log(f"warning: skipping checkpoint {path.name}: {problem}; trying the previous one")
                continue
            self.acc.load_state(str(path))
            for name, module in emas.items():
                module.load_state_dict(load_file(path / f"ema-{name}.safetensors"))
            state = json.loads((path / "state.json").read_text())
            self.log(f"resumed from {path} (step {state['step']}, {state['nimg'] / 1000:.1f} kimg)")
            return state
        if self.complete():
            raise CheckpointError(f"no usable checkpoint in {self.dir}: every one failed verification "
                                  "(see the warnings above); move the directory away to start over")
        return None
