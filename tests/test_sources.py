"""Sources read the real on-disk formats (written here, small) back exactly."""
import io
import os
import pickle
import tarfile

import lmdb
import numpy as np
import pytest
from PIL import Image

from shards.errors import DataError
from shards.sources import open_source
from shards.spec import SourceSpec

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
    assert source.channels == 3
    assert source.splits == ["train", "test"]
    for split, (images, labels) in expected.items():
        assert source.labels(split).dtype == np.int64
        np.testing.assert_array_equal(source.labels(split), labels)
        loaded = source.load(split, range(len(labels)))
        assert loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded, images)
    assert len(source.labels("train")) == 15 and len(source.labels("test")) == 3
    np.testing.assert_array_equal(source.load("train", [7, 2]), expected["train"][0][[7, 2]])


def test_cifar10_resizes(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_tarball(path, per_batch=1)
    source = open_source(SourceSpec(kind="cifar10", path=str(path), image_size=16))
    assert source.load("test", [0]).shape == (1, 16, 16, 3)


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
    images = source.load("train", range(5))
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
    assert source.channels == 3
    np.testing.assert_array_equal(source.labels("train"), [0, 0, 1])
    images = source.load("train", [1, 2])
    np.testing.assert_array_equal(images[0], np.broadcast_to((1, 2, 3), (6, 6, 3)))
    np.testing.assert_array_equal(images[1], np.full((6, 6, 3), 77))
    assert source.load("train", [0]).shape == (1, 6, 6, 3)


def test_digits_embedded():
    source = open_source(SourceSpec(kind="digits", image_size=16))
    assert source.class_names == [str(c) for c in range(10)]
    assert source.channels == 1 and source.splits == ["train"]
    assert source.labels("train").shape == (1797,)
    assert source.load("train", [0, 1796]).shape == (2, 16, 16, 1)
    from sklearn.datasets import load_digits
    native = open_source(SourceSpec(kind="digits", image_size=8)).load("train", [5])[0, :, :, 0]
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
