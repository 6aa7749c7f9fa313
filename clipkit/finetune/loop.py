"""The fine-tuning loop: batches from the in-memory training set, validation every N steps, early stopping.

One process (CPU or one GPU). The data order is a function of the seed alone: a fresh permutation per epoch from a
private generator (which also draws FLYP's templates), so two runs with the same seed and thread count take the same
steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from clipkit.config import FinetuneCfg
from clipkit.finetune.data import LabeledImages, Pixels
from clipkit.finetune.early_stop import EarlyStopping
from clipkit.finetune.ema import WeightAverage
from clipkit.finetune.head import ImageClassifier
from clipkit.finetune.layer_decay import layer_decay_groups
from clipkit.optim import make_optimizer, make_scheduler
from clipkit.precision import autocast

log = logging.getLogger(__name__)

BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW as in WiSE-FT and FLYP


@torch.inference_mode()
def predict_logits(
    classifier: ImageClassifier,
    data: LabeledImages,
    pixels: Pixels,
    batch_size: int,
    device,
    flip: bool = False,
    precision: str = "fp32",
) -> torch.Tensor:
    """[N, C] float32 logits of every image of `data` (eval mode; the previous mode is restored).

    With `flip`, each image's logits are the mean of its own and its left-right mirror's (test-time augmentation;
    twice the forward passes). `precision` ("fp32" or "bf16") is the autocast of the forward passes.
    """
    was_training = classifier.training
    classifier.eval()
    out = []
    for i in range(0, len(data), batch_size):
        images = pixels.batch(data.pixels[i : i + batch_size], device)  # [B, 3, S, S]
        with autocast(precision, device):
            logits = classifier(images).float()
            if flip:
                logits = (logits + classifier(images.flip(-1)).float()) / 2
        out.append(logits.cpu())
    classifier.train(was_training)
    return torch.cat(out)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"accuracy", "macro_f1", "loss"} of [N, C] logits against [N] labels (macro-F1 over the classes present)."""
    pred = logits.argmax(dim=1)
    return {
        "accuracy": float((pred == labels).float().mean()),
        "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro")),
        "loss": float(F.cross_entropy(logits, labels)),
    }


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of full batches, epoch after epoch, each epoch a fresh permutation."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def augment(pixels: torch.Tensor, flip: bool, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and pad-and-crop shifts of stored training pixels (the CIFAR / Fashion-MNIST recipe).

    Args:
        pixels: [B, 3, S, S] stored images at the model's input size (uint8, or float: `LabeledImages.pixels`).
        flip: flip each image left-right with probability 1/2.
        pad: largest shift in pixels; the border is filled by repeating the edge pixels.
        generator: draws the flips and offsets (its own stream: the data order does not change with augmentation).

    Returns:
        [B, 3, S, S] of the same dtype.
    """
    b, _, h, w = pixels.shape
    out = pixels
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    if pad:
        padded = F.pad(out.float(), (pad, pad, pad, pad), mode="replicate").to(out.dtype)  # [B, 3, S+2p, S+2p]
        dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).tolist()
        out = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx, strict=True))])
    return out


def fit(
    mode,
    train: LabeledImages,
    val: LabeledImages,
    pixels: Pixels,
    cfg: FinetuneCfg,
    seed: int,
    device,
    record: Callable[[dict], None],
    on_eval: Callable[[int, dict, torch.nn.Module], None] | None = None,
) -> dict:
    """Trains `mode` for up to `cfg.steps` steps; restores the best validation step's weights at the end.

    Validation runs before the first step (the starting weights can win), every `cfg.eval_every` steps and after the
    last one. Early stopping (`cfg.patience`, `cfg.min_delta`, `cfg.monitor`, from `cfg.early_stop_from`) may end the
    run sooner. With `cfg.ema`, validation sees the moving average of the weights, and the average is what is kept.

    Args:
        mode: a `clipkit.finetune.modes` mode that trains.
        train: the training images.
        val: the validation images.
        pixels: turns stored pixels into model input.
        cfg: the finetune section, its `precision` resolved ("fp32" or "bf16": `clipkit.precision.resolve`).
        seed: seeds data order and FLYP's template draws.
        device: where the model lives.
        record: called with every log row ({"step", "loss", "lr", ...} or {"step", "val/accuracy", ...}).
        on_eval: called as on_eval(step, val_metrics, mode.module) after each validation (tests snapshot weights).

    Returns:
        {"best_step", "best", "steps_run", "stopped_early", "train_seconds"}.
    """
    if len(train) < cfg.batch_size:
        raise ValueError(f"finetune.batch_size={cfg.batch_size} is larger than the {len(train)} training samples")
    generator = torch.Generator().manual_seed(seed)
    aug_generator = torch.Generator().manual_seed(seed + 1_000_003)  # flips and shifts: a stream of their own
    module = mode.module
    optimizer, scheduler = _optimizer(mode, cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    stopper = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta, cfg.early_stop_from)
    average = WeightAverage(params, cfg.ema) if cfg.ema else None

    def evaluate(step: int) -> bool:
        if average is None:
            return validate(step)
        with average.swapped_in():  # the best snapshot (and `on_eval`) see the averaged weights
            return validate(step)

    def validate(step: int) -> bool:
        logits = predict_logits(
            mode.classifier(), val, pixels, cfg.eval_batch_size, device, cfg.test_time_flip, cfg.precision
        )
        metrics = scores(logits, val.labels)
        stop = stopper.update(step, metrics, module)
        record({"step": step, **{f"val/{k}": v for k, v in metrics.items()}, "best_step": stopper.best_step})
        log.info(
            "step %d: val accuracy %.4f macro-F1 %.4f loss %.4f (%s)",
            step, metrics["accuracy"], metrics["macro_f1"], metrics["loss"], stopper.status(step),
        )  # fmt: skip
        if on_eval is not None:
            on_eval(step, metrics, module)
        return stop

    t0 = time.perf_counter()
    module.train()
    stopped = evaluate(0)
    step, seen, t_log = 0, 0, time.perf_counter()
    batches = _batches(len(train), cfg.batch_size, generator)
    with tqdm(total=cfg.steps, desc=f"finetune {cfg.mode}", unit="step", disable=None) as bar:
        while step < cfg.steps and not stopped:
            rows = next(batches)
            stored = train.pixels[rows]  # [B, 3, S, S] uint8
            if cfg.flip or cfg.crop_pad:
                stored = augment(stored, cfg.flip, cfg.crop_pad, aug_generator)
            images, labels = pixels.batch(stored, device), train.labels[rows].to(device)
            with autocast(cfg.precision, device):
                loss = mode.loss(images, labels, generator)
            _optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
            mode.after_step()
            if average is not None:
                average.update()
            step += 1
            seen += len(rows)
            bar.update(1)
            if step % cfg.log_every == 0:
                now = time.perf_counter()
                record({"step": step, "loss": float(loss.detach()), "lr": max(scheduler.get_last_lr()),
                        "samples_per_s": seen / max(now - t_log, 1e-9)})  # fmt: skip
                seen, t_log = 0, now
            if step % cfg.eval_every == 0 or step == cfg.steps:
                stopped = evaluate(step)
    _log_end(stopped, step, stopper, cfg)
    stopper.restore(module)
    module.eval()
    return {
        "best_step": stopper.best_step,
        "best": {cfg.monitor: stopper.best_value},
        "steps_run": step,
        "stopped_early": stopped,
        "train_seconds": time.perf_counter() - t0,
    }


def _optimizer(mode, cfg: FinetuneCfg) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the mode's trainable weights (per-layer rates with `cfg.layer_decay` < 1), warmup + cosine to 0."""
    groups = None
    if cfg.layer_decay < 1:
        groups = layer_decay_groups(mode.module, cfg.weight_decay, cfg.layer_decay, mode.tower_prefix)
    optimizer = make_optimizer(mode.module, cfg.lr, cfg.weight_decay, BETAS, EPS, groups=groups)
    return optimizer, make_scheduler(optimizer, cfg.steps, cfg.warmup, cfg.lr, 0.0)


def _optimizer_step(loss: torch.Tensor, optimizer, scheduler, params: list[torch.nn.Parameter], clip: float) -> None:
    """Backward, optional global-norm clipping, the optimizer and the learning-rate schedule: one training step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step()


def _log_end(stopped: bool, step: int, stopper: EarlyStopping, cfg: FinetuneCfg) -> None:
    """Says why training ended and which step is restored."""
    if stopped:
        log.info(
            "early stop at step %d: no val %s improvement > %g in %d evaluations; restoring step %d (%s %.4f)",
            step, cfg.monitor, cfg.min_delta, cfg.patience, stopper.best_step, cfg.monitor, stopper.best_value,
        )  # fmt: skip
    else:
        log.info("ran all %d steps; restoring the best step %d (%s %.4f)", step, stopper.best_step, cfg.monitor,
                 stopper.best_value)  # fmt: skip


def features(
    model: torch.nn.Module, data: LabeledImages, pixels: Pixels, batch_size: int, device, precision: str = "fp32"
) -> np.ndarray:
    """[N, D] float64 L2-normalized image features (for the linear mode), the forward passes under `precision`."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            with autocast(precision, device):
                emb = model.encode_image(pixels.batch(data.pixels[i : i + batch_size], device)).float()
            out.append(F.normalize(emb, dim=-1))
    return torch.cat(out).double().cpu().numpy()
