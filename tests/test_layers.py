"""The floors of the code, from the ground up: shards (data, errors, atomic files, pixels, seeds) <- trainer
(networks, fitting math, the engine) <- evaluation (metrics, intervals, the verdict) <- stages (the run config,
the run directory, the catalogue, one file per stage) <- launch (the CLI, SLURM). Each floor is imported in a
fresh interpreter, and nothing above it may have been loaded."""
import json
import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FLOORS = ["shards", "trainer", "evaluation", "stages", "launch"]


def loaded_by(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("floor", FLOORS[:-1])
def test_no_floor_imports_one_above_it(floor):
    modules = [f"{floor}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / floor)])]
    above = FLOORS[FLOORS.index(floor) + 1:]
    loaded = loaded_by(modules)
    assert not [m for m in loaded if m.split(".")[0] in above]


def test_the_engine_loads_no_config_stage_evaluation_or_data_preparation():
    loaded = loaded_by(["trainer.engine"])
    assert not [m for m in loaded if m.split(".")[0] in ("stages", "evaluation", "launch")]
    assert not {"shards.prepare", "shards.stream", "webdataset"} & loaded
