"""Sources read the real on-disk formats (written here, small) back exactly."""
import gzip
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from shards.errors import DataError, UndecodableItem
from shards.sources import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, open_source
from shards.spec import SourceSpec

def load(source, split, indices):
    """uint8 [N, H, W, C] of the given items, loaded one by one."""
    return np.stack([source.load(split, index) for index in indices])


def write_folder(root, classes: dict):
    """An image folder: {class: [item, ...]}, item i saved as <class>/<i:02d>.png. An item is an RGB
    colour (an 8x8 image of it), a PIL image, or bytes written as they are."""
    for name, items in classes.items():
        (root / name).mkdir(parents=True)
        for number, item in enumerate(items):
            path = root / name / f"{number:02d}.png"
            if isinstance(item, bytes):
                path.write_bytes(item)
            elif isinstance(item, Image.Image):
                item.save(path)
            else:
                Image.new("RGB", (8, 8), tuple(item)).save(path)
    return root


def luma(red, green, blue):
    """PIL's RGB -> L conversion (ITU-R 601-2, fixed point), for expected values."""
    return (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def add_pickle(archive, name, obj, protocol):
    data = pickle.dumps(obj, protocol=protocol)
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_cifar_tarball(path, per_batch=3, protocol=2):
    """A cifar-10-python.tar.gz in the real layout; returns {split: (images NHWC, labels)}."""
    rng = np.random.default_rng(0)
    expected = {"train": ([], []), "test": ([], [])}
    with tarfile.open(path, "w:gz") as archive:
        add_pickle(archive, "batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES]}, protocol)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
            add_pickle(archive, name, {b"data": data, b"labels": labels, b"batch_label": name.encode()}, protocol)
            split = "test" if name == "test_batch" else "train"
            expected[split][0].append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            expected[split][1].extend(labels)
    return {split: (np.concatenate(images), np.array(labels)) for split, (images, labels) in expected.items()}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_both_splits_pixel_exact(tmp_path, protocol):
    path = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar_tarball(path, protocol=protocol)
    source = open_source(SourceSpec(kind="cifar10", path=str(path), image_size=32))
    assert source.class_names == CIFAR_CLASSES
    assert source.channels == 3 and source.native_size() == 32
    assert source.splits == ["train", "test"]
    for split, (images, labels) in expected.items():
        assert source.labels(split).dtype == np.int64
        np.testing.assert_array_equal(source.labels(split), labels)
        loaded = load(source, split, range(len(labels)))
        assert loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded, images)
    assert len(source.labels("train")) == 15 and len(source.labels("test")) == 3
    np.testing.assert_array_equal(load(source, "train", [7, 2]), expected["train"][0][[7, 2]])


def test_cifar10_resizes(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_tarball(path, per_batch=1)
    source = open_source(SourceSpec(kind="cifar10", path=str(path), image_size=16))
    assert load(source, "test", [0]).shape == (1, 16, 16, 3)


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        add_pickle(archive, "batches.meta", {b"label_names": [os.getcwd]}, 2)
    with pytest.raises(DataError, match="batches.meta"):
        open_source(SourceSpec(kind="cifar10", path=str(path), image_size=32))


def framed_image(width, height, inner, outer):
    """An RGB image whose centered square (side min(width, height)) is `inner` and the rest `outer`."""
    pixels = np.full((height, width, 3), outer, dtype=np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top:top + side, left:left + side] = inner
    return Image.fromarray(pixels)


def encode(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def test_lsun_lmdb_categories_center_cropped(tmp_path):
    colours = {"bedroom": [(10, 20, 30), (40, 50, 60), (70, 80, 90)], "church": [(200, 0, 0), (0, 200, 0)]}
    for category, inners in colours.items():
        env = lmdb.open(str(tmp_path / f"{category}_train_lmdb"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for number, inner in enumerate(inners):
                image = framed_image(40, 24, inner, outer=(255, 255, 255))
                fmt = "WEBP" if category == "church" else "PNG"
                txn.put(f"{number:040x}".encode(), encode(image, fmt))
        env.close()
    source = open_source(SourceSpec(kind="lsun", path=str(tmp_path), image_size=8,
                                    categories=["bedroom", "church"]))
    assert source.class_names == ["bedroom", "church"]
    assert source.splits == ["train"]
    np.testing.assert_array_equal(source.labels("train"), [0, 0, 0, 1, 1])
    images = load(source, "train", range(5))
    assert images.shape == (5, 8, 8, 3)
    for image, inner in zip(images, colours["bedroom"] + colours["church"]):
        np.testing.assert_array_equal(image, np.broadcast_to(inner, (8, 8, 3)))


def test_lsun_missing_category_names_it(tmp_path):
    (tmp_path / "bedroom_train_lmdb").mkdir()
    with pytest.raises(DataError, match="'tower'.*tower_train_lmdb"):
        open_source(SourceSpec(kind="lsun", path=str(tmp_path), image_size=8, categories=["tower"]))


def test_image_folder_two_classes(tmp_path):
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    framed_image(12, 20, (1, 2, 3), (9, 9, 9)).save(tmp_path / "cat" / "b.png")
    framed_image(30, 30, (4, 5, 6), (4, 5, 6)).save(tmp_path / "cat" / "a.jpg", quality=100)
    Image.new("L", (6, 6), 77).save(tmp_path / "dog" / "x.png")  # greyscale: converted to RGB
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    source = open_source(SourceSpec(kind="folder", path=str(tmp_path), image_size=6))
    assert source.class_names == ["cat", "dog"]
    assert source.channels == 3 and source.native_size() is None  # its images' sizes vary
    np.testing.assert_array_equal(source.labels("train"), [0, 0, 1])
    images = load(source, "train", [1, 2])
    np.testing.assert_array_equal(images[0], np.broadcast_to((1, 2, 3), (6, 6, 3)))
    np.testing.assert_array_equal(images[1], np.full((6, 6, 3), 77))
    assert load(source, "train", [0]).shape == (1, 6, 6, 3)


def test_digits_embedded():
    source = open_source(SourceSpec(kind="digits", image_size=16))
    assert source.class_names == [str(c) for c in range(10)]
    assert source.channels == 1 and source.splits == ["train"] and source.native_size() == 8
    assert source.labels("train").shape == (1797,)
    assert load(source, "train", [0, 1796]).shape == (2, 16, 16, 1)
    from sklearn.datasets import load_digits
    native = load(open_source(SourceSpec(kind="digits", image_size=8)), "train", [5])[0, :, :, 0]
    np.testing.assert_array_equal(native, np.round(load_digits().images[5] * 255 / 16).astype(np.uint8))


@pytest.mark.parametrize("kind", ["cifar10", "lsun", "folder"])
def test_missing_path_is_named(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing} does not exist"):
        open_source(SourceSpec(kind=kind, path=str(missing), categories=["bedroom"]))


def test_unknown_kind_and_split_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="unknown data.source.kind 'imagenet'"):
        open_source(SourceSpec(kind="imagenet"))
    with pytest.raises(DataError, match="unknown split 'test'"):
        open_source(SourceSpec(kind="digits")).labels("test")
    with pytest.raises(DataError, match=f"{tmp_path} has no class sub-directories"):
        open_source(SourceSpec(kind="folder", path=str(tmp_path)))


def grey_palette_image(level):
    image = Image.new("L", (8, 8), level).convert("P")
    assert image.mode == "P"
    return image


def test_grey_folder_stays_one_channel(tmp_path):
    sixteen_bit = Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16))
    assert sixteen_bit.mode == "I;16"
    items = [Image.new("L", (8, 8), 77), Image.new("1", (8, 8), 1), sixteen_bit,
             Image.new("LA", (8, 8), (50, 10)), grey_palette_image(33), b"corrupt: has no say"]
    write_folder(tmp_path, {"grey": items})
    source = open_source(SourceSpec(kind="folder", path=str(tmp_path), image_size=8))
    assert source.channels == 1
    images = load(source, "train", range(5))
    assert images.shape == (5, 8, 8, 1)
    # L as it is, 1-bit white, 16-bit scaled to 8 bits (not clipped to 255), LA without alpha, grey palette
    assert [int(v) for v in images[:, 0, 0, 0]] == [77, 255, 100, 50, 33]
    assert (images == images[:, :1, :1]).all()


def test_mixed_folder_is_rgb_and_channels_can_be_forced(tmp_path):
    write_folder(tmp_path, {"a": [Image.new("L", (8, 8), 77)], "b": [(10, 200, 30)]})
    auto = open_source(SourceSpec(kind="folder", path=str(tmp_path), image_size=4))
    assert auto.channels == 3
    np.testing.assert_array_equal(load(auto, "train", [0, 1]),
                                  [np.full((4, 4, 3), 77), np.broadcast_to((10, 200, 30), (4, 4, 3))])
    grey = open_source(SourceSpec(kind="folder", path=str(tmp_path), image_size=4, channels="1"))
    assert grey.channels == 1
    assert [int(v) for v in load(grey, "train", [0, 1])[:, 0, 0, 0]] == [77, luma(10, 200, 30)] == [77, 124]
    write_folder(tmp_path / "grey", {"a": [Image.new("L", (8, 8), 77)]})
    rgb = open_source(SourceSpec(kind="folder", path=str(tmp_path / "grey"), image_size=4, channels="3"))
    assert rgb.channels == 3
    np.testing.assert_array_equal(rgb.load("train", 0), np.full((4, 4, 3), 77))
    # A palette image is grey only when its palette is (PIL's web palette has colours, even for a grey pixel).
    write_folder(tmp_path / "palette", {"a": [Image.new("RGB", (8, 8), (51, 51, 51)).convert("P")]})
    palette = open_source(SourceSpec(kind="folder", path=str(tmp_path / "palette"), image_size=4))
    assert palette.channels == 3
    np.testing.assert_array_equal(palette.load("train", 0), np.full((4, 4, 3), 51))


def test_channels_of_array_sources_can_be_forced(tmp_path):
    grey = open_source(SourceSpec(kind="digits", image_size=8))
    rgb = open_source(SourceSpec(kind="digits", image_size=8, channels="3"))
    assert (grey.channels, rgb.channels) == (1, 3)
    np.testing.assert_array_equal(rgb.load("train", 5), np.repeat(grey.load("train", 5), 3, axis=2))
    path = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar_tarball(path, per_batch=1)
    source = open_source(SourceSpec(kind="cifar10", path=str(path), image_size=32, channels="1"))
    assert source.channels == 1
    red, green, blue = (expected["test"][0][0, :, :, c].astype(np.int64) for c in range(3))
    np.testing.assert_array_equal(source.load("test", 0)[:, :, 0], luma(red, green, blue))


def test_bad_channels_value_is_named():
    with pytest.raises(DataError, match=re.escape("data.source.channels: '2' is not auto | 1 | 3")):
        open_source(SourceSpec(kind="digits", channels="2"))


def test_undecodable_items_name_the_file_or_key(tmp_path):
    png = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    folder = write_folder(tmp_path / "folder", {"a": [(1, 2, 3), b"not an image", png[:len(png) // 2]]})
    source = open_source(SourceSpec(kind="folder", path=str(folder), image_size=8))
    assert source.load("train", 0).shape == (8, 8, 3)
    with pytest.raises(UndecodableItem) as error:
        source.load("train", 1)
    assert str(error.value) == f"cannot decode image {folder}/a/01.png: not an image format PIL reads"
    with pytest.raises(UndecodableItem) as error:
        source.load("train", 2)
    assert str(error.value).startswith(f"cannot decode image {folder}/a/02.png: OSError: image file is truncated")
    env = lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0a", png)
        txn.put(b"0b", b"\x89PNG but not")
    env.close()
    lsun = open_source(SourceSpec(kind="lsun", path=str(tmp_path), image_size=8, categories=["bedroom"]))
    assert lsun.load("train", 0).shape == (8, 8, 3)
    with pytest.raises(UndecodableItem) as error:
        lsun.load("train", 1)
    assert str(error.value).startswith(f"cannot decode image key 0b in {tmp_path}/bedroom_train_lmdb: ")


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: the magic number, each dimension as a big-endian 32-bit word, then the bytes."""
    return b"".join([magic.to_bytes(4, "big"), *(d.to_bytes(4, "big") for d in array.shape), array.tobytes()])


def write_idx_set(directory, gz: bool, counts=(5, 3), size=(28, 28), classes=4, seed=0) -> dict:
    """The four files of an MNIST-style IDX set (plain or gzipped) with random images; returns
    {split: (images uint8 [N, rows, cols], labels)}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for (split, (images_name, labels_name)), count in zip(IDX_FILES.items(), counts):
        images = rng.integers(0, 256, size=(count, *size), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % classes).astype(np.uint8)  # classes as even as can be
        for name, data in ((images_name, idx_bytes(images, IDX_IMAGES_MAGIC)),
                           (labels_name, idx_bytes(labels, IDX_LABELS_MAGIC))):
            (directory / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        written[split] = (images, labels.astype(np.int64))
    return written


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_both_splits_pixel_exact(tmp_path, gz):
    expected = write_idx_set(tmp_path, gz)
    source = open_source(SourceSpec(kind="idx", path=str(tmp_path), image_size=28))
    assert source.class_names == ["0", "1", "2", "3"] and source.channels == 1 and source.native_size() == 28
    assert source.splits == ["train", "test"]
    for split, (images, labels) in expected.items():
        np.testing.assert_array_equal(source.labels(split), labels)
        np.testing.assert_array_equal(load(source, split, range(len(labels))), images[..., None])
    named = open_source(SourceSpec(kind="idx", path=str(tmp_path), image_size=14, channels="3",
                                   categories=["shirt", "trouser", "bag", "boot"]))
    assert named.class_names == ["shirt", "trouser", "bag", "boot"] and named.channels == 3
    box = Image.fromarray(expected["test"][0][2]).resize((14, 14), resample=Image.BOX)
    np.testing.assert_array_equal(load(named, "test", [2])[0], np.stack([np.asarray(box)] * 3, axis=-1))


def spoil_idx(directory, how: str):
    """Damage a plain IDX set one way; returns the file the error must name."""
    images, labels = (directory / name for name in IDX_FILES["train"])
    test_images = directory / IDX_FILES["test"][0]
    if how == "missing":
        labels.unlink()
        return labels
    if how == "truncated":
        test_images.write_bytes(test_images.read_bytes()[:-1])
        return test_images
    if how == "longer":
        images.write_bytes(images.read_bytes() + b"\0")
        return images
    if how == "short header":
        labels.write_bytes(labels.read_bytes()[:6])
        return labels
    if how == "counts":
        labels.write_bytes(idx_bytes(np.zeros(4, np.uint8), IDX_LABELS_MAGIC))
        return labels
    if how == "magic":  # a labels file where the images should be
        images.write_bytes(labels.read_bytes())
        return images
    raise ValueError(how)


IDX_REFUSALS = {
    "missing": "has no train-labels-idx1-ubyte (nor train-labels-idx1-ubyte.gz)",
    "truncated": "is truncated: its header says 3 x 28 x 28 = 2352 bytes of data, it holds 2351",
    "longer": "is longer than its header says: its header says 5 x 28 x 28 = 3920 bytes of data, it holds 3921",
    "short header": "is truncated: its header ends after 6 bytes",
    "counts": "holds 5 images but",
    "magic": "is not an IDX file of 3-dimensional unsigned bytes: its magic number is 0x00000801, expected 0x00000803",
}


@pytest.mark.parametrize("how", list(IDX_REFUSALS))
def test_idx_refuses_a_damaged_set_naming_the_file(tmp_path, how):
    write_idx_set(tmp_path, gz=False)
    culprit = spoil_idx(tmp_path, how)
    with pytest.raises(DataError) as raised:
        source = open_source(SourceSpec(kind="idx", path=str(tmp_path), image_size=28))
        for split in source.splits:  # images are read on first use
            source.load(split, 0)
    message = str(raised.value)
    assert "\n" not in message and IDX_REFUSALS[how] in message
    assert str(culprit) in message if how != "missing" else f"the idx source {tmp_path} " in message


def test_idx_refuses_a_cut_gzip_stream_and_unnamed_labels(tmp_path):
    write_idx_set(tmp_path, gz=True)
    labels = tmp_path / (IDX_FILES["test"][1] + ".gz")
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(DataError, match=f"^cannot read {labels}: Compressed file ended before the end-of-stream"):
        open_source(SourceSpec(kind="idx", path=str(tmp_path), image_size=28))
    write_idx_set(tmp_path, gz=True)
    with pytest.raises(DataError, match=r"categories must name each label .* \(0 to 3\) once, in label order; it "
                                        r"names 3: a, b, c$"):
        open_source(SourceSpec(kind="idx", path=str(tmp_path), categories=["a", "b", "c"]))


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed "
                    "(apt-get install dataset-fashion-mnist; `make venv` does it where apt-get runs as root)")
def test_the_real_fashion_mnist_files_parse():
    source = open_source(SourceSpec(kind="idx", path=str(FASHION_MNIST), image_size=28))
    assert source.class_names == [str(c) for c in range(10)] and source.channels == 1
    for split, count in (("train", 6000), ("test", 1000)):
        assert np.bincount(source.labels(split)).tolist() == [count] * 10
        assert source.load(split, len(source.labels(split)) - 1).shape == (28, 28, 1)
