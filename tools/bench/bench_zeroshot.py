"""Zero-shot evaluation throughput: clipkit against CLIP_benchmark, same checkpoint, same shards, same settings.

Each run is a pair of fresh processes, one per side, in alternating order (clipkit first in odd runs, CLIP_benchmark
first in even ones, so a drift in background load hits both); the ratio of a run is CLIP_benchmark's seconds over
clipkit's (= clipkit's images/s over CLIP_benchmark's), and the benchmark reports every run and the median ratio,
and checks that both sides report the same acc1, acc5 and mean per-class recall, exactly.

- clipkit: `clipkit.evaluate.run.zeroshot`, what `clipkit eval zeroshot` runs, in this interpreter.
- CLIP_benchmark: `tools/clip_benchmark_worker.py --bench-zeroshot` in the interpreter of --cb-python (a venv with
  `clip-benchmark`, see tools/compare_clip_benchmark.py): `zeroshot_classification.evaluate` over the loader
  `clip_benchmark eval --dataset wds/...` builds (WebDataset, PIL decode, the model's transform, batched). Without
  --cb-python (CI), the worker runs in this interpreter with its line-for-line copy of that loop, and the report
  says so.

Both sides load the model folder before the clock starts (clipkit `load_model`, CLIP_benchmark open_clip's
`local-dir:`; the same weights and transform); the clock then covers the whole evaluation: building the loader and
its workers, the class embeddings (tokenize and encode every class x template prompt), reading, decoding,
transforming and encoding every image, and the scores and metrics. fp32, CPU, the same batch size and number of
DataLoader workers on both sides, and the same torch thread count while the model encodes (--threads, default
cores - workers, at least 1: clipkit's own default; each side reports the counts its images were encoded with and
the benchmark fails when they differ).

    flock /tmp/clipkit-bench.lock python -m tools.bench.bench_zeroshot --checkpoint runs/quickstart/model \\
        --data 'data/fashion-mnist/test-*.tar' --classnames data/fashion-mnist/classnames.txt \\
        --templates data/fashion-mnist/templates.txt --workers 1 --runs 5 --cb-python /tmp/cbenv/bin/python

Exit status 1 when the metrics or the model's thread counts of the two sides differ in any run, or the median ratio
is below --min-ratio.
`--in-process` runs both sides in this process (no interpreter start-ups: the CI smoke); its timings are not the
benchmark's (the second side finds warm caches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRIC_KEYS = ("acc1", "acc5", "mean_per_class_recall")
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tools" / "clip_benchmark_worker.py"
SIDES = ("clipkit", "clip_benchmark")


# ----------------------------------------------------------------------------------------------- the two sides


def clipkit_side(spec: dict) -> dict:
    """One timed clipkit zero-shot evaluation (what `clipkit eval zeroshot` runs), model loaded before the clock.

    Args:
        spec: {"checkpoint", "shards", "classnames", "templates", "batch_size", "workers", "threads"}.

    Returns:
        {"seconds", "n_images", "metrics", "implementation", "torch_threads"}: the thread counts images were
        encoded with.
    """
    import torch

    from clipkit.evaluate import run as evals
    from clipkit.models import load_model
    from tools.clip_benchmark_worker import record_threads

    bundle = load_model(spec["checkpoint"], "cpu")
    # clipkit's evaluation gives its model `workers` fewer threads than it finds while the loader workers run
    # (clipkit.threads): start from that many more, so it encodes on spec["threads"].
    torch.set_num_threads(spec["threads"] + spec["workers"] if spec["workers"] else spec["threads"])
    threads = record_threads(bundle.model)
    start = time.perf_counter()
    metrics = evals.zeroshot(
        bundle,
        "::".join(spec["shards"]),
        spec["classnames"],
        spec["templates"],
        spec["batch_size"],
        "cpu",
        workers=spec["workers"],
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "n_images": metrics["n_samples"],
        "metrics": {k: float(metrics.get(k, math.nan)) for k in METRIC_KEYS},
        "implementation": "clipkit.evaluate.run.zeroshot",
        "torch_threads": sorted(threads),
    }


def run_side(side: str, spec: dict, cb_python: str | None, in_process: bool) -> dict:
    """Runs one side once and returns its JSON result (see `clipkit_side` and the worker's `bench_zeroshot`)."""
    if in_process:
        return clipkit_side(spec) if side == "clipkit" else _worker_module().bench_zeroshot(spec)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        if side == "clipkit":
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            cmd = [sys.executable, "-m", "tools.bench.bench_zeroshot", "--side-spec", f.name]
            env = dict(os.environ, PYTHONPATH=path)
        else:
            # CLIP_benchmark's venv must not see this checkout's packages (PYTHONPATH); CI's fallback runs the
            # worker in this interpreter, where its reference loop is used.
            cmd = [cb_python or sys.executable, str(WORKER), "--bench-zeroshot", f.name]
            env = dict(os.environ, PYTHONPATH="") if cb_python else dict(os.environ)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_module():
    """tools/clip_benchmark_worker.py as a module (imported here only for --in-process: it imports torch)."""
    from tools import clip_benchmark_worker

    return clip_benchmark_worker


# -------------------------------------------------------------------------------------------------- the runs


def paired_runs(spec: dict, runs: int, cb_python: str | None, in_process: bool) -> list[dict]:
    """`runs` pairs of (clipkit, CLIP_benchmark) measurements, the order alternating from pair to pair."""
    out = []
    for i in range(runs):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        pair = {"run": i + 1, "order": list(order), "load_before": os.getloadavg()}
        for side in order:
            pair[side] = run_side(side, spec, cb_python, in_process)
        pair["load_after"] = os.getloadavg()
        pair["ratio"] = pair["clip_benchmark"]["seconds"] / pair["clipkit"]["seconds"]
        pair["metrics_equal"] = metrics_equal(pair["clipkit"]["metrics"], pair["clip_benchmark"]["metrics"])
        pair["threads_equal"] = pair["clipkit"]["torch_threads"] == pair["clip_benchmark"]["torch_threads"]
        pair["n_images_equal"] = pair["clipkit"]["n_images"] == pair["clip_benchmark"]["n_images"]
        print(format_run(pair), flush=True)
        out.append(pair)
    return out


def metrics_equal(a: dict, b: dict) -> bool:
    """Exact equality of acc1, acc5 and mean per-class recall (NaN equals NaN: acc5 under 5 classes)."""
    return all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in METRIC_KEYS)


def machine() -> dict:
    """Where and when the runs were measured (the parent imports no torch: the sides report their versions)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip


def summarize(pairs: list[dict], spec: dict) -> dict:
    """The report: settings, every run, the median ratio and whether every run's metrics were equal."""
    ratios = [p["ratio"] for p in pairs]
    return {
        "machine": machine(),
        "settings": {k: v for k, v in spec.items() if k not in ("classnames", "templates")}
        | {"n_classes": len(spec["classnames"]), "n_templates": len(spec["templates"])},
        "implementations": {s: pairs[0][s]["implementation"] for s in SIDES},
        "versions": pairs[0]["clip_benchmark"].get("versions", {}),
        "runs": pairs,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "metrics_equal": all(p["metrics_equal"] and p["n_images_equal"] for p in pairs),
        "threads_equal": all(p["threads_equal"] for p in pairs),
        "metrics": pairs[0]["clipkit"]["metrics"],
    }


def format_run(p: dict) -> str:
    ck, cb = p["clipkit"], p["clip_benchmark"]
    return (
        f"run {p['run']} ({p['order'][0]} first): clipkit {ck['seconds']:.2f} s ({ck['n_images'] / ck['seconds']:.0f}"
        f" img/s), CLIP_benchmark {cb['seconds']:.2f} s ({cb['n_images'] / cb['seconds']:.0f} img/s), ratio "
        f"{p['ratio']:.3f}; metrics equal: {p['metrics_equal']}; model threads {ck['torch_threads']} / "
        f"{cb['torch_threads']}; load {p['load_before'][0]:.2f} -> "
        f"{p['load_after'][0]:.2f}"
    )


def format_summary(report: dict) -> str:
    m = report["metrics"]
    runs = ", ".join(f"{r:.3f}" for r in report["ratios"])
    return "\n".join(
        [
            f"clipkit side: {report['implementations']['clipkit']}",
            f"CLIP_benchmark side: {report['implementations']['clip_benchmark']}",
            f"throughput ratio clipkit / CLIP_benchmark: median {report['median_ratio']:.3f} (runs: {runs})",
            f"metrics identical in every run: {report['metrics_equal']} (clipkit acc1 {m['acc1']:.4f}, acc5 "
            f"{m['acc5']:.4f}, mean_per_class_recall {m['mean_per_class_recall']:.4f})",
        ]
    )


# ------------------------------------------------------------------------------------------------------- CLI


def read_lines(path: str) -> list[str]:
    """Non-empty stripped lines (class names, templates), as `clipkit eval` reads them."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path}: empty")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="clipkit model folder (an open_clip local-dir: folder)")
    p.add_argument("--data", help="labelled shards: a glob, brace pattern or '::'-joined list")
    p.add_argument("--classnames", help="class names file, one per line")
    p.add_argument("--templates", help="prompt templates file, one per line, '{c}' for the class name")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers", type=int, default=1, help="DataLoader workers, both sides (CLIP_benchmark's CLI default: 4)"
    )
    p.add_argument("--threads", type=int, help="model threads, both sides (default: cores - workers, at least 1)")
    p.add_argument("--runs", type=int, default=3, help="pairs of measurements")
    p.add_argument("--cb-python", help="python of a venv with clip-benchmark; default: the reference copy here")
    p.add_argument("--reference", action="store_true", help="use the reference copy even with --cb-python")
    p.add_argument("--in-process", action="store_true", help="both sides in this process (smoke test)")
    p.add_argument("--min-ratio", type=float, help="exit 1 if the median ratio is below this")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--side-spec", help=argparse.SUPPRESS)  # internal: run clipkit's side once, print JSON
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side_spec:
        print(json.dumps(clipkit_side(json.loads(Path(args.side_spec).read_text()))), flush=True)
        return 0
    missing = [n for n in ("checkpoint", "data", "classnames", "templates") if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join('--' + n for n in missing)}")
    from clipkit.data.shards import expand_shards  # here, not at the top: the parent needs no torch otherwise

    spec = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "shards": [str(Path(u).resolve()) for u in expand_shards(args.data)],
        "classnames": read_lines(args.classnames),
        "templates": read_lines(args.templates),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads or max(1, (os.cpu_count() or 1) - args.workers),
        "reference": args.reference,
    }
    print(f"{len(spec['shards'])} shard(s), batch {args.batch_size}, {args.workers} worker(s), {spec['threads']} "
          f"model thread(s), {args.runs} run(s)")  # fmt: skip
    report = summarize(paired_runs(spec, args.runs, args.cb_python, args.in_process), spec)
    print(format_summary(report))
    if args.json:
        from clipkit.files import write_json_atomic

        write_json_atomic(args.json, report, sort_keys=False)
    too_slow = args.min_ratio is not None and report["median_ratio"] < args.min_ratio
    return 0 if report["metrics_equal"] and report["threads_equal"] and not too_slow else 1


if __name__ == "__main__":
    sys.exit(main())
