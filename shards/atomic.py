"""Files written whole or not at all, and their hashes: every file a stage leaves for another (shards,
manifests, checkpoints, models, reports, cached statistics) goes through these, so an interrupted write
leaves the previous version intact and a damaged file is recognised."""
import hashlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """Give a file the mode a plain open() would (0644 under umask 022): for files other libraries write
    with 0600 (safetensors does), which the rest of a group could not read."""
    os.chmod(path, 0o666 & ~_umask())


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, flush it to disk, then rename it into place (atomic
    on POSIX). The file gets the mode a plain open() would give it (0644 under umask 022): mkstemp makes
    0600 files, and results a group cannot read are of little use on a shared cluster."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def sha256_file(path) -> str:
    """The sha256 of a file, read in blocks: how shards, checkpoints and feature weights are verified."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
