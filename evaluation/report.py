"""The run report: one Markdown file a person reads first, and the same numbers as JSON for programs.

The caller decides what the rows are (FID per model, lambda, timings...); this module only lays them out,
so a new metric never needs a change here. A section is a table (a list of row dicts) or text (a list of
sentences). Cells keep their numbers in the JSON: an estimate with its uncertainty is a dict, {"mean", "se"}
or {"mean", "std"} (shown "m ± s") or {"value", "low", "high"} (shown "v [low, high]"). Both files are replaced
atomically: an interrupted write leaves the previous report intact instead of a truncated one.
"""
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from shards.atomic import write_atomically

MISSING_CELL = "—"


def format_cell(value) -> str:
    """Floats to 4 significant digits (FID 3.771, lambda 0.2500 -> 0.25); None as a dash; estimates with their
    uncertainty as "m ± s" or "v [low, high]"; pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_CELL
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and {"value", "low", "high"} <= value.keys():
        return f"{value['value']:.4g} [{value['low']:.4g}, {value['high']:.4g}]"
    if isinstance(value, dict) and "mean" in value and ("se" in value or "std" in value):
        spread = value.get("se", value.get("std"))
        return f"{value['mean']:.4g} ± {spread:.2g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict]) -> str:
    """A table whose columns are the keys of the first row, in order; keys only later rows have are appended."""
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [key for key in row if key not in columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_report(path: Path, title: str, sections: list[tuple[str, list]],
                 notes: Iterable[str] = (), data: dict | None = None) -> None:
    """Write the Markdown report `path` (per section a table, or text, then notes) and the same with .json
    (raw values, and `data`: numbers for programs that no section shows as they are)."""
    path = Path(path)
    notes = list(notes)
    parts = [f"# {title}", ""]
    for name, rows in sections:
        if rows and all(isinstance(row, str) for row in rows):
            parts += [f"## {name}", "", *[f"- {sentence}" for sentence in rows], ""]
        else:
            parts += [f"## {name}", "", markdown_table(rows) if rows else "(no rows)", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    document = {
        "title": title,
        "sections": [{"name": name, "text": rows} if rows and all(isinstance(r, str) for r in rows)
                     else {"name": name, "rows": rows} for name, rows in sections],
        "notes": notes,
        **({"data": data} if data is not None else {}),
    }
    write_atomically(path.with_suffix(".json"), (json.dumps(document, indent=2) + "\n").encode())
    write_atomically(path, "\n".join(parts).encode())
