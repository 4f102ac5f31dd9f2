"""Readers: eval passes see every sample once under ranks x workers; the training stream resumes
bit-identically; corrupt data is skipped with one warning and stops the reader past the limit, each bad
sample counted once however often the endless stream meets it."""
import io
import shutil
import tarfile
from itertools import count as count_from, islice

import numpy as np
import pytest
import torch
import webdataset as wds

from shards.errors import DataError
from shards.manifest import load_manifest, shard_paths
from shards.prepare import prepare, write_shard
from shards.spec import DataSpec, PopulationSpec, SourceSpec
from shards import stream
from shards.stream import (BadSampleCounter, TrainStream, population_batches, read_population, shard_samples,
                           train_loader)

POPULATION = "reference"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    spec = DataSpec(
        source=SourceSpec(kind="digits", image_size=8),
        aux=[],
        target=PopulationSpec(name="target", mixture={"1": 1.0}, count=6, seed=1),
        reference=PopulationSpec(name=POPULATION, mixture={str(c): 0.1 for c in range(10)}, count=70, seed=2),
        min_shards=6, max_shard_images=100)
    prepare(spec, data_dir, log=lambda line: None)
    return data_dir


def shard_keys(path):
    with tarfile.open(path) as archive:
        return sorted({name.rsplit(".", 1)[0] for name in archive.getnames()})


def all_keys(data_dir):
    manifest = load_manifest(data_dir)
    return [key for path in shard_paths(data_dir, manifest, POPULATION) for key in shard_keys(path)]


def test_read_population_in_shard_order(data_dir):
    images, labels = read_population(data_dir, POPULATION)
    assert images.shape == (70, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [7] * 10
    in_order = []
    for path in shard_paths(data_dir, load_manifest(data_dir), POPULATION):
        with tarfile.open(path) as archive:
            in_order += [int(archive.extractfile(m).read()) for m in archive.getmembers() if m.name.endswith(".cls")]
    assert labels.tolist() == in_order


def test_population_batches_deal_one_pass_over_the_ranks(data_dir, monkeypatch):
    """Batches of 8 of the 70 images (the last one 6), batch i to rank i % 3: together the ranks' batches are
    read_population's images in order, and each rank reads every shard once (decoding only its own batches)."""
    images, labels = read_population(data_dir, POPULATION)
    reads = []
    monkeypatch.setattr(stream, "shard_samples", lambda path, *args: reads.append(path) or shard_samples(path, *args))
    shares = {rank: list(population_batches(data_dir, POPULATION, 8, rank=rank, world_size=3)) for rank in range(3)}
    paths = shard_paths(data_dir, load_manifest(data_dir), POPULATION)
    assert reads == paths * 3
    assert {rank: [index for index, _, _ in share] for rank, share in shares.items()} == {
        0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]}
    dealt = sorted((index, batch, batch_labels) for share in shares.values() for index, batch, batch_labels in share)
    assert [len(batch) for _, batch, _ in dealt] == [8] * 8 + [6]
    assert torch.equal(torch.cat([batch for _, batch, _ in dealt]), images)
    assert torch.equal(torch.cat([batch_labels for _, _, batch_labels in dealt]), labels)


def batches(loader, count):
    return list(islice(iter(loader), count))


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for (images_a, labels_a), (images_b, labels_b) in zip(left, right):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("num_workers,resume_at", [(0, 10), (2, 10), (2, 11)])
def test_train_stream_resumes_bit_identically(data_dir, num_workers, resume_at):
    def loader(start_batch):
        return train_loader(data_dir, POPULATION, batch_size=8, seed=3, rank=0, world_size=1,
                            num_workers=num_workers, start_batch=start_batch)

    uninterrupted = batches(loader(0), 20)
    images, labels = uninterrupted[0]
    assert images.shape == (8, 1, 8, 8) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert_same_batches(batches(loader(resume_at), 20 - resume_at), uninterrupted[resume_at:])


def test_train_stream_depends_on_rank_and_seed(data_dir):
    def first_batches(seed, rank):
        stream = TrainStream(data_dir, POPULATION, batch_size=8, seed=seed, rank=rank, world_size=2,
                             num_workers=0)
        return [labels for _, labels in islice(iter(stream), 3)]

    base = first_batches(seed=3, rank=0)
    assert_same_batches([(b, b) for b in base], [(b, b) for b in first_batches(seed=3, rank=0)])
    assert any(not torch.equal(a, b) for a, b in zip(base, first_batches(seed=3, rank=1)))
    assert any(not torch.equal(a, b) for a, b in zip(base, first_batches(seed=4, rank=0)))


def spoil(path, positions) -> list:
    """Rewrite a shard with the samples at `positions` holding text instead of a PNG; returns their keys."""
    samples = list(wds.WebDataset(path, shardshuffle=False))
    bad_keys = [samples[p]["__key__"] for p in positions]
    with wds.TarWriter(path) as writer:
        for sample in samples:
            png = b"not an image" if sample["__key__"] in bad_keys else sample["png"]
            writer.write({"__key__": sample["__key__"], "png": png, "cls": sample["cls"]})
    return bad_keys


@pytest.fixture
def damaged_dir(data_dir, tmp_path):
    """A copy with shard 0 truncated and one sample of shard 1 holding text instead of a PNG."""
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    paths = shard_paths(damaged, load_manifest(damaged), POPULATION)
    truncated = paths[0]
    with open(truncated, "r+b") as handle:
        handle.truncate(handle.seek(0, io.SEEK_END) // 2)
    bad_key, = spoil(paths[1], [3])
    return damaged, truncated, paths[1], bad_key


def test_corrupt_data_is_skipped_with_one_warning(damaged_dir, capfd):
    damaged, truncated, rewritten, bad_key = damaged_dir
    images, _ = read_population(damaged, POPULATION)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert f"population {POPULATION}" in warnings[0] and truncated in warnings[0]
    intact = [key for path in shard_paths(damaged, load_manifest(damaged), POPULATION)[1:]
              for key in shard_keys(path) if key != bad_key]
    # every intact sample of the other shards, and some of the truncated one, but not the undecodable one
    assert len(intact) <= len(images) < 69


def test_corrupt_data_over_the_limit_stops_the_reader(damaged_dir, capfd):
    damaged, truncated, rewritten, bad_key = damaged_dir
    with pytest.raises(DataError, match=f"more than 1 corrupt samples in population {POPULATION}; "
                                        f"first: key .* in file {truncated}"):
        read_population(damaged, POPULATION, max_bad_samples=1)
    # Which of the two bad shards the stream meets first depends on its seed; either must stop it.
    first = rf"(key {bad_key} in file {rewritten}: UnidentifiedImageError|key unknown in file {truncated})"
    with pytest.raises(DataError, match=f"more than 0 corrupt samples in population {POPULATION}; first: {first}"):
        for _ in islice(TrainStream(damaged, "reference", batch_size=4, seed=0, rank=0, world_size=1,
                                    num_workers=0, max_bad_samples=0), 200):
            pass
    capfd.readouterr()


def test_missing_shard_and_unknown_population(data_dir, tmp_path):
    with pytest.raises(DataError, match="unknown population 'nope'"):
        read_population(data_dir, "nope")
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "target" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="population target: shard .*target/shard-000001.tar is missing"):
        TrainStream(broken, "target", batch_size=2, seed=0, rank=0, world_size=1, num_workers=0)


@pytest.mark.parametrize("cut,readable", [(100, 0), (700, 0), (1024, 0), (1500, 0), (2048, 1), (2500, 1)])
def test_a_truncated_shard_counts_once_wherever_it_is_cut(tmp_path, cut, readable, capfd):
    """Cut inside a header, inside member data, and exactly at member boundaries (which tar reads as a
    clean end; only the manifest count reveals it). Each 512-byte header is followed by one data block
    here: sample 0 spans bytes 0..2048 (cls header, cls data, png header, png data)."""
    path = tmp_path / "shard.tar"
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4, 1)
    write_shard(path, [(f"k{i}", images[i], i) for i in range(5)])
    path.write_bytes(path.read_bytes()[:cut])
    counter = BadSampleCounter("p", max_bad_samples=5)
    samples = list(shard_samples(str(path), 5, counter))
    assert [s["__key__"] for s in samples] == ["k0"][:readable]
    assert counter.count == 1 and str(path) in counter.first
    assert capfd.readouterr().err.count("warning:") == 1


def test_the_counter_counts_distinct_samples(capfd):
    counter = BadSampleCounter("p", max_bad_samples=2)
    for _ in range(5):
        counter.record("a.tar", "k1", "bad png")
        counter.record("a.tar", "unknown", "truncated")
    assert counter.count == 2 and counter.first == "key k1 in file a.tar: bad png"
    with pytest.raises(DataError, match="more than 2 corrupt samples in population p; first: key k1 in file a.tar"):
        counter.record("b.tar", "k1", "bad png")  # the same key in another shard is another sample
    assert counter.count == 3
    assert capfd.readouterr().err.count("warning:") == 1


def visits_to(shard, stream, samples) -> int:
    """How often the stream (role 0, one bad sample in `shard`) reads `shard` while it yields `samples`
    samples: its own shard choices, replayed."""
    visits = 0
    for visit in count_from():
        chosen = int(np.random.default_rng([stream.seed, stream.rank, 0, visit]).integers(len(stream.shards.paths)))
        visits += chosen == shard
        samples -= stream.shards.counts[chosen] - (chosen == shard)
        if samples <= 0:
            return visits


@pytest.mark.parametrize("bad_samples", [1, 2])
def test_a_bad_sample_counts_once_in_the_endless_stream(data_dir, tmp_path, bad_samples, capfd):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(data_dir, spoilt)
    path = shard_paths(spoilt, load_manifest(spoilt), POPULATION)[2]
    spoil(path, range(bad_samples))
    stream = TrainStream(spoilt, POPULATION, batch_size=4, seed=0, rank=0, world_size=1, num_workers=0,
                         max_bad_samples=1)
    if bad_samples == 1:
        assert len(list(islice(stream, 200))) == 200
        assert visits_to(2, stream, 200 * 4) == 10  # the bad sample was met ten times and counted once
    else:
        with pytest.raises(DataError, match=f"more than 1 corrupt samples in population {POPULATION}; first: "
                                            f"key .* in file {path}"):
            for _ in islice(stream, 200):
                pass
    assert capfd.readouterr().err.count("warning:") == 1
