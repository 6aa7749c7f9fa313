"""clipkit's zero-shot and retrieval metrics against CLIP_benchmark's on the same model folder and the same shards.

CLIP_benchmark (PyPI `clip-benchmark`) needs numpy<2.4, so it runs in its own venv, through
tools/clip_benchmark_worker.py; clipkit's numbers come from this process (`clipkit.evaluate.run`). Both sides use
fp32 on CPU (CLIP_benchmark with amp=False, i.e. its `--no_amp`), the same batch size and the same sample order.
Prints, per task and metric, both values, the absolute difference and the tie interval (the range of values that
orders of exactly tied scores can give: duplicate images or captions), and exits 1 if CLIP_benchmark's value lies
further than --tolerance outside that interval. Without ties the interval is one point, so this is "equal within
the tolerance"; with ties torch.topk (CLIP_benchmark) orders them in an unspecified way and clipkit lower index
first, and both must lie inside.

    python3 -m venv /tmp/cbenv
    /tmp/cbenv/bin/pip install clip-benchmark "numpy<2.4" open_clip_torch torch torchvision
    python tools/compare_clip_benchmark.py --cb-python /tmp/cbenv/bin/python --checkpoint runs/quickstart/model \
        --data-root data --out cmp.json

Tasks (those whose data exist under --data-root): zero-shot on fashion-mnist/test and digits/test (with their
classnames.txt and templates.txt), retrieval on emoji/test, emoji/train and digits/test (every caption line is a
text of its image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from clipkit.data.shards import expand_shards
from clipkit.evaluate import run as evals
from clipkit.evaluate.embed import embed_shards
from clipkit.evaluate.retrieval import retrieval_metrics
from clipkit.models import load_model

ZEROSHOT_KEYS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_KEYS = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))


def tasks_under(root: Path) -> list[dict]:
    tasks = []
    for name in ("fashion-mnist", "digits"):
        folder = root / name
        if (folder / "classnames.txt").is_file() and list(folder.glob("test-*.tar")):
            tasks.append(
                {
                    "name": f"zeroshot/{name}",
                    "task": "zeroshot",
                    "shards": expand_shards(str(folder / "test-*.tar")),
                    "classnames": evals.read_lines(folder / "classnames.txt", "classnames"),
                    "templates": evals.read_lines(folder / "templates.txt", "templates"),
                }
            )
    for name, split in (("emoji", "test"), ("emoji", "train"), ("digits", "test")):
        shards = sorted((root / name).glob(f"{split}-*.tar"))
        if shards:
            tasks.append({"name": f"retrieval/{name}-{split}", "task": "retrieval", "shards": [str(s) for s in shards]})
    return tasks


def clipkit_metrics(checkpoint: Path, tasks: list[dict], batch_size: int) -> dict:
    bundle = load_model(checkpoint, "cpu")
    out = {}
    for task in tasks:
        spec = "::".join(task["shards"])
        intervals = {}
        if task["task"] == "zeroshot":
            m = evals.zeroshot(bundle, spec, task["classnames"], task["templates"], batch_size, "cpu")
        else:
            emb = embed_shards(bundle.model, bundle.eval_transform, bundle.tokenizer, task["shards"], batch_size)
            m = retrieval_metrics(emb.image, emb.text, emb.text_to_image)  # what `clipkit eval retrieval` reports
            intervals = tie_intervals(emb.image, emb.text, emb.text_to_image, (1, 5, 10))
        first = embed_shards(
            bundle.model, bundle.eval_transform, bundle.tokenizer, task["shards"][:1], batch_size, texts=False
        ).image[:batch_size]
        out[task["name"]] = {"metrics": m, "intervals": intervals, "first_batch_image_emb": first}
        print(f"clipkit {task['name']}: { {k: m[k] for k in m if k in ZEROSHOT_KEYS + RETRIEVAL_KEYS} }", flush=True)
    return out


def tie_intervals(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...]) -> dict:
    """[lowest, highest] recall@k over every order of exactly tied scores (duplicate images or captions).

    A query is a sure hit if its positive is in the top k however ties are ordered (candidates scoring >= it,
    other than itself, number < k) and a possible hit if it is for some order (candidates scoring > it number < k).
    For image->text, an image's positive is its best caption; its own other captions never push it out.
    torch.topk (CLIP_benchmark) orders ties in an unspecified way, clipkit lower index first: both must lie inside.
    """
    s = txt.astype(np.float32) @ img.astype(np.float32).T  # [M, N]
    pos = s[np.arange(len(t2i)), t2i][:, None]  # [M, 1]
    t2i_greater, t2i_geq = (s > pos).sum(1), (s >= pos).sum(1) - 1
    si = s.T  # [N, M]
    own = np.zeros_like(si, dtype=bool)
    own[t2i, np.arange(len(t2i))] = True
    best = np.where(own, si, -np.inf).max(1, keepdims=True)  # [N, 1] each image's best caption score
    i2t_greater = (si > best).sum(1)
    i2t_geq = i2t_greater + ((si == best) & ~own).sum(1)
    captioned = own.any(1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = [float(np.mean(t2i_geq < k)), float(np.mean(t2i_greater < k))]
        lo, hi = i2t_geq[captioned] < k, i2t_greater[captioned] < k
        out[f"text_retrieval_recall@{k}"] = [float(np.mean(lo)), float(np.mean(hi))]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cb-python", required=True, help="python of the venv with clip-benchmark installed")
    p.add_argument("--checkpoint", required=True, help="clipkit model folder (open_clip local-dir folder)")
    p.add_argument("--data-root", required=True, help="folder with fashion-mnist/, digits/, emoji/ shard sets")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tolerance", type=float, default=1e-6)
    p.add_argument("--out", help="write the comparison JSON here")
    args = p.parse_args()

    tasks = tasks_under(Path(args.data_root))
    if not tasks:
        raise SystemExit(f"no dataset found under {args.data_root}")
    with tempfile.TemporaryDirectory() as tmp:
        task_file = Path(tmp) / "tasks.json"
        task_file.write_text(json.dumps(tasks))
        worker = Path(__file__).with_name("clip_benchmark_worker.py")
        cmd = [args.cb_python, str(worker), "--checkpoint", str(Path(args.checkpoint).resolve())]
        cmd += ["--tasks", str(task_file), "--batch-size", str(args.batch_size)]
        env = dict(os.environ, PYTHONPATH="")  # CLIP_benchmark's env must not see this checkout's packages
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-5000:])
            raise SystemExit(f"CLIP_benchmark worker failed (exit {proc.returncode})")
        cb = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = clipkit_metrics(Path(args.checkpoint), tasks, args.batch_size)

    report = {
        "clip_benchmark_versions": cb["versions"],
        "tasks": {},
        "max_abs_diff": 0.0,
        "max_abs_diff_outside_ties": 0.0,
    }
    print(f"\nCLIP_benchmark side: {cb['versions']}")
    print(f"{'task':<24} {'metric':<26} {'clipkit':>11} {'CLIP_bench':>11} {'abs diff':>9}  tie interval")
    for task in tasks:
        name = task["name"]
        keys = ZEROSHOT_KEYS if task["task"] == "zeroshot" else RETRIEVAL_KEYS
        emb_diff = float(
            np.max(np.abs(np.asarray(cb[name]["first_batch_image_emb"]) - ours[name]["first_batch_image_emb"]))
        )
        rows = {}
        for key in keys:
            a, b = ours[name]["metrics"].get(key, float("nan")), cb[name]["metrics"][key]
            diff = 0.0 if (math.isnan(a) and math.isnan(b)) else abs(a - b)
            lo, hi = ours[name]["intervals"].get(key, [a, a])
            # Outside ties: how far CLIP_benchmark's value lies outside the range any tie order could give.
            outside = max(lo - b, b - hi, 0.0) if not math.isnan(b) else diff
            rows[key] = {"clipkit": a, "clip_benchmark": b, "abs_diff": diff, "tie_interval": [lo, hi]}
            report["max_abs_diff"] = max(report["max_abs_diff"], diff)
            report["max_abs_diff_outside_ties"] = max(report["max_abs_diff_outside_ties"], outside)
            tie = f"[{lo:.6f}, {hi:.6f}]" if hi > lo else "no ties"
            print(f"{name:<24} {key:<26} {a:>11.8f} {b:>11.8f} {diff:>9.2e}  {tie}")
        report["tasks"][name] = {"metrics": rows, "image_emb_max_abs_diff": emb_diff, "n_images": cb[name]["n_images"]}
        print(f"{name:<24} {'image embeddings (batch 1)':<26} {'':>11} {'':>11} {emb_diff:>9.2e}")
    print(
        f"\nmax abs diff over all metrics: {report['max_abs_diff']:.3e}; beyond what tie order explains: "
        f"{report['max_abs_diff_outside_ties']:.3e} (tolerance {args.tolerance:g})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["max_abs_diff_outside_ties"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
