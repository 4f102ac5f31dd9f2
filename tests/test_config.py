"""Config mistakes fail before any work, with the key or path in one message."""
import subprocess
import sys
from pathlib import Path

import pytest

from shards.errors import ConfigError
from trainer.config import load_config

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


def test_all_shipped_configs_are_valid_schema(tmp_path):
    """cifar10/lsun configs name data that is not here; the schema part must still be right."""
    for name in ("cifar10.yaml", "lsun.yaml"):
        path = DIGITS.parent / name
        with pytest.raises(ConfigError, match="data.source.path"):
            load_config(path)
        fake = tmp_path / name.replace(".yaml", "")
        fake.mkdir()
        cfg = load_config(path, [f"data.source.path={fake}"])
        assert cfg.train.batch > 0
