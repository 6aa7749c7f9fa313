"""Collecting a run's evaluation results ({"dataset", "model", "task", "metrics"} JSON files) into one table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

# Metric columns first in this order (when present), then any other scalar metric, alphabetically.
PREFERRED = (
    "acc1",
    "acc5",
    "mean_per_class_recall",
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
    "image_retrieval_recall@10",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
    "text_retrieval_recall@10",
)


def collect_results(run_dir: Path) -> list[dict]:
    """Reads RUN_DIR/eval/*.json (or RUN_DIR/*.json when there is no eval/ folder), sorted by file name.

    Returns:
        One {"file", "dataset", "model", "task", "metrics"} per result file.

    Raises:
        FileNotFoundError: if there is no result file.
        ValueError: naming a file that is not a result JSON.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "eval" if (run_dir / "eval").is_dir() else run_dir
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no result JSON in {folder} (expected {run_dir}/eval/*.json)")
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict) or "task" not in data:
            raise ValueError(f"{f}: not a result file (needs 'task' and a 'metrics' object)")
        results.append({"file": f.name, **{k: data.get(k) for k in ("dataset", "model", "task", "metrics")}})
    return results


def results_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows): one row per result; columns dataset, task, then every scalar metric any result has."""
    metrics = {k for r in results for k, v in r["metrics"].items() if _is_scalar(v)}
    columns = [k for k in PREFERRED if k in metrics] + sorted(metrics - set(PREFERRED))
    header = ["dataset", "task", *columns]
    rows = [[r["dataset"], r["task"], *(r["metrics"].get(c) for c in columns)] for r in results]
    return header, rows


def format_table(results: list[dict], fmt: str = "markdown", digits: int = 4) -> str:
    """The results as a markdown table or CSV (missing metrics are blank; floats rounded to `digits` in markdown).

    Raises:
        ValueError: for an unknown format.
    """
    header, rows = results_table(results)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"format must be markdown or csv, got {fmt!r}")
    cell = lambda v: "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _is_scalar(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
