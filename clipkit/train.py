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
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from clipkit import distributed, faults, threads
from clipkit.checkpoint import Progress, find_checkpoint, load_progress, prune_checkpoints, save_checkpoint
from clipkit.config import Recipe, RecipeError, save_recipe, to_dict
from clipkit.data.pipeline import Source, TrainStream, train_loader
from clipkit.data.shards import expand_shards
from clipkit.evaluate import run as evals
from clipkit.loss import ContrastiveLoss
from clipkit.models import ModelBundle, create_model
from clipkit.models.factory import resolve_config
from clipkit.models.weights import refuse_pickled_code
from clipkit.optim import make_optimizer, make_scheduler
from clipkit.plots import plot_metrics
from clipkit.step import forward_backward

log = logging.getLogger("clipkit")
MIN_SAMPLES_FOR_SKIP_RATE = 1000  # the skip rate of the first few batches says little about a data set
MAX_LOGIT_SCALE = math.log(100.0)
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}  # from the SigLIP paper


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason it names (too much bad data, non-finite steps in a row)."""


class NonFiniteGuard:
    """Skips optimizer steps whose gradient norm is not finite and counts them, with no host sync per step.

    With a fused AdamW (clipkit's optimizer on CPU and CUDA) the skip happens on the device: the optimizer's
    `found_inf` tensor (the protocol GradScaler uses) makes the kernel leave parameters, moments and step counts
    untouched, and the counts accumulate in device tensors that the host reads only in `sync` (log steps,
    checkpoints, the end). Any other optimizer falls back to reading the flag every step. Every process decides
    alike with no collective: DDP and FSDP leave identical gradients, hence identical norms, on all of them.

    Args:
        optimizer: the (possibly Accelerate-wrapped) optimizer.
        device: where the gradients live.
        max_in_a_row: this many skipped steps in a row stop the run (checked in `sync`).
        skipped: steps skipped before (a resumed run's count).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, max_in_a_row: int, skipped: int = 0):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
        self.on_device = bool(self.inner.defaults.get("fused")) and getattr(
            self.inner, "_step_supports_amp_scaling", False
        )
        self.max_in_a_row, self.total = max_in_a_row, skipped
        # [new skips since the last sync, current streak, longest streak since the last sync]
        self.counts = torch.zeros(3, device=device)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        """Steps the optimizer unless `grad_norm` is not finite; clears the gradients either way."""
        bad = (~torch.isfinite(grad_norm.detach().float())).float()  # [] 0. or 1., on the device
        if self.on_device:
            self.inner.found_inf = bad
            optimizer.step()
            self.inner.found_inf = None
        elif bad.item():  # a host sync: the fallback for optimizers without found_inf
            pass
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        new, run, worst = self.counts.unbind()
        new.add_(bad)
        run.add_(bad).mul_(bad)  # +1 on a skip, back to 0 on a good step
        torch.maximum(worst, run, out=worst)

    def sync(self, step: int, where: Path) -> int:
        """Reads the counts (one host sync); returns all skipped steps so far.

        Raises:
            TrainingStopped: when `max_in_a_row` steps in a row were skipped since the last sync.
        """
        new, run, worst = self.counts.tolist()
        self.total += int(new)
        self.counts[0] = 0
        self.counts[2] = run
        if worst >= self.max_in_a_row:
            raise TrainingStopped(
                f"step {step}: {int(worst)} steps in a row had a non-finite loss or gradient; stopping. The last "
                f"good checkpoint is kept under {where} (lower train.lr, check the data)"
            )
        return self.total


class StopVote:
    """Whether any process got a stop signal, agreed by all processes at the same step.

    One process: its own flag, no collective. Several: a 1-element MAX all-reduce of a CPU tensor over gloo (the
    default group on CPU; a second, gloo group beside NCCL on GPUs), so the vote never waits on the device queue.
    """

    def __init__(self, world_size: int):
        self.group, self.multi = None, world_size > 1
        if self.multi:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")  # collective: every process builds its StopVote

    def __call__(self, local: bool) -> bool:
        if not self.multi:
            return local
        import torch.distributed as dist

        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


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
    if recipe.model.name is not None:
        resolve_config(recipe.model)  # an unknown architecture fails here, naming model.name
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
    distributed.check_elastic_launch()  # before the process group: a restarted group would fail in its init
    kwargs["kwargs_handlers"] = [distributed.process_group_kwargs(recipe.train.timeout)]
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), **kwargs)


def build_bundle(recipe: Recipe) -> ModelBundle:
    """The recipe's model; SigLIP needs the learnable bias and its own initial scale (unless the config sets them)."""
    if recipe.train.loss != "siglip":
        return create_model(recipe.model)
    resolved = resolve_config(recipe.model)
    config = {**SIGLIP_INIT, **resolved["model_cfg"], "preprocess_cfg": resolved["preprocess_cfg"]}
    return create_model(replace(recipe.model, name=None, config=config))


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


class StopSignals:
    """SIGTERM / SIGINT: the first asks for a checkpoint at the next step boundary, the second exits at once.

    Exiting at once cannot corrupt a checkpoint: a half-written one has no COMPLETE marker and is never resumed.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        print(
            f"clipkit: {signal.Signals(signum).name} received: checkpointing at the next step boundary "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )


def worst_shards(skipped_shards: dict, k: int = 3) -> str:
    return ", ".join(f"{url} ({n})" for url, n in Counter(skipped_shards).most_common(k))


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
    faults.maybe_raise("eval_error", step)  # tests: an eval that fails on the main process only
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
    """Trains a recipe into `out_dir` and returns the end summary; `_train` does it (torch's thread count restored)."""
    with threads.using_threads(None):  # _train sets the policy's count once its process group is up
        return _train(recipe, out_dir, resume)


def _train(recipe: Recipe, out_dir: str | Path, resume: str | None = None) -> dict:
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
    distributed.apply_thread_policy(accelerator, recipe.train.threads, recipe.data.workers)
    # One checkpoint (or none) for every process, picked by the main process.
    resume = distributed.agree_resume(accelerator, resume, lambda wish: distributed.resolve_resume(wish, out_dir))
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
    channels_last = use_channels_last(t.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # conv weights NHWC; the optimizer state follows
    optimizer = make_optimizer(model.to(device), t.lr, t.weight_decay, t.betas, t.eps)
    scheduler = make_scheduler(optimizer, t.steps, t.warmup, t.lr, t.min_lr)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)
    # Only the forward/backward runs compiled; checkpoints, evals and clamps use the plain modules (clean keys).
    step_model = torch.compile(model) if t.compile else model
    if recipe.train.wandb:
        accelerator.init_trackers(
            "clipkit",
            config=to_dict(recipe),
            init_kwargs={
                "wandb": {"name": recipe.name, "dir": str(out_dir), "mode": os.environ.get("WANDB_MODE", "offline")}
            },
        )

    progress = Progress()
    if resume is not None:
        ckpt = find_checkpoint(out_dir, resume)
        with refuse_pickled_code(ckpt / "state"):  # Accelerate reads its .bin/.pkl files with weights_only=True
            accelerator.load_state(str(ckpt / "state"))
        progress = load_progress(ckpt, rank)
        if main:
            log.info("resumed from %s at step %d", ckpt, progress.step)

    sources = [Source(tuple(shards[f"data.sources.{i}.shards"]), s.weight) for i, s in enumerate(recipe.data.sources)]
    stream = TrainStream(
        sources,
        recipe.data.batch_size,
        bundle.train_transform,
        bundle.tokenizer,
        rank=rank,
        world_size=world_size,
        seed=recipe.seed,
        resampled=recipe.data.resampled,
        shuffle_size=recipe.data.shuffle_buffer,
        caption=recipe.data.caption,
        fast=recipe.data.fast_images,
        normalize_on_device=device.type != "cpu",
    )
    loader = train_loader(stream, recipe.data.workers, recipe.data.prefetch_factor, pin_memory=device.type == "cuda")
    if recipe.data.resampled:  # segments end at checkpoints, so a resume replays at most one segment
        epoch_len = (t.checkpoint_every or t.steps) * t.accum_freq
    else:
        epoch_len = stream.batches_per_worker(recipe.data.workers) * max(recipe.data.workers, 1)
    batches = positioned_batches(stream, loader, epoch_len, progress.epoch, progress.consumed)
    gather_dtype = torch.bfloat16 if t.gather_dtype == "bf16" else None
    loss_fn = ContrastiveLoss(
        t.loss, local_loss=t.local_loss, gather_grad=t.gather_with_grad, gather_dtype=gather_dtype
    )
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", main)
    skipped, skipped_shards = Counter(progress.skipped), Counter(progress.skipped_shards)
    samples_per_step = recipe.data.batch_size * world_size * t.accum_freq

    guard = NonFiniteGuard(optimizer, device, t.max_nonfinite, progress.nonfinite)
    vote = StopVote(world_size)

    def checkpoint(step: int, metrics: dict | None = None) -> Path:
        progress.nonfinite = guard.sync(step, out_dir / "checkpoints")
        progress.step, progress.skipped, progress.skipped_shards = step, dict(skipped), dict(skipped_shards)
        progress.metrics = metrics or {}
        ckpt = save_checkpoint(accelerator, model, bundle.config, out_dir, progress, recipe.name)
        if main:
            prune_checkpoints(out_dir, t.keep_checkpoints, t.keep_best)
        return ckpt

    model.train()
    bar = tqdm(total=t.steps, initial=progress.step, desc="train", unit="step", disable=not main or None)
    last_time, last_step = time.perf_counter(), progress.step
    loss, preempted, final = torch.zeros(()), None, None
    with StopSignals() as signals, distributed.Watchdog(t.timeout, f"rank {rank}") as watchdog:
        for step in range(progress.step, t.steps):
            watchdog.pet(step + 1)
            micro = []
            for _ in range(t.accum_freq):
                batch, (progress.epoch, progress.consumed) = next(batches)
                skipped.update(batch["skipped"])
                skipped_shards.update(batch["skipped_shards"])
                progress.samples += len(batch["key"])
                images = stream.finish_images(batch["image"].to(device, non_blocking=True))  # uint8 on GPUs
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                micro.append((images, batch["text"].to(device, non_blocking=True)))
            loss = forward_backward(
                step_model,
                micro,
                loss_fn,
                backward=accelerator.backward,
                no_sync=lambda: accelerator.no_sync(model),
                autocast=accelerator.autocast,
            )
            done = step + 1
            faults.maybe_signal("sigterm", done, signal.SIGTERM)  # tests: a preemption notice during step `done`
            faults.maybe_signal("sigkill", done, signal.SIGKILL)  # tests: a process lost mid-run
            if faults.armed("nan_grad", done):
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            # The grad norm is computed anyway for clipping (inf: measure only). A non-finite one skips the step on
            # the device; the host learns of it on log steps and checkpoints. The stop vote is host-side.
            norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            guard.step(optimizer, norm)
            scheduler.step()
            with torch.no_grad():  # CLIP's clamp: a temperature below 0.01 destabilizes training
                raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            bar.update(1)
            stop = vote(signals.received is not None)

            if done % t.log_every == 0 or done == t.steps:
                progress.nonfinite = guard.sync(done, out_dir / "checkpoints")
                scalars = [accelerator.reduce(loss.detach(), "mean"), raw_model.logit_scale.detach().exp()]
                if getattr(raw_model, "logit_bias", None) is not None:
                    scalars.append(raw_model.logit_bias.detach().reshape(()))
                values = torch.stack([v.float() for v in scalars]).tolist()  # one host sync for all of them
                all_skips = sum_over_processes(accelerator, skipped, skipped_shards, progress.samples)
                now = time.perf_counter()
                row = {
                    "step": done,
                    "loss": values[0],
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": values[1],
                    "samples_per_s": samples_per_step * (done - last_step) / (now - last_time),
                    "skipped": dict(all_skips[0]),
                    "nonfinite_steps": progress.nonfinite,
                }
                if len(values) > 2:
                    row["logit_bias"] = values[2]
                last_time, last_step = now, done
                metrics_log.write(row)
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}", T=f"{row['logit_scale']:.1f}", sps=f"{row['samples_per_s']:.0f}"
                )
                accelerator.log({k: v for k, v in row.items() if k != "skipped"}, step=done)
                check_skip_rate(*all_skips, recipe.data.max_skip_rate, done)

            at_checkpoint = bool(t.checkpoint_every) and done % t.checkpoint_every == 0 and done < t.steps
            at_eval = bool(recipe.eval.every) and done % recipe.eval.every == 0 and done < t.steps
            flat = {}
            if at_eval or (at_checkpoint and t.keep_best):
                if main:
                    flat = run_evals(recipe, bundle, raw_model, out_dir, done, device)
                    metrics_log.write({"step": done, **flat})
                    accelerator.log(flat, step=done)
                accelerator.wait_for_everyone()
            if at_checkpoint or (stop and done < t.steps):
                checkpoint(done, flat)
            if stop and done < t.steps:
                preempted = done
                break
        else:
            final = checkpoint(t.steps)
    bar.close()

    summary = {
        "steps": progress.step,
        "world_size": world_size,
        "global_batch": samples_per_step,
        "final_loss": accelerator.reduce(loss.detach(), "mean").item(),
        "skipped": dict(sum_over_processes(accelerator, skipped, skipped_shards, progress.samples)[0]),
        "nonfinite_steps": progress.nonfinite,
        "model": str(out_dir / "model"),
    }
    if preempted is not None:
        summary["preempted_at"] = preempted
        if main:
            print(
                f"clipkit: stopped at step {preempted}: checkpoint saved; continue with --resume latest",
                file=sys.stderr,
            )
    elif main:
        shutil.copytree(final / "model", out_dir / "model", dirs_exist_ok=True)
        flat = run_evals(recipe, bundle, raw_model, out_dir, t.steps, device) if recipe.eval.tasks else {}
        metrics_log.write({"step": t.steps, **flat})
        accelerator.log(flat, step=t.steps)
        summary["eval"] = flat
        if recipe.index.shards:
            summary["index"] = build_run_index(recipe, bundle, raw_model, out_dir, device)
    if main:
        plot_metrics(out_dir / "metrics.jsonl", out_dir / "metrics.png")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def sum_over_processes(
    accelerator: Accelerator, skipped: Counter, skipped_shards: Counter, samples: int
) -> tuple[Counter, Counter, int]:
    """Skip counts and usable samples summed over all processes (a small object gather; every process calls it,
    so every process takes the same decision from them)."""
    if accelerator.num_processes == 1:
        return skipped, skipped_shards, samples
    from accelerate.utils import gather_object

    parts = gather_object([(dict(skipped), dict(skipped_shards), samples)])
    reasons, shards = Counter(), Counter()
    for r, s, _ in parts:
        reasons.update(r)
        shards.update(s)
    return reasons, shards, sum(n for _, _, n in parts)


def check_skip_rate(skipped: Counter, skipped_shards: Counter, samples: int, max_rate: float, step: int) -> None:
    """Stops the run when too many samples were unusable (once MIN_SAMPLES_FOR_SKIP_RATE samples were read)."""
    bad = sum(v for k, v in skipped.items() if k != "bad_shard")
    seen = bad + samples
    if seen >= MIN_SAMPLES_FOR_SKIP_RATE and bad / seen > max_rate:
        raise TrainingStopped(
            f"step {step}: {bad} of {seen} samples read were unusable ({dict(skipped)}), above "
            f"data.max_skip_rate={max_rate}; worst shards: {worst_shards(skipped_shards)}"
        )


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
