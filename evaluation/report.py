"""The run report: one Markdown file a person reads first, and the same numbers as JSON for programs.

The caller decides what the rows are (FID per model, lambda, timings...); this module only lays them out,
so a new metric never needs a change here. Both files are replaced atomically: an interrupted write leaves
the previous report intact instead of a truncated one.
"""
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from shards.files import write_atomically

MISSING_CELL = "—"


def format_cell(value) -> str:
    """Floats to 4 significant digits (FID 3.771, lambda 0.2500 -> 0.25); None as a dash; pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_CELL
    if isinstance(value, float):
        return f"{value:.4g}"
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


def write_report(run_dir: Path, title: str, sections: list[tuple[str, list[dict]]],
                 notes: Iterable[str] = ()) -> None:
    """Write `run_dir/report.md` (a table per section, then notes) and `run_dir/report.json` (raw values)."""
    run_dir = Path(run_dir)
    notes = list(notes)
    parts = [f"# {title}", ""]
    for name, rows in sections:
        parts += [f"## {name}", "", markdown_table(rows) if rows else "(no rows)", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    document = {
        "title": title,
        "sections": [{"name": name, "rows": rows} for name, rows in sections],
        "notes": notes,
    }
    write_atomically(run_dir / "report.json", (json.dumps(document, indent=2) + "\n").encode())
    write_atomically(run_dir / "report.md", "\n".join(parts).encode())
