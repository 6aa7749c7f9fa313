"""Typed, frozen recipe dataclasses read from YAML with dotted command-line overrides.

A recipe is checked completely before any work starts: an unknown key, a wrong type or an invalid value
raises `RecipeError` naming the dotted key, the value and the reason.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from clipkit.files import write_text_atomic


class RecipeError(ValueError):
    """A recipe key, type or value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class ModelCfg:
    """Which dual encoder to build.

    Attributes:
        name: an open_clip architecture (`clipkit models` lists them), e.g. "ViT-B-32". Exactly one of
            `name` and `config` is set.
        config: a custom open_clip model config: {"embed_dim", "vision_cfg", "text_cfg"}; a timm image tower
            (`vision_cfg.timm_model_name`) or an HF text tower (`text_cfg.hf_model_name`) is a config too.
        pretrained: path to an open_clip checkpoint file to start from (no hub downloads).
        image_size: override of the vision tower's input size.
        context_length: override of the text tower's context length.
        lock_image: freeze the image tower, as open_clip_train's --lock-image (a timm tower's head stays trainable).
        lock_image_unlocked_groups: leave the last N layer groups of a locked image tower trainable.
        lock_image_freeze_bn_stats: keep BatchNorm running statistics of a locked image tower frozen.
        lock_text: freeze the text tower (LiT), as open_clip_train's --lock-text; the projection of an HF text
            tower stays trainable (it is new), and a fully locked tower runs in eval mode (no dropout).
        lock_text_unlocked_layers: leave the last N layer groups of a locked text tower trainable: N transformer
            layers of an HF tower; for open_clip's own text transformer the projection is the last group and the
            last block with the final norm the one before.
        lock_text_freeze_layer_norm: keep the LayerNorms of a locked text tower frozen (False: they stay trainable).
        grad_checkpointing: recompute tower activations in the backward pass (less memory, ~30% more compute).
        cache_locked_text: memoize a fully locked HF text tower's pooled features per distinct caption, so each
            caption runs the transformer once (LiT on small caption sets; see docs/models.md).
    """

    name: str | None = None
    config: dict | None = None
    pretrained: str | None = None
    image_size: int | None = None
    context_length: int | None = None
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    grad_checkpointing: bool = False
    cache_locked_text: bool = False


@dataclass(frozen=True)
class SourceCfg:
    """One shard set mixed into training.

    Attributes:
        shards: shard spec relative to `data_root` (brace expansion, globs, `::`-separated lists).
        weight: share of samples drawn from this source, relative to the other sources.
    """

    shards: str
    weight: float = 1.0


@dataclass(frozen=True)
class AugmentCfg:
    """Training image augmentation: open_clip's `aug_cfg` (the defaults give open_clip's plain training transform).

    Attributes:
        scale: RandomResizedCrop's range of the crop's area, as a share of the image.
        color_jitter: brightness, contrast, saturation and hue jitter strengths (4 numbers), applied with
            probability `color_jitter_prob`; both or neither.
        color_jitter_prob: probability of the color jitter.
        gray_scale_prob: probability of turning the image gray.
    """

    scale: tuple[float, float] = (0.9, 1.0)
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_prob: float | None = None
    gray_scale_prob: float | None = None


@dataclass(frozen=True)
class DataCfg:
    """The training stream.

    Attributes:
        sources: shard sets to mix, each with a weight.
        batch_size: samples per process per optimizer micro-step.
        workers: DataLoader worker processes per training process (0 = load in the main process).
        shuffle_buffer: samples held per worker for within-shard shuffling.
        caption: what a sample trains on each time it is seen, from its caption lines: "random" (one line at
            random), "first" (always the first), "all" (every line joined by "; ", cut at the context length) or
            "keywords" (as random, but a keyword line, "curl, document, page", becomes a random non-empty subset of
            its keywords in random order; samples without one train as in random). See
            `clipkit.data.pipeline.choose_caption`.
        caption_max_keywords: the largest keyword subset of caption "keywords" (0: up to all of a line's keywords).
        prefetch_factor: batches prefetched per worker.
        resampled: draw shards with replacement, forever (True), or run exact epochs (False): shards shuffled with
            (seed, epoch) before the split by process and worker, every worker yielding the same number of full
            batches. Epoch mode mixes sources by concatenation, so source weights must all be 1.
        max_skip_rate: stop the run when more than this share of the samples read so far was unusable (checked on
            log steps once 1,000 samples were read); the error names the worst shards.
        fast_images: with open_clip's plain training transform, draw the crop from the image header, decode JPEGs
            at 1/2, 1/4 or 1/8 size when the crop still covers the output there, crop and resize uint8 tensors, and
            normalize whole batches on the device (false: the transform as it is, on full-size decoded images).
            Color jitter and gray scale take the plain path (decode, then open_clip's transform).
        augment: the training image augmentation.
    """

    sources: tuple[SourceCfg, ...] = ()
    batch_size: int = 64
    workers: int = 1
    shuffle_buffer: int = 1000
    caption: Literal["random", "first", "all", "keywords"] = "random"
    caption_max_keywords: int = 0
    prefetch_factor: int = 2
    resampled: bool = True
    max_skip_rate: float = 0.1
    fast_images: bool = True
    augment: AugmentCfg = field(default_factory=AugmentCfg)


@dataclass(frozen=True)
class SlipAugmentCfg:
    """SimCLR's view augmentation for SLIP: each image gives two views drawn independently with these settings.

    Attributes:
        scale: random resized crop's range of the crop's area, as a share of the image.
        color_jitter: brightness, contrast, saturation and hue jitter strengths (hue at most 0.5).
        color_jitter_prob: probability of the color jitter.
        gray_scale_prob: probability of turning a view gray.
        flip_prob: probability of a horizontal flip.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_prob: float = 0.8
    gray_scale_prob: float = 0.2
    flip_prob: float = 0.5


@dataclass(frozen=True)
class SlipCfg:
    """SLIP's image self-supervision (Mu et al. 2021): L = L_contrastive + weight * L_simclr (docs/learning.md).

    L_simclr is the NT-Xent loss between two augmented views of every image of the global batch, on an MLP head
    (Linear-LayerNorm-ReLU-Linear) over the image tower's output. The head trains with the model and is saved in
    checkpoints, not in the model folder. Costs two more image-tower forwards and backwards per sample.

    Attributes:
        weight: weight of the SimCLR loss (0: off).
        temperature: NT-Xent temperature.
        head_hidden: width of the head's hidden layer.
        head_out: width of the head's output (the features the NT-Xent loss compares).
        augment: how the two views are drawn.
    """

    weight: float = 0.0
    temperature: float = 0.1
    head_hidden: int = 512
    head_out: int = 128
    augment: SlipAugmentCfg = field(default_factory=SlipAugmentCfg)


@dataclass(frozen=True)
class TrainCfg:
    """Optimization and loop settings.

    Attributes:
        steps: optimizer steps to run.
        lr: peak learning rate (AdamW), reached after `warmup` steps, then cosine to `min_lr`.
        min_lr: final learning rate of the cosine schedule.
        warmup: linear warmup steps.
        weight_decay: applied to weight matrices only, never to gains, biases, embeddings' logit_scale.
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: max global grad norm (0 = off).
        precision: "fp32", or "bf16" autocast: for GPUs and CPUs with AMX (on a CPU, attention then runs on SDPA's
            math backend: clipkit.precision); on a CPU without AMX it is slower than fp32 (docs/benchmarks.md).
        loss: "clip" (symmetric InfoNCE) or "siglip" (sigmoid).
        local_loss: each process computes its rows against all columns (True), or the full global matrix.
        gather_with_grad: all-gather features with autograd (exact gradients). Only False to reproduce
            open_clip's default, which under-weights encoder gradients by the world size.
        gather_dtype: dtype features are cast to for the cross-process exchange ("bf16" halves its bytes; the
            loss itself stays in the features' dtype).
        accum_freq: micro-batches per optimizer step with cached features (GradCache), giving the gradient
            of one accum_freq-times larger batch.
        positives: multiple positives: pairs of a global batch that share this are positives of each other, not
            negatives: a key of the samples' json (e.g. "label": every prompt of a class) or "caption" (the same
            caption text). None (default): only a pair itself. With the CLIP loss, identical captions already
            act as one shared target (their text features are equal), so "caption" changes only SigLIP, where the
            plain loss labels the same logit both +1 and -1; a json key changes both.
        fsdp: shard parameters, gradients and optimizer state with FSDP2 through Accelerate's plugin (GPUs only:
            on CPU Accelerate ignores the plugin and runs DDP, so clipkit refuses it there).
        log_every: steps between metric log lines.
        checkpoint_every: steps between checkpoints (0 = only at the end). It also sets the length of the resampled
            data segments that an exact resume replays, so keep it when resuming.
        keep_checkpoints: how many of the latest checkpoints to keep (0 = all).
        keep_best: also keep the checkpoint with the best value of this eval metric, e.g.
            "eval/fashion-mnist/acc1" (higher is better); the evals then also run at every checkpoint.
        max_nonfinite: a step whose loss or gradient is not finite is skipped and counted; this many in a row stop
            the run (the last good checkpoint is kept).
        wandb: log to Weights & Biases (offline unless WANDB_MODE says otherwise).
        compile: wrap the model in `torch.compile` (the first steps pay the compile time).
        channels_last: keep image batches and conv weights channels-last in memory (NHWC), the layout oneDNN and
            cuDNN convolutions run fastest in. None (default): on for convolutional image towers (more than one
            Conv2d: ResNet, ConvNeXt), off for ViTs, whose only convolution is the patch embedding.
        threads: torch intra-op threads of each training process. 0 (default): clipkit/threads.py's policy, the
            cores of this process shared by the job's processes on the machine, minus data.workers, at least 1
            (whatever the launcher put in OMP_NUM_THREADS). Keep it when resuming: it changes float summation order.
        timeout: seconds a process may wait for the others in a collective, or spend on one step (evals and
            checkpoint writes included), before the run fails on every process instead of hanging
            (clipkit/distributed.py). Raise it if one step can take longer, e.g. large evals on the main process.
        slip: SLIP's image self-supervision as an auxiliary loss (off by default; `SlipCfg`).
        caption_weight: CoCa only (a model config with `multimodal_cfg`), and required there: the weight of the
            captioning loss (next-token cross-entropy of the text decoder, averaged over the caption tokens of the
            whole step) added to the contrastive loss; open_clip's default is 2.0. See docs/learning.md#coca.
    """

    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 100
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    loss: Literal["clip", "siglip"] = "clip"
    local_loss: bool = True
    gather_with_grad: bool = True
    gather_dtype: Literal["fp32", "bf16"] = "fp32"
    accum_freq: int = 1
    positives: str | None = None
    fsdp: bool = False
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    keep_best: str | None = None
    max_nonfinite: int = 5
    wandb: bool = False
    compile: bool = False
    channels_last: bool | None = None
    threads: int = 0
    timeout: float = 1800.0
    slip: SlipCfg = field(default_factory=SlipCfg)
    caption_weight: float | None = None


@dataclass(frozen=True)
class EvalTaskCfg:
    """One evaluation run at the end of training (and every `EvalCfg.every` steps).

    Attributes:
        task: "zeroshot" (classification from class names x templates) or "retrieval" (image<->text R@k).
        dataset: a name for the results file `<run>/eval/<task>-<dataset>.json`.
        shards: shard spec relative to `data_root`.
        classnames: file of class names, one per line in label order (zeroshot), relative to `data_root`.
        templates: file of prompt templates with `{c}`, one per line (zeroshot; default: open_clip's simple
            ImageNet templates), relative to `data_root`.
    """

    task: Literal["zeroshot", "retrieval"]
    dataset: str
    shards: str
    classnames: str | None = None
    templates: str | None = None


@dataclass(frozen=True)
class EvalCfg:
    """Evaluations run during and after training.

    Attributes:
        tasks: the evaluations.
        every: steps between evaluations during training (0 = only at the end).
        batch_size: batch size for embedding.
    """

    tasks: tuple[EvalTaskCfg, ...] = ()
    every: int = 0
    batch_size: int = 256


@dataclass(frozen=True)
class IndexCfg:
    """A FAISS index built at the end of training from a shard set's embeddings.

    Attributes:
        shards: shard spec relative to `data_root` (empty: no index).
        factory: FAISS index factory string (default: chosen from the vector count).
    """

    shards: str = ""
    factory: str | None = None


@dataclass(frozen=True)
class FinetuneEvalSetCfg:
    """An extra labelled set the fine-tuned model (and every WiSE-FT mix) is evaluated on.

    Attributes:
        name: the set's name in reports (`<run>/reports/<name>.json`).
        shards: labelled shard spec relative to `data_root` (json `label` indexes `finetune.classnames`).
    """

    name: str
    shards: str


@dataclass(frozen=True)
class FinetuneCfg:
    """`clipkit finetune`: adapt a model folder to a labelled classification set (docs/finetune.md).

    Attributes:
        model: the model folder to start from (open_clip_config.json + weights; not resolved against data_root).
        train: labelled training shards (json `label` = index into `classnames`), relative to `data_root`.
        val: labelled validation shards; default a deterministic hash split of `train` (`val_fraction`).
        val_fraction: share of training samples held out for validation when `val` is not given (by key hash).
        classnames: class names file, one per line in label order, relative to `data_root`.
        templates: prompt templates file with `{c}`, relative to `data_root` (default: open_clip's simple ones).
        eval_sets: extra sets reported for the fine-tuned model and for every WiSE-FT mix (e.g. test, shifted test).
        mode: "ce" (cross-entropy, image tower + zero-shot-initialized head, as WiSE-FT), "flyp" (contrastive loss
            against class-prompt captions, both towers; the head is rebuilt from the text tower at each evaluation)
            or "linear" (frozen towers, logistic regression on image features, C chosen on validation).
        train_head: in "ce" mode, also train the head (False: keep the zero-shot head, so that the saved model folder
            alone, through `clipkit eval zeroshot`, gives the fine-tuned classifier).
        steps: optimizer steps at most (early stopping may end sooner).
        batch_size: training samples per step.
        lr: peak AdamW learning rate (warmup, then cosine to 0 at `steps`).
        weight_decay: AdamW weight decay on weight matrices.
        warmup: linear warmup steps.
        grad_clip: max global gradient norm (0 = off).
        flip: in "ce" and "flyp", flip each training image horizontally with probability 1/2.
        crop_pad: in "ce" and "flyp", pad each training image by this many pixels (edge pixels repeated) and crop it
            back at a random offset: shifts of up to `crop_pad` px at the model's input size (0 = off).
        image_size: fine-tune (and save) the model at this input size in pixels (0 = the model's own). An open_clip ViT
            image tower only; its position embeddings are interpolated to the new patch grid (clipkit.models.resize).
        patch_dropout: in "ce" and "flyp", drop this share of each training image's patch tokens (open_clip's
            PatchDropout, as in FLIP: fewer tokens, cheaper steps); evaluation sees every patch. An open_clip ViT only.
        label_smoothing: in "ce", the cross-entropy target puts this much mass uniformly on all classes (0 = off).
        mixup: in "ce", the Beta alpha of batch mixup: each batch is blended with its mirrored order, the loss mixed
            alike (clipkit.finetune.mix; 0 = off, e.g. 0.2).
        cutmix: in "ce", the Beta alpha of batch CutMix (0 = off, e.g. 1.0); with both, each batch picks one.
        layer_decay: layer-wise learning-rate decay in "ce" and "flyp" (1 = off): block i of a tower of L blocks trains
            at lr * layer_decay^(L - i), its embeddings at lr * layer_decay^(L + 1), its final norm and projection and
            the head at lr (clipkit.finetune.layer_decay). A transformer tower only.
        ema: decay of an exponential moving average of the trained weights, updated after every step (0 = off; e.g.
            0.999 averages over about the last 1000 steps). Validation, early stopping, the restored weights and the
            WiSE-FT mixes then use the averaged weights.
        test_time_flip: score every evaluated image as the mean of its own and its mirror's logits (validation, the
            eval sets, the WiSE-FT sweep and the reports; twice the evaluation cost). Use with `flip` training.
        eval_every: steps between validation evaluations (early stopping decides at each).
        patience: evaluations without an improvement larger than `min_delta` before stopping (0 = never stop early).
        min_delta: the smallest change of the monitored metric that counts as an improvement.
        early_stop_from: evaluations before this step can still be the best (and be restored) but never count
            against `patience` (the accuracy dip of a high learning rate early in the schedule does not stop the run).
        monitor: validation metric that picks the best step: "accuracy", "macro_f1" (higher is better) or "loss".
        wise_alphas: WiSE-FT mixing weights a (theta = (1-a) theta_zeroshot + a theta_finetuned); empty = no sweep.
        linear_c_grid: inverse regularization strengths tried in "linear" mode.
        eval_batch_size: images per forward pass when evaluating.
        precision: "fp32"; "bf16" autocast for every forward pass, training and evaluation (weights and optimizer
            state stay fp32); or "auto": bf16 on a GPU with bf16 and on a CPU with AMX, where it is faster (1.66x a
            quickstart `ce` step on 2 AMX Xeon cores, docs/finetune.md), else fp32 (clipkit.precision). The run's
            summary.json records the one used.
        log_every: steps between training log lines.
        threads: torch intra-op threads (0: torch's count). On a CPU shared with other jobs use 1: an OpenMP region
            waits for its slowest thread, and a descheduled one stalls every layer (a `ce` step of the quickstart
            model took 16 s at 2 threads and 2.5 s at 1 under a load average of 11 on 2 cores).
        wandb: log to Weights & Biases (offline unless WANDB_MODE says otherwise).
    """

    model: str = ""
    train: str = ""
    val: str | None = None
    val_fraction: float = 0.1
    classnames: str = ""
    templates: str | None = None
    eval_sets: tuple[FinetuneEvalSetCfg, ...] = ()
    mode: Literal["ce", "flyp", "linear"] = "ce"
    train_head: bool = True
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup: int = 100
    grad_clip: float = 1.0
    flip: bool = False
    crop_pad: int = 0
    image_size: int = 0
    patch_dropout: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    layer_decay: float = 1.0
    ema: float = 0.0
    test_time_flip: bool = False
    eval_every: int = 100
    patience: int = 5
    min_delta: float = 0.0
    early_stop_from: int = 0
    monitor: Literal["accuracy", "macro_f1", "loss"] = "accuracy"
    wise_alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    linear_c_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
    eval_batch_size: int = 512
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    log_every: int = 20
    threads: int = 0
    wandb: bool = False


@dataclass(frozen=True)
class Recipe:
    """A whole training recipe: only what differs from these defaults goes in a YAML file."""

    name: str = "run"
    seed: int = 0
    data_root: str = "data"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    index: IndexCfg = field(default_factory=IndexCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)

    def path(self, relative: str) -> str:
        """Resolves a data path or shard spec against `data_root` (absolute parts are kept)."""
        parts = [p if Path(p).is_absolute() else str(Path(self.data_root) / p) for p in relative.split("::")]
        return "::".join(parts)


# ----------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp` and converts YAML shapes (lists -> tuples, dicts -> dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(value, a, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {inner}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4`, without a dot, as a string
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{key}: {value!r} is not finite")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{key}: unsupported type {_type_name(tp)}")  # a bug in a dataclass, not in the recipe


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a plain mapping; unknown keys and wrong types raise RecipeError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(
            f"{prefix}{unknown[0]}: unknown key (known keys of {prefix or 'the recipe'}: {sorted(names)})"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: {e}") from None


def to_dict(recipe: Any) -> dict:
    """Plain-data form of a recipe (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(recipe)


def apply_override(data: dict, override: str) -> None:
    """Applies one `dotted.key=value` override in place; the value is parsed as YAML (numbers, lists, null).

    List items are addressed by index (`data.sources.0.weight=2`). Intermediate mappings are created so that
    the unknown-key check of `from_dict` names a misspelled key.
    """
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected dotted.key=value")
    dotted, raw = override.split("=", 1)
    value = _parse_yaml(raw, f"override {override!r}: the value {raw!r}") if raw.strip() else ""
    keys = dotted.strip().split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(f"{where}: no list item {k} (the list has {len(node)} items)")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"{where}: is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"{dotted}: no list item {last}")
        node[int(last)] = value
    else:
        node[last] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values; a syntax error or a repeated key raises RecipeError with `where` and the line.

    Raises:
        RecipeError: "{where}, line L, column C: problem".
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise RecipeError(f"{where}{at}: {problem}" + (f" ({context})" if context else "")) from None


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Reads a YAML recipe, applies dotted overrides, and returns the validated, frozen Recipe.

    Args:
        path: the YAML file (None: defaults only).
        overrides: `dotted.key=value` strings, applied in order.

    Raises:
        RecipeError: naming the key, value and reason, for any invalid recipe.
    """
    recipe = from_dict(Recipe, read_recipe_data(path, overrides))
    validate(recipe)
    return recipe


def read_recipe_data(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The plain mapping of a YAML recipe (empty for None) with the dotted overrides applied, not yet validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path}: " + ("a folder, not a file" if path.is_dir() else "file not found"))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe {path}: not UTF-8 text (byte {e.start})") from None
        data = _parse_yaml(text, f"recipe {path}") or {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path}: the top level must be a mapping")
    for o in overrides:
        apply_override(data, o)
    return data


def validate(r: Recipe) -> None:
    """Value checks that types alone cannot express; each names the key, the value and the reason."""

    def need(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise RecipeError(f"{key}: {value!r} {why}")

    m = r.model
    need(
        (m.name is None) != (m.config is None),
        "model",
        {"name": m.name, "config": m.config and "..."},
        "needs exactly one of model.name (an open_clip architecture) and model.config",
    )
    if m.config is not None:
        for k in ("embed_dim", "vision_cfg", "text_cfg"):
            need(k in m.config, f"model.config.{k}", None, "is required in a custom model config")
    need(m.image_size is None or m.image_size > 0, "model.image_size", m.image_size, "must be positive")
    need(m.context_length is None or m.context_length > 1, "model.context_length", m.context_length, "must be > 1")
    for key in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        need(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0")
    if m.cache_locked_text:
        need(
            m.lock_text and m.lock_text_unlocked_layers == 0 and m.lock_text_freeze_layer_norm,
            "model.cache_locked_text",
            True,
            "needs a fully locked text tower (model.lock_text, no unlocked layers, frozen layer norms)",
        )

    d = r.data
    need(len(d.sources) > 0, "data.sources", list(d.sources), "must name at least one shard set")
    for i, s in enumerate(d.sources):
        need(s.weight > 0, f"data.sources.{i}.weight", s.weight, "must be positive")
        need(bool(s.shards.strip()), f"data.sources.{i}.shards", s.shards, "must not be empty")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    need(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    need(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0")
    need(d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor, "must be >= 1")
    need(d.caption_max_keywords >= 0, "data.caption_max_keywords", d.caption_max_keywords, "must be >= 0 (0 = all)")
    need(
        d.caption_max_keywords == 0 or d.caption == "keywords",
        "data.caption_max_keywords",
        d.caption_max_keywords,
        f"applies to data.caption keywords only (data.caption is {d.caption!r})",
    )
    a = d.augment
    need(0 < a.scale[0] <= a.scale[1] <= 1, "data.augment.scale", list(a.scale), "must be 0 < low <= high <= 1")
    need(
        (a.color_jitter is None) == (a.color_jitter_prob is None),
        "data.augment.color_jitter",
        a.color_jitter,
        "and data.augment.color_jitter_prob go together (strengths, and the probability of applying them)",
    )
    for key in ("color_jitter_prob", "gray_scale_prob"):
        v = getattr(a, key)
        need(v is None or 0 <= v <= 1, f"data.augment.{key}", v, "must be a probability in [0, 1]")
    if not d.resampled:
        for i, s in enumerate(d.sources):
            need(
                s.weight == 1.0, f"data.sources.{i}.weight", s.weight, "must be 1 in epoch mode (data.resampled false)"
            )

    t = r.train
    need(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    need(t.lr > 0, "train.lr", t.lr, "must be positive")
    need(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"must be in [0, train.lr={t.lr}]")
    need(0 <= t.warmup < t.steps, "train.warmup", t.warmup, f"must be in [0, train.steps={t.steps})")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    need(all(0 <= b < 1 for b in t.betas), "train.betas", list(t.betas), "must each be in [0, 1)")
    need(t.eps > 0, "train.eps", t.eps, "must be positive")
    need(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 = off)")
    need(t.accum_freq >= 1, "train.accum_freq", t.accum_freq, "must be >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "must be >= 0")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 0 (0 = keep all)")
    need(t.max_nonfinite >= 1, "train.max_nonfinite", t.max_nonfinite, "must be >= 1")
    need(t.threads >= 0, "train.threads", t.threads, "must be >= 0 (0 = auto)")
    need(t.timeout > 0, "train.timeout", t.timeout, "must be positive (seconds)")
    need(0 <= d.max_skip_rate <= 1, "data.max_skip_rate", d.max_skip_rate, "must be in [0, 1]")
    _validate_slip(r, need)
    if m.config is not None:  # a named architecture is checked once open_clip resolves it (train.preflight)
        check_caption_weight(t.caption_weight, "multimodal_cfg" in m.config)

    e = r.eval
    if t.keep_best is not None:
        names = {f"eval/{task.dataset}/" for task in e.tasks}
        need(
            any(t.keep_best.startswith(n) for n in names),
            "train.keep_best",
            t.keep_best,
            f"must name an eval metric as eval/<dataset>/<metric>, with a dataset of eval.tasks {sorted(names)}",
        )
    need(e.every >= 0, "eval.every", e.every, "must be >= 0")
    need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    seen = set()
    for i, task in enumerate(e.tasks):
        out = (task.task, task.dataset)
        need(out not in seen, f"eval.tasks.{i}", f"{task.task}-{task.dataset}", "duplicates an earlier task's output")
        seen.add(out)
        if task.task == "zeroshot":
            need(task.classnames is not None, f"eval.tasks.{i}.classnames", None, "is required for a zeroshot task")


def _validate_slip(r: Recipe, need: Callable[[bool, str, Any, str], None]) -> None:
    """The checks of train.slip: values, and the settings SLIP cannot run with."""
    s, a = r.train.slip, r.train.slip.augment
    need(s.weight >= 0, "train.slip.weight", s.weight, "must be >= 0 (0 = off)")
    need(s.temperature > 0, "train.slip.temperature", s.temperature, "must be positive")
    need(s.head_hidden >= 1, "train.slip.head_hidden", s.head_hidden, "must be >= 1")
    need(s.head_out >= 1, "train.slip.head_out", s.head_out, "must be >= 1")
    need(0 < a.scale[0] <= a.scale[1] <= 1, "train.slip.augment.scale", list(a.scale), "must be 0 < low <= high <= 1")
    need(all(v >= 0 for v in a.color_jitter), "train.slip.augment.color_jitter", list(a.color_jitter), "must be >= 0")
    need(a.color_jitter[3] <= 0.5, "train.slip.augment.color_jitter", list(a.color_jitter), "hue must be <= 0.5")
    for key in ("color_jitter_prob", "gray_scale_prob", "flip_prob"):
        v = getattr(a, key)
        need(0 <= v <= 1, f"train.slip.augment.{key}", v, "must be a probability in [0, 1]")
    if s.weight == 0:
        return
    need(
        r.train.accum_freq == 1,
        "train.accum_freq",
        r.train.accum_freq,
        "cannot be used with train.slip (the NT-Xent loss of one micro-batch is not the big-batch loss, and it is not "
        "accumulated exactly): use train.accum_freq 1, or train.slip.weight 0",
    )
    need(not r.train.fsdp, "train.fsdp", True, "is not supported with train.slip yet (its head is not sharded)")
    m = r.model
    need(
        not (m.lock_image and m.lock_image_unlocked_groups == 0),
        "train.slip.weight",
        s.weight,
        "trains the image tower, which model.lock_image freezes entirely (unlock some groups, or turn SLIP off)",
    )


def check_caption_weight(weight: float | None, coca: bool) -> None:
    """train.caption_weight: required and positive for a CoCa model, unset (or 0) for any other.

    Raises:
        RecipeError: naming train.caption_weight.
    """
    if coca and not (weight is not None and weight > 0):
        raise RecipeError(
            f"train.caption_weight: {weight!r}: a CoCa model (model.config.multimodal_cfg) trains its text decoder "
            "with a captioning loss: set its weight > 0 (open_clip's default is 2.0)"
        )
    if not coca and weight:
        raise RecipeError(
            f"train.caption_weight: {weight!r} needs a CoCa model (an open_clip config with multimodal_cfg, or a "
            "coca_* architecture); this model has no text decoder"
        )


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Writes the resolved recipe (every field, defaults included) as YAML."""
    write_text_atomic(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))


FINETUNE_KEYS = ("name", "seed", "data_root", "finetune")  # the recipe keys `clipkit finetune` reads


def load_finetune_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Reads a fine-tuning recipe (`name`, `seed`, `data_root` and a `finetune` section), validated like training's.

    Raises:
        RecipeError: naming the key, for an unknown key, a training key (unused here), a wrong type or a bad value.
    """
    data = read_recipe_data(path, overrides)
    extra = sorted(k for k in data if k not in FINETUNE_KEYS and k in {f.name for f in dataclasses.fields(Recipe)})
    if extra:
        raise RecipeError(f"{extra[0]}: not read by clipkit finetune (a fine-tuning recipe has {list(FINETUNE_KEYS)})")
    recipe = from_dict(Recipe, data)
    validate_finetune(recipe.finetune)
    return recipe


def validate_finetune(f: FinetuneCfg) -> None:
    """Value checks of a `finetune` section; each names the key, the value and the reason."""

    def need(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise RecipeError(f"finetune.{key}: {value!r} {why}")

    for key in ("model", "train", "classnames"):
        need(bool(getattr(f, key).strip()), key, getattr(f, key), "is required")
    need(0 < f.val_fraction < 1, "val_fraction", f.val_fraction, "must be in (0, 1)")
    need(f.steps >= 1, "steps", f.steps, "must be >= 1")
    need(f.batch_size >= 2, "batch_size", f.batch_size, "must be >= 2")
    need(f.lr > 0, "lr", f.lr, "must be positive")
    need(f.weight_decay >= 0, "weight_decay", f.weight_decay, "must be >= 0")
    need(0 <= f.warmup < f.steps, "warmup", f.warmup, f"must be in [0, finetune.steps={f.steps})")
    need(f.grad_clip >= 0, "grad_clip", f.grad_clip, "must be >= 0 (0 = off)")
    need(f.crop_pad >= 0, "crop_pad", f.crop_pad, "must be >= 0 (0 = off)")
    for key in ("flip", "crop_pad"):
        need(f.mode != "linear" or not getattr(f, key), key, getattr(f, key),
             "augments the training images of 'ce' and 'flyp'; 'linear' fits frozen features once")  # fmt: skip
    need(f.image_size >= 0, "image_size", f.image_size, "must be >= 0 (0 = the model's own)")
    need(0 <= f.patch_dropout < 1, "patch_dropout", f.patch_dropout, "must be in [0, 1) (0 = off)")
    need(f.mode != "linear" or not f.patch_dropout, "patch_dropout", f.patch_dropout,
         "drops patches in training steps; 'linear' takes none")  # fmt: skip
    need(0 <= f.label_smoothing < 1, "label_smoothing", f.label_smoothing, "must be in [0, 1)")
    need(f.mode == "ce" or not f.label_smoothing, "label_smoothing", f.label_smoothing,
         f"smooths the cross-entropy of 'ce'; finetune.mode={f.mode!r} has none")  # fmt: skip
    for key in ("mixup", "cutmix"):
        need(getattr(f, key) >= 0, key, getattr(f, key), "must be >= 0 (0 = off)")
        need(f.mode == "ce" or not getattr(f, key), key, getattr(f, key),
             f"mixes the cross-entropy targets of 'ce'; finetune.mode={f.mode!r} has none")  # fmt: skip
    need(0 < f.layer_decay <= 1, "layer_decay", f.layer_decay, "must be in (0, 1] (1 = off)")
    need(f.mode != "linear" or f.layer_decay == 1, "layer_decay", f.layer_decay,
         "scales the learning rates of 'ce' and 'flyp'; 'linear' takes no gradient steps")  # fmt: skip
    need(0 <= f.ema < 1, "ema", f.ema, "must be in [0, 1) (0 = off)")
    need(f.mode != "linear" or not f.ema, "ema", f.ema, "averages training steps; 'linear' takes none")
    need(f.eval_every >= 1, "eval_every", f.eval_every, "must be >= 1")
    need(f.patience >= 0, "patience", f.patience, "must be >= 0 (0 = never stop early)")
    need(f.min_delta >= 0, "min_delta", f.min_delta, "must be >= 0")
    need(
        0 <= f.early_stop_from <= f.steps,
        "early_stop_from",
        f.early_stop_from,
        f"must be in [0, finetune.steps={f.steps}]",
    )
    need(all(0 <= a <= 1 for a in f.wise_alphas), "wise_alphas", list(f.wise_alphas), "must each be in [0, 1]")
    need(len(f.linear_c_grid) > 0 and all(c > 0 for c in f.linear_c_grid), "linear_c_grid", list(f.linear_c_grid),
         "must be positive numbers")  # fmt: skip
    need(f.eval_batch_size >= 1, "eval_batch_size", f.eval_batch_size, "must be >= 1")
    need(f.log_every >= 1, "log_every", f.log_every, "must be >= 1")
    need(f.threads >= 0, "threads", f.threads, "must be >= 0 (0 = torch's count)")
    names = [s.name for s in f.eval_sets]
    for i, s in enumerate(f.eval_sets):
        need(bool(s.name.strip()) and "/" not in s.name, f"eval_sets.{i}.name", s.name, "must be a plain name")
        need(names.count(s.name) == 1 and s.name != "val", f"eval_sets.{i}.name", s.name, "must be unique, not 'val'")
