"""What the evaluation cache saves: `scorefuse evaluate` on a finished run (after `make demo`), run twice on a
copy of it whose cache starts empty: the first run samples every model, extracts features and integrates
the likelihood ODE; the second finds all of it cached and only recomputes the statistics and the report.
(bench/likelihood.py times the NLL per image.) The run's own size decides how long it takes.

    python bench/evaluate.py [--config configs/digits.yaml] [key=value ...]
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from stages.config import load_config  # noqa: E402
from stages.rundir import RunDir  # noqa: E402


def evaluate(config: str, overrides: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "evaluate", "--config", config, *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"evaluate failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    source = RunDir.of(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / cfg.name
        shutil.copytree(source.root, copy, ignore=shutil.ignore_patterns("eval_cache", "sweep", "*.replaced-*"))
        overrides = [*a.overrides, f"root={tmp}"]
        cold = evaluate(a.config, overrides)
        warm = evaluate(a.config, overrides)
        models = len(list((copy / "eval_cache").glob("samples-*.npz")))
    print(f"\nevaluate on a copy of {source.root} ({models} models, {cfg.eval.num_samples} samples each, NLL on "
          f"{cfg.eval.nll_images} images at {cfg.eval.nll_steps} steps)")
    print("| run | seconds |\n|---|---|")
    print(f"| first (empty cache) | {cold:.1f} |\n| again (cached) | {warm:.1f} |")
    print(f"cached / first: {warm / cold:.3f}")


if __name__ == "__main__":
    main()
