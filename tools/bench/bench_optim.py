"""AdamW step time on a preset model's parameters: torch's CPU default (a per-parameter loop, what open_clip_train
gets), foreach (clipkit before), fused (clipkit now). Rounds interleave the three; the best step of each round
counts, and the median over rounds is printed.

    python -m tools.bench.bench_optim --preset quickstart --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from clipkit.optim import param_groups
from tools.bench.common import (
    add_model_arguments,
    add_round_arguments,
    bench_lock,
    log,
    machine,
    median,
    model_from_args,
    write_json,
)

KINDS = {"for-loop (torch CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_time(model: torch.nn.Module, kwargs: dict, steps: int) -> float:
    """Best wall time of one AdamW step over `steps` steps (after 2 warm-up steps that create the state)."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **kwargs)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(2):
        opt.step()
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_round_arguments(p, threads=1, rounds=5, steps=5, steps_help="timed steps per implementation and round")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = model_from_args(a)
    n = sum(p.numel() for p in model.parameters())
    info = machine() | {"threads": a.threads}
    log(f"machine: {json.dumps(info)}")
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(a.rounds):
        with bench_lock(a.lock or None):
            load = os.getloadavg()[0]
            for kind, kwargs in KINDS.items():
                times[kind].append(step_time(model, kwargs, a.steps))
        print(f"round {r + 1} (load {load:.2f}): " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()))
    for kind, v in times.items():
        print(f"{kind}: {median(v) * 1e3:.1f} ms a step ({n / 1e6:.1f}M parameters, {a.threads} thread(s))")
    write_json(a.json, {"machine": info, "parameters": n, "step_s": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
