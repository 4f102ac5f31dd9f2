"""prepare: exact populations, disjoint, verifiable shards, idempotent, and refusing bad configs early."""
import copy
import hashlib
import shutil
import tarfile

import numpy as np
import pytest
from sklearn.datasets import load_digits

from shards.errors import DataError
from shards.manifest import load_manifest, population_entry, shard_paths
from shards.populations import allocate_counts
from shards.prepare import prepare, shard_count
from shards.spec import DataSpec, PopulationSpec, SourceSpec

THIRDS = {"0": 1 / 3, "1": 1 / 3, "2": 1 / 3}
# Largest-remainder allocations of the populations below, worked by hand.
EXPECTED_HISTOGRAMS = {
    "aux0": {"0": 4, "1": 3, "2": 3},            # 3.33 each: the tie goes to the first class
    "aux1": {"3": 3, "4": 3, "5": 1},            # 3.15, 2.45, 1.4: the 0.45 remainder wins
    "aux2": {"9": 3},
    "target": {"0": 13, "9": 12},                # 12.5 each: tie to class 0
    "reference": {str(c): 6 for c in range(10)},
}


def digits_spec(**changes) -> DataSpec:
    spec = DataSpec(
        source=SourceSpec(kind="digits", image_size=8),
        aux=[PopulationSpec(name="aux0", mixture=dict(THIRDS), count=10, seed=1),
             PopulationSpec(name="aux1", mixture={"3": 0.45, "4": 0.35, "5": 0.2}, count=7, seed=2),
             PopulationSpec(name="aux2", mixture={"9": 1.0}, count=3, seed=3)],
        target=PopulationSpec(name="target", mixture={"0": 0.5, "9": 0.5}, count=25, seed=4),
        reference=PopulationSpec(name="reference", mixture={str(c): 0.1 for c in range(10)}, count=60, seed=5),
        min_shards=4, max_shard_images=10)
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    manifest = prepare(digits_spec(), data_dir, log=lambda line: None)
    return data_dir, manifest


def file_times(data_dir):
    return {p: p.stat().st_mtime_ns for p in sorted(data_dir.rglob("*"))}


def shard_members(path):
    """{key: label} read with the standard library, independently of the readers under test."""
    with tarfile.open(path) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    keys = {name.rsplit(".", 1)[0] for name in files}
    assert files.keys() == {f"{k}.{ext}" for k in keys for ext in ("png", "cls")}
    return {key: int(files[f"{key}.cls"]) for key in keys}


def test_largest_remainder_allocation():
    np.testing.assert_array_equal(allocate_counts(10, [1 / 3] * 3), [4, 3, 3])
    np.testing.assert_array_equal(allocate_counts(7, [0.45, 0.35, 0.2]), [3, 3, 1])
    np.testing.assert_array_equal(allocate_counts(5, [0.0, 0.5, 0.5]), [0, 3, 2])
    assert allocate_counts(1001, np.full(7, 1 / 7)).sum() == 1001


def test_shard_count_rule():
    assert shard_count(60, min_shards=4, max_shard_images=10) == 6
    assert shard_count(25, min_shards=4, max_shard_images=10) == 4
    assert shard_count(3, min_shards=4, max_shard_images=10) == 3


def test_populations_have_exact_counts_histograms_and_shards(prepared):
    data_dir, manifest = prepared
    assert manifest["class_names"] == [str(c) for c in range(10)]
    assert (manifest["image_size"], manifest["channels"]) == (8, 1)
    assert manifest["disjoint"] is True and manifest["overlaps"] == {}
    roles = {name: entry["role"] for name, entry in manifest["populations"].items()}
    assert roles == {"aux0": "aux", "aux1": "aux", "aux2": "aux", "target": "target", "reference": "reference"}
    digit_labels = load_digits().target
    for name, expected in EXPECTED_HISTOGRAMS.items():
        entry = population_entry(manifest, name)
        histogram = {c: n for c, n in entry["class_histogram"].items() if n}
        assert histogram == expected
        assert entry["count"] == sum(expected.values())
        shard_sizes = [shard["count"] for shard in entry["shards"]]
        assert len(shard_sizes) == shard_count(entry["count"], 4, 10)
        assert max(shard_sizes) - min(shard_sizes) <= 1
        members = {}
        for path, shard in zip(shard_paths(data_dir, manifest, name), entry["shards"]):
            found = shard_members(path)
            assert len(found) == shard["count"]
            members.update(found)
        # Every key names its source image, and the label stored with it is that image's class.
        counted = {}
        for key, label in members.items():
            split, index = key.split("-")
            assert split == "train" and label == digit_labels[int(index)]
            counted[str(label)] = counted.get(str(label), 0) + 1
        assert counted == expected


def test_populations_are_disjoint(prepared):
    data_dir, manifest = prepared
    all_keys = []
    for name in manifest["populations"]:
        for path in shard_paths(data_dir, manifest, name):
            all_keys.extend(shard_members(path))
    assert len(all_keys) == sum(sum(h.values()) for h in EXPECTED_HISTOGRAMS.values())
    assert len(set(all_keys)) == len(all_keys)


def test_manifest_hashes_match_files(prepared):
    data_dir, manifest = prepared
    assert load_manifest(data_dir) == manifest
    for name, entry in manifest["populations"].items():
        for shard in entry["shards"]:
            assert hashlib.sha256((data_dir / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    hashes = [entry["hash"] for entry in manifest["populations"].values()]
    assert len(set(hashes)) == len(hashes)


def test_second_prepare_writes_nothing(prepared):
    data_dir, manifest = prepared
    before = file_times(data_dir)
    lines = []
    assert prepare(digits_spec(), data_dir, log=lines.append) == manifest
    assert any("shards up to date" in line for line in lines)
    assert file_times(data_dir) == before


def test_reader_settings_do_not_change_the_fingerprint(prepared):
    data_dir, manifest = prepared
    assert prepare(digits_spec(workers=7, max_bad_samples=0), data_dir, log=lambda line: None) == manifest


def test_changed_config_is_refused_without_overwriting(prepared):
    data_dir, manifest = prepared
    before = file_times(data_dir)
    spec = digits_spec()
    spec.target.count = 24
    with pytest.raises(DataError, match=f"{data_dir} was prepared from a different data config"):
        prepare(spec, data_dir, log=lambda line: None)
    assert file_times(data_dir) == before
    assert load_manifest(data_dir) == manifest


def test_damaged_shard_is_rewritten_identically(prepared, tmp_path):
    data_dir = tmp_path / "copy"
    shutil.copytree(prepared[0], data_dir)
    victim = data_dir / "target" / "shard-000002.tar"
    original = victim.read_bytes()
    victim.unlink()
    (data_dir / "aux1" / "shard-000000.tar").write_bytes(b"garbage")
    lines = []
    manifest = prepare(digits_spec(), data_dir, log=lines.append)
    assert any("target" in line and "missing" in line for line in lines)
    assert any("aux1" in line and "sha256" in line for line in lines)
    assert victim.read_bytes() == original
    assert manifest == prepared[1]


def assert_refused_before_writing(spec, tmp_path, match):
    data_dir = tmp_path / "fresh"
    with pytest.raises(DataError, match=match):
        prepare(spec, data_dir, log=lambda line: None)
    assert not data_dir.exists()


def test_mixture_not_summing_to_one(tmp_path):
    spec = digits_spec()
    spec.aux[1].mixture = {"3": 0.5, "4": 0.4}
    assert_refused_before_writing(spec, tmp_path, "population 'aux1': mixture proportions sum to 0.9, not 1")


def test_negative_proportion(tmp_path):
    spec = digits_spec()
    spec.target.mixture = {"0": 1.5, "9": -0.5}
    assert_refused_before_writing(spec, tmp_path, r"population 'target': mixture\['9'\] = -0.5 must be >= 0")


def test_too_large_population_names_the_class(tmp_path):
    spec = digits_spec()
    spec.reference = copy.deepcopy(spec.reference)
    spec.reference.mixture = {"0": 0.5, "1": 0.5}
    spec.reference.count = 340
    # Class '0' has 178 digits, aux0 and target took 4 + 13 of them: 161 remain for 170 wanted.
    assert_refused_before_writing(spec, tmp_path, "population 'reference' needs 170 images of class '0' "
                                                  "from split 'train' but only 161 remain")


def test_unknown_class_key_lists_valid_ones(tmp_path):
    spec = digits_spec()
    spec.aux[0].mixture = {"cat": 1.0}
    assert_refused_before_writing(spec, tmp_path, "mixture key 'cat' is not a class of the source; "
                                                  "valid classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9")


def test_duplicate_names_and_unknown_split(tmp_path):
    spec = digits_spec()
    spec.aux[2].name = "target"
    assert_refused_before_writing(spec, tmp_path, "duplicate population names: target")
    spec = digits_spec()
    spec.target.split = "test"
    assert_refused_before_writing(spec, tmp_path, "unknown split 'test'")


def test_manifest_errors_name_what_to_do(prepared, tmp_path):
    with pytest.raises(DataError, match="run `scorefuse prepare` first"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read .*manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="unknown population 'aux9'; the data directory has: aux0, aux1"):
        population_entry(prepared[1], "aux9")
