"""The fine-tuning studies of docs/finetune.md: zero-shot vs linear probe vs `ce` vs `flyp` vs best WiSE-FT.

Two labelled sets, each with a shifted copy of its test split (same keys and labels, another look):
- fashion-mnist (recipes/finetune-fashion-mnist.yaml): every official test image inverted to dark-on-light, blurred;
- emoji (recipes/finetune-emoji.yaml, the 9 Unicode groups of the Noto renders): grayscale, blurred.
For each mode and seed it runs `clipkit finetune` with the test split and the shifted set as extra eval sets and
writes one table: accuracy in distribution (test) and under the shift, mean +- std over seeds, with wall times.
Hyper-parameters are the recipe's (chosen on validation; the test sets are only read for the table).

    python tools/finetune_study.py --dataset fashion-mnist --model runs/quickstart/model --data data \
        --out runs/finetune-study --seeds 0 1 2 --modes linear ce flyp

Writes <out>/<mode>-s<seed>/ (each a finetune run folder), <out>/study.json and <out>/study.md; with --bench also
docs/bench/finetune_study_<dataset>.json, with --figure docs/images/finetune_shift_<dataset>.png (test images over their
shifted copies).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipkit.config import FinetuneCfg, load_finetune_recipe  # noqa: E402
from clipkit.data.pipeline import read_tar_samples  # noqa: E402
from clipkit.data.shards import encode_png, expand_shards, write_shards  # noqa: E402
from clipkit.files import write_json_atomic, write_text_atomic  # noqa: E402
from clipkit.finetune import finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def invert_blur(image: Image.Image) -> Image.Image:
    """Fashion-MNIST's shift: invert (light garments on black become dark on white), then blur 1 px (of 28)."""
    return ImageOps.invert(image.convert("RGB")).filter(ImageFilter.GaussianBlur(1.0))


def gray_blur(image: Image.Image) -> Image.Image:
    """The emoji shift: grayscale (the colour cue gone), then blur 2 px (of 72)."""
    return ImageOps.grayscale(image.convert("RGB")).convert("RGB").filter(ImageFilter.GaussianBlur(2.0))


# dataset -> (recipe, shift function, its description in the table header)
STUDIES = {
    "fashion-mnist": (ROOT / "recipes" / "finetune-fashion-mnist.yaml", invert_blur, "inverted + blurred"),
    "emoji": (ROOT / "recipes" / "finetune-emoji.yaml", gray_blur, "grayscale + blurred"),
}


def build_shifted(data: Path, dataset: str) -> Path:
    """Writes <data>/<dataset>-shifted/test-*.tar from the test shards (same keys, labels, captions)."""
    import io
    from collections import Counter

    shift, what = STUDIES[dataset][1], STUDIES[dataset][2]
    out = data / f"{dataset}-shifted"
    if (out / "dataset.json").is_file():
        return out
    src = data / dataset

    def samples():
        for s in read_tar_samples(iter(expand_shards(str(src / "test-*.tar"))), Counter()):
            png = encode_png(shift(Image.open(io.BytesIO(s["png"]))))
            yield {"__key__": s["__key__"], "png": png, "txt": s["txt"], "json": s["json"]}

    shards = write_shards(samples(), out, "test", maxcount=5000)
    for name in ("classnames.txt", "templates.txt"):
        write_text_atomic(out / name, (src / name).read_text(encoding="utf-8"))
    write_json_atomic(out / "dataset.json", {"name": out.name, "from": str(src), "shift": what, "shards": shards})
    return out


def shift_figure(data: Path, dataset: str, out: Path, n: int = 8, size: int = 64) -> Path:
    """A PNG of the first `n` test images (top row) over their shifted copies (bottom row), each `size` px."""
    import io
    from collections import Counter

    rows = []
    for split in (dataset, f"{dataset}-shifted"):
        it = read_tar_samples(iter(expand_shards(str(data / split / "test-*.tar"))), Counter())
        rows.append([Image.open(io.BytesIO(next(it)["png"])).convert("RGB").resize((size, size)) for _ in range(n)])
    sheet = Image.new("RGB", (n * size, 2 * size), "white")
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            sheet.paste(im, (c * size, r * size))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


# The recipe keys each mode refuses (clipkit.config.validate_finetune), set back to their defaults (off) for that mode
# so that one recipe (tuned for `ce`) drives every mode of the study.
OFF_FOR_MODE = {
    "linear": ["flip", "crop_pad", "patch_dropout", "label_smoothing", "mixup", "cutmix", "layer_decay", "ema"],
    "flyp": ["label_smoothing", "mixup", "cutmix"],
    "ce": [],
}


def study_overrides(mode: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The recipe overrides of one run: data, seed, mode (and the keys it refuses turned off), model, eval sets."""
    return [f"data_root={args.data}", f"seed={seed}", f"finetune.mode={mode}", f"finetune.model={args.model}",
            *(f"finetune.{k}={getattr(FinetuneCfg, k)}" for k in OFF_FOR_MODE[mode]),
            f"finetune.eval_sets=[{{name: test, shards: {args.dataset}/test-*.tar}}, "
            f"{{name: shifted, shards: {args.dataset}-shifted/test-*.tar}}]", *args.set]  # fmt: skip


def run_one(mode: str, seed: int, args: argparse.Namespace) -> dict:
    folder = args.out / f"{mode}-s{seed}"
    if (folder / "summary.json").is_file() and not args.rerun:
        return json.loads((folder / "summary.json").read_text())
    recipe = load_finetune_recipe(STUDIES[args.dataset][0], study_overrides(mode, seed, args))
    t0 = time.perf_counter()
    summary = finetune(recipe, folder)
    summary["wall_seconds"] = time.perf_counter() - t0
    write_json_atomic(folder / "summary.json", summary, sort_keys=False)
    return summary


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(runs: dict[str, list[dict]], shift: str) -> tuple[str, list[dict]]:
    """Markdown rows: zero-shot, then each mode's fine-tuned model, then the best WiSE-FT mix of ce and flyp."""
    rows = []
    first = next(iter(runs.values()))
    rows.append({"method": "zero-shot (quickstart model)", "runs": first, "key": "zeroshot", "time": None})
    names = {"linear": "linear probe (frozen towers, `linear`)", "ce": "fine-tune `ce`", "flyp": "fine-tune `flyp`"}
    for mode, summaries in runs.items():
        rows.append({"method": names[mode], "runs": summaries, "key": "finetuned", "time": "wall_seconds"})
    for mode in ("ce", "flyp"):
        if mode in runs and "wise" in runs[mode][0]:
            rows.append({"method": f"WiSE-FT of `{mode}` (a chosen on val)", "runs": runs[mode], "key": "wise",
                         "time": None})  # fmt: skip
    lines = [f"| method | seeds | val | test (in distribution) | shifted ({shift}) | a | wall time (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    out = []
    for r in rows:
        acc = {s: [x[r["key"]][s]["accuracy"] for x in r["runs"]] for s in ("val", "test", "shifted")}
        alpha = ", ".join(f"{x['wise']['alpha']:g}" for x in r["runs"]) if r["key"] == "wise" else ""
        times = [x[r["time"]] for x in r["runs"]] if r["time"] else []
        wall = _mean_std(times).replace(".0000", "") if times else ""
        if times:
            wall = f"{statistics.mean(times):.0f}" + (f" +- {statistics.stdev(times):.0f}" if len(times) > 1 else "")
        seeds = ",".join(str(x["seed"]) for x in r["runs"])
        cells = [_mean_std(acc["val"]), _mean_std(acc["test"]), _mean_std(acc["shifted"])]
        lines.append(f"| {r['method']} | {seeds} | {' | '.join(cells)} | {alpha} | {wall} |")
        out.append({"method": r["method"], "seeds": seeds, "accuracy": acc, "alpha": alpha, "wall_seconds": times})
    return "\n".join(lines) + "\n", out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(STUDIES), default="fashion-mnist")
    p.add_argument("--model", default="runs/quickstart/model", help="the quickstart model folder")
    p.add_argument("--data", type=Path, default=Path("data"), help="folder holding the built dataset")
    p.add_argument("--out", type=Path, default=Path("runs/finetune-study"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["linear", "ce", "flyp"], choices=["linear", "ce", "flyp"])
    p.add_argument("--set", nargs="*", default=[], help="extra recipe overrides (dotted.key=value)")
    p.add_argument("--rerun", action="store_true", help="rerun runs that already have a summary.json")
    p.add_argument("--bench", action="store_true", help="also write docs/bench/finetune_study_<dataset>.json")
    p.add_argument("--figure", action="store_true", help="also write docs/images/finetune_shift_<dataset>.png")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.data = args.data.resolve()
    build_shifted(args.data, args.dataset)
    if args.figure:
        shift_figure(args.data, args.dataset, ROOT / f"docs/images/finetune_shift_{args.dataset}.png")
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: a cut-short study still has every mode of the first seeds
        for mode in args.modes:
            runs.setdefault(mode, []).append(run_one(mode, seed, args))
            md, rows = table(runs, STUDIES[args.dataset][2])
            write_text_atomic(args.out / "study.md", md)
            write_json_atomic(args.out / "study.json", {"rows": rows, "runs": runs}, sort_keys=False)
    print(md)
    if args.bench:
        import os

        facts = {"loadavg_end": os.getloadavg(), "command": " ".join(sys.argv), "rows": rows}
        write_json_atomic(ROOT / f"docs/bench/finetune_study_{args.dataset}.json", facts, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
