"""Locking towers (LiT) through open_clip's own `lock_image_tower` / `lock_text_tower`.

What open_clip's lock methods freeze differs by tower type, and clipkit keeps those semantics (so open_clip_train
recipes mean the same here):

- open_clip ViT / ModifiedResNet image tower: every parameter, its projection included; `unlocked_groups` leaves
  the last N groups (blocks, then the final norm + projection) trainable.
- timm image tower: the trunk; the head (pooling projection to the embedding) stays trainable.
- open_clip text transformer: every parameter, its projection included; `unlocked_layers` leaves the last N
  layers (and the final norm + projection) trainable.
- Hugging Face text tower: the transformer; the pooler projection stays trainable, which is what LiT trains.

Two things are added on top. A fully locked tower (nothing left unlocked) is pinned to eval mode, so dropout does
not perturb the features it gives, and its BatchNorm statistics stay put; a locked tower's features are then a
fixed function of the input, as LiT intends. And `freeze_layer_norm=False` makes the LayerNorm parameters of a
locked text tower trainable for every tower type (open_clip supports that only for HF towers).
"""

from __future__ import annotations

import types

from torch import nn

from clipkit.config import ModelCfg


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    # Replaces `train` on a fully locked tower: the parent's `.train()` reaches it through `children()`, and
    # whatever mode is asked, the tower and its children stay in eval mode.
    return nn.Module.train(self, False)


def pin_eval(module: nn.Module) -> None:
    """Keeps `module` in eval mode whatever `.train()` its parents call (dropout off, BatchNorm stats frozen)."""
    module.train = types.MethodType(_eval_only, module)
    module.eval()


def text_tower_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that make up the text tower: `model.text` (CustomTextCLIP), or CLIP's unpacked attributes."""
    if hasattr(model, "text"):
        return [model.text]
    names = ("token_embedding", "transformer", "ln_final")
    return [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]


def _locked_trunk(model: nn.Module, tower: str) -> list[nn.Module]:
    """The part of a fully locked tower whose parameters open_clip's lock freezes (pinned to eval mode)."""
    if tower == "image":
        return [getattr(model.visual, "trunk", model.visual)]  # timm keeps its head trainable: only the trunk
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "pooler"):  # HF tower
        return [text.transformer]
    return text_tower_modules(model)


def apply_locks(model: nn.Module, cfg: ModelCfg) -> None:
    """Freezes the towers `cfg` locks (requires_grad False), pins fully locked ones to eval mode.

    Args:
        model: an open_clip CLIP / CustomTextCLIP.
        cfg: the recipe's model section (lock_image*, lock_text*).
    """
    if cfg.lock_image:
        model.lock_image_tower(
            unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats
        )
        if cfg.lock_image_unlocked_groups == 0:
            for m in _locked_trunk(model, "image"):
                pin_eval(m)
    if cfg.lock_text:
        # open_clip's own text transformer refuses freeze_layer_norm=False; clipkit unfreezes the norms itself.
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
        if not cfg.lock_text_freeze_layer_norm:
            for tower in text_tower_modules(model):
                for m in tower.modules():
                    if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm"):
                        for p in m.parameters(recurse=False):
                            p.requires_grad = True
        if cfg.lock_text_unlocked_layers == 0:
            for m in _locked_trunk(model, "text"):
                pin_eval(m)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts {"total", "trainable", "frozen"}, for the log line that tells a user what a lock did."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
