"""configs/fashion_mnist.yaml, ScoreFusion's experiment at its scale: its populations fit the real Fashion-MNIST
at the largest sweep size, none of the auxiliaries has the target's mixture, the held-out reference comes from
the test split, and `scorefuse prepare` writes it (cut down, on IDX files the test writes) with the splits and
disjointness in the manifest."""
import json
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import load_manifest
from shards.populations import allocate_counts, draw_populations, ordered_populations
from shards.sources import open_source
from stages.config import load_config
from stages.rundir import RunDir, is_finished
from tests.conftest import FAST, ROOT, scorefuse, scorefuse_here
from tests.test_sources import FASHION_MNIST, write_idx_set

CONFIG = ROOT / "configs" / "fashion_mnist.yaml"


def config(*overrides):
    """The config, its source pointed at the real files (or at a stand-in directory where they are missing)."""
    path = [] if FASHION_MNIST.is_dir() else [f"data.source.path={ROOT}"]
    return load_config(CONFIG, [*path, *overrides])


def test_the_design_is_the_papers():
    cfg = config()
    assert cfg.sweep.sizes == [64 * 2 ** i for i in range(9)]  # 64 ... 16,384
    assert sum(pop.count for pop in cfg.data.aux) == 40000 and len(cfg.data.aux) == 4
    assert cfg.data.reference.split == "test" and cfg.data.reference.count == 5000
    assert {pop.split for pop in [*cfg.data.aux, cfg.data.target]} == {"train"}
    assert cfg.data.target.mixture == cfg.data.reference.mixture
    assert all(pop.mixture != cfg.data.target.mixture for pop in cfg.data.aux)
    tops = ["tshirt", "pullover", "dress", "coat", "shirt"]
    assert [round(sum(pop.mixture[c] for c in tops), 6) for pop in [*cfg.data.aux, cfg.data.target]] == \
        [0.1, 0.3, 0.7, 0.9, 0.6]


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed (apt-get install "
                    "dataset-fashion-mnist)")
def test_the_real_files_hold_every_population_at_the_largest_size():
    """Drawn (not written) at n = 16,384: every population gets its exact class counts, and no training item is in
    two of them; a top class keeps 34 of its 6,000 training images."""
    cfg = config(f"data.target.count={max(config().sweep.sizes)}")
    source = open_source(cfg.data.source)
    drawn = draw_populations(source, ordered_populations(cfg.data))
    train = np.concatenate([indices for split, indices in drawn.values() if split == "train"])
    assert len(np.unique(train)) == len(train) == 40000 + 16384
    assert drawn["reference"][0] == "test" and len(drawn["reference"][1]) == 5000
    used = np.bincount(source.labels("train")[train], minlength=10)
    target = allocate_counts(16384, [cfg.data.target.mixture[c] for c in source.class_names])
    np.testing.assert_array_equal(used, 4000 + target)
    assert 6000 - used.max() == 34


def test_prepare_writes_it_cut_down(tmp_path, capfd):
    """The config with every population a hundredth of its size, on a 10-class IDX set written here: prepare
    exits 0, and the manifest records each population's split and that no image is in two."""
    idx = tmp_path / "idx"
    write_idx_set(idx, gz=True, counts=(600, 100), classes=10)
    code, _, err = scorefuse_here(capfd, "prepare", "--config", CONFIG, f"root={tmp_path / 'runs'}",
                                  f"data.source.path={idx}", *(f"data.aux.{i}.count=100" for i in range(4)),
                                  "data.reference.count=50", "data.target.count=16", "data.min_shards=2")
    assert code == 0, err
    manifest = load_manifest(Path(tmp_path / "runs" / "fashion_mnist" / "data"))
    assert manifest["disjoint"] and manifest["class_names"][0] == "tshirt"
    assert {name: (entry["split"], entry["count"]) for name, entry in manifest["populations"].items()} == {
        "tops-10": ("train", 100), "tops-30": ("train", 100), "tops-70": ("train", 100), "tops-90": ("train", 100),
        "reference": ("test", 50), "target": ("train", 16)}


@pytest.mark.slow
def test_a_tiny_fashion_mnist_shaped_run_through_fuse(tmp_path):
    """prepare -> train-aux -> fuse with the config's populations (cut down), on a 28x28 IDX set written here
    (prepared at 16x16), the fast pipeline's settings and the tiny network: lambda over the four auxiliaries fitted on the 16 target
    images, streamed from their shards, pi by EM, and every baseline finished."""
    idx = tmp_path / "idx"
    write_idx_set(idx, gz=False, counts=(600, 100), classes=10)
    overrides = [f"root={tmp_path / 'runs'}", f"data.source.path={idx}",
                 *(f"data.aux.{i}.count=100" for i in range(4)),
                 "data.reference.count=50", "data.target.count=16", "data.min_shards=2", "data.workers=0",
                 "data.source.image_size=16", "network.preset=tiny", "train.precision=no", "eval.sample_precision=no", "fuse.batch=8",
                 "fuse.router_batch=32", *FAST]
    scorefuse("run", "--config", CONFIG, "stages=prepare,train-aux,fuse", *overrides)
    run = RunDir.of(load_config(CONFIG, overrides))
    fit = json.loads(run.lambda_file.read_text())
    assert fit["names"] == ["tops-10", "tops-30", "tops-70", "tops-90"] and fit["target_images"] == 16
    assert sum(fit["exact"]["lambda"][0]) == pytest.approx(1.0)  # one sigma bin
    assert json.loads(run.mixture_file.read_text())["target_images"] == 16
    assert all(is_finished(run.baseline(b)) for b in ("target-scratch", "target-finetune", "checkpoint-merge"))
