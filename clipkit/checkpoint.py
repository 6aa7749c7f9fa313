"""Training checkpoints: what a run needs to continue exactly, written so that a crash never leaves a bad one.

`<run>/checkpoints/step-N/` holds Accelerate's state (model, optimizer, scheduler, grad scaler, every process's
RNG), a model folder (open_clip-loadable), and `progress-R.json` per process R (the step, the data position, and
that process's counters: each process reads its own back on resume).
`COMPLETE` is written last: a folder without it (a process killed mid-write) is never resumed from, and old
checkpoints are removed only after a newer one is complete.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

from clipkit import faults
from clipkit.files import write_json_atomic
from clipkit.models import save_model

COMPLETE = "COMPLETE"


@dataclass
class Progress:
    """Everything besides Accelerate's state that a resumed run needs to continue exactly.

    Attributes:
        step: optimizer steps done.
        epoch: the data epoch (epoch mode) or segment (resampled mode) being read.
        consumed: batches of that epoch or segment consumed by the main process of each rank.
        skipped: this process's unusable samples by reason, over the whole run.
        skipped_shards: this process's unusable samples (or broken tars) by shard, over the whole run.
        samples: usable samples consumed by this process.
        nonfinite: steps skipped for a non-finite loss or gradient.
        metrics: eval metrics at this step, if evals ran here.
    """

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    skipped: dict = field(default_factory=dict)
    skipped_shards: dict = field(default_factory=dict)
    samples: int = 0
    nonfinite: int = 0
    metrics: dict = field(default_factory=dict)


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(re.findall(r"\d+", path.name)[-1])


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return sorted((p for p in (out_dir / "checkpoints").glob("step-*") if (p / COMPLETE).exists()), key=step_of)


def find_checkpoint(out_dir: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint of the run; otherwise the given folder, which must be complete."""
    if resume == "latest":
        done = complete_checkpoints(out_dir)
        if not done:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {out_dir / 'checkpoints'}")
        return done[-1]
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"--resume {resume}: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def progress_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"progress-{rank}.json"


def load_progress(ckpt: Path, rank: int = 0) -> Progress:
    """Process `rank`'s progress record of a checkpoint (step, data position and metrics are the same on all)."""
    return Progress(**json.loads(progress_file(ckpt, rank).read_text()))


def save_checkpoint(
    accelerator: Accelerator, model, config: dict, out_dir: Path, progress: Progress, name: str
) -> Path:
    """Writes checkpoints/step-N/ on every process; `COMPLETE` last, by the main process, after all have written.

    Args:
        accelerator: the run's Accelerator (its save_state is collective).
        model: the prepared (wrapped) model.
        config: the open_clip config of the model folder.
        out_dir: the run folder.
        progress: this process's progress record.
        name: the recipe name, kept in the model folder's info.
    """
    ckpt = checkpoint_dir(out_dir, progress.step)
    if accelerator.is_main_process and ckpt.exists():  # an incomplete leftover of a killed run: start clean
        shutil.rmtree(ckpt)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt / "state"))
    state = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if accelerator.is_main_process:
        save_model(ckpt / "model", state, config, {"recipe": name, "step": progress.step})
    write_json_atomic(progress_file(ckpt, accelerator.process_index), asdict(progress), sort_keys=False)
    accelerator.wait_for_everyone()
    faults.maybe_signal("sigkill_in_checkpoint", progress.step, signal.SIGKILL)
    if accelerator.is_main_process:
        (ckpt / COMPLETE).write_text("")
    accelerator.wait_for_everyone()
    return ckpt


def prune_checkpoints(out_dir: Path, keep_last: int, keep_best: str | None) -> list[Path]:
    """Removes complete checkpoints beyond the `keep_last` newest, sparing the best by `keep_best`.

    Incomplete folders older than the newest complete checkpoint are removed too (they can never be resumed).

    Returns:
        The removed folders.
    """
    done = complete_checkpoints(out_dir)
    if not done:
        return []
    keep = set(done[-keep_last:]) if keep_last > 0 else set(done)
    if keep_best is not None:
        scored = [(load_progress(p).metrics.get(keep_best), p) for p in done]
        scored = [(v, p) for v, p in scored if v is not None]
        if scored:
            keep.add(max(scored, key=lambda vp: (vp[0], step_of(vp[1])))[1])
    newest = step_of(done[-1])
    stale = [p for p in (out_dir / "checkpoints").glob("step-*") if not (p / COMPLETE).exists() and step_of(p) < newest]
    removed = [p for p in done if p not in keep] + stale
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
