"""sweep: ScoreFusion's experiment, the target size n against every method (the paper's figure: NLL vs n).

Each n in sweep.sizes is a run of its own, runs/<name>/sweep/n<n>/: its data directory holds a target of n
images cut like the main run's (nested at every pair of sizes: a smaller target is inside a larger one,
shards/populations.py) and shares the main run's auxiliary and reference shards (shards/prepare.py, shared=);
it fits lambda and trains the baselines on those n images (the fuse stage) and is evaluated against the same held-out images (the evaluate stage). The
auxiliaries, the feature classifier and the evaluation cache are the main run's (stages/rundir.py), so the
auxiliaries are trained once and each one's samples are measured once. Every step skips what is finished:
the sweep resumes like any stage, and `scorefuse submit` runs the sizes as an array job.

The summary, written once every size has its measurements file (evaluation/measurements.py), is a view of
those files: sweep.md (how fusion compares with the baselines at each n, then a table per metric), sweep.json
(the same, and under "data" every metric of every model at every n with its uncertainty) and one plot per
metric (metric vs n, a line per method, error bars).
"""
from evaluation.comparison import BETTER, INDISTINGUISHABLE, WORSE, find
from evaluation.labels import BASELINES, FUSED, FUSED_MIXTURE, fused
from evaluation.measurements import read_measurements
from evaluation.plots import metric_vs_n
from evaluation.report import write_report
from evaluation.run_report import COPIES, KID, LOSS, NLL, comparison_rows, fd_column, model_row
from shards.errors import ConfigError, ModelError
from stages.config import RunConfig, sweep_member
from trainer.accelerator import make_accelerator
from trainer.progress import say
from stages.rundir import RunDir, is_finished
from stages import evaluate, fuse, prepare

# The methods on the plots (every model of a member's measurements is in sweep.json): fusion and its baselines.
METHODS = (*FUSED, *BASELINES)
NESTED = "The targets are nested: each holds every image of the smaller ones, so a change of n adds images."
# the report's column -> (the plot's file name, what the error bar shows); and the Fréchet distance's (fd_column)
METRICS = {NLL: ("nll", "± standard error"), LOSS: ("loss", "± standard error"),
           KID: ("kid", "± std over subsets"), COPIES: ("copies", "")}


def command(cfg: RunConfig, args: dict, invocation) -> None:
    """`scorefuse sweep [n=16,32]`."""
    if args.get("n") and not all(n.isdigit() for n in args["n"].split(",")):
        raise ConfigError(f"n={args['n']}: target sizes are comma-separated whole numbers")
    run(cfg, [int(n) for n in args["n"].split(",")] if args.get("n") else None)


def run(cfg: RunConfig, sizes: list[int] | None = None) -> None:
    """Run the sweep's sizes (all of sweep.sizes, or `sizes`), then the summary if every size is done."""
    if cfg.sweep.n:
        raise ConfigError(f"sweep.n={cfg.sweep.n} names one run of a sweep; run the sweep from the main config")
    if not cfg.sweep.sizes:
        raise ConfigError("sweep.sizes is empty: give the target sizes, e.g. sweep.sizes=[16,32,64]")
    unknown = sorted(set(sizes or []) - set(cfg.sweep.sizes))
    if unknown:
        raise ConfigError(f"n={','.join(map(str, unknown))}: not in sweep.sizes {list(cfg.sweep.sizes)}")
    main = RunDir.of(cfg)
    missing = [name for name, stage in main.aux_dirs(cfg).items() if not is_finished(stage)]
    if missing:
        raise ModelError(f"the sweep reuses the trained auxiliaries, and {', '.join(missing)} is not trained: run "
                         f"`scorefuse run stages=prepare,train-aux` first")
    acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes)
    for n in sizes or cfg.sweep.sizes:
        member = sweep_member(cfg, n)
        say(f"sweep: target size n = {n} in {RunDir.of(member).root}")
        if acc.is_main_process:  # one process writes the data
            prepare.run(member, shared=main.data)
        acc.wait_for_everyone()
        fuse.run(member)
        evaluate.run(member)
    if acc.is_main_process and all(RunDir.of(sweep_member(cfg, n)).measurements.is_file() for n in cfg.sweep.sizes):
        summarise(cfg)


def summarise(cfg: RunConfig) -> None:
    """sweep.md, sweep.json and the plots from the measurements file of each size n of sweep.sizes: the
    tables' cells are the members' report cells (evaluation/run_report.py), the findings their comparisons."""
    main = RunDir.of(cfg)
    sizes = sorted(cfg.sweep.sizes)
    measured = {n: read_measurements(RunDir.of(sweep_member(cfg, n)).measurements) for n in sizes}
    rows = {n: {label: model_row(label, entry, measured[n])
                for label, entry in [*measured[n]["models"].items(), *measured[n]["floors"].items()]} for n in sizes}
    metrics = {**METRICS, fd_column(measured[sizes[0]]): ("fd", "95% bootstrap interval")}
    models = [m for m in rows[sizes[0]] if all(m in rows[n] for n in sizes)]
    table = {metric: {model: {n: rows[n][model].get(metric) for n in sizes} for model in models} for metric in metrics}

    sections = [("Fusion against the baselines", _findings({n: measured[n]["comparisons"] for n in sizes}, cfg))]
    for metric, (file_name, bars) in metrics.items():
        series = {model: [(n, *_bar(value)) for n, value in table[metric][model].items() if value is not None]
                  for model in METHODS if model in table[metric]}
        metric_vs_n(series, main.sweep / f"{file_name}.png", metric,
                    f"{metric} vs target size n ({bars})" if bars else f"{metric} vs target size n")
        sections.append((metric, [{"model": model, **{f"n = {n}": table[metric][model][n] for n in sizes}}
                                  for model in models]))
    notes = ["Each n is the run sweep/n<n>/ (its report.md has the details and the floors); every model is "
             "measured on the same held-out images at every n.",
             "Plots: " + ", ".join(f"{file_name}.png" for file_name, _ in metrics.values()) + " in this directory.",
             NESTED]
    write_report(main.sweep / "sweep.md", f"scorefuse sweep: {cfg.name}, target sizes {sizes}", sections, notes,
                 data={"sizes": sizes, "metrics": table,
                       "comparisons": {n: comparison_rows(measured[n]) for n in sizes}})
    say(f"sweep: summary in {main.sweep / 'sweep.md'}")


def _bar(value) -> tuple[float, float, float]:
    """(value, low, high) of a report cell: an interval, a mean with its standard error or std, a number."""
    if isinstance(value, dict) and "low" in value:
        return value["value"], value["low"], value["high"]
    if isinstance(value, dict):
        spread = value.get("se", value.get("std", 0.0))
        return value["mean"], value["mean"] - spread, value["mean"] + spread
    return float(value), float(value), float(value)


def _findings(comparisons: dict[int, list[dict]], cfg: RunConfig) -> list[str]:
    """Per baseline and metric, the sizes at which the fused model (fuse.method's, then the mixture) is better,
    worse or indistinguishable: the members' comparisons (evaluation/comparison.py), by n."""
    lines = []
    for model in (fused(cfg.fuse.method), FUSED_MIXTURE):
        for baseline in BASELINES:
            for metric, name in (("nll", "held-out NLL (paired)"), ("fd", "Fréchet distance (95% intervals)")):
                verdicts = {n: c[metric] for n in sorted(comparisons)
                            if (c := find(comparisons[n], model, baseline)) is not None and c[metric]}
                if verdicts:
                    by = {v: [n for n in verdicts if verdicts[n] == v] for v in (BETTER, INDISTINGUISHABLE, WORSE)}
                    lines.append(f"{model} against {baseline} on {name}: " + "; ".join(
                        f"{v} at n = {', '.join(map(str, ns))}" for v, ns in by.items() if ns) + ".")
    return lines
