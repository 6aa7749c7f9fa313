"""What the training loop reports: data counts, the progress bar, metrics.jsonl rows, trackers, the skip-rate stop."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from clipkit.stopping import TrainingStopped

MIN_SAMPLES_FOR_SKIP_RATE = 1000  # the skip rate of the first few batches says little about a data set


@dataclass
class DataCounts:
    """This process's data counters over the whole run (a resumed run starts from its checkpoint's).

    Attributes:
        skipped: unusable samples by reason.
        shards: unusable samples (or broken tars) by shard.
        samples: usable samples consumed.
    """

    skipped: Counter = field(default_factory=Counter)
    shards: Counter = field(default_factory=Counter)
    samples: int = 0

    def add(self, batch: dict) -> None:
        self.skipped.update(batch["skipped"])
        self.shards.update(batch["skipped_shards"])
        self.samples += len(batch["key"])

    def summed(self, accelerator: Accelerator) -> DataCounts:
        """The counts summed over all processes (a small object gather: every process must call it)."""
        if accelerator.num_processes == 1:
            return self
        from accelerate.utils import gather_object

        total = DataCounts()
        for skipped, shards, samples in gather_object([(dict(self.skipped), dict(self.shards), self.samples)]):
            total.skipped.update(skipped)
            total.shards.update(shards)
            total.samples += samples
        return total


def worst_shards(shards: Counter, k: int = 3) -> str:
    return ", ".join(f"{url} ({n})" for url, n in shards.most_common(k))


def check_skip_rate(counts: DataCounts, max_rate: float, step: int) -> None:
    """Stops the run when too many samples were unusable (once MIN_SAMPLES_FOR_SKIP_RATE samples were read)."""
    bad = sum(v for k, v in counts.skipped.items() if k != "bad_shard")
    seen = bad + counts.samples
    if seen >= MIN_SAMPLES_FOR_SKIP_RATE and bad / seen > max_rate:
        raise TrainingStopped(
            f"step {step}: {bad} of {seen} samples read were unusable ({dict(counts.skipped)}), above "
            f"data.max_skip_rate={max_rate}; worst shards: {worst_shards(counts.shards)}"
        )


class StepLogger:
    """The progress bar on every step; on log steps one metrics row (metrics.jsonl, trackers, bar postfix).

    Rows are written by the main process only; every process takes part in the reductions of a log step.

    Args:
        accelerator: the run's Accelerator (trackers, reductions).
        path: `<run>/metrics.jsonl`.
        steps: the run's last step.
        start: the step the run starts from.
        log_every: steps between rows.
        samples_per_step: global samples per optimizer step (for samples/s).
        max_skip_rate: data.max_skip_rate, checked on log steps.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        path: Path,
        steps: int,
        start: int,
        log_every: int,
        samples_per_step: int,
        max_skip_rate: float,
    ):
        self.accelerator, self.path, self.steps, self.log_every = accelerator, path, steps, log_every
        self.samples_per_step, self.max_skip_rate = samples_per_step, max_skip_rate
        self.main = accelerator.is_main_process
        self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not self.main or None)
        self.last_time, self.last_step = time.perf_counter(), start

    def write(self, row: dict) -> None:
        """Appends `row` to metrics.jsonl and sends its scalars to the trackers (main process)."""
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if k not in ("step", "skipped")}, step=row["step"])

    def step(
        self,
        done: int,
        loss: torch.Tensor,
        model: torch.nn.Module,
        lr: float,
        counts: DataCounts,
        nonfinite,
        parts: dict[str, torch.Tensor] | None = None,
    ):
        """After optimizer step `done`: advances the bar; on a log step, writes a row and checks the skip rate.

        Args:
            loss: this process's loss of the step (reduced over processes here).
            model: the unwrapped model (its logit scale and bias).
            nonfinite: returns the steps skipped up to step `done` (a host sync, so only on log steps).
            parts: auxiliary losses of the step by metric name (`loss/slip`, ...), reduced over processes here.
        """
        self.bar.update(1)
        if done % self.log_every and done != self.steps:
            return
        parts = parts or {}
        scalars = [self.accelerator.reduce(loss.detach(), "mean"), model.logit_scale.detach().exp()]
        scalars += [self.accelerator.reduce(v.detach(), "mean") for v in parts.values()]
        if getattr(model, "logit_bias", None) is not None:
            scalars.append(model.logit_bias.detach().reshape(()))
        values = torch.stack([v.float().reshape(()) for v in scalars]).tolist()  # one host sync for all of them
        total = counts.summed(self.accelerator)
        now = time.perf_counter()
        row = {
            "step": done,
            "loss": values[0],
            "lr": lr,
            "logit_scale": values[1],
            "samples_per_s": self.samples_per_step * (done - self.last_step) / (now - self.last_time),
            "skipped": dict(total.skipped),
            "nonfinite_steps": nonfinite(done),
        }
        row.update(zip(parts, values[2 : 2 + len(parts)], strict=True))
        if len(values) > 2 + len(parts):
            row["logit_bias"] = values[-1]
        self.last_time, self.last_step = now, done
        self.write(row)
        self.bar.set_postfix(
            loss=f"{row['loss']:.3f}", T=f"{row['logit_scale']:.1f}", sps=f"{row['samples_per_s']:.0f}"
        )
        check_skip_rate(total, self.max_skip_rate, done)

    def close(self) -> None:
        self.bar.close()
