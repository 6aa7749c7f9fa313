"""The training loop under Hugging Face Accelerate: one CPU process up to many GPU nodes.

Launch it plainly, with `torchrun`, or with `accelerate launch`; Accelerate reads the process group from the
environment. The data loader is deliberately NOT passed to `accelerator.prepare` (it is already split by
process and worker; see clipkit/data/pipeline.py): batches are moved to the device here.

`_train` is the whole loop on one screen; `setup` builds what it touches (a `Run`), and the small functions
below it do one job each: the next micro-batches, the optimizer step, the evals and checkpoints that are due,
and the end of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from clipkit import distributed, faults, threads
from clipkit.checkpoint import Progress, checkpoint_dir, load_progress, prune_checkpoints, save_checkpoint
from clipkit.config import Recipe, RecipeError, check_caption_weight, save_recipe, to_dict
from clipkit.data.pipeline import Source, TrainStream, train_loader
from clipkit.data.shards import expand_shards
from clipkit.data.views import SimCLRViews
from clipkit.evaluate import run as evals
from clipkit.files import write_json_atomic
from clipkit.loss import ContrastiveLoss
from clipkit.models import ModelBundle, create_model
from clipkit.models.factory import build_transforms, is_coca, resolve_config
from clipkit.models.weights import refuse_pickled_code
from clipkit.objectives import build_objectives, heads
from clipkit.optim import NonFiniteGuard, make_optimizer, make_scheduler
from clipkit.plots import plot_metrics
from clipkit.precision import cpu_attention
from clipkit.resume import check_resume_recipe, check_rng_state, note_resumed_recipe, start_checkpoint, trim_metrics
from clipkit.step import MicroBatch, Objective, forward_backward
from clipkit.steplog import DataCounts, StepLogger
from clipkit.stopping import StopSignals, StopVote

log = logging.getLogger("clipkit")
MAX_LOGIT_SCALE = math.log(100.0)
DATA_GRACE_S = 30  # how long a run that got a stop signal may still wait for its next batch
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}  # from the SigLIP paper


def train(recipe: Recipe, out_dir: str | Path, resume: str | None = None) -> dict:
    """Trains a recipe into `out_dir` and returns the end summary (torch's thread count restored afterwards).

    The run folder gets: recipe.yaml (resolved), metrics.jsonl, checkpoints/step-N/ (Accelerate state + a model
    folder), model/ (the final model: open_clip-loadable), eval/*.json, summary.json.

    Args:
        recipe: the validated recipe.
        out_dir: the run folder; one that holds a run already is refused unless `resume` is given.
        resume: "latest", "auto" (latest if any, else a new run) or a checkpoint folder to continue from.

    Raises:
        stopping.Preempted: a stop signal came while the run waited for data (resumable from its last checkpoint).
    """
    with threads.using_threads(None):  # setup sets the policy's count once the process group is up
        return _train(recipe, Path(out_dir), resume)


def _train(recipe: Recipe, out_dir: Path, resume: str | None) -> dict:
    run = setup(recipe, out_dir, resume)
    t, acc = recipe.train, run.accelerator
    loss = torch.zeros(())
    watchdog = distributed.Watchdog(t.timeout, f"rank {acc.process_index}")
    with StopSignals(DATA_GRACE_S) as signals, watchdog:
        for step in range(run.progress.step, t.steps):
            watchdog.pet(step + 1)
            with signals.waiting_for_data():
                faults.maybe_stall("stall_data", step + 1)
                micro = next_micro_batches(run)
            loss = forward_backward(
                run.step_model,
                micro,
                run.loss_fn,
                backward=acc.backward,
                no_sync=lambda: acc.no_sync(run.model),
                autocast=run.autocast,
                objectives=run.objectives,
            )
            done = step + 1
            inject_faults(run.model, done)
            optimizer_step(run)
            stop = run.vote(signals.received is not None) and done < t.steps
            lr = run.scheduler.get_last_lr()[0]
            parts = {f"loss/{o.name}": o.last for o in run.objectives}
            run.log.step(done, loss, run.raw_model, lr, run.counts, run.sync_nonfinite, parts)
            metrics = evals_due(run, done)
            if stop:
                return finish(run, loss, run.checkpoint(done, metrics), preempted=True)
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
                run.checkpoint(done, metrics)
    return finish(run, loss, final_checkpoint(run), preempted=False)


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`.

    Attributes:
        model: the prepared (DDP/FSDP-wrapped) model; `raw_model` is the plain module (clean keys, clamps, evals)
            and `step_model` what the forward/backward calls (compiled when train.compile).
        batches: (batch, (epoch, consumed)) pairs from the run's data position on (`positioned_batches`).
        progress: the step and data position reached, saved in checkpoints.
        counts: this process's data counts (unusable samples by reason and shard, usable samples).
        objectives: auxiliary losses added to the contrastive loss (train.slip, train.caption_weight).
        heads: the objectives' trainable heads (prepared, in the optimizer and checkpoints, not in model folders).
    """

    recipe: Recipe
    out_dir: Path
    accelerator: Accelerator
    bundle: ModelBundle
    model: torch.nn.Module
    raw_model: torch.nn.Module
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: TrainStream
    batches: Iterator
    loss_fn: ContrastiveLoss
    progress: Progress
    counts: DataCounts
    guard: NonFiniteGuard
    vote: StopVote
    log: StepLogger
    channels_last: bool
    objectives: list[Objective] = field(default_factory=list)
    heads: list[torch.nn.Module] = field(default_factory=list)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Accelerate's autocast for train.precision; under bf16 on a CPU, attention on the math backend as well
        (its flash kernel's bf16 backward is slow there: clipkit.precision)."""
        with self.accelerator.autocast():
            if self.recipe.train.precision != "bf16":
                yield
                return
            with cpu_attention(self.accelerator.device):
                yield

    def sync_nonfinite(self, step: int) -> int:
        """Reads the non-finite step count (a host sync; stops the run after too many in a row)."""
        self.progress.nonfinite = self.guard.sync(step, self.out_dir / "checkpoints")
        return self.progress.nonfinite

    def checkpoint(self, step: int, metrics: dict | None = None) -> Path:
        """Writes checkpoints/step-N (collective) and prunes old ones; returns its folder."""
        p = self.progress
        self.sync_nonfinite(step)
        p.step, p.skipped, p.skipped_shards, p.samples = (
            step,
            dict(self.counts.skipped),
            dict(self.counts.shards),
            self.counts.samples,
        )
        p.metrics = metrics or {}
        t = self.recipe.train
        ckpt = save_checkpoint(self.accelerator, self.model, self.bundle.config, self.out_dir, p, self.recipe.name)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.out_dir, t.keep_checkpoints, t.keep_best)
        return ckpt


def setup(recipe: Recipe, out_dir: Path, resume: str | None) -> Run:
    """Checks the recipe and the run folder, then builds the accelerator, model, optimizer and data stream."""
    shards = preflight(recipe)  # before any work: a missing file fails in seconds, not after model build
    accelerator = make_accelerator(recipe, out_dir)
    main, rank, world_size = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    distributed.apply_thread_policy(accelerator, recipe.train.threads, recipe.data.workers)
    # One decision for all processes, before any of them writes in the folder (after an elastic restart only the
    # failed node's workers know they were restarted).
    ckpt = distributed.agree_resume(accelerator, resume, lambda wish: start_checkpoint(out_dir, wish))
    if recipe.data.batch_size * world_size < 2:
        raise RecipeError("data.batch_size: a contrastive batch needs at least 2 samples in all")
    changed = check_resume_recipe(recipe, out_dir, ckpt, world_size) if ckpt else []
    if ckpt:
        check_rng_state(ckpt, rank)
    progress = load_progress(ckpt, rank) if ckpt else Progress()
    accelerator.wait_for_everyone()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            save_recipe(recipe, out_dir / "recipe.yaml")
        note_resumed_recipe(recipe, out_dir, progress.step, changed)
        trim_metrics(out_dir / "metrics.jsonl", progress.step)

    t = recipe.train
    set_seed(recipe.seed)  # the same initial weights on every process
    bundle = build_bundle(recipe)
    channels_last = use_channels_last(t.channels_last, bundle.model)
    if channels_last:
        bundle.model.to(memory_format=torch.channels_last)  # conv weights NHWC; the optimizer state follows
    objectives = build_objectives(t, bundle.config["model_cfg"]["embed_dim"], bundle.tokenizer)
    extra = [h.to(accelerator.device) for h in heads(objectives)]
    optimizer = make_optimizer(bundle.model.to(accelerator.device), t.lr, t.weight_decay, t.betas, t.eps, extra)
    scheduler = make_scheduler(optimizer, t.steps, t.warmup, t.lr, t.min_lr)
    # Heads are prepared as models of their own: DDP syncs them, save_state/load_state keep them (model_1, ...),
    # and the model folder (get_state_dict of the model alone) stays open_clip's.
    model, *extra, optimizer, scheduler = accelerator.prepare(bundle.model, *extra, optimizer, scheduler)
    for obj, head in zip([o for o in objectives if getattr(o, "head", None) is not None], extra, strict=True):
        obj.head = head
    if t.wandb:
        accelerator.init_trackers(
            "clipkit",
            config=to_dict(recipe),
            init_kwargs={
                "wandb": {"name": recipe.name, "dir": str(out_dir), "mode": os.environ.get("WANDB_MODE", "offline")}
            },
        )
    if ckpt:
        with refuse_pickled_code(ckpt / "state"):  # Accelerate reads its .bin/.pkl files with weights_only=True
            accelerator.load_state(str(ckpt / "state"))
        if main:
            log.info("resumed from %s at step %d", ckpt, progress.step)

    stream, batches = data_stream(recipe, shards, bundle, accelerator, progress)
    samples_per_step = recipe.data.batch_size * world_size * t.accum_freq
    gather_dtype = torch.bfloat16 if t.gather_dtype == "bf16" else None
    return Run(
        recipe=recipe,
        out_dir=out_dir,
        accelerator=accelerator,
        bundle=bundle,
        model=model,
        raw_model=accelerator.unwrap_model(model),
        # Only the forward/backward runs compiled; checkpoints, evals and clamps use the plain modules (clean keys).
        step_model=torch.compile(model) if t.compile else model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        batches=batches,
        loss_fn=ContrastiveLoss(
            t.loss, local_loss=t.local_loss, gather_grad=t.gather_with_grad, gather_dtype=gather_dtype
        ),
        progress=progress,
        counts=DataCounts(Counter(progress.skipped), Counter(progress.skipped_shards), progress.samples),
        guard=NonFiniteGuard(optimizer, accelerator.device, t.max_nonfinite, progress.nonfinite),
        vote=StopVote(world_size),
        log=StepLogger(
            accelerator,
            out_dir / "metrics.jsonl",
            t.steps,
            progress.step,
            t.log_every,
            samples_per_step,
            recipe.data.max_skip_rate,
        ),
        channels_last=channels_last,
        objectives=objectives,
        heads=extra,
    )


def data_stream(recipe: Recipe, shards: dict, bundle: ModelBundle, accelerator: Accelerator, progress: Progress):
    """The training stream and its batches from the run's data position: (stream, positioned batch iterator)."""
    device, t = accelerator.device, recipe.train
    views = SimCLRViews.of(t.slip.augment, bundle.config["preprocess_cfg"]) if t.slip.weight > 0 else None
    sources = [Source(tuple(shards[f"data.sources.{i}.shards"]), s.weight) for i, s in enumerate(recipe.data.sources)]
    stream = TrainStream(
        sources,
        recipe.data.batch_size,
        bundle.train_transform,
        bundle.tokenizer,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=recipe.seed,
        resampled=recipe.data.resampled,
        shuffle_size=recipe.data.shuffle_buffer,
        caption=recipe.data.caption,
        fast=recipe.data.fast_images,
        normalize_on_device=device.type != "cpu",
        positives=t.positives,
        max_keywords=recipe.data.caption_max_keywords,
        views=views,
    )
    loader = train_loader(stream, recipe.data.workers, recipe.data.prefetch_factor, pin_memory=device.type == "cuda")
    if recipe.data.resampled:  # segments end at checkpoints, so a resume replays at most one segment
        epoch_len = (t.checkpoint_every or t.steps) * t.accum_freq
    else:
        epoch_len = stream.batches_per_worker(recipe.data.workers) * max(recipe.data.workers, 1)
    return stream, positioned_batches(stream, loader, epoch_len, progress.epoch, progress.consumed)


def next_micro_batches(run: Run) -> list[MicroBatch]:
    """The step's train.accum_freq micro-batches (images [n, 3, H, W], tokens [n, L][, group ids [n]]) on the device.

    Also advances the data position and counts the data.
    """
    device, micro = run.accelerator.device, []
    for _ in range(run.recipe.train.accum_freq):
        batch, (run.progress.epoch, run.progress.consumed) = next(run.batches)
        run.counts.add(batch)
        images = run.stream.finish_images(batch["image"].to(device, non_blocking=True))  # uint8 on GPUs
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        texts = batch["text"].to(device, non_blocking=True)
        groups = batch["group"].to(device) if "group" in batch else None
        extras = {}
        if "views" in batch:  # SLIP: [n, 2, 3, H, W]
            views = run.stream.finish_views(batch["views"].to(device, non_blocking=True))
            if run.channels_last:  # each view NHWC in memory, so the objective's flatten(0, 1) is channels-last
                views = views.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
            extras["views"] = views
        micro.append(MicroBatch(images, texts, groups, extras))
    return micro


def inject_faults(model: torch.nn.Module, step: int) -> None:
    """Tests only (CLIPKIT_FAULT): a preemption notice, a lost process or NaN gradients during `step`."""
    faults.maybe_signal("sigterm", step, signal.SIGTERM)
    faults.maybe_signal("sigkill", step, signal.SIGKILL)  # a process lost mid-run
    if faults.armed("nan_grad", step):
        next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))


def optimizer_step(run: Run) -> None:
    """Clips, steps (skipping a non-finite step on the device), advances the LR schedule, clamps the logit scale.

    The grad norm is computed anyway for clipping (inf: measure only). A non-finite one skips the step on the
    device; the host learns of it on log steps and checkpoints.
    """
    params = [*run.model.parameters(), *(p for h in run.heads for p in h.parameters())] if run.heads else None
    norm = run.accelerator.clip_grad_norm_(params or run.model.parameters(), run.recipe.train.grad_clip or float("inf"))
    run.guard.step(run.optimizer, norm)
    run.scheduler.step()
    with torch.no_grad():  # CLIP's clamp: a temperature below 0.01 destabilizes training
        run.raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def evals_due(run: Run, done: int) -> dict:
    """Runs the recipe's evals when due at step `done` (every eval.every steps; at checkpoints with keep_best)."""
    t, every = run.recipe.train, run.recipe.eval.every
    at_checkpoint = bool(t.checkpoint_every) and done % t.checkpoint_every == 0
    if done >= t.steps or not ((every and done % every == 0) or (at_checkpoint and t.keep_best)):
        return {}
    flat = {}
    if run.accelerator.is_main_process:
        flat = run_evals(run.recipe, run.bundle, run.raw_model, run.out_dir, done, run.accelerator.device)
        run.log.write({"step": done, **flat})
    run.accelerator.wait_for_everyone()
    return flat


def final_checkpoint(run: Run) -> Path:
    """The last step's checkpoint: written now, or found complete when a finished run was resumed."""
    done = checkpoint_dir(run.out_dir, run.recipe.train.steps)
    if run.progress.step == run.recipe.train.steps and (done / "COMPLETE").exists():
        return done
    return run.checkpoint(run.recipe.train.steps)


def finish(run: Run, loss: torch.Tensor, ckpt: Path, preempted: bool) -> dict:
    """Ends the run: summary.json; unless preempted, model/, the final evals and the index."""
    run.log.close()
    acc, out_dir, recipe = run.accelerator, run.out_dir, run.recipe
    main = acc.is_main_process
    summary = {
        "steps": run.progress.step,
        "world_size": acc.num_processes,
        "global_batch": recipe.data.batch_size * acc.num_processes * recipe.train.accum_freq,
        "final_loss": acc.reduce(loss.detach().to(acc.device), "mean").item(),
        "skipped": dict(run.counts.summed(acc).skipped),
        "nonfinite_steps": run.progress.nonfinite,
        "checkpoint": str(ckpt),
    }
    # The last collective: the main process's final evals and index may outlast train.timeout, so nobody waits for them.
    acc.wait_for_everyone()
    if preempted:
        summary["preempted_at"] = run.progress.step
        if main:
            print(
                f"clipkit: stopped at step {run.progress.step}: checkpoint saved; continue with --resume latest",
                file=sys.stderr,
            )
    elif main:
        shutil.copytree(ckpt / "model", out_dir / "model", dirs_exist_ok=True)
        summary["model"] = str(out_dir / "model")  # named only once written
        flat = (
            run_evals(recipe, run.bundle, run.raw_model, out_dir, recipe.train.steps, acc.device)
            if recipe.eval.tasks
            else {}
        )
        run.log.write({"step": recipe.train.steps, **flat})
        summary["eval"] = flat
        if recipe.index.shards:
            summary["index"] = build_run_index(recipe, run.bundle, run.raw_model, out_dir, acc.device)
    if main:
        plot_metrics(out_dir / "metrics.jsonl", out_dir / "metrics.png")
        write_json_atomic(out_dir / "summary.json", summary, sort_keys=False)
    acc.end_training()
    return summary


def use_channels_last(setting: bool | None, model: torch.nn.Module) -> bool:
    """The recipe's train.channels_last, or (None) whether the image tower is convolutional.

    A ViT's only convolution is its patch embedding: the layout changes nothing there. A ResNet tower ran its
    forward + backward 1.4x faster channels-last on the 2-core CPU (docs/benchmarks.md).
    """
    if setting is not None:
        return setting
    visual = getattr(model, "visual", model)
    return sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def preflight(recipe: Recipe) -> dict[str, list[str]]:
    """Checks everything a run reads, before any work: shard patterns match files, eval files exist.

    Returns:
        The expanded shard lists by recipe key.

    Raises:
        RecipeError: naming the key whose files are missing.
    """
    model_cfg = resolve_config(recipe.model)["model_cfg"]  # an unknown architecture or tower key fails here
    check_caption_weight(recipe.train.caption_weight, is_coca(model_cfg))  # a named coca_* architecture too
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
        try:  # an eval would refuse a truncated or empty shard after training: refuse it before instead
            evals.refuse_damaged(shards[f"eval.tasks.{i}.shards"])
        except ValueError as e:
            raise RecipeError(f"eval.tasks.{i}.shards: {e}") from None
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
    distributed.check_elastic_launch()  # before the process group: a restarted group would fail in its init
    kwargs["kwargs_handlers"] = [distributed.process_group_kwargs(recipe.train.timeout)]
    # step_scheduler_with_optimizer=False: the schedule counts optimizer steps. Accelerate's default steps a prepared
    # scheduler W times per call (it assumes a data loader split across processes): warmup and cosine W times too fast.
    return Accelerator(
        mixed_precision=precision, cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False, **kwargs
    )


def build_bundle(recipe: Recipe) -> ModelBundle:
    """The recipe's model and its training transform with data.augment; SigLIP needs the learnable bias and its
    own initial scale (unless the config sets them)."""
    model_cfg = recipe.model
    if recipe.train.loss == "siglip":
        resolved = resolve_config(recipe.model)
        config = {**SIGLIP_INIT, **resolved["model_cfg"], "preprocess_cfg": resolved["preprocess_cfg"]}
        model_cfg = replace(recipe.model, name=None, config=config)
    bundle = create_model(model_cfg)
    augmented, _ = build_transforms(bundle.config["preprocess_cfg"], dataclasses.asdict(recipe.data.augment))
    return replace(bundle, train_transform=augmented)


def positioned_batches(stream: TrainStream, loader, epoch_len: int, epoch: int = 0, consumed: int = 0):
    """Yields (batch, (epoch, consumed)) forever from a data position.

    Each epoch (epoch mode) or segment (resampled mode: `epoch_len` batches between checkpoints) restarts the
    loader with the shared epoch counter set, so its data depends only on (seed, epoch, rank, worker). Resuming
    mid-epoch re-reads that epoch and discards the `consumed` batches already trained on (their decode cost is
    bounded by one segment); their skip counts were recorded before and are dropped.
    """
    epoch, consumed = epoch + consumed // epoch_len, consumed % epoch_len
    while True:
        stream.epoch.value = epoch
        batches = iter(loader)
        for i in range(epoch_len):
            batch = next(batches)
            if i >= consumed:
                yield batch, (epoch, i + 1)
        del batches  # shuts the workers down before the next epoch starts its own
        epoch, consumed = epoch + 1, 0


def run_evals(recipe: Recipe, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path, step: int, device) -> dict:
    """Runs every eval task of the recipe; writes `<run>/eval/<task>-<dataset>.json`; returns flat metrics."""
    faults.maybe_raise("eval_error", step)  # tests: an eval that fails on the main process only
    flat = {}
    was_training = model.training
    model.eval()
    bundle_eval = replace(bundle, model=model)
    for t in recipe.eval.tasks:
        metrics = evals.run_task(
            bundle_eval,
            t.task,
            recipe.path(t.shards),
            classnames=evals.read_lines(recipe.path(t.classnames), "classnames") if t.classnames else None,
            templates=evals.read_lines(recipe.path(t.templates), "templates") if t.templates else None,
            batch_size=recipe.eval.batch_size,
            device=device,
        )
        metrics["step"] = step
        evals.write_result(out_dir / "eval" / f"{t.task}-{t.dataset}.json", t.dataset, recipe.name, t.task, metrics)
        flat.update({f"eval/{t.dataset}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    model.train(was_training)
    return flat


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
