"""Measures what every collective of a real `clipkit train` run moves, per process, against the on-paper tables.

Run it where a launcher would run `-m clipkit.cli`; it runs `clipkit train` under torch.profiler (CPU activity,
input shapes and dtypes) and writes one JSON per process with every collective it called: name, dtype, shape and
count. Then `--summarize` turns the files into a markdown table of bytes received per process per optimizer step
(algorithm level, ring, as tools/comm_math.py counts them) next to tools/comm_math.py's formulas for the same n,
D, W and P. Two "nodes" on one machine (docs/distributed.md, "Measured on the 2-node run"):

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    for node in 0 1; do
      torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:29500 \\
          tools/comm_profile.py --report /tmp/comm -- train RECIPE --out /tmp/comm/run &
    done; wait
    python tools/comm_profile.py --summarize /tmp/comm

The profiler slows the run; the counts and shapes, not its times, are the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "int": 4, "long int": 8, "unsigned char": 1}


BACKENDS = ("gloo:", "nccl:")  # the profiler's events of the transfers themselves, with dtype and shape


def profile_train(argv: list[str], report: Path) -> int:
    """Runs `clipkit <argv>` under the profiler; writes `report/comm-rank<R>.json`; returns the exit status."""
    from torch.profiler import ProfilerActivity, profile

    from clipkit.cli import main
    from clipkit.files import write_json_atomic

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        status = main(argv)
    calls = Counter()
    for e in prof.events():
        if e.name.startswith(BACKENDS):
            dtype = next((d for d in e.input_dtypes if d), "?")
            calls[(e.name, dtype, json.dumps(e.input_shapes[0] if e.input_shapes else []))] += 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    steps = json.loads(Path(argv[argv.index("--out") + 1], "summary.json").read_text())["steps"] if rank == 0 else None
    rows = [{"name": n, "dtype": d, "shape": json.loads(s), "calls": c} for (n, d, s), c in sorted(calls.items())]
    report.mkdir(parents=True, exist_ok=True)
    import torch

    conditions = {"argv": argv, "torch": torch.__version__, "backend": "nccl" if torch.cuda.is_available() else "gloo",
                  "nnodes": os.environ.get("GROUP_WORLD_SIZE"), "host_cores": os.cpu_count()}  # fmt: skip
    record = {"rank": rank, "world": world, "steps": steps, "conditions": conditions, "collectives": rows}
    write_json_atomic(report / f"comm-rank{rank}.json", record, sort_keys=False)
    return status


def numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def received_bytes(op: str, elements: int, itemsize: int, world: int) -> float:
    """Bytes one process receives in one call, ring algorithms (what tools/comm_math.py counts)."""
    if op == "all_gather":  # input: this process's part
        return (world - 1) * elements * itemsize
    if op == "reduce_scatter":  # input: the whole tensor
        return (world - 1) / world * elements * itemsize
    if op == "all_reduce":
        return 2 * (world - 1) / world * elements * itemsize
    if op == "broadcast":
        return elements * itemsize
    return 0.0


def kind_of(op: str, dtype: str, shape: list[int]) -> str:
    """Which line of the tables a transfer belongs to: features are 2-D [rows, D] floats, DDP's buckets are 1-D."""
    floating = dtype in ("float", "c10::BFloat16", "c10::Half", "double")
    if floating and len(shape) == 2 and op == "all_gather":
        return "gather"
    if floating and len(shape) == 2 and op in ("reduce_scatter", "all_reduce"):  # gloo reduce-scatters by all-reduce
        return "scatter"
    if floating and len(shape) == 1 and numel(shape) > 1 and op == "all_reduce":
        return "grads"
    return "other"


def summarize(report: Path) -> str:
    """The markdown table of rank 0's transfers per step, and the formulas' figures for the same run."""
    sys.path.insert(0, str(TOOLS))
    from comm_math import allreduce_bytes, gather_bytes

    data = json.loads((report / "comm-rank0.json").read_text())
    world, steps = data["world"], data["steps"]
    lines = ["| transfer (profiler event) | dtype | shape per call | calls per step | bytes received per step |",
             "|---|---|---|---|---|"]  # fmt: skip
    per_step, n, dim, grads = Counter(), 0, 0, 0
    for r in data["collectives"]:
        op = r["name"].split(":", 1)[1]
        kind = kind_of(op, r["dtype"], r["shape"])
        b = received_bytes(op, numel(r["shape"]), ITEMSIZE.get(r["dtype"], 0), world) * r["calls"] / steps
        per_step[kind] += b
        if kind == "gather":
            n, dim = r["shape"]
        elif kind == "grads":
            grads += numel(r["shape"]) * r["calls"]
        lines.append(f"| `{r['name']}` | {r['dtype']} | {r['shape']} | {r['calls'] / steps:.2f} | {b:,.0f} |")
    grads //= steps
    paper_gather = gather_bytes(n, world, dim, 4)
    lines += ["", f"W={world}, {steps} steps, per-process batch n={n}, embedding D={dim}, gradient elements "
              f"all-reduced per step P={grads:,}.", "",
              "| per process per step | measured | tools/comm_math.py formula |", "|---|---|---|",
              f"| feature all-gather (image + text) | {per_step['gather']:,.0f} B | {paper_gather:,} B |",
              f"| its backward reduce-scatter | {per_step['scatter']:,.0f} B | {paper_gather:,} B |",
              f"| DDP gradient all-reduce | {per_step['grads']:,.0f} B | {allreduce_bytes(grads, world):,.0f} B |",
              f"| everything else (scalars, skip counts, buffers, checkpoints, setup) | {per_step['other']:,.0f} B "
              "| not counted |"]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, help="folder for comm-rank<R>.json (with the clipkit arguments after --)")
    p.add_argument("--summarize", type=Path, help="a report folder: print the table")
    p.add_argument("clipkit", nargs=argparse.REMAINDER, help="-- train RECIPE --out RUN ...")
    args = p.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    argv = args.clipkit[1:] if args.clipkit[:1] == ["--"] else args.clipkit
    if args.report is None or argv[:1] != ["train"] or "--out" not in argv:
        p.error("give --report DIR -- train RECIPE --out RUN [...]")
    return profile_train(argv, args.report)


if __name__ == "__main__":
    sys.exit(main())
