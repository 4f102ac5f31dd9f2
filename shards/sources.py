"""Image sources: the datasets populations are drawn from, behind one small interface.

A Source knows its class names, the label of every item of each split, and can load any items by index as
uint8 [N, H, W, C] already resized to the configured image size. Items are addressed by their position in
a split, which is stable for a given dataset file, so a manifest can name them (`train-0001234`).
Loading is lazy and by index, so a large LSUN category is never held in memory at once.
"""
import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shards.errors import DataError
from shards.spec import SourceSpec

CIFAR10_MEMBER_DIR = "cifar-10-batches-py"
CIFAR10_SPLIT_MEMBERS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


@dataclass
class Source:
    """Base of all sources. Subclasses fill `class_names`, `channels`, `splits` and implement
    `labels` and `_load_one`; `load` handles batching and the final resize."""
    image_size: int
    class_names: list = field(default_factory=list)
    channels: int = 3
    splits: list = field(default_factory=lambda: ["train"])

    def labels(self, split: str) -> np.ndarray:
        raise NotImplementedError

    def load(self, split: str, indices) -> np.ndarray:
        """uint8 [N, H, W, C] for the given item indices of `split`, at image_size x image_size."""
        self.check_split(split)
        images = [self._load_one(split, int(i)) for i in indices]
        shape = (self.image_size, self.image_size, self.channels)
        return np.stack(images) if images else np.zeros((0, *shape), np.uint8)

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DataError(f"unknown split '{split}' for a {type(self).__name__}; "
                            f"it has: {', '.join(self.splits)}")

    def _load_one(self, split: str, index: int) -> np.ndarray:
        raise NotImplementedError


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Center-crop a PIL image to a square, resize it and return uint8 [H, W, C].

    Shrinking uses area averaging (Image.BOX), which does not alias; enlarging uses bicubic.
    """
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        resample = Image.BOX if side > image_size else Image.BICUBIC
        image = image.resize((image_size, image_size), resample=resample)
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)


def decode_image(data: bytes, image_size: int, channels: int, where: str) -> np.ndarray:
    """Decode encoded image bytes (any PIL format); `where` names the file/key in the error."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_array(image, image_size, channels)
    except Exception as error:  # PIL raises many types for bad data
        raise DataError(f"cannot decode image {where}: {error}") from error


@dataclass
class DigitsSource(Source):
    """sklearn's embedded 8x8 handwritten digits (1,797 images, values 0..16); needs no download."""
    channels: int = 1

    def __post_init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.class_names = [str(c) for c in range(10)]
        self._images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self._labels = digits.target.astype(np.int64)

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels

    def _load_one(self, split: str, index: int) -> np.ndarray:
        image = Image.fromarray(self._images[index])
        if self.image_size != image.size[0]:
            # Bilinear keeps the upsampled strokes smooth without bicubic's ringing on 8x8 inputs.
            image = image.resize((self.image_size, self.image_size), resample=Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)[:, :, None]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches, which hold only numpy arrays, lists and bytes, and refuses any other
    global, so a tampered tarball cannot run code."""
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


@dataclass
class Cifar10Source(Source):
    """The CIFAR-10 python tarball (cifar-10-python.tar.gz), read directly without extracting it."""
    path: Path = None

    def __post_init__(self):
        self.splits = ["train", "test"]
        self._arrays = {}  # split -> (images uint8 [N, 32, 32, 3], labels int64 [N]), read on first use
        meta = self._read_members(["batches.meta"])[0]
        self.class_names = [name.decode() for name in meta[b"label_names"]]

    def _read_members(self, names):
        try:
            with tarfile.open(self.path, "r:*") as archive:
                return [self._unpickle(archive, f"{CIFAR10_MEMBER_DIR}/{name}") for name in names]
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"cannot read the CIFAR-10 tarball {self.path}: {error}") from error

    def _unpickle(self, archive, member):
        try:
            handle = archive.extractfile(member)
        except KeyError:
            raise DataError(f"{self.path} is not the CIFAR-10 python tarball: it has no {member}") from None
        try:
            return _ArrayUnpickler(handle, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise DataError(f"cannot read {member} in {self.path}: {error}") from error

    def _split_arrays(self, split):
        self.check_split(split)
        if split not in self._arrays:
            batches = self._read_members(CIFAR10_SPLIT_MEMBERS[split])
            data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
            # Rows are three 32x32 planes (R, G, B); the rest of the system works in HWC.
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
            self._arrays[split] = (images, labels)
        return self._arrays[split]

    def labels(self, split: str) -> np.ndarray:
        return self._split_arrays(split)[1]

    def _load_one(self, split: str, index: int) -> np.ndarray:
        image = self._split_arrays(split)[0][index]
        if self.image_size == 32:
            return image
        return to_array(Image.fromarray(image), self.image_size, 3)


@dataclass
class LsunSource(Source):
    """LSUN categories as distributed: `<category>_train_lmdb` directories of encoded images.

    Items of the "train" split are all keys of the first category in key order, then the second, ...;
    the key list is read once (as EDM's dataset_tool does) so any item can be fetched by index.
    """
    path: Path = None
    categories: list = field(default_factory=list)

    def __post_init__(self):
        import lmdb

        if not self.categories:
            raise DataError(f"an lsun source needs data.source.categories (the lmdb names under {self.path})")
        self.class_names = list(self.categories)
        self._envs, self._keys = [], []
        for category in self.categories:
            lmdb_dir = self.path / f"{category}_train_lmdb"
            if not lmdb_dir.is_dir():
                raise DataError(f"LSUN category '{category}' has no lmdb: {lmdb_dir} does not exist")
            try:
                env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=False, max_readers=64)
                with env.begin(write=False) as txn:
                    keys = list(txn.cursor().iternext(keys=True, values=False))
            except lmdb.Error as error:
                raise DataError(f"cannot open the lmdb {lmdb_dir}: {error}") from error
            if not keys:
                raise DataError(f"the lmdb {lmdb_dir} holds no images")
            self._envs.append(env)
            self._keys.append(keys)
        sizes = [len(keys) for keys in self._keys]
        self._starts = np.cumsum([0] + sizes)
        self._labels = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels

    def _load_one(self, split: str, index: int) -> np.ndarray:
        category = int(self._labels[index])
        key = self._keys[category][index - self._starts[category]]
        with self._envs[category].begin(write=False) as txn:
            data = txn.get(key)
        where = f"key {key.decode(errors='replace')} in {self.path / (self.categories[category] + '_train_lmdb')}"
        return decode_image(data, self.image_size, 3, where)


@dataclass
class FolderSource(Source):
    """A directory with one sub-directory of images per class; sorted directory names are the classes."""
    path: Path = None

    def __post_init__(self):
        class_dirs = sorted(p for p in self.path.iterdir() if p.is_dir())
        if not class_dirs:
            raise DataError(f"the image folder {self.path} has no class sub-directories")
        extensions = set(Image.registered_extensions())
        self.class_names = [d.name for d in class_dirs]
        self._files, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in extensions)
            if not files:
                raise DataError(f"the class folder {class_dir} holds no images")
            self._files.extend(files)
            labels.extend([label] * len(files))
        self._labels = np.asarray(labels, dtype=np.int64)

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels

    def _load_one(self, split: str, index: int) -> np.ndarray:
        file = self._files[index]
        return decode_image(file.read_bytes(), self.image_size, 3, str(file))


SOURCE_KINDS = {"digits": DigitsSource, "cifar10": Cifar10Source, "lsun": LsunSource, "folder": FolderSource}


def open_source(spec: SourceSpec) -> Source:
    """Open the source a SourceSpec describes; DataError (naming the path or kind) if it cannot be used."""
    if spec.kind not in SOURCE_KINDS:
        raise DataError(f"unknown data.source.kind '{spec.kind}'; choose one of: {', '.join(SOURCE_KINDS)}")
    if spec.image_size < 1:
        raise DataError(f"data.source.image_size must be positive, got {spec.image_size}")
    if spec.kind == "digits":
        return DigitsSource(image_size=spec.image_size)
    if not spec.path:
        raise DataError(f"a {spec.kind} source needs data.source.path")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"data.source.path {path} does not exist")
    if spec.kind == "cifar10":
        return Cifar10Source(image_size=spec.image_size, path=path)
    if not path.is_dir():
        raise DataError(f"data.source.path {path} must be a directory for a {spec.kind} source")
    if spec.kind == "lsun":
        return LsunSource(image_size=spec.image_size, path=path, categories=list(spec.categories))
    return FolderSource(image_size=spec.image_size, path=path)
