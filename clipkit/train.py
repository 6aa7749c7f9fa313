"""The training loop under Hugging Face Accelerate: one CPU process up to many GPU nodes.

Launch it plainly, with `torchrun`, or with `accelerate launch`; Accelerate reads the process group from the
environment. The data loader is deliberately NOT passed to `accelerator.prepare` (it is already split by
process and worker; see clipkit/data/pipeline.py): batches are moved to the device here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from clipkit.config import Recipe, RecipeError, save_recipe, to_dict
from clipkit.data.pipeline import Source, TrainStream, train_loader
from clipkit.data.shards import expand_shards
from clipkit.evaluate import run as evals
from clipkit.loss import ContrastiveLoss
from clipkit.models import ModelBundle, create_model, save_model
from clipkit.optim import make_optimizer, make_scheduler
from clipkit.plots import plot_metrics
from clipkit.step import forward_backward

log = logging.getLogger("clipkit")
MAX_LOGIT_SCALE = math.log(100.0)
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}  # from the SigLIP paper


def preflight(recipe: Recipe) -> dict[str, list[str]]:
    """Checks everything a run reads, before any work: shard patterns match files, eval files exist.

    Returns:
        The expanded shard lists by recipe key.

    Raises:
        RecipeError: naming the key whose files are missing.
    """
    shards = {}
    specs = [(f"data.sources.{i}.shards", s.shards) for i, s in enumerate(recipe.data.sources)]
    specs += [(f"eval.tasks.{i}.shards", t.shards) for i, t in enumerate(recipe.eval.tasks)]
    if recipe.index.shards:
        specs.append(("index.shards", recipe.index.shards))
    for key, spec in specs:
        try:
            shards[key] = expand_shards(recipe.path(spec))
        except FileNotFoundError as e:
            raise RecipeError(f"{key}: {spec!r} under data_root {recipe.data_root!r}: {e}") from None
    for i, t in enumerate(recipe.eval.tasks):
        for name in ("classnames", "templates"):
            value = getattr(t, name)
            if value is not None and not Path(recipe.path(value)).is_file():
                raise RecipeError(f"eval.tasks.{i}.{name}: {recipe.path(value)!r} is not a file")
    return shards


def make_accelerator(recipe: Recipe, out_dir: Path) -> Accelerator:
    """Accelerator for the recipe: bf16 autocast only when asked (fp16 on CPU silently runs fp32)."""
    precision = "bf16" if recipe.train.precision == "bf16" else "no"
    kwargs = {}
    if recipe.train.fsdp:
        if not torch.cuda.is_available():
            raise RecipeError("train.fsdp: true needs GPUs (on CPU, Accelerate ignores the FSDP plugin and runs DDP)")
        from accelerate import FullyShardedDataParallelPlugin

        # Size-based wrapping fits every tower family (open_clip, timm, HF) without naming their block classes.
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="size_based_wrap",
            min_num_params=1_000_000,
            state_dict_type="FULL_STATE_DICT",
        )
    if recipe.train.wandb:
        kwargs.update(log_with="wandb", project_dir=str(out_dir))
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), **kwargs)


def build_bundle(recipe: Recipe) -> ModelBundle:
    """The recipe's model; SigLIP needs the learnable bias and its own initial scale."""
    if recipe.train.loss != "siglip":
        return create_model(recipe.model)
    cfg = recipe.model
    if cfg.config is not None:
        config = {**SIGLIP_INIT, **cfg.config}
    else:  # a named architecture: copy its config and add the SigLIP init
        from clipkit.models.factory import resolve_config

        config = {**SIGLIP_INIT, **resolve_config(cfg)["model_cfg"]}
    from dataclasses import replace

    return create_model(replace(cfg, name=None, config=config))


def find_checkpoint(out_dir: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint folder of the run; otherwise the given path."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "state").is_dir():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint state folder at {path / 'state'}")
        return path
    done = [p for p in (out_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()]
    if not done:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under {out_dir / 'checkpoints'}")
    return max(done, key=lambda p: int(re.findall(r"\d+", p.name)[-1]))


def epochs(stream: TrainStream, loader: torch.utils.data.DataLoader):
    """Batches forever: a resampled stream never ends; in epoch mode each pass is an epoch, and the shared epoch
    counter is bumped before the loader starts its workers again (so they reshuffle shards with the new epoch)."""
    while True:
        yield from loader
        stream.epoch.value += 1


class MetricsLog:
    """Appends one JSON object per line to `<run>/metrics.jsonl` (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def run_evals(recipe: Recipe, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path, step: int, device) -> dict:
    """Runs every eval task of the recipe; writes `<run>/eval/<task>-<dataset>.json`; returns flat metrics."""
    flat = {}
    was_training = model.training
    model.eval()
    bundle_eval = ModelBundle(model, bundle.train_transform, bundle.eval_transform, bundle.tokenizer, bundle.config)
    for t in recipe.eval.tasks:
        if t.task == "zeroshot":
            classnames = evals.read_lines(recipe.path(t.classnames), "classnames")
            templates = evals.read_lines(recipe.path(t.templates), "templates") if t.templates else None
            metrics = evals.zeroshot(
                bundle_eval, recipe.path(t.shards), classnames, templates, recipe.eval.batch_size, device
            )
        else:
            metrics = evals.retrieval(bundle_eval, recipe.path(t.shards), recipe.eval.batch_size, device)
        metrics["step"] = step
        evals.write_result(out_dir / "eval" / f"{t.task}-{t.dataset}.json", t.dataset, recipe.name, t.task, metrics)
        flat.update({f"eval/{t.dataset}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    model.train(was_training)
    return flat


def train(recipe: Recipe, out_dir: str | Path, resume: str | None = None) -> dict:
    """Trains a recipe into `out_dir` and returns the end summary.

    The run folder gets: recipe.yaml (resolved), metrics.jsonl, checkpoints/step-N/ (Accelerate state + a model
    folder), model/ (the final model: open_clip-loadable), eval/*.json, summary.json.

    Args:
        recipe: the validated recipe.
        out_dir: the run folder.
        resume: "latest" or a checkpoint folder to continue from.
    """
    out_dir = Path(out_dir)
    shards = preflight(recipe)  # before any work: a missing file fails in seconds, not after model build
    accelerator = make_accelerator(recipe, out_dir)
    main = accelerator.is_main_process
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if recipe.data.batch_size * world_size < 2:
        raise RecipeError("data.batch_size: a contrastive batch needs at least 2 samples in all")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out_dir / "recipe.yaml")
    set_seed(recipe.seed)  # the same initial weights on every process
    bundle = build_bundle(recipe)
    model = bundle.model
    t = recipe.train
    optimizer = make_optimizer(model.to(device), t.lr, t.weight_decay, t.betas, t.eps)
    scheduler = make_scheduler(optimizer, t.steps, t.warmup, t.lr, t.min_lr)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)
    if recipe.train.wandb:
        accelerator.init_trackers(
            "clipkit",
            config=to_dict(recipe),
            init_kwargs={
                "wandb": {"name": recipe.name, "dir": str(out_dir), "mode": os.environ.get("WANDB_MODE", "offline")}
            },
        )

    start = 0
    if resume is not None:
        ckpt = find_checkpoint(out_dir, resume)
        accelerator.load_state(str(ckpt / "state"))
        start = json.loads((ckpt / "progress.json").read_text())["step"]
        if main:
            log.info("resumed from %s at step %d", ckpt, start)

    sources = [Source(tuple(shards[f"data.sources.{i}.shards"]), s.weight) for i, s in enumerate(recipe.data.sources)]
    # The stream's seed includes the start step, so a resumed run does not replay the samples it already saw.
    stream = TrainStream(
        sources,
        recipe.data.batch_size,
        bundle.train_transform,
        bundle.tokenizer,
        rank=rank,
        world_size=world_size,
        seed=recipe.seed * 1_000_003 + start,
        resampled=recipe.data.resampled,
        shuffle_size=recipe.data.shuffle_buffer,
        caption=recipe.data.caption,
    )
    batches = epochs(stream, train_loader(stream, recipe.data.workers, recipe.data.prefetch_factor))
    gather_dtype = torch.bfloat16 if t.gather_dtype == "bf16" else None
    loss_fn = ContrastiveLoss(
        t.loss, local_loss=t.local_loss, gather_grad=t.gather_with_grad, gather_dtype=gather_dtype
    )
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", main)
    skipped: Counter = Counter()
    samples_per_step = recipe.data.batch_size * world_size * t.accum_freq

    model.train()
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", disable=not main or None)
    last_time, last_step = time.perf_counter(), start
    loss = torch.zeros(())
    for step in range(start, t.steps):
        micro = []
        for _ in range(t.accum_freq):
            batch = next(batches)
            skipped.update(batch["skipped"])
            micro.append((batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True)))
        loss = forward_backward(
            model,
            micro,
            loss_fn,
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
            autocast=accelerator.autocast,
        )
        if t.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP's clamp: a temperature below 0.01 destabilizes training
            raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        done = step + 1
        bar.update(1)

        if done % t.log_every == 0 or done == t.steps:
            value = accelerator.reduce(loss.detach(), "mean").item()  # the only host sync of a step, on log steps
            now = time.perf_counter()
            row = {
                "step": done,
                "loss": value,
                "lr": scheduler.get_last_lr()[0],
                "logit_scale": raw_model.logit_scale.exp().item(),
                "samples_per_s": samples_per_step * (done - last_step) / (now - last_time),
                "skipped": dict(skipped),
            }
            if getattr(raw_model, "logit_bias", None) is not None:
                row["logit_bias"] = raw_model.logit_bias.item()
            last_time, last_step = now, done
            metrics_log.write(row)
            bar.set_postfix(loss=f"{value:.3f}", T=f"{row['logit_scale']:.1f}", sps=f"{row['samples_per_s']:.0f}")
            accelerator.log({k: v for k, v in row.items() if k != "skipped"}, step=done)
            if not math.isfinite(value):
                raise FloatingPointError(f"step {done}: loss is {value}; see {out_dir / 'metrics.jsonl'}")

        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
            save_checkpoint(accelerator, model, bundle.config, out_dir, done, recipe.name)
        if recipe.eval.every and done % recipe.eval.every == 0 and done < t.steps:
            if main:
                flat = run_evals(recipe, bundle, raw_model, out_dir, done, device)
                metrics_log.write({"step": done, **flat})
                accelerator.log(flat, step=done)
            accelerator.wait_for_everyone()
    bar.close()

    final = save_checkpoint(accelerator, model, bundle.config, out_dir, t.steps, recipe.name)
    summary = {
        "steps": t.steps,
        "world_size": world_size,
        "global_batch": samples_per_step,
        "final_loss": accelerator.reduce(loss.detach(), "mean").item(),
        "skipped": dict(skipped),
        "model": str(out_dir / "model"),
    }
    if main:
        shutil.copytree(final / "model", out_dir / "model", dirs_exist_ok=True)
        flat = run_evals(recipe, bundle, raw_model, out_dir, t.steps, device) if recipe.eval.tasks else {}
        metrics_log.write({"step": t.steps, **flat})
        accelerator.log(flat, step=t.steps)
        plot_metrics(out_dir / "metrics.jsonl", out_dir / "metrics.png")
        summary["eval"] = flat
        if recipe.index.shards:
            summary["index"] = build_run_index(recipe, bundle, raw_model, out_dir, device)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, config: dict, out_dir: Path, step: int, name: str
) -> Path:
    """Writes checkpoints/step-N/: Accelerate state (model, optimizer, scheduler, RNG of every process), a model
    folder, progress.json; `COMPLETE` is written last, so a half-written checkpoint is never resumed from."""
    ckpt = out_dir / "checkpoints" / f"step-{step:08d}"
    accelerator.save_state(str(ckpt / "state"))
    state = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if accelerator.is_main_process:
        save_model(ckpt / "model", state, config, {"recipe": name, "step": step})
        (ckpt / "progress.json").write_text(json.dumps({"step": step}))
        (ckpt / "COMPLETE").write_text("")
    accelerator.wait_for_everyone()
    return ckpt


def build_run_index(recipe: Recipe, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path, device) -> dict:
    """Embeds the recipe's index shards with the final model and builds their FAISS index in `<run>/index`."""
    from clipkit.evaluate.embed import embed_shards, save_embeddings
    from clipkit.index import build_index_dir

    model.eval()
    urls = expand_shards(recipe.path(recipe.index.shards))
    emb = embed_shards(
        model, bundle.eval_transform, bundle.tokenizer, urls, recipe.eval.batch_size, device, desc="index embed"
    )
    emb_dir = out_dir / "embeddings"
    save_embeddings(emb_dir, emb, {"model": str((out_dir / "model").resolve()), "shards": urls})
    return build_index_dir(emb_dir, out_dir / "index", factory=recipe.index.factory)
