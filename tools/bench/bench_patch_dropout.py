"""Samples per second of a `clipkit finetune` `ce` step (image tower + head, cross-entropy, fused AdamW) with
open_clip's PatchDropout at each share against none, measured in the same rounds. Rounds interleave the shares; the
median over rounds is printed, with its ratio to p = 0.

    python -m tools.bench.bench_patch_dropout --preset quickstart --threads 2 --batch 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
from open_clip.transformer import PatchDropout

from clipkit.finetune.head import ImageClassifier
from clipkit.finetune.modes import CrossEntropyMode
from clipkit.optim import make_optimizer
from tools.bench import common


def samples_per_s(classifier: ImageClassifier, optimizer, images, labels, steps: int, autocast=nullcontext) -> float:
    """Samples per second over `steps` training steps, after 3 untimed ones; `autocast()` wraps each forward."""
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.cross_entropy(classifier(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * len(labels) / (time.perf_counter() - t0)


def ce_step_setup(a: argparse.Namespace, **facts) -> tuple:
    """The benchmarked `ce` step's pieces from the model and round arguments: (dual encoder, mode in train mode,
    AdamW, [batch, 3, S, S] random images, [batch] labels, machine facts + `facts`); sets threads and the seed."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = common.model_from_args(a)
    mode = CrossEntropyMode(model, torch.nn.Linear(model.visual.output_dim, 10))
    optimizer = make_optimizer(mode.module, 1e-4, 0.1, (0.9, 0.999), 1e-8)
    size = model.visual.image_size[0]
    images, labels = torch.randn(a.batch, 3, size, size), torch.randint(0, 10, (a.batch,))
    info = common.machine() | {"threads": a.threads, "batch": a.batch, **facts}
    common.log(f"machine: {json.dumps(info)}")
    mode.module.train()
    return model, mode, optimizer, images, labels, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(p)
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--batch", type=int, default=128)
    common.add_round_arguments(p, threads=2, rounds=3, steps=30, steps_help="timed steps per share and round")
    a = p.parse_args(argv)
    model, mode, optimizer, images, labels, info = ce_step_setup(a)
    rates: dict[float, list[float]] = {s: [] for s in a.shares}
    for r in range(a.rounds):
        with common.bench_lock(a.lock or None):
            load = os.getloadavg()[0]
            for share in a.shares:
                model.visual.patch_dropout = PatchDropout(share) if share else torch.nn.Identity()
                rates[share].append(samples_per_s(mode.module, optimizer, images, labels, a.steps))
        print(f"round {r + 1} (load {load:.2f}): " + ", ".join(f"p={s:g} {v[-1]:.0f}/s" for s, v in rates.items()))
    anchor = common.median(rates[a.shares[0]])
    for share, v in rates.items():
        rate = common.median(v)
        print(f"patch_dropout {share:g}: {rate:.0f} samples/s, {rate / anchor:.2f}x p={a.shares[0]:g}")
    figures = {
        "machine": info,
        "model_cfg": common.model_config(a),
        "samples_per_s": {str(s): v for s, v in rates.items()},
    }
    common.write_json(a.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
