"""prepare: exact populations, disjoint (no item and no image content in two), nested draws, verifiable
shards, idempotent, sharing identical populations with another data directory, and refusing bad configs
early."""
import copy
import hashlib
import io
import math
import os
import shutil
import tarfile
from fractions import Fraction

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from shards.errors import DataError
from shards.manifest import load_manifest, population_entry, shard_paths
from shards.populations import allocate_counts, class_sequence, draw_populations, ordered_populations
from shards.prepare import prepare, shard_count
from shards.sources import open_source
from shards.spec import DataSpec, PopulationSpec, SourceSpec
from shards.stream import read_population
from tests.conftest import DIGITS
from tests.test_sources import write_folder

THIRDS = {"0": 1 / 3, "1": 1 / 3, "2": 1 / 3}
# Class counts of the populations below (within quota, worked by hand; allocate_counts' order decides the
# classes that get the ceiling).
EXPECTED_HISTOGRAMS = {
    "aux0": {"0": 4, "1": 3, "2": 3},            # 3.33 each: the tie goes to the first class
    "aux1": {"3": 3, "4": 3, "5": 1},            # 3.15, 2.45, 1.4: the order 3 4 5 3 4 3 4
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


def shard_files(path):
    """{member name: bytes} read with the standard library, independently of the readers under test."""
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def shard_members(path):
    """{key: label} of a shard."""
    files = shard_files(path)
    keys = {name.rsplit(".", 1)[0] for name in files}
    assert files.keys() == {f"{k}.{ext}" for k in keys for ext in ("png", "cls")}
    return {key: int(files[f"{key}.cls"]) for key in keys}


def population_pixels(data_dir, manifest, name):
    """{key: sha256 of the decoded pixels} of a population, read with PIL from the tar members."""
    pixels = {}
    for path in shard_paths(data_dir, manifest, name):
        for member, data in shard_files(path).items():
            if member.endswith(".png"):
                with Image.open(io.BytesIO(data)) as image:
                    pixels[member[:-4]] = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
    return pixels


def test_class_counts_stay_within_quota_and_never_shrink():
    """At every size n from 1 to 300, each class count is floor(n p_k) or ceil(n p_k) (exact fractions), the
    counts sum to n, and none is smaller than at n - 1: the counts of one interleaved order's prefixes."""
    mixtures = [[Fraction(13, 100)] * 5 + [Fraction(7, 100)] * 5,  # the digits' target
                [Fraction(1, 50)] * 5 + [Fraction(9, 50)] * 5,     # a skewed auxiliary
                [Fraction(1, 3)] * 3, [Fraction(9, 20), Fraction(7, 20), Fraction(1, 5)],
                [Fraction(0), Fraction(1, 2), Fraction(1, 2)], [Fraction(1, 7)] * 7,
                [Fraction(1, 1000), Fraction(999, 1000)]]
    for mixture in mixtures:
        previous = np.zeros(len(mixture), dtype=np.int64)
        for n in range(1, 301):
            counts = allocate_counts(n, [float(p) for p in mixture])
            assert counts.sum() == n and np.all(counts >= previous), (mixture, n, counts)
            within = all(math.floor(n * p) <= c <= math.ceil(n * p) for c, p in zip(counts, mixture))
            assert within, (mixture, n, counts)
            previous = counts
    np.testing.assert_array_equal(allocate_counts(10, [1 / 3] * 3), [4, 3, 3])  # ties: the earlier class
    np.testing.assert_array_equal(allocate_counts(7, [0.45, 0.35, 0.2]), [3, 3, 1])
    np.testing.assert_array_equal(class_sequence(7, [0.45, 0.35, 0.2]), [0, 1, 2, 0, 1, 0, 1])


def test_targets_are_nested_at_every_size():
    """The digits' target mixture at every n from 1 to 300 (auxiliaries cut to 100 images so the source holds
    them): the target of n images is inside the target of n + 1, and its class histogram is allocate_counts'."""
    spec = digits_config_spec()
    for pop in spec.aux:
        pop.count = 100
    source = open_source(spec.source)
    labels = source.labels("train")
    mixture = np.array([spec.target.mixture[str(k)] for k in range(10)])
    previous = set()
    for n in range(1, 301):
        spec.target.count = n
        _, indices = draw_populations(source, ordered_populations(spec))["target"]
        assert previous < set(indices.tolist()), n
        np.testing.assert_array_equal(np.bincount(labels[indices], minlength=10), allocate_counts(n, mixture))
        previous = set(indices.tolist())


def test_an_upsampling_image_size_is_noted_and_the_native_size_recorded(tmp_path):
    lines = []
    manifest = prepare(digits_spec(source=SourceSpec(kind="digits", image_size=12)), tmp_path, log=lines.append)
    assert (manifest["image_size"], manifest["native_size"]) == (12, 8)
    assert sum("image_size=12 upsamples the source's 8x8 images" in line for line in lines) == 1


def test_shard_count_rule():
    assert shard_count(60, min_shards=4, max_shard_images=10) == 6
    assert shard_count(25, min_shards=4, max_shard_images=10) == 4
    assert shard_count(3, min_shards=4, max_shard_images=10) == 3


def test_populations_have_exact_counts_histograms_and_shards(prepared):
    data_dir, manifest = prepared
    assert manifest["class_names"] == [str(c) for c in range(10)]
    assert (manifest["image_size"], manifest["native_size"], manifest["channels"]) == (8, 8, 1)
    assert manifest["disjoint"] is True and manifest["overlaps"] == {}
    roles = {name: entry["role"] for name, entry in manifest["populations"].items()}
    assert roles == {"aux0": "aux", "aux1": "aux", "aux2": "aux", "target": "target", "reference": "reference"}
    assert manifest["order"] == ["aux0", "aux1", "aux2", "reference", "target"]
    digit_labels = load_digits().target
    for name, expected in EXPECTED_HISTOGRAMS.items():
        entry = population_entry(manifest, name)
        histogram = {c: n for c, n in entry["class_histogram"].items() if n}
        assert histogram == expected
        assert entry["count"] == sum(expected.values()) and entry["skipped"] == []
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
        contents = data_dir / entry["contents"]["file"]
        assert entry["contents"]["file"] == f"{name}/contents.txt"
        assert hashlib.sha256(contents.read_bytes()).hexdigest() == entry["contents"]["sha256"]
        # One "key sha256-of-pixels" line per written image.
        lines = dict(line.split() for line in contents.read_text().splitlines())
        assert lines == population_pixels(data_dir, manifest, name)
    for field in ("hash", "items"):
        hashes = [entry[field] for entry in manifest["populations"].values()]
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
    (data_dir / "reference" / "contents.txt").write_text("")
    lines = []
    manifest = prepare(digits_spec(), data_dir, log=lines.append)
    assert any("target" in line and "missing" in line for line in lines)
    assert any("aux1" in line and "sha256" in line for line in lines)
    assert any("reference" in line and "contents.txt does not match its sha256" in line for line in lines)
    assert victim.read_bytes() == original
    assert manifest == prepared[1]
    assert sorted(p.name for p in data_dir.iterdir()) == ["aux0", "aux1", "aux2", "manifest.json", "reference",
                                                          "target"]  # no staging directory left


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
    spec.reference.count = 350
    # Class '0' has 178 digits, aux0 took 4 of them (the target is drawn after the reference): 174 remain
    # for 175 wanted.
    assert_refused_before_writing(spec, tmp_path, "population 'reference' needs 175 images of class '0' "
                                                  "from split 'train' but only 174 remain")


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


def digits_config_spec(**target) -> DataSpec:
    """The data section of configs/digits.yaml, with target fields changed."""
    spec = OmegaConf.merge(OmegaConf.structured(DataSpec), OmegaConf.load(DIGITS).data)
    for key, value in target.items():
        spec.target[key] = value
    return spec


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """configs/digits.yaml prepared as the main run (target n = 64), then with n = 16 sharing it, in the
    sweep's layout: (main data dir, member data dir, member manifest, member log lines)."""
    runs = tmp_path_factory.mktemp("runs")
    main, member = runs / "digits" / "data", runs / "digits" / "sweep" / "n16" / "data"
    prepare(digits_config_spec(), main, log=lambda line: None)
    lines = []
    manifest = prepare(digits_config_spec(count=16), member, log=lines.append, shared=main)
    return main, member, manifest, lines


def test_the_reference_ignores_the_target_size_and_targets_nest(sweep):
    main, member, manifest, _ = sweep
    main_manifest = load_manifest(main)
    keys = {}
    for data_dir, m in [(main, main_manifest), (member, manifest)]:
        for name in ("reference", "target"):
            keys[data_dir, name] = {k for path in shard_paths(data_dir, m, name) for k in shard_members(path)}
    assert keys[main, "reference"] == keys[member, "reference"] and len(keys[main, "reference"]) == 200
    assert len(keys[member, "target"]) == 16 and len(keys[main, "target"]) == 64
    assert keys[member, "target"] < keys[main, "target"]
    # 16 and 64 x (0.13 x 5, 0.07 x 5), each class within quota (2.08 -> 3 or 2, 1.12 -> 1; 8.32 -> 9 or 8,
    # 4.48 -> 5 or 4), and every class count grows with n.
    assert list(population_entry(manifest, "target")["class_histogram"].values()) == [3] + [2] * 4 + [1] * 5
    assert list(population_entry(main_manifest, "target")["class_histogram"].values()) == \
        [9] * 3 + [8] * 2 + [5] + [4] * 4


def test_shared_populations_are_not_written_again(sweep):
    main, member, manifest, lines = sweep
    main_manifest = load_manifest(main)
    assert sorted(p.name for p in member.iterdir()) == ["manifest.json", "target"]
    shared = ["aux-low", "aux-high", "aux-even", "reference"]
    counts = {name: population_entry(main_manifest, name)["count"] for name in shared}
    assert lines == [*(f"population {name} ({'reference' if name == 'reference' else 'aux'}): {counts[name]} images "
                       f"shared with {main}" for name in shared),
                     "population target (target): 16 images from 'train' in 8 shards", f"wrote {member}/manifest.json"]
    for name in shared:
        entry, main_entry = population_entry(manifest, name), population_entry(main_manifest, name)
        assert entry["shards"][0]["file"] == f"../../../data/{name}/shard-000000.tar"
        assert [(os.path.normpath(member / s["file"]), s["sha256"], s["count"]) for s in entry["shards"]] == \
               [(str(main / s["file"]), s["sha256"], s["count"]) for s in main_entry["shards"]]
        assert entry["contents"] == dict(main_entry["contents"], file=f"../../../data/{name}/contents.txt")
        assert (entry["items"], entry["hash"]) == (main_entry["items"], main_entry["hash"])
        images, labels = read_population(member, name)
        main_images, main_labels = read_population(main, name)
        assert torch.equal(images, main_images) and torch.equal(labels, main_labels)
    assert population_entry(manifest, "target")["items"] != population_entry(main_manifest, "target")["items"]
    assert read_population(member, "target")[0].shape == (16, 1, 8, 8)
    assert manifest["disjoint"] is True and manifest["order"] == [*shared, "target"]
    # Both manifests verify: preparing either again finds every file intact and writes nothing.
    before = file_times(main) | file_times(member)
    for data_dir, spec in [(main, digits_config_spec()), (member, digits_config_spec(count=16))]:
        lines = []
        prepare(spec, data_dir, log=lines.append)
        assert lines == [f"shards up to date in {data_dir}"]
    assert file_times(main) | file_times(member) == before


def test_a_damaged_shared_population_is_written_locally(sweep, tmp_path):
    main, member, manifest, _ = sweep
    copy_main, copy_member = tmp_path / "digits" / "data", tmp_path / "digits" / "sweep" / "n16" / "data"
    shutil.copytree(main, copy_main)
    shutil.copytree(member, copy_member)
    (copy_main / "aux-even" / "shard-000003.tar").unlink()
    lines = []
    rewritten = prepare(digits_config_spec(count=16), copy_member, log=lines.append, shared=copy_main)
    assert any(line.startswith("population aux-even: ") and line.endswith("is missing; rewriting it") for line in lines)
    assert sorted(p.name for p in copy_member.iterdir()) == ["aux-even", "manifest.json", "target"]
    entry = population_entry(rewritten, "aux-even")
    assert entry["shards"][3]["file"] == "aux-even/shard-000003.tar"
    original = population_entry(manifest, "aux-even")["shards"]
    assert [s["sha256"] for s in entry["shards"]] == [s["sha256"] for s in original]
    assert {k: v for k, v in rewritten["populations"].items() if k != "aux-even"} == \
           {k: v for k, v in manifest["populations"].items() if k != "aux-even"}


def folder_spec(path, **changes) -> DataSpec:
    """Three classes of an image folder: aux takes all of a, the reference all of b, the target all of c."""
    spec = DataSpec(
        source=SourceSpec(kind="folder", path=str(path), image_size=8),
        aux=[PopulationSpec(name="aux", mixture={"a": 1.0}, count=3, seed=1)],
        reference=PopulationSpec(name="reference", mixture={"b": 1.0}, count=3, seed=2),
        target=PopulationSpec(name="target", mixture={"c": 1.0}, count=3, seed=3),
        min_shards=2, max_shard_images=10)
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


def test_duplicate_images_are_kept_once(tmp_path):
    # b/00 is a/01 saved as a BMP, c/01 is c/00 again: equal pixels, different files.
    folder = write_folder(tmp_path / "images", {"a": [(1, 1, 1), (2, 2, 2), (3, 3, 3)],
                                                "b": [(2, 2, 2), (4, 4, 4), (5, 5, 5)],
                                                "c": [(6, 6, 6), (6, 6, 6), (7, 7, 7)]})
    Image.open(folder / "b" / "00.png").save(folder / "b" / "00.bmp")
    (folder / "b" / "00.png").unlink()
    data_dir = tmp_path / "data"
    lines = []
    manifest = prepare(folder_spec(folder), data_dir, log=lines.append)
    reference, target = population_entry(manifest, "reference"), population_entry(manifest, "target")
    assert reference["skipped"] == [{"key": "train-0000003", "reason": "duplicate of train-0000001"}]
    assert (reference["count"], reference["class_histogram"]) == (2, {"a": 0, "b": 2, "c": 0})
    # Which of c/00 (train-0000006) and c/01 (train-0000007) is written depends on the seeded shard order.
    (skipped,) = target["skipped"]
    kept = skipped["reason"].removeprefix("duplicate of ")
    assert {skipped["key"], kept} == {"train-0000006", "train-0000007"} and target["count"] == 2
    assert ("warning: population reference: 1 of its 3 images skipped (listed in its manifest entry); the first: "
            "train-0000003: duplicate of train-0000001") in lines
    pixels = {name: population_pixels(data_dir, manifest, name) for name in manifest["order"]}
    assert sorted(pixels["target"]) == sorted([kept, "train-0000008"])
    all_pixels = [digest for population in pixels.values() for digest in population.values()]
    assert len(all_pixels) == len(set(all_pixels)) == 7
    assert manifest["disjoint"] is True and manifest["overlaps"] == {}
    # Rewriting the reference alone checks it against the aux's content sidecar: the same entry again.
    shutil.rmtree(data_dir / "reference")
    assert prepare(folder_spec(folder), data_dir, log=lambda line: None) == manifest


def test_grey_folder_prepares_one_channel_and_can_be_forced_to_rgb(tmp_path):
    levels = {"a": [10, 20, 30], "b": [40, 50, 60], "c": [70, 80, 90]}
    folder = tmp_path / "grey"
    write_folder(folder, {c: [Image.new("L", (8, 8), v) for v in values] for c, values in levels.items()})
    for channels, expected in [("auto", 1), ("3", 3)]:
        spec = folder_spec(folder)
        spec.source.channels = channels
        manifest = prepare(spec, tmp_path / channels, log=lambda line: None)
        assert manifest["channels"] == expected
        images, labels = read_population(tmp_path / channels, "target")
        assert images.shape == (3, expected, 8, 8)
        assert sorted(images[:, :, 0, 0].tolist()) == [[v] * expected for v in levels["c"]]
        mode = {1: "L", 3: "RGB"}[expected]
        for path in shard_paths(tmp_path / channels, manifest, "aux"):
            for member, data in shard_files(path).items():
                if member.endswith(".png"):
                    assert Image.open(io.BytesIO(data)).mode == mode
