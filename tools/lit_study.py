"""LiT vs joint training at equal steps, several seeds: runs the two recipes, then tabulates and plots the evals.

    python tools/lit_study.py --seeds 0 1 2 --out runs/lit-study [dotted.overrides for both recipes ...]

Each run is `clipkit train recipes/<name>.yaml seed=S --out OUT/<name>-s<S>`; a run whose summary.json exists is not
run again, so an interrupted study continues where it stopped. Writes OUT/results.json (every metric of every run,
plus the wall time), OUT/results.md (mean +- std over seeds per recipe) and OUT/lit_study.png (a dot per seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ("lit", "lit-joint")
SHOWN = (  # (metric key suffix, column title)
    ("emoji/acc1", "emoji zero-shot acc1 (9 groups)"),
    ("openclipart/acc1", "OpenClipart zero-shot acc1 (22 folders)"),
    ("emoji/image_retrieval_recall@5", "emoji text->image R@5"),
    ("emoji/text_retrieval_recall@5", "emoji image->text R@5"),
    ("openclipart/image_retrieval_recall@5", "OpenClipart text->image R@5"),
    ("openclipart/text_retrieval_recall@5", "OpenClipart image->text R@5"),
)


def run_one(recipe: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Trains one (recipe, seed) unless already done; returns its eval metrics and wall time."""
    run_dir = out / f"{recipe}-s{seed}"
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        start = time.perf_counter()
        cmd = ["clipkit", "train", f"recipes/{recipe}.yaml", f"seed={seed}", *overrides, "--out", str(run_dir)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    summary = json.loads(summary_file.read_text())
    wall = float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").is_file() else None
    return {"recipe": recipe, "seed": seed, "wall_s": wall, "final_loss": summary["final_loss"], **summary["eval"]}


def table(rows: list[dict]) -> str:
    """Markdown: one line per recipe, mean +- std over seeds of each shown metric, and the mean wall time."""
    head = "| recipe | seeds | " + " | ".join(t for _, t in SHOWN) + " | wall time per run |"
    lines = [head, "|" + "---|" * (len(SHOWN) + 3)]
    for recipe in RECIPES:
        mine = [r for r in rows if r["recipe"] == recipe]
        cells = []
        for key, _ in SHOWN:
            vals = [r[f"eval/{key}"] for r in mine]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {std:.3f}")
        walls = [r["wall_s"] for r in mine if r["wall_s"]]
        wall = f"{statistics.mean(walls) / 60:.1f} min" if walls else "?"
        lines.append(f"| {recipe} | {len(mine)} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """One panel per shown metric, a dot per seed and a bar at the mean, LiT beside joint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHOWN), figsize=(3 * len(SHOWN), 3.2))
    for ax, (key, title) in zip(axes, SHOWN, strict=True):
        for x, recipe in enumerate(RECIPES):
            vals = [r[f"eval/{key}"] for r in rows if r["recipe"] == recipe]
            ax.bar(x, statistics.mean(vals), color=("tab:blue", "tab:orange")[x], alpha=0.5)
            ax.scatter([x] * len(vals), vals, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(RECIPES)), RECIPES)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/lit-study"))
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to both recipes")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # Seed-major order: a study cut short still has both recipes at the seeds it finished.
    rows = [run_one(recipe, s, args.out, args.overrides) for s in args.seeds for recipe in RECIPES]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "lit_study.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
