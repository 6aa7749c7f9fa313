"""Layer-wise learning-rate decay (BEiT, and the CLIP fine-tuning recipes after it): deeper blocks learn faster.

A tower of L blocks gets layer ids 0 (its embeddings: patch or token embedding, class token, position embedding,
pre-norm), i + 1 (block i) and L + 1 (everything else: final norm, projection, pooling head).
A parameter with id k trains at `lr * decay ** (L + 1 - k)`: the embedding at decay^(L+1) of the peak, the last block
at decay, the projection and the classification head at the peak. Each tower counts its own blocks, so in `flyp` the
text tower's embedding is as slow as the image tower's however deep either is.

Ids are read from names, for open_clip's transformers, timm ViTs and Hugging Face encoders alike: blocks are
`...(resblocks|blocks|layer|layers).<i>....`; the embeddings are the parts named in `_EMBEDDING` (`conv1`,
`class_embedding`, `token_embedding`, timm's `patch_embed`, `cls_token`, HF's `embeddings`, ...). Names, not the
registration order: open_clip's built-in text tower registers its blocks before its token embedding.
"""

from __future__ import annotations

import re

import torch

from clipkit.optim import param_groups

_BLOCK = re.compile(r"\.(?:resblocks|blocks|layer|layers)\.(\d+)\.")
_EMBEDDING = re.compile(
    r"(?:^|\.)(?:conv1|class_embedding|positional_embedding|ln_pre|token_embedding|patch_embed|cls_token|pos_embed"
    r"|reg_token|norm_pre|embeddings)(?:\.|$)"
)
# Parameters outside both towers, e.g. a classification head or the logit scale: always at the peak rate.
_TOWERS = ("visual.", "text.")


def tower_of(name: str) -> str:
    """The tower a dual encoder's parameter belongs to: "visual", "text" (open_clip's `text.` HF / timm wrapper or its
    built-in text transformer at the top level), or "" for the logit scale and bias."""
    if name.startswith(_TOWERS):
        return name.split(".", 1)[0]
    return "" if name.startswith("logit_") else "text"


def layer_ids(named: list[tuple[str, torch.nn.Parameter]], prefix: str = "") -> dict[str, tuple[int, int]]:
    """{name: (layer id, L + 1)} for the trainable parameters of a dual encoder, tower by tower.

    Args:
        named: (name, parameter) pairs, e.g. `list(model.named_parameters())`; frozen ones are left out.
        prefix: dropped from each name before the tower is read (e.g. "model." inside `ImageClassifier`); names
            without it get the top id of their own (they are heads).

    Raises:
        ValueError: a tower with trainable parameters but no numbered blocks (a ResNet, say), naming it.
    """
    towers: dict[str, list[tuple[str, int | None]]] = {}
    heads: list[str] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        local = name[len(prefix) :] if name.startswith(prefix) else None
        tower = tower_of(local) if local is not None else ""
        if not tower:
            heads.append(name)
            continue
        m = _BLOCK.search("." + local)
        block = int(m.group(1)) if m else (-1 if _EMBEDDING.search(local) else None)  # -1: embedding, None: after
        towers.setdefault(tower, []).append((name, block))
    out: dict[str, tuple[int, int]] = {}
    for tower, rows in towers.items():
        blocks = [b for _, b in rows if b is not None and b >= 0]
        if not blocks:
            raise ValueError(f"layer_decay: the {tower} tower has no numbered transformer blocks to decay over")
        top = max(blocks) + 2  # L + 1
        for name, b in rows:
            out[name] = (top if b is None else b + 1, top)
    for name in heads:
        out[name] = (1, 1)
    return out


def layer_decay_groups(module: torch.nn.Module, weight_decay: float, decay: float, prefix: str = "") -> list[dict]:
    """AdamW parameter groups: `clipkit.optim.param_groups`' weight-decay split, each further split by learning-rate
    scale `decay ** (top - id)`, carried as the group's "lr_scale" (multiply the peak lr by it)."""
    ids = layer_ids(list(module.named_parameters()), prefix)
    by_param = {id(p): ids[name] for name, p in module.named_parameters() if name in ids}
    groups = []
    for group in param_groups(module, weight_decay):
        scales: dict[float, list] = {}
        for p in group["params"]:
            layer, top = by_param[id(p)]
            scales.setdefault(decay ** (top - layer), []).append(p)
        for scale, params in sorted(scales.items()):
            groups.append({**group, "params": params, "lr_scale": scale})
    return groups
