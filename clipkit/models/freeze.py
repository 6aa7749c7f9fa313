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

import torch
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


class PooledTextCache:
    """Memoizes a fully locked HF text tower's pooled features by token row (LiT on CPU).

    A locked, eval-pinned HF tower maps a token row to a fixed pooled vector, so each distinct caption needs the
    transformer once: afterwards a training step runs only the (trainable) projection. On a small caption set
    (OpenClipart + emoji: ~10k distinct lines) this removes the text tower's forward from almost every step, its
    largest cost on CPU (MiniLM-L6 at 24 tokens: ~0.5 GFLOP per caption).

    Cost: 4 * hidden bytes per distinct row (1.5 KiB for MiniLM). Rows missing from the cache are encoded together in
    one batch; a row's features do not depend on the other rows, up to the float rounding of batched matmuls.
    """

    def __init__(self, tower: nn.Module, max_rows: int = 1_000_000):
        self.tower, self.max_rows = tower, max_rows
        self.rows: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] int token ids -> [B, hidden] pooled features, from the cache where possible."""
        keys = [row.tobytes() for row in tokens.cpu().numpy()]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # key -> index of its first row
        new_keys = [k for k in first if k not in self.rows]
        if new_keys:
            new = tokens[[first[k] for k in new_keys]]  # [M, L], each distinct new row once
            with torch.no_grad():
                mask = (new != self.tower.config.pad_token_id).long()
                feats = self.tower.pooler(self.tower.transformer(input_ids=new, attention_mask=mask), mask)
            if len(self.rows) + len(new_keys) > self.max_rows:
                self.rows.clear()  # a caption set this large is not what the cache is for: start over
            self.rows.update(zip(new_keys, feats.detach(), strict=True))
        self.misses += len(new_keys)
        self.hits += len(keys) - len(new_keys)
        return torch.stack([self.rows[k] for k in keys])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's forward with the pooled features cached: [B, L] -> [B, embed_dim]."""
        return self.tower.proj(self.pooled(tokens))


def cache_locked_text(model: nn.Module) -> PooledTextCache:
    """Routes a fully locked HF text tower's forward through a `PooledTextCache`.

    Raises:
        ValueError: the text tower is not an HF tower, is not fully locked, or returns tokens too.
    """
    text = getattr(model, "text", None)
    if text is None or not hasattr(text, "pooler") or not hasattr(text, "transformer"):
        raise ValueError("model.cache_locked_text: needs a Hugging Face text tower (text_cfg.hf_model_name)")
    if any(p.requires_grad for p in text.transformer.parameters()) or text.transformer.training:
        raise ValueError("model.cache_locked_text: needs the text tower fully locked (lock_text, 0 unlocked layers)")
    if getattr(text, "output_tokens", False):
        raise ValueError("model.cache_locked_text: the text tower also returns tokens; they are not cached")
    cache = PooledTextCache(text)
    text.forward = cache.forward  # the instance attribute wins over the class's forward in Module.__call__
    return cache
