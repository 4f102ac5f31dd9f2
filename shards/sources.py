"""Image sources: the datasets populations are drawn from, behind one small interface.

A Source knows its class names, its number of channels, the label of every item of each split, and loads
any one item by index as uint8 [H, W, C], already resized to the configured image size and converted to
its channels. Items are addressed by their position in a split, which is stable for a given dataset file,
so a manifest can name them (`train-0001234`). Loading is lazy and by index, so a large LSUN category is
never held in memory at once.

Channels (data.source.channels): auto keeps grey sources grey: digits and IDX files are 1, CIFAR-10 and LSUN 3, and a
folder is 1 when every image in it is grey (judged from the file headers, see is_grey), else 3. 1 or 3
forces it: grey is replicated into RGB, colour becomes PIL's "L" (ITU-R 601-2 luma).

An item whose stored bytes do not decode (a corrupt file in a folder, a bad lmdb value) raises
UndecodableItem, which prepare counts and skips; CIFAR-10, IDX files and digits are arrays and cannot be bad
item by item: a damaged file is refused whole.
"""
import gzip
import io
import math
import pickle
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shards.errors import DataError, UndecodableItem
from shards.spec import SourceSpec

CHANNELS = {"auto": 0, "1": 1, "3": 3}  # data.source.channels -> Source.channels (0: the source decides)
# PIL modes of one channel of intensity, alpha aside: binary, 8-bit, 16-bit, 32-bit integer and float grey.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
CIFAR10_MEMBER_DIR = "cifar-10-batches-py"
CIFAR10_SPLIT_MEMBERS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
# The IDX files of an MNIST-style dataset under their usual names, each also accepted gzipped (name + ".gz").
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


@dataclass
class Source:
    """Base of all sources. Subclasses fill `class_names` and `splits`, resolve `channels` 0 (auto) to
    their own 1 or 3, and implement `labels` and `_load_one`."""
    image_size: int
    channels: int = 0
    class_names: list = field(default_factory=list)
    splits: list = field(default_factory=lambda: ["train"])

    def labels(self, split: str) -> np.ndarray:
        raise NotImplementedError

    def load(self, split: str, index: int) -> np.ndarray:
        """uint8 [image_size, image_size, channels] of item `index` of `split`; UndecodableItem if its
        stored bytes are not an image."""
        self.check_split(split)
        return self._load_one(split, int(index))

    def native_size(self) -> int | None:
        """The side of the source's own square images, where they all share one; None where they vary (a folder,
        LSUN). An image_size above it upsamples: the extra dimensions are near-deterministic functions of the
        native ones, and a likelihood per dimension weighs them as much."""
        return None

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DataError(f"unknown split '{split}' for a {type(self).__name__}; "
                            f"it has: {', '.join(self.splits)}")

    def _load_one(self, split: str, index: int) -> np.ndarray:
        raise NotImplementedError


def is_grey(image: Image.Image) -> bool:
    """Whether an opened image holds one channel of intensity, judged from its header (no pixel is read):
    the GREY_MODES, and palette images whose palette is all grey (a grey GIF or PNG stored as P). An RGB
    file is colour even if its pixels happen to be grey."""
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return palette[0::3] == palette[1::3] == palette[2::3]
    return image.mode in GREY_MODES


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Center-crop a PIL image to a square, resize it and return uint8 [H, W, C].

    Shrinking uses area averaging (Image.BOX), which does not alias; enlarging uses bicubic. 16-bit grey is
    scaled to 8 bits (PIL's own conversion would clip everything above 255 to white); 32-bit and float grey
    are clipped to 0..255, as PIL converts them.
    """
    if image.mode.startswith("I;16"):
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))
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
    """Decode encoded image bytes (any PIL format); UndecodableItem, naming `where` (the file or key), if
    they are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_array(image, image_size, channels)
    except Image.UnidentifiedImageError:  # its message holds the BytesIO's memory address: not repeatable
        raise UndecodableItem(f"cannot decode image {where}: not an image format PIL reads") from None
    except Exception as error:  # PIL raises many types for bad data
        raise UndecodableItem(f"cannot decode image {where}: {type(error).__name__}: {error}") from error


@dataclass
class DigitsSource(Source):
    """sklearn's embedded 8x8 handwritten digits (1,797 images, values 0..16); needs no download."""

    def __post_init__(self):
        from sklearn.datasets import load_digits

        self.channels = self.channels or 1
        digits = load_digits()
        self.class_names = [str(c) for c in range(10)]
        self._images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self._labels = digits.target.astype(np.int64)

    def native_size(self) -> int:
        return 8

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels

    def _load_one(self, split: str, index: int) -> np.ndarray:
        image = Image.fromarray(self._images[index])
        if self.image_size != image.size[0]:
            # Bilinear keeps the upsampled strokes smooth without bicubic's ringing on 8x8 inputs.
            image = image.resize((self.image_size, self.image_size), resample=Image.BILINEAR)
        image = image.convert("L" if self.channels == 1 else "RGB")
        return np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)


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
        self.channels = self.channels or 3
        self.splits = ["train", "test"]
        self._arrays = {}  # split -> (images uint8 [N, 32, 32, 3], labels int64 [N]), read on first use
        meta = self._read_members(["batches.meta"])[0]
        self.class_names = [name.decode() for name in meta[b"label_names"]]

    def native_size(self) -> int:
        return 32

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
        if self.image_size == 32 and self.channels == 3:
            return image
        return to_array(Image.fromarray(image), self.image_size, self.channels)


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
        self.channels = self.channels or 3
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
        return decode_image(data, self.image_size, self.channels, where)


@dataclass
class FolderSource(Source):
    """A directory with one sub-directory of images per class; sorted directory names are the classes.
    Files with an image extension PIL knows are the items, in sorted order within each class."""
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
        self.channels = self.channels or (1 if self._all_grey() else 3)

    def _all_grey(self) -> bool:
        """Whether every image file in the folder is grey (is_grey); a file that does not open has no say
        (prepare skips it when it is drawn)."""
        for file in self._files:
            try:
                with Image.open(file) as image:
                    if not is_grey(image):
                        return False
            except Exception:  # PIL raises many types for bad data
                continue
        return True

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels

    def _load_one(self, split: str, index: int) -> np.ndarray:
        file = self._files[index]
        try:
            data = file.read_bytes()
        except OSError as error:
            raise UndecodableItem(f"cannot read {file}: {error.strerror}") from error
        return decode_image(data, self.image_size, self.channels, str(file))


def idx_file(directory: Path, name: str) -> Path:
    """The IDX file `name` in `directory`, or its gzipped copy; DataError naming both if neither is there."""
    for path in (directory / name, directory / f"{name}.gz"):
        if path.is_file():
            return path
    raise DataError(f"the idx source {directory} has no {name} (nor {name}.gz)")


def read_idx(path: Path, magic: int, header_only: bool = False):
    """The dimensions of an IDX file of unsigned bytes (header_only), or its array uint8 [*dimensions]. One
    DataError naming the file for a wrong magic number (another element type or number of dimensions, or not
    IDX at all), a file shorter or longer than its header says, or a damaged gzip stream."""
    ndim = magic & 0xFF
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or int.from_bytes(head, "big") != magic:
                found = f"0x{int.from_bytes(head, 'big'):08x}" if len(head) == 4 else f"{len(head)} bytes"
                raise DataError(f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes: its magic number "
                                f"is {found}, expected 0x{magic:08x}")
            raw = handle.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise DataError(f"{path} is truncated: its header ends after {4 + len(raw)} bytes")
            dims = tuple(int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in range(ndim))
            if header_only:
                return dims
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {error}") from None
    expected = math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is {state}: its header says {' x '.join(map(str, dims))} = {expected} bytes of "
                        f"data, it holds {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


@dataclass
class IdxSource(Source):
    """An MNIST-style dataset as IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST): a directory holding the
    train and t10k image and label files under their usual names (IDX_FILES), each plain or gzipped.

    The labels and the image headers are read and checked when the source opens (so a missing file, a wrong
    magic number or an image count that differs from its label count stops prepare before it writes); each
    split's images are read whole on first use, and checked against their header then. Class names are
    `categories` in label order, or the label numbers ("0", "1", ...) without them.
    """
    path: Path = None
    categories: list = field(default_factory=list)

    def __post_init__(self):
        self.channels = self.channels or 1
        self.splits = list(IDX_FILES)
        self._files = {split: [idx_file(self.path, name) for name in names] for split, names in IDX_FILES.items()}
        self._labels, self._images, self._sides = {}, {}, set()
        for split, (images, labels) in self._files.items():
            count, rows, cols = read_idx(images, IDX_IMAGES_MAGIC, header_only=True)
            self._sides.add((rows, cols))
            self._labels[split] = read_idx(labels, IDX_LABELS_MAGIC).astype(np.int64)
            if len(self._labels[split]) != count:
                raise DataError(f"{images} holds {count} images but {labels} holds {len(self._labels[split])} labels")
            if min(rows, cols) < 1:
                raise DataError(f"{images} holds images of {rows} x {cols} pixels")
        top = max(int(labels.max(initial=0)) for labels in self._labels.values())
        if not self.categories:
            self.class_names = [str(label) for label in range(top + 1)]
        elif len(set(self.categories)) != len(self.categories) or len(self.categories) <= top:
            raise DataError(f"data.source.categories must name each label of the idx source {self.path} (0 to {top}) "
                            f"once, in label order; it names {len(self.categories)}: {', '.join(self.categories)}")
        else:
            self.class_names = list(self.categories)

    def native_size(self) -> int | None:
        (rows, cols), *others = self._sides
        return rows if rows == cols and not others else None

    def labels(self, split: str) -> np.ndarray:
        self.check_split(split)
        return self._labels[split]

    def _load_one(self, split: str, index: int) -> np.ndarray:
        if split not in self._images:
            self._images[split] = read_idx(self._files[split][0], IDX_IMAGES_MAGIC)
        image = self._images[split][index]
        if image.shape == (self.image_size, self.image_size) and self.channels == 1:
            return image[:, :, None]
        return to_array(Image.fromarray(image), self.image_size, self.channels)


SOURCE_KINDS = {"digits": DigitsSource, "cifar10": Cifar10Source, "lsun": LsunSource, "folder": FolderSource,
                "idx": IdxSource}


def open_source(spec: SourceSpec) -> Source:
    """Open the source a SourceSpec describes; DataError (naming the path or kind) if it cannot be used."""
    if spec.kind not in SOURCE_KINDS:
        raise DataError(f"unknown data.source.kind '{spec.kind}'; choose one of: {', '.join(SOURCE_KINDS)}")
    if spec.image_size < 1:
        raise DataError(f"data.source.image_size must be positive, got {spec.image_size}")
    if str(spec.channels) not in CHANNELS:
        raise DataError(f"data.source.channels: {spec.channels!r} is not {' | '.join(CHANNELS)}")
    channels = CHANNELS[str(spec.channels)]
    if spec.kind == "digits":
        return DigitsSource(image_size=spec.image_size, channels=channels)
    if not spec.path:
        raise DataError(f"a {spec.kind} source needs data.source.path")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"data.source.path {path} does not exist")
    if spec.kind == "cifar10":
        return Cifar10Source(image_size=spec.image_size, channels=channels, path=path)
    if not path.is_dir():
        raise DataError(f"data.source.path {path} must be a directory for a {spec.kind} source")
    if spec.kind == "lsun":
        return LsunSource(image_size=spec.image_size, channels=channels, path=path,
                          categories=list(spec.categories))
    if spec.kind == "idx":
        return IdxSource(image_size=spec.image_size, channels=channels, path=path, categories=list(spec.categories))
    return FolderSource(image_size=spec.image_size, channels=channels, path=path)
