"""Where a run starts: a new run folder, or an exact continuation of the run already in it.

Three rules keep runs from being lost or mixed:
- A folder that holds a run is never trained into again without `--resume`: the old checkpoints, model and
  metrics would be replaced or mixed with the new run's.
- A resume continues exactly what the run's first steps did, so the settings that define the data stream, the
  model and the float summation order must be those of the run's `recipe.yaml` (else: refused, naming each key).
  Settings that only steer what comes next (steps, lr, evals, logging) may change: a warning names them, and the
  recipe of the resumed part is saved beside the original (`recipe.yaml` always records the first steps).
- A checkpoint whose RNG state cannot be read cannot give a bitwise resume: refused, naming the file (Accelerate
  itself only logs that at INFO and goes on).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from clipkit.checkpoint import complete_checkpoints, find_checkpoint
from clipkit.config import Recipe, RecipeError, to_dict
from clipkit.files import write_text_atomic

log = logging.getLogger("clipkit")

# What a run folder holds once training has written into it.
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "checkpoints", "model", "summary.json", "eval", "index", "embeddings")
# Dotted prefixes of the settings an exact resume cannot change: the data stream (order, batches, decode), the
# model, the loss and what decides float summation order. Everything else may change on resume, with a warning.
FIXED_ON_RESUME = (
    "seed",
    "model.",
    "data.sources",
    "data.batch_size",
    "data.workers",
    "data.shuffle_buffer",
    "data.caption",
    "data.resampled",
    "data.fast_images",
    "data.augment",
    "train.loss",
    "train.local_loss",
    "train.gather_with_grad",
    "train.gather_dtype",
    "train.accum_freq",
    "train.positives",
    "train.checkpoint_every",
    "train.precision",
    "train.threads",
    "train.fsdp",
    "train.slip",
    "train.caption_weight",
)


class ResumeError(RecipeError):
    """The run folder or checkpoint does not allow what was asked; the message says what to do instead."""


def start_checkpoint(out_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from, or None for a new run; refuses to train into an existing run.

    Args:
        out_dir: the run folder.
        resume: None (a new run), "latest" (the newest complete checkpoint, which must exist), "auto" (the newest
            complete checkpoint if there is one, else a new run: for restarts by a scheduler or torchrun), or a
            checkpoint folder.
    """
    if resume == "auto":
        done = complete_checkpoints(out_dir) if out_dir.is_dir() else []
        return done[-1] if done else None
    if resume is not None:
        return find_checkpoint(out_dir, resume)
    if out_dir.exists() and not out_dir.is_dir():
        raise ResumeError(f"--out {out_dir}: is a file, not a folder")
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if present:
        n = len(complete_checkpoints(out_dir))
        raise ResumeError(
            f"--out {out_dir} holds a run already ({', '.join(present)}; {n} complete checkpoint(s)). clipkit never "
            "replaces a run: continue it with --resume latest, or train into a new --out folder"
        )
    return None


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "config":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_recipe(recipe: Recipe, out_dir: Path, ckpt: Path, world_size: int) -> list[str]:
    """Compares the recipe with the run's saved one and the checkpoint's world size; returns the keys that changed.

    Raises:
        ResumeError: a setting of `FIXED_ON_RESUME` or the number of processes differs, naming each.
    """
    saved_path = out_dir / "recipe.yaml"
    saved = _flat(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}) if saved_path.is_file() else {}
    now = _flat(json.loads(json.dumps(to_dict(recipe))))  # tuples -> lists, as in the YAML
    # A key the saved recipe lacks came with a newer clipkit: the run used what its default does now.
    changed = sorted(k for k in saved if saved[k] != now.get(k) and k != "data_root")
    fixed = [k for k in changed if any(k == p or k.startswith(p) for p in FIXED_ON_RESUME)]
    lines = [f"  {k}: {saved.get(k)!r} in {saved_path.name} -> {now.get(k)!r} now" for k in fixed]
    saved_world = len(list(ckpt.glob("progress-*.json")))
    if saved_world and saved_world != world_size:
        lines.append(f"  processes: {saved_world} in {ckpt.name} -> {world_size} now")
    if lines:
        raise ResumeError(
            f"--resume {ckpt}: an exact resume needs the data stream, model and process count of the run's first "
            "steps, and these differ:\n" + "\n".join(lines) + "\nResume with the run's settings (its recipe.yaml), "
            "or start a new run in a new --out folder"
        )
    return changed


def check_rng_state(ckpt: Path, rank: int) -> None:
    """Reads this process's RNG state file of a checkpoint as Accelerate will, refusing it when unreadable."""
    from accelerate.utils import load

    path = ckpt / "state" / f"random_states_{rank}.pkl"
    try:
        states = load(path)
        missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed") if k not in states]
    except Exception as e:  # torch.load raises many kinds on a truncated or foreign file
        missing = [f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    if missing:
        raise ResumeError(
            f"--resume {ckpt}: {path} cannot restore the random state ({', '.join(missing)}), so the run would not "
            "continue exactly. Resume from an earlier checkpoint (--resume <its folder>)"
        )


def note_resumed_recipe(recipe: Recipe, out_dir: Path, step: int, changed: list[str]) -> None:
    """Warns about the settings changed on resume and saves the recipe in force from `step` beside recipe.yaml."""
    if not changed:
        return
    path = out_dir / f"recipe.resumed-step-{step}.yaml"
    log.warning(
        "resuming with changed settings (%s); the recipe from step %d on is in %s", ", ".join(changed), step, path
    )
    write_text_atomic(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))


def trim_metrics(path: Path, step: int) -> None:
    """Drops the metrics rows after `step` (written by the interrupted attempt that the resume replaces)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))
