"""Per-class classification reports: scikit-learn's `classification_report` as JSON and markdown, a confusion PNG.

The numbers are scikit-learn's own (`classification_report(..., output_dict=True)`: per class precision, recall,
F1 and support, then accuracy and the macro and weighted averages); this module only lays them out and writes them.
Every class of `classnames` gets a row, also one absent from the labels (support 0, its recall reported as 0 with
`zero_division=0`), so reports of the same classes line up across sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from clipkit.files import atomic_path, write_json_atomic, write_text_atomic

AVERAGES = ("macro avg", "weighted avg")


def report_dict(y_true: np.ndarray, y_pred: np.ndarray, classnames: Sequence[str]) -> dict:
    """scikit-learn's classification report of integer predictions, one row per class of `classnames`.

    Returns:
        {"classes": {name: {"precision", "recall", "f1-score", "support"}}, "accuracy", "macro avg",
        "weighted avg", "n_samples"} as plain Python numbers.
    """
    labels = list(range(len(classnames)))
    raw = classification_report(
        y_true, y_pred, labels=labels, target_names=list(classnames), output_dict=True, zero_division=0
    )
    out = {"classes": {name: _plain(raw[name]) for name in classnames}}
    # With every class listed, sklearn reports "accuracy" only when the predictions stay inside the labels; it
    # then equals micro-averaged recall, which it gives as "micro avg" otherwise.
    out["accuracy"] = float(raw["accuracy"]) if "accuracy" in raw else float(raw["micro avg"]["recall"])
    for avg in AVERAGES:
        out[avg] = _plain(raw[avg])
    out["n_samples"] = len(y_true)
    return out


def _plain(row: dict) -> dict:
    return {k: (int(v) if k == "support" else float(v)) for k, v in row.items()}


def report_markdown(report: dict, title: str) -> str:
    """The report as a markdown table: one row per class, then accuracy and the two averages."""
    lines = [f"## {title}", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in [*report["classes"].items(), *((avg, report[avg]) for avg in AVERAGES)]:
        cells = f"{row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | {row['support']}"
        lines.append(f"| {name} | {cells} |")
    lines.append(f"| accuracy | | | {report['accuracy']:.4f} | {report['n_samples']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classnames: Sequence[str], out_file: Path, title: str):
    """Confusion matrix (rows: true class, columns: predicted; row-normalized colours, counts written) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    counts = confusion_matrix(y_true, y_pred, labels=list(range(len(classnames))))  # [C, C]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.5 * len(classnames) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(classnames) <= 30:  # beyond that the numbers are unreadable: the colours still show the pattern
        for i, j in np.ndindex(counts.shape):
            ax.text(
                j,
                i,
                counts[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(classnames)), classnames, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classnames)), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_file


def write_report(
    out_dir: Path, name: str, y_true: np.ndarray, y_pred: np.ndarray, classnames: Sequence[str], title: str
) -> dict:
    """Writes `<out_dir>/<name>.json`, `<name>.md` and `<name>_confusion.png`; returns the report dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report_dict(y_true, y_pred, classnames)
    write_json_atomic(out_dir / f"{name}.json", report, sort_keys=False)
    write_text_atomic(out_dir / f"{name}.md", report_markdown(report, title))
    plot_confusion(y_true, y_pred, classnames, out_dir / f"{name}_confusion.png", title)
    return report


def zeroshot_report(
    bundle, shards: str, classnames, templates, batch_size: int, device, workers: int, out_dir: Path, name: str
) -> dict:
    """`clipkit eval zeroshot --report`: the zero-shot metrics of `run.zeroshot` plus the per-class report files.

    The images are embedded once; the predictions are the argmax of the same prompt-ensembled class embeddings
    (first class among ties, as acc1 counts them).

    Returns:
        the metrics, with "report": the report dict and "report_files": the three paths written.
    """
    from clipkit.evaluate import run as evals
    from clipkit.evaluate.embed import encode_texts
    from clipkit.evaluate.zeroshot import class_embeddings, fill_templates

    emb = evals.embed_images(bundle, shards, batch_size, device, "zero-shot images", workers)
    metrics = evals._zeroshot_metrics(bundle, emb, shards, classnames, templates, batch_size, device)
    templates = templates or [t("{c}") for t in evals.SIMPLE_IMAGENET_TEMPLATES]
    text = encode_texts(bundle.model, bundle.tokenizer, fill_templates(classnames, templates), batch_size, device)
    classes = class_embeddings(text.reshape(len(classnames), len(templates), -1))  # [C, D]
    pred = np.argmax(emb.image @ classes.T, axis=1)  # [N]
    labels = evals._labels(emb, shards, "the report")
    report = write_report(out_dir, name, labels, pred, classnames, f"zero-shot on {name}")
    files = [str(Path(out_dir) / f"{name}{suffix}") for suffix in (".json", ".md", "_confusion.png")]
    return {**metrics, "report": report, "report_files": files}
