"""sweep: ScoreFusion's experiment, the target size n against every method (the paper's figure: NLL vs n).

Each n in sweep.sizes is a run of its own, runs/<name>/sweep/n<n>/ (and with sweep.replicates = R, R of them:
n<n>/ and n<n>-r<r>/ for r = 1 .. R - 1, each with another draw of the n target images, its seed from
data.target.seed and r): its data directory holds a target of n images cut like the main run's (nested at every
pair of sizes: a smaller target is inside a larger one, shards/populations.py) and shares the main run's
auxiliary and reference shards (shards/prepare.py, shared=); it fits lambda and trains the baselines on those n
images (the fuse stage) and is evaluated against the same held-out images (the evaluate stage). The
auxiliaries, the feature classifier and the evaluation cache are the main run's (stages/rundir.py), so the
auxiliaries are trained once and each one's samples are measured once. Every step skips what is finished:
the sweep resumes like any stage, and `scorefuse submit` runs the sizes as an array job. With sweep.aux_seeds,
replicate r > 0 has auxiliaries of its own, trained first (aux/<name>-r<r>/, stages/rundir.py; under `submit`, an
array job over the auxiliaries per replicate), so that the spread over replicates covers the auxiliaries' seeds.

The summary, written once every size and replicate has its measurements file (evaluation/measurements.py), is
a view of those files: sweep.md (how fusion compares with the baselines and the controls at each n, every
comparison pooled over the replicates (evaluation/replicates.py) and the whole sweep one Holm family, then a
table per metric), sweep.json (the same, and under "data" every metric of every model at every n with its
uncertainty) and one plot per metric (metric vs n, a line per method, error bars). With one replicate a cell is
the member's report cell; with several, the mean ± standard deviation over the replicates.
"""
from dataclasses import replace

from evaluation.comparison import ALPHA, BETTER, INDISTINGUISHABLE, WORSE, decide, tests_in
from evaluation.labels import BASELINES, FUSED, FUSED_MIXTURE, FUSED_UNIFORM, fused
from evaluation.measurements import read_measurements
from evaluation.plots import metric_vs_n
from evaluation.replicates import pooled_comparison
from evaluation.report import write_report
from evaluation.run_report import COMPARISONS, COPIES, KID, LOSS, NLL, fd_column, model_row
from shards.errors import ConfigError, ModelError
from stages.config import RunConfig, sweep_member
from trainer.accelerator import make_accelerator
from trainer.progress import say
from stages.rundir import RunDir, is_finished
from stages import evaluate, fuse, prepare, train_aux

BEST_AUXILIARY = "the best auxiliary"  # a finding's "against" for each replicate's own best auxiliary
# The methods on the plots (every model of a member's measurements is in sweep.json): fusion, the uniform control
# and the baselines.
METHODS = (*FUSED, FUSED_UNIFORM, *BASELINES)
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
    for replicate in range(1, cfg.sweep.replicates) if cfg.sweep.aux_seeds else ():
        own = replace(cfg, sweep=replace(cfg.sweep, replicate=replicate))  # its auxiliaries: aux/<name>-r<r>/
        for name in sorted(RunDir.of(own).retrained):
            train_aux.run(own, name)
    for n in sizes or cfg.sweep.sizes:
        for replicate in range(cfg.sweep.replicates):
            member = sweep_member(cfg, n, replicate)
            say(f"sweep: target size n = {n}, replicate {replicate}, in {RunDir.of(member).root}")
            if acc.is_main_process:  # one process writes the data
                prepare.run(member, shared=main.data)
            acc.wait_for_everyone()
            fuse.run(member)
            evaluate.run(member)
    if acc.is_main_process and all(RunDir.of(sweep_member(cfg, n, r)).measurements.is_file()
                                   for n in cfg.sweep.sizes for r in range(cfg.sweep.replicates)):
        summarise(cfg)


def summarise(cfg: RunConfig) -> None:
    """sweep.md, sweep.json and the plots from the measurements file of each size n of sweep.sizes and each
    replicate: the tables' cells are the members' report cells (evaluation/run_report.py), or their mean ± std
    over the replicates, the findings their comparisons pooled over the replicates."""
    main = RunDir.of(cfg)
    sizes, replicates = sorted(cfg.sweep.sizes), cfg.sweep.replicates
    measured = {n: [read_measurements(RunDir.of(sweep_member(cfg, n, r)).measurements) for r in range(replicates)]
                for n in sizes}
    rows = {n: [{label: model_row(label, entry, m) for label, entry in [*m["models"].items(), *m["floors"].items()]}
                for m in measured[n]] for n in sizes}
    # with replicates a cell's bar is their spread, not one member's interval or standard error
    spread = f"± std over {replicates} replicates"
    metrics = {metric: (name, bars if replicates == 1 or not bars else spread) for metric, (name, bars) in
               METRICS.items()}
    metrics[fd_column(measured[sizes[0]][0])] = ("fd", "95% bootstrap interval" if replicates == 1 else spread)
    models = [m for m in rows[sizes[0]][0] if all(m in row for n in sizes for row in rows[n])]
    table = {metric: {model: {n: _over_replicates([row[model].get(metric) for row in rows[n]]) for n in sizes}
                      for model in models} for metric in metrics}

    aux = [p["images"] for p in measured[sizes[0]][0]["populations"] if p["role"] == "aux"]
    aux_images = sum(aux) / len(aux) if aux else None  # N_aux of the plots' n / N_aux axis: the mean population
    findings, pooled, family = _findings(measured, cfg)
    sections = [(COMPARISONS, findings)]
    for metric, (file_name, bars) in metrics.items():
        series = {model: [(n, *_bar(value)) for n, value in table[metric][model].items() if value is not None]
                  for model in METHODS if model in table[metric]}
        metric_vs_n(series, main.sweep / f"{file_name}.png", metric,
                    f"{metric} vs target size n ({bars})" if bars else f"{metric} vs target size n", aux_images)
        sections.append((metric, [{"model": model, **{f"n = {n}": table[metric][model][n] for n in sizes}}
                                  for model in models]))
    notes = ["Each n is the run sweep/n<n>/ (its report.md has the details and the floors); every model is "
             "measured on the same held-out images at every n."
             + (f" Each n has {replicates} replicates, n<n>/ and n<n>-r<r>/, each another draw of the n target "
                + ("images and its own training of the auxiliaries (sweep.aux_seeds; the held-out images are shared)"
                   if cfg.sweep.aux_seeds else "images (the auxiliaries and the held-out images are shared)")
                + ": a table's cell is the mean ± standard "
                "deviation over them, a finding pools their differences (standard error: their spread over the "
                "square root of their number, and their own paired standard error, which the shared held-out "
                "images do not let shrink; its p-value from Student's t with the Welch-Satterthwaite degrees of "
                f"freedom, at most {replicates - 1} where the replicates' spread dominates)." if replicates > 1 else ""),
             "Plots: " + ", ".join(f"{file_name}.png" for file_name, _ in metrics.values()) + " in this directory.",
             f"The findings are one family of {sum(family.values())} paired tests ({family['nll']} on NLL, "
             f"{family['fd']} on the Fréchet distance" + (f", {family['tv']} on the class TV" if family["tv"] else "")
             + "), Holm-adjusted together: 'better' or 'worse' where the "
             f"adjusted p is at most {ALPHA:g} (each n's report adjusts over its own comparisons instead).",
             NESTED]
    write_report(main.sweep / "sweep.md", f"scorefuse sweep: {cfg.name}, target sizes {sizes}", sections, notes,
                 data={"sizes": sizes, "replicates": replicates, "metrics": table, "comparisons": pooled})
    say(f"sweep: summary in {main.sweep / 'sweep.md'}")


def _bar(value) -> tuple[float, float, float]:
    """(value, low, high) of a report cell: an interval, a mean with its standard error or std, a number."""
    if isinstance(value, dict) and "low" in value:
        return value["value"], value["low"], value["high"]
    if isinstance(value, dict):
        spread = value.get("se", value.get("std", 0.0))
        return value["mean"], value["mean"] - spread, value["mean"] + spread
    return float(value), float(value), float(value)


def _findings(measured: dict[int, list[dict]], cfg: RunConfig) -> tuple[list[str], dict, dict[str, int]]:
    """Per fused model (fuse.method's, then the mixture), model it is compared with and metric, the sizes at which
    it is better, worse or indistinguishable; the comparisons' rows by n; and the family's test counts. Each
    member's comparisons (evaluation/comparison.py) are pooled over the replicates of its n (the best auxiliary
    may differ between them: it is "the best auxiliary" there), and all of them, at every n, are one family,
    decided with Holm."""
    models = (fused(cfg.fuse.method), FUSED_MIXTURE)
    grouped = {}
    for n in sorted(measured):
        for m in measured[n]:
            for c in m["comparisons"]:
                if c["model"] in models and c["against"] not in models:
                    against = BEST_AUXILIARY if c["against"] == m["best_auxiliary"] else c["against"]
                    grouped.setdefault((n, c["model"], against), []).append(c)
    family = decide([{"n": n, "model": model, "against": against, **pooled_comparison(group)}
                     for (n, model, against), group in grouped.items()])
    lines = []
    for model in models:
        for against in dict.fromkeys(c["against"] for c in family if c["model"] == model):
            for metric, name in (("nll", "held-out NLL (paired)"), ("fd", "Fréchet distance (paired rounds)"),
                                 ("tv", "class TV (paired rounds)")):
                verdicts = {c["n"]: c[metric] for c in family
                            if c["model"] == model and c["against"] == against and c[metric]}
                if verdicts:
                    by = {v: [n for n in verdicts if verdicts[n] == v] for v in (BETTER, INDISTINGUISHABLE, WORSE)}
                    lines.append(f"{model} against {against} on {name}: " + "; ".join(
                        f"{v} at n = {', '.join(map(str, ns))}" for v, ns in by.items() if ns) + ".")
    rows = {n: [_finding_row(c) for c in family if c["n"] == n] for n in sorted(measured)}
    return lines, rows, tests_in(family)


def _finding_row(c: dict) -> dict:
    """A pooled comparison as sweep.json holds it."""
    nll, fd, tv = c["nll_difference"], c["fd_difference"], c["tv_difference"]
    return {"fused": c["model"], "against": c["against"],
            "NLL difference": None if nll is None else {"mean": nll["mean"], "se": nll["se"]},
            "NLL p (Holm)": None if nll is None else nll["p_holm"], "NLL": c["nll"],
            "FD difference": None if fd is None else {"mean": fd["value"], "se": fd["se"]},
            "FD p (Holm)": None if fd is None else fd["p_holm"], "FD": c["fd"],
            **({} if tv is None else {"class TV difference": {"mean": tv["value"], "se": tv["se"]},
                                      "class TV p (Holm)": tv["p_holm"], "class TV": c["tv"]})}


def _over_replicates(cells: list):
    """One cell of a sweep table from the replicates' report cells: the cell itself for one replicate, else
    {"mean", "std"} of the cells' values over the replicates (None where a replicate has no value)."""
    if len(cells) == 1 or any(cell is None for cell in cells):
        return cells[0] if len(cells) == 1 else None
    values = [_bar(cell)[0] for cell in cells]
    mean = sum(values) / len(values)
    return {"mean": mean, "std": (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5}
