"""Bad source images at prepare time: skipped, counted and listed in the manifest; past
data.max_bad_samples the call stops with one line and leaves the data directory as it was; so does a
damaged source file."""
import gzip

import pytest
import yaml

from shards.errors import DataError
from shards.manifest import load_manifest, population_entry
from shards.prepare import prepare
from shards.sources import IDX_FILES
from shards.stream import read_population
from tests.conftest import scorefuse_here
from tests.test_prepare import folder_spec
from tests.test_sources import write_folder, write_idx_set

NOT_AN_IMAGE = "not an image format PIL reads"


@pytest.fixture
def folder(tmp_path):
    """Three classes of distinct colours; a/03.png (train-0000003, the aux's) is not an image."""
    return write_folder(tmp_path / "images", {"a": [(1, 1, 1), (2, 2, 2), (3, 3, 3), b"not a png"],
                                              "b": [(4, 4, 4), (5, 5, 5), (6, 6, 6)],
                                              "c": [(7, 7, 7), (8, 8, 8), (9, 9, 9)]})


def folder_config(tmp_path, folder):
    """A run config over the folder (folder_spec's populations, the aux taking all four of class a)."""
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump({"name": "folder", "root": str(tmp_path / "runs"), "data": {
        "source": {"kind": "folder", "path": str(folder), "image_size": 8},
        "aux": [{"name": "aux", "mixture": {"a": 1.0}, "count": 4, "seed": 1}],
        "reference": {"name": "reference", "mixture": {"b": 1.0}, "count": 3, "seed": 2},
        "target": {"name": "target", "mixture": {"c": 1.0}, "count": 3, "seed": 3},
        "min_shards": 2, "workers": 0}}))
    return path


def test_a_corrupt_file_is_skipped_with_a_warning_and_listed(tmp_path, folder, capfd):
    code, _, err = scorefuse_here(capfd, "prepare", "--config", folder_config(tmp_path, folder))
    assert code == 0, err
    reason = f"cannot decode image {folder}/a/03.png: {NOT_AN_IMAGE}"
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: population aux: 1 of its 4 images skipped (listed in its manifest entry); "
                        f"the first: train-0000003: {reason}"]
    data_dir = tmp_path / "runs" / "folder" / "data"
    aux = population_entry(load_manifest(data_dir), "aux")
    assert aux["skipped"] == [{"key": "train-0000003", "reason": reason}]
    assert aux["count"] == 3 and sum(shard["count"] for shard in aux["shards"]) == 3
    assert aux["class_histogram"] == {"a": 3, "b": 0, "c": 0}
    assert read_population(data_dir, "aux")[0][:, 0, 0, 0].sort().values.tolist() == [1, 2, 3]


def test_past_max_bad_samples_the_cli_exits_2_and_writes_nothing(tmp_path, folder, capfd):
    code, _, err = scorefuse_here(capfd, "prepare", "--config", folder_config(tmp_path, folder),
                                  "data.max_bad_samples=0")
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"scorefuse: error: more than data.max_bad_samples=0 source images do not decode; the first: "
                      f"train-0000003 of population aux: cannot decode image {folder}/a/03.png: {NOT_AN_IMAGE}; "
                      f"nothing was written"]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def tree(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_a_failed_prepare_leaves_a_prepared_directory_as_it_was(tmp_path, folder):
    spec = folder_spec(folder)
    spec.aux[0].count = 4
    data_dir = tmp_path / "data"
    manifest = prepare(spec, data_dir, log=lambda line: None)
    (data_dir / "aux" / "shard-000001.tar").unlink()  # the aux is written again on the next call
    (data_dir / "target" / "shard-000000.tar").write_bytes(b"damaged")  # and so is the target
    before = tree(data_dir)
    spec.max_bad_samples = 0
    with pytest.raises(DataError, match="more than data.max_bad_samples=0 source images do not decode; the first: "
                                        "train-0000003 of population aux"):
        prepare(spec, data_dir, log=lambda line: None)
    assert tree(data_dir) == before
    spec.max_bad_samples = 1
    assert prepare(spec, data_dir, log=lambda line: None) == manifest


def test_a_population_with_nothing_to_write_is_refused(tmp_path):
    folder = write_folder(tmp_path / "images", {"a": [(1, 1, 1)], "b": [(2, 2, 2)], "c": [(1, 1, 1)]})
    spec = folder_spec(folder)
    for pop in [*spec.aux, spec.reference, spec.target]:
        pop.count = 1
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        prepare(spec, data_dir, log=lambda line: None)
    assert str(error.value) == ("population 'target': none of its 1 images could be written; the first skipped: "
                                "train-0000002: duplicate of train-0000000")
    assert not data_dir.exists()


def test_a_damaged_idx_file_stops_prepare_with_one_line_and_writes_nothing(tmp_path, capfd):
    """The t10k images are read when the reference is written, after the auxiliaries' shards: the call still
    exits 2 with one line naming the file, and leaves no run directory behind."""
    idx = tmp_path / "idx"
    write_idx_set(idx, gz=True, counts=(12, 6), classes=3)
    images = idx / (IDX_FILES["test"][0] + ".gz")
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-5]))
    config = tmp_path / "idx.yaml"
    config.write_text(yaml.safe_dump({"name": "idx", "root": str(tmp_path / "runs"), "data": {
        "source": {"kind": "idx", "path": str(idx), "image_size": 28},
        "aux": [{"name": "aux", "mixture": {"0": 0.5, "1": 0.5}, "count": 4, "seed": 1}],
        "reference": {"name": "reference", "mixture": {"2": 1.0}, "count": 2, "seed": 2, "split": "test"},
        "target": {"name": "target", "mixture": {"2": 1.0}, "count": 2, "seed": 3},
        "min_shards": 2, "workers": 0}}))
    code, _, err = scorefuse_here(capfd, "prepare", "--config", config)
    assert code == 2, err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"scorefuse: error: {images} is truncated: its header says 6 x 28 x 28 = 4704 bytes of data, it holds 4699"]
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
