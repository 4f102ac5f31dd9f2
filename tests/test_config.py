"""Config mistakes fail before any work, with the key or path in one message."""
import os
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import pytest

from launch.cli import main
from shards.errors import ConfigError
from shards.ranges import CHOICES, RANGE
from stages.config import RunConfig, load_config

DIGITS = Path(__file__).parents[1] / "configs" / "digits.yaml"


def test_digits_config_loads_with_overrides():
    cfg = load_config(DIGITS, ["train.total_kimg=3", "name=x"])
    assert cfg.train.total_kimg == 3.0 and cfg.name == "x"
    assert [p.name for p in cfg.data.aux] == ["aux-low", "aux-high", "aux-even"]
    assert cfg.data.target.count == 64


def test_yaml_boolean_words_stay_strings_in_string_fields():
    cfg = load_config(DIGITS, ["train.precision=bf16", "train.precision=no", "name=off", "data.workers=1"])
    assert cfg.train.precision == "no" and cfg.name == "off"


@pytest.mark.parametrize("override, needle", [
    ("train.bacth=3", "train.bacth"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("train.batch=lots", "train.batch"),
    ("train.precision=fp8", "train.precision"),
    ("train.keep_checkpoints=1", "keep_checkpoints"),
    ("data.source.kind=cifar10", "data.source.path"),
    ("eval.inception_weights=/no/such/weights.pth", "/no/such/weights.pth"),
    ("train.batch=100", "train.accum"),
])
def test_bad_overrides_name_the_key(override, needle):
    extra = ["train.accum=3"] if override == "train.batch=100" else []
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(DIGITS, [override, *extra])


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text().replace("  lr: 0.002", "  lr: 0.002\n  learning_rate: 0.1"))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(bad)


def test_missing_source_path(tmp_path):
    with pytest.raises(ConfigError, match="/nowhere/cifar-10-python.tar.gz"):
        load_config(DIGITS, ["data.source.kind=cifar10", "data.source.path=/nowhere/cifar-10-python.tar.gz"])


def test_cli_reports_one_line_and_exits_2_without_touching_the_run_dir(tmp_path):
    """The one case run as a real process: its exit code and its whole stderr, as README shows them."""
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", "--config", str(DIGITS),
                           f"root={tmp_path}", "train.bacth=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "scorefuse: error: unknown key 'train.bacth' (scorefuse config prints every key)\n"
    assert not any(tmp_path.iterdir())


def test_overrides_reach_list_elements_and_replace_dicts():
    cfg = load_config(DIGITS, ["data.aux.0.count=300", 'data.target.mixture={"0": 0.5, "1": 0.5}',
                               "fuse.sigma_bins=[0.5, 5]", "eval.inception_weights=null", "train.lr=1e-3"])
    assert cfg.data.aux[0].count == 300 and cfg.data.aux[1].count == 380
    assert dict(cfg.data.target.mixture) == {"0": 0.5, "1": 0.5}  # replaced, not merged into the old ten
    assert list(cfg.fuse.sigma_bins) == [0.5, 5.0] and cfg.eval.inception_weights is None and cfg.train.lr == 1e-3


# One bad value of each kind (a range, a choice, a list index, a dict, a file, a preset, two related keys...)
# and its message, word for word: the messages are the interface.
BAD_VALUES = {
    "train.total_kimg=-1": "train.total_kimg=-1.0: must be positive",
    "data.workers=-1": "data.workers=-1: must be 0 or more",
    "train.lr=-1": "train.lr=-1.0: must be positive",
    "data.aux.0.count=0": "data.aux.0.count=0: a population needs at least one image",
    "data.aux.1.seed=-2": "data.aux.1.seed=-2: must be 0 or more",
    "data.aux.7.count=3": "unknown key 'data.aux.7.count' (scorefuse config prints every key)",
    'data.target.mixture={"0": 0.9}': "data.target.mixture: proportions sum to 0.9, not 1 ({'0': 0.9})",
    "eval.copy_threshold=2": "eval.copy_threshold=2.0: must be in (0, 1)",
    "edm.sampler_steps=1": "edm.sampler_steps=1: must be at least 2",
    "fuse.sgd_momentum=1": "fuse.sgd_momentum=1.0: must be in [0, 1)",
    "distill.real_mix=2": "distill.real_mix=2.0: must be in [0, 1]",
    "distill.lr_d=0": "distill.lr_d=0.0: must be positive",
    "launch.timeout_minutes=0": "launch.timeout_minutes=0: must be positive",
    "train.keep_checkpoints=1": "train.keep_checkpoints=1: must be at least 2 (the newest may be half-written)",
    "data.source.channels=2": "data.source.channels: '2' is not auto | 1 | 3",
    "train.log_with=x": "train.log_with: 'x' is not none | tensorboard | wandb | all",
    "distill.teacher_fit=best": "distill.teacher_fit: 'best' is not \"\" | exact | sgd | mixture",
    "eval.fd_reference=nope": "eval.fd_reference: no population 'nope' (have: aux-low, aux-high, aux-even, target, "
                              "reference)",
    "network.preset=huge": "network.preset: unknown preset 'huge' (tiny | ddpmpp-cifar10 | ddpmpp-28 | ddpmpp-64)",
    "fuse.router_preset=huge": "fuse.router_preset: unknown preset 'huge' (tiny | ddpmpp-cifar10 | ddpmpp-28 | ddpmpp-64)",
    "train.resume=/no/such/ckpt": "train.resume: /no/such/ckpt is not latest, none or a checkpoint directory",
    "edm.sigma_min=100": "edm.sigma_min (100.0) must be below edm.sigma_max (80.0)",
    "train.adam_betas=[0.9]": "train.adam_betas must be two numbers in [0, 1), got [0.9]",
    "data.reference.split=val": "data.reference.split: 'val' is not train | test",
    "eval.nll_steps=0": "eval.nll_steps=0: must be at least 1",
    "eval.test_draws_per_image=0": "eval.test_draws_per_image=0: must be positive",
    "fuse.validation_share=1": "fuse.validation_share=1.0: must be in [0, 1)",
}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`scorefuse ARGS` in this process (the CLI's code path but for the interpreter's start-up, ~3 s):
    (exit code, stdout, stderr). The environment is left as it was: a command past its config sets
    DS_ACCELERATOR on a CPU machine."""
    environment = dict(os.environ)
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        os.environ.clear()
        os.environ.update(environment)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("override, message", BAD_VALUES.items(), ids=list(BAD_VALUES))
def test_a_bad_value_of_any_kind_of_key_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, override,
                                                                                    message):
    code, _, err = cli(capsys, "prepare", "--config", str(DIGITS), f"root={tmp_path}", override)
    assert code == 2 and err == f"scorefuse: error: {message}\n"
    assert not any(tmp_path.iterdir())


def test_a_value_on_the_edge_of_its_range_is_accepted():
    cfg = load_config(DIGITS, ["train.keep_checkpoints=2", "fuse.sgd_momentum=0", "distill.real_mix=1",
                               "eval.nll_steps=1", "data.workers=0", "distill.teacher_fit=", "distill.lr_d=null"])
    assert cfg.distill.real_mix == 1.0 and cfg.distill.teacher_fit == "" and cfg.distill.lr_d is None
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\)"):
        load_config(DIGITS, ["eval.copy_threshold=0"])


def scalar_fields(spec_type, prefix=""):
    """(dotted key, field, the types it may hold) of every plain value of the schema (list elements unnumbered)."""
    hints = get_type_hints(spec_type)
    for f in fields(spec_type):
        key, kind = prefix + f.name, hints[f.name]
        if is_dataclass(kind):
            yield from scalar_fields(kind, key + ".")
        elif get_origin(kind) is list and is_dataclass(get_args(kind)[0]):
            yield from scalar_fields(get_args(kind)[0], key + ".")
        elif get_origin(kind) in (None, Union):  # a plain or Optional value, not a list or dict
            yield key, f, set(get_args(kind) or (kind,))


def test_every_number_and_word_of_the_schema_declares_what_it_accepts():
    """A new key gets its range or choices beside its field. The exceptions are checked by hand in
    stages/config.py, or take any value (p_mean: a log-normal's mean; names, paths, presets)."""
    by_hand = {"data.aux.count", "data.target.count", "data.reference.count", "edm.sigma_max", "network.preset",
               "fuse.router_preset", "train.resume", "eval.fd_reference", "distill.real_population",
               "distill.g_preset", "distill.d_preset", "data.source.path", "eval.inception_weights"}
    free = {"name", "root", "data.aux.name", "data.target.name", "data.reference.name", "edm.p_mean",
            "data.aux.pretrained", "data.aux.revision", "data.aux.subfolder"}  # a model's path or hub id, its version
    undeclared = [key for key, f, types in scalar_fields(RunConfig) if types & {int, float, str}
                  and RANGE not in f.metadata and CHOICES not in f.metadata and key not in by_hand | free]
    assert not undeclared, undeclared


def test_cli_version_help_default_config_and_the_resolved_config(capsys):
    def stdout(*args) -> str:
        code, out, _ = cli(capsys, *args)
        assert code == 0
        return out
    assert stdout("--version").startswith("scorefuse ")
    help_text = stdout("sample", "--help")
    assert "model=VALUE" in help_text and "out=VALUE" in help_text and "examples:" in help_text
    printed = stdout("config", "train.total_kimg=7")  # no --config: configs/digits.yaml
    assert "name: digits" in printed and "total_kimg: 7.0" in printed


def test_all_shipped_configs_are_valid_schema(tmp_path):
    """Every config in configs/ loads; those that name data that is not here (CIFAR-10, LSUN, Fashion-MNIST where
    it is not installed) are refused for that path alone, and load with a directory in its place."""
    paths = sorted(DIGITS.parent.glob("*.yaml"))
    assert {"cifar10.yaml", "cifar10_smm.yaml", "lsun.yaml", "digits_disjoint.yaml"} <= {p.name for p in paths}
    for path in paths:
        try:
            cfg = load_config(path)
        except ConfigError as error:
            assert "data.source.path" in str(error), (path.name, error)
            fake = tmp_path / path.stem
            fake.mkdir()
            cfg = load_config(path, [f"data.source.path={fake}"])
        assert cfg.train.batch > 0
