"""Auxiliary training objectives added to the contrastive loss (clipkit/step.py `Objective`), built from a recipe:
SLIP's image self-supervision (train.slip) and CoCa's captioning loss (train.caption_weight).

An objective with trainable parameters of its own (a head) exposes them as `head`: the training loop puts them in
the optimizer beside the model's, prepares the head with Accelerate beside the model (DDP syncs it, checkpoints
save it) and keeps it out of the exported model folder.
"""

from __future__ import annotations

import torch

from clipkit.config import TrainCfg
from clipkit.objectives.slip import SlipHead, SlipObjective, nt_xent, nt_xent_rows

__all__ = ["SlipHead", "SlipObjective", "build_objectives", "nt_xent", "nt_xent_rows"]


def build_objectives(train: TrainCfg, embed_dim: int, tokenizer=None) -> list:
    """The recipe's auxiliary objectives, in the order their losses are added; heads built on the CPU from torch's RNG.

    Args:
        train: the recipe's train section.
        embed_dim: the width of the image tower's output (the model's embed_dim).
        tokenizer: the model's tokenizer (its pad id: padding is not a caption target).
    """
    objectives = []
    if train.caption_weight:
        from clipkit.objectives.caption import CaptionObjective, pad_token_id

        objectives.append(CaptionObjective(train.caption_weight, pad_token_id(tokenizer)))
    s = train.slip
    if s.weight > 0:
        head = SlipHead(embed_dim, s.head_hidden, s.head_out)
        objectives.append(SlipObjective(head, s.weight, s.temperature))
    return objectives


def heads(objectives: list) -> list[torch.nn.Module]:
    """The trainable heads of `objectives`, in order."""
    return [o.head for o in objectives if getattr(o, "head", None) is not None]
