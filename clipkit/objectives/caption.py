"""CoCa's captioning loss: next-token cross-entropy of the text decoder, as one big batch's token mean.

open_clip's `CoCaLoss` takes the mean over the non-pad target tokens of each process's batch. That mean is not
what K micro-batches or W processes add up to: their batches hold different numbers of caption tokens, so a
per-batch mean weighs a token of a short batch more than one of a long batch. Here the step's loss is

    L = w * sum over the step's target tokens t != pad of CE(logits_t, t) / N,

N = the non-pad target tokens of the whole step (all K micro-batches of all W processes, all-reduced in `begin`).
Each micro-batch contributes its share of the sum; the K backward passes add up to the big batch's gradient.
DDP averages gradients over the W processes, so each process's share is multiplied by W: the average of the W
processes' gradients is then the gradient of the global sum / N (tests/test_coca.py checks 1 vs 2 processes).

Targets are the tokens after the first (`labels = texts[:, 1:]`, as CoCa's forward returns them); the tokenizer
pads with 0 (open_clip's CLIP BPE), which is ignored. Cost: logits of the target positions only, [targets, vocab]
(49,408 entries per token with the CLIP BPE), from clipkit's CoCa (`caption_states` @ `caption_projection`,
clipkit/models/coca.py); a model giving open_clip's dense `logits` [n, L-1, vocab] works too, at the cost of
projecting the padding positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipkit.loss import world
from clipkit.step import MicroBatch


class CaptionObjective:
    """w * (token cross-entropy summed over the step's non-pad caption targets) / (their count in the whole step).

    Args:
        weight: train.caption_weight.
        pad_id: the tokenizer's padding id (0 for open_clip's CLIP BPE), never a target.

    Attributes:
        name: "caption" (logged as `loss/caption`).
        last: the step's loss on this process summed over its micro-batches (detached). It includes the factor W,
            so its mean over the processes (what the step log reports) is the big batch's caption loss.
    """

    name = "caption"

    def __init__(self, weight: float, pad_id: int = 0):
        self.weight, self.pad_id = weight, pad_id
        self.last = torch.zeros(())
        self.tokens = torch.ones(())

    def begin(self, micro_batches: Sequence[MicroBatch]) -> None:
        """Counts the step's non-pad targets over all micro-batches and processes (one small all-reduce)."""
        count = sum((mb.texts[:, 1:] != self.pad_id).sum() for mb in micro_batches)  # int64 scalar on the device
        _, w = world()
        if w > 1:
            dist.all_reduce(count)
        self.tokens = count.clamp_min(1)  # stays on the device: no host sync
        self.scale = self.weight * w
        self.last = torch.zeros((), device=count.device)

    def __call__(self, model: torch.nn.Module, output: dict, mb: MicroBatch) -> torch.Tensor:
        """This micro-batch's share of the step's weighted caption loss (scaled by W for DDP's average).

        Args:
            output: the model's output dict: "labels" [n, L-1] and either "caption_states" [n, L-1, width] with
                "caption_projection" [width, vocab] (clipkit's CoCa in training) or "logits" [n, L-1, vocab].
        """
        labels = output.get("labels")
        if labels is None or not ("caption_states" in output or "logits" in output):
            raise ValueError("train.caption_weight: the model gave no caption logits (not a CoCa model)")
        if "caption_states" in output:
            keep = labels != self.pad_id  # [n, L-1]
            logits = output["caption_states"][keep] @ output["caption_projection"]  # [targets, vocab]
            summed = F.cross_entropy(logits, labels[keep], reduction="sum")
        else:  # flattened: cross_entropy over dim 1 of a [n, vocab, L-1] view ran 2.5x slower on CPU
            summed = F.cross_entropy(output["logits"].flatten(0, 1), labels.flatten(), ignore_index=self.pad_id,
                                     reduction="sum")  # fmt: skip
        loss = summed * self.scale / self.tokens.to(summed.dtype)
        self.last = self.last + loss.detach()
        return loss


def pad_token_id(tokenizer) -> int:
    """The id a tokenizer pads with: an HF tokenizer's pad token, else 0 (open_clip's CLIP BPE)."""
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return int(pad) if pad is not None else 0
