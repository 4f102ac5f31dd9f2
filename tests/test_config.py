"""Config mistakes fail before any work, with the key or path in one message."""
import subprocess
import sys
from pathlib import Path

import pytest

from shards.errors import ConfigError
from stages.config import load_config

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
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", "--config", str(DIGITS),
                           f"root={tmp_path}", "train.bacth=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.bacth" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_overrides_reach_list_elements_and_replace_dicts():
    cfg = load_config(DIGITS, ["data.aux.0.count=300", 'data.target.mixture={"0": 0.5, "1": 0.5}',
                               "fuse.sigma_bins=[0.5, 5]", "eval.inception_weights=null", "train.lr=1e-3"])
    assert cfg.data.aux[0].count == 300 and cfg.data.aux[1].count == 380
    assert dict(cfg.data.target.mixture) == {"0": 0.5, "1": 0.5}  # replaced, not merged into the old ten
    assert list(cfg.fuse.sigma_bins) == [0.5, 5.0] and cfg.eval.inception_weights is None and cfg.train.lr == 1e-3


BAD_VALUES = ["train.total_kimg=-1", "data.workers=-1", "train.lr=-1", "data.aux.0.count=0", "data.aux.7.count=3",
              'data.target.mixture={"0": 0.9}', "eval.copy_threshold=2", "edm.sampler_steps=1", "fuse.sgd_momentum=1",
              "distill.real_mix=2", "launch.timeout_minutes=0", "data.source.channels=2", "train.log_with=x",
              "eval.fd_reference=nope", "network.preset=huge", "train.resume=/no/such/ckpt", "edm.sigma_min=100",
              "train.adam_betas=[0.9]", "data.reference.split=val", "eval.nll_steps=0"]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_a_bad_value_of_any_kind_of_key_is_one_line_and_exit_2_with_nothing_written(tmp_path, override):
    key = override.split("=")[0]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", "--config", str(DIGITS),
                           f"root={tmp_path}", override], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scorefuse: error:") and key.rsplit(".", 1)[0] in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_cli_version_help_default_config_and_the_resolved_config(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)
    assert cli("--version").stdout.startswith("scorefuse ")
    help_text = cli("sample", "--help").stdout
    assert "model=VALUE" in help_text and "out=VALUE" in help_text and "examples:" in help_text
    printed = cli("config", "train.total_kimg=7").stdout  # no --config: configs/digits.yaml
    assert "name: digits" in printed and "total_kimg: 7.0" in printed


def test_all_shipped_configs_are_valid_schema(tmp_path):
    """cifar10/lsun configs name data that is not here; the schema part must still be right."""
    for name in ("cifar10.yaml", "cifar10_smm.yaml", "lsun.yaml"):
        path = DIGITS.parent / name
        with pytest.raises(ConfigError, match="data.source.path"):
            load_config(path)
        fake = tmp_path / name.replace(".yaml", "")
        fake.mkdir()
        cfg = load_config(path, [f"data.source.path={fake}"])
        assert cfg.train.batch > 0
