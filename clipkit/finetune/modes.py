"""The fine-tuning modes: what is trained, its loss, and the classifier it is evaluated as.

- `ce` (WiSE-FT's end-to-end fine-tuning): the image tower and a head initialized as the zero-shot head, trained with
  cross-entropy; the text tower stays as it is.
- `flyp` (FLYP, "finetune like you pretrain", Goyal et al. 2023): both towers trained with the CLIP contrastive loss
  between each image and a prompt of its class (a random template per sample and step); two samples of the same class
  are not negatives of each other (their logits leave both softmaxes). The head is the zero-shot head of the current
  text tower, rebuilt at each evaluation.
- `linear` (no gradient steps): the towers stay frozen and a logistic regression on the normalized image features
  becomes the head; `clipkit.evaluate.linear_probe` fits it for each C, the best C on validation is kept.

Each mode exposes `module` (every weight a WiSE-FT mix interpolates, as one state dict) and `classifier()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipkit.evaluate.linear_probe import fit_logistic
from clipkit.finetune.head import ImageClassifier, zeroshot_head
from clipkit.finetune.mix import mix_batch
from clipkit.loss import clip_loss_rows

LOGIT_SCALE_MAX = float(np.log(100.0))  # CLIP's clamp of the learned temperature


class CrossEntropyMode:
    """`ce`: image tower + zero-shot-initialized head under cross-entropy.

    Args:
        model: the dual encoder (its text tower is frozen here).
        head: the zero-shot head (`zeroshot_head`).
        train_head: whether the head trains too (False: the saved model folder alone is the classifier).
        label_smoothing: mass of the cross-entropy target spread uniformly over all classes.
        mixup: Beta alpha of batch mixup (0 = off; `clipkit.finetune.mix`).
        cutmix: Beta alpha of batch CutMix (0 = off).
    """

    trains = True
    tower_prefix = "model."  # where the dual encoder's names start in `module` (layer-wise decay reads them)

    def __init__(
        self,
        model: torch.nn.Module,
        head: torch.nn.Linear,
        train_head: bool = True,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ):
        self.module, self.label_smoothing = ImageClassifier(model, head), label_smoothing
        self.mixup, self.cutmix = mixup, cutmix
        for name, p in self.module.named_parameters():
            p.requires_grad_(name.startswith("model.visual.") or (train_head and name.startswith("head.")))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not (self.mixup or self.cutmix):
            return F.cross_entropy(self.module(images), labels, label_smoothing=self.label_smoothing)
        mixed, lam = mix_batch(images, self.mixup, self.cutmix, generator)
        logits = self.module(mixed)  # [B, C]
        own = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        partner = F.cross_entropy(logits, labels.flip(0), label_smoothing=self.label_smoothing)
        return lam * own + (1 - lam) * partner

    def after_step(self) -> None:
        pass

    def classifier(self) -> ImageClassifier:
        return self.module


class FlypMode:
    """`flyp`: contrastive fine-tuning of both towers against class-prompt captions.

    Args:
        model: the dual encoder.
        tokenizer: its tokenizer.
        classnames: C class names.
        templates: T prompt templates with `{c}`.
        device: where the model lives.
    """

    trains = True
    tower_prefix = ""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str], templates, device):
        self.module, self.tokenizer = model, tokenizer
        self.classnames, self.templates, self.device = list(classnames), list(templates), device
        prompts = [t.replace("{c}", name) for name in self.classnames for t in self.templates]  # class-major
        self.tokens = tokenizer(prompts).to(device)  # [C*T, L]: every caption a step can draw, tokenized once
        for p in model.parameters():
            p.requires_grad_(True)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n_t = len(self.templates)
        pick = torch.randint(n_t, labels.shape, generator=generator).to(labels.device)
        prompt = labels * n_t + pick  # [B] row of self.tokens
        # At most C*T distinct captions: encode each once, then index (the gradient sums over repeats).
        unique, inverse = torch.unique(prompt, return_inverse=True)
        text = F.normalize(self.module.encode_text(self.tokens[unique]), dim=-1)[inverse]  # [B, D]
        image = F.normalize(self.module.encode_image(images), dim=-1)  # [B, D]
        same = labels[:, None] == labels[None, :]  # [B, B]
        exclude = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        return clip_loss_rows(image, text, image, text, self.module.logit_scale.exp(), exclude=exclude)

    def after_step(self) -> None:
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def classifier(self) -> ImageClassifier:
        head = zeroshot_head(self.module, self.tokenizer, self.classnames, self.templates, self.device)
        return ImageClassifier(self.module, head)


class LinearMode:
    """`linear`: frozen towers; the head becomes a logistic regression on normalized image features."""

    trains = False

    def __init__(self, model: torch.nn.Module, head: torch.nn.Linear):
        self.module = ImageClassifier(model, head)
        for p in self.module.parameters():
            p.requires_grad_(False)

    def classifier(self) -> ImageClassifier:
        return self.module

    def fit(
        self, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, c_grid, seed: int
    ) -> list[dict]:
        """Fits one logistic regression per C on the training features, keeps the best on validation (accuracy;
        the smallest C among ties) as the head, and returns [{"C", "val_accuracy"}] per C."""
        tried = []
        for c in sorted(c_grid):
            clf = fit_logistic(train_x, train_y, c, seed)
            tried.append({"C": float(c), "val_accuracy": float(np.mean(clf.predict(val_x) == val_y)), "clf": clf})
        best = max(tried, key=lambda r: (r["val_accuracy"], -r["C"]))
        clf = best["clf"]
        n_classes = self.module.head.weight.shape[0]
        if list(clf.classes_) != list(range(n_classes)):
            raise ValueError(
                f"linear mode: the training labels cover classes {clf.classes_.tolist()}, not all {n_classes}"
            )
        weight, bias = clf.coef_, clf.intercept_
        if n_classes == 2:  # sklearn keeps one row for two classes: logit(1) - logit(0) = w.x + b
            weight, bias = np.stack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
        with torch.no_grad():
            head = self.module.head
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
        return [{k: v for k, v in r.items() if k != "clf"} | {"chosen": r is best} for r in tried]
