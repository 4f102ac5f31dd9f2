"""The measurements file (evaluation/measurements.py): what an entry holds of the raw results, an exact round
trip through the file, and a file of another schema refused with a message."""
import json

import pytest
import torch

from evaluation.intervals import Interval, mean_se
from evaluation.measurements import SCHEMA, by_class, entry, read_measurements, write_measurements
from shards.errors import ModelError
from tests.constructed_measurements import measurements, model

COPIES = {"copy_share": 0.125, "train_distance": 20.0, "held_out_distance": 60.0}


def test_an_entry_holds_the_raw_results_in_the_report_units():
    nll = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64)
    made = entry("a model", fd=Interval(5.0, 4.0, 7.0), fd_rounds=[4.5, 6.0], kid=(0.5, 0.25), copies=COPIES,
                 pixels=16, nll=nll,
                 loss=torch.tensor([0.25, 0.75]), classes=[0.5, 0.25, 0.25], reference_classes=[0.25, 0.25, 0.5],
                 weights=[[0.5, 0.5]], fit_minutes=1.5)
    assert made["nll"] == {"mean": mean_se(nll)[0], "se": mean_se(nll)[1], "n": 3, "per_image": [1.0, 1.5, 3.0]}
    assert made["loss"] == {"mean": 0.5, "se": 0.25, "n": 2}  # no per-image values: the loss is not compared
    assert made["fd"] == {"value": 5.0, "low": 4.0, "high": 7.0, "rounds": [4.5, 6.0]}
    assert made["kid"] == {"mean": 0.5, "std": 0.25}
    assert (made["copy_share"], made["nn_train"], made["nn_held_out"]) == (0.125, 5.0, 15.0)  # / sqrt(16 pixels)
    assert made["class_tv"] == 0.25 and made["class_proportions"] == [0.5, 0.25, 0.25]
    assert made["weights"] == [[0.5, 0.5]] and made["fit_minutes"] == 1.5 and made["nfe"] is None

    floor = entry("a floor", fd=3.0, kid=(0.0, 0.0), copies=COPIES, pixels=4, nll=torch.tensor([2.0]))
    assert floor["fd"] == {"value": 3.0, "low": None, "high": None, "rounds": None}  # no bootstrap rounds
    assert floor["nll"] is None and floor["loss"] is None  # one image has no standard error
    assert floor["class_proportions"] is None and floor["class_tv"] is None


def test_the_nll_by_class_is_each_class_estimate():
    """Images of classes 0, 2, 0, 2, 1 (of 3 classes): class 0 has 1.0 and 2.0 (mean 1.5, se 0.5), class 2 has
    3.0 and 5.0 (4.0 ± 1.0), class 1 one image (no standard error: None). No labels, or unlabelled images
    (-1): no per-class NLL."""
    nll = torch.tensor([1.0, 3.0, 2.0, 5.0, 7.0], dtype=torch.float64)
    made = entry("a model", fd=3.0, kid=(0.0, 0.0), copies=COPIES, pixels=4, nll=nll, nll_labels=[0, 2, 0, 2, 1],
                 class_count=3)
    assert made["nll_by_class"] == [{"mean": 1.5, "se": 0.5, "n": 2}, None, {"mean": 4.0, "se": 1.0, "n": 2}]
    assert entry("a model", fd=3.0, kid=(0.0, 0.0), copies=COPIES, pixels=4, nll=nll)["nll_by_class"] is None
    assert entry("a model", fd=3.0, kid=(0.0, 0.0), copies=COPIES, pixels=4, nll=nll, nll_labels=[0, -1, 0, 1, 1],
                 class_count=2)["nll_by_class"] is None
    with pytest.raises(ValueError, match="4 labels for 5 values"):
        by_class(nll, [0, 1, 0, 1], 2)


def test_the_file_round_trips_exactly(tmp_path):
    made = measurements({"aux/a": model([2.5, 2.0, 2.25]),
                         "fused-exact": model([2.0, 2.1, 2.3], loss=[0.1, 0.3]),
                         "fused-uniform": model([2.0, 2.2, 2.3], fd=(10.5, 8.0, 12.0), own=[0.1, 0.2, 0.3, 0.4]),
                         "target-scratch": model([1.0 / 3, 2.0 / 7, 0.1 + 0.2], fd=(20.0, 18.0, 22.0))},
                        floors={"real: held-out half vs half": model(fd=(1.0, None, None))}, sweep_n=16,
                        best_auxiliary="aux/a")
    path = tmp_path / "measurements.json"
    write_measurements(path, made)
    assert json.loads(path.read_text())["schema"] == SCHEMA
    assert read_measurements(path) == made
    assert [p.name for p in tmp_path.iterdir()] == ["measurements.json"]  # written atomically, nothing left over


def test_another_schema_or_no_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "measurements.json"
    with pytest.raises(ModelError, match="run `scorefuse evaluate` first"):
        read_measurements(path)
    path.write_text(json.dumps({"schema": SCHEMA + 1, "models": {}}))
    with pytest.raises(ModelError, match=f"schema {SCHEMA + 1}, this version reads {SCHEMA}.*evaluate"):
        read_measurements(path)
