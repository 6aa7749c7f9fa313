"""Samples per second of a `clipkit finetune` `ce` step (image tower + head, cross-entropy, fused AdamW) under bf16
autocast against fp32, measured in the same rounds: clipkit's bf16 (`clipkit.precision.autocast`: attention on SDPA's
math backend on a CPU) and plain `torch.autocast` (SDPA picks its own kernel). Rounds interleave the variants; the
median over rounds is printed with its ratio to fp32. The machine facts in the JSON say whether the CPU has AMX.

    python -m tools.bench.bench_precision --preset quickstart --threads 2 --batch 128 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

from clipkit.precision import autocast, cpu_has_amx_bf16
from tools.bench import common
from tools.bench.bench_patch_dropout import ce_step_setup, samples_per_s

VARIANTS = {
    "fp32": functools.partial(autocast, "fp32", "cpu"),
    "bf16": functools.partial(autocast, "bf16", "cpu"),
    "bf16, torch.autocast alone": functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(p)
    p.add_argument("--batch", type=int, default=128)
    common.add_round_arguments(p, threads=2, rounds=3, steps=30, steps_help="timed steps per variant and round")
    a = p.parse_args(argv)
    _, mode, optimizer, images, labels, info = ce_step_setup(a, amx_bf16=cpu_has_amx_bf16())
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(a.rounds):
        with common.bench_lock(a.lock or None):
            load = os.getloadavg()[0]
            for name, context in VARIANTS.items():
                rates[name].append(samples_per_s(mode.module, optimizer, images, labels, a.steps, context))
        print(f"round {r + 1} (load {load:.2f}): " + ", ".join(f"{n} {v[-1]:.0f}/s" for n, v in rates.items()))
    anchor = common.median(rates["fp32"])
    for name, v in rates.items():
        rate = common.median(v)
        print(f"{name}: {rate:.0f} samples/s, {rate / anchor:.2f}x fp32")
    common.write_json(a.json, {"machine": info, "model_cfg": common.model_config(a), "samples_per_s": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
