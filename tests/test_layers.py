"""The floors of the code, from the ground up: shards (data, errors, atomic files, pixels, seeds) <- trainer
(networks, fitting math, the engine) <- evaluation (metrics, intervals, the verdict) <- stages (the run config,
the run directory, the catalogue, one file per stage) <- launch (the CLI, SLURM). Each floor is imported in a
fresh interpreter, and nothing above it may have been loaded."""
import json
import os
import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FLOORS = ["shards", "trainer", "evaluation", "stages", "launch"]


def _importing(modules: list[str]) -> subprocess.Popen:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """What sys.modules holds after importing every module of each floor below the top (and trainer.engine
    alone), each in a fresh interpreter; the interpreters run side by side."""
    jobs = {floor: [f"{floor}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / floor)])] for floor in FLOORS[:-1]}
    jobs["trainer.engine"] = ["trainer.engine"]
    procs = {name: _importing(modules) for name, modules in jobs.items()}
    result = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"importing {jobs[name]}:\n{err}"
        result[name] = set(json.loads(out))
    return result


@pytest.mark.parametrize("floor", FLOORS[:-1])
def test_no_floor_imports_one_above_it(floor, loaded):
    above = FLOORS[FLOORS.index(floor) + 1:]
    assert not [m for m in loaded[floor] if m.split(".")[0] in above]


def test_the_engine_loads_no_config_stage_evaluation_or_data_preparation(loaded):
    engine = loaded["trainer.engine"]
    assert not [m for m in engine if m.split(".")[0] in ("stages", "evaluation", "launch")]
    assert not {"shards.prepare", "shards.stream", "webdataset"} & engine


def test_diffusers_loads_only_where_a_pretrained_model_is_loaded(loaded):
    # trainer.pretrained and stages.pretrained import it inside the functions that load a model
    assert not [floor for floor, modules in loaded.items() if "diffusers" in modules]
