"""DDP against FSDP2 on the GPUs of one machine: one recipe, seed and data for N steps each; the losses compared.

clipkit refuses `train.fsdp: true` on a CPU (Accelerate would silently run DDP there), so this check needs GPUs:

    python tools/ddp_vs_fsdp.py recipes/quickstart.yaml --gpus 8 --steps 200 --out /tmp/ddp-vs-fsdp \\
        --json docs/bench/ddp_vs_fsdp.json data_root=data eval.tasks=[] index.shards=

Each side is `torchrun --standalone --nproc_per_node GPUS -m clipkit.cli train RECIPE` with `train.fsdp` false, then
true (log every step, checkpoint only at the end). The two compute the same gradients with different reduction
orders (an all-reduce of full gradients against a reduce-scatter of shards), so their losses agree to rounding at
first and drift apart slowly; the check fails (exit status 1) when a loss of the first `--check-steps` steps differs
by more than `--tol` (relative). Also printed: each side's mean samples/s after the first 10% of the steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def command(recipe: str, out: Path, gpus: int, steps: int, fsdp: bool, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
            "-m", "clipkit.cli", "train", recipe, "--out", str(out), f"train.steps={steps}", "train.log_every=1",
            "train.checkpoint_every=0", f"train.fsdp={str(fsdp).lower()}", *overrides]  # fmt: skip


def read_rows(run: Path) -> dict[int, dict]:
    """The step rows of a run's metrics.jsonl (eval rows left out), by step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def compare(ddp: dict[int, dict], fsdp: dict[int, dict], check_steps: int, tol: float) -> dict:
    """Per-step loss differences of two runs' rows (relative to the DDP loss) and their throughputs.

    Returns:
        {"steps", "max_rel_diff", "max_rel_diff_checked", "first_step_above_tol", "final_loss": {...},
        "samples_per_s": {...}, "ok"}.
    """
    steps = sorted(set(ddp) & set(fsdp))
    rel = {s: abs(fsdp[s]["loss"] - ddp[s]["loss"]) / max(abs(ddp[s]["loss"]), 1e-12) for s in steps}
    checked = [s for s in steps if s <= check_steps]
    warm = steps[len(steps) // 10 :]
    speed = {name: sum(rows[s]["samples_per_s"] for s in warm) / max(len(warm), 1) for name, rows in
             (("ddp", ddp), ("fsdp", fsdp))}  # fmt: skip
    worst_checked = max((rel[s] for s in checked), default=0.0)
    return {
        "steps": len(steps),
        "max_rel_diff": max(rel.values(), default=0.0),
        "max_rel_diff_checked": worst_checked,
        "first_step_above_tol": next((s for s in steps if rel[s] > tol), None),
        "final_loss": {"ddp": ddp[steps[-1]]["loss"], "fsdp": fsdp[steps[-1]]["loss"]} if steps else {},
        "samples_per_s": speed,
        "ok": bool(checked) and worst_checked <= tol,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for both runs")
    p.add_argument("--gpus", type=int, default=8, help="processes (one per GPU)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--check-steps", type=int, default=20, help="the first steps whose losses must agree")
    p.add_argument("--tol", type=float, default=1e-3, help="relative loss difference allowed in those steps")
    p.add_argument("--out", type=Path, required=True, help="folder for the two runs (ddp/, fsdp/)")
    p.add_argument("--json", type=Path, help="write the comparison and run conditions here")
    args = p.parse_args()

    import torch

    if torch.cuda.device_count() < 1:
        print("tools/ddp_vs_fsdp.py: needs GPUs (clipkit refuses FSDP on a CPU)", file=sys.stderr)
        return 2
    gpus = min(args.gpus, torch.cuda.device_count())
    times = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        start = time.time()
        subprocess.run(command(args.recipe, args.out / name, gpus, args.steps, fsdp, args.overrides), check=True)
        times[name] = time.time() - start
    result = compare(read_rows(args.out / "ddp"), read_rows(args.out / "fsdp"), args.check_steps, args.tol)
    result["conditions"] = {"recipe": args.recipe, "overrides": args.overrides, "gpus": gpus,
                            "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                            "wall_s": times, "check_steps": args.check_steps, "tol": args.tol}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        from clipkit.files import write_json_atomic

        write_json_atomic(args.json, result, sort_keys=False)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
