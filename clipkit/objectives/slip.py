"""SLIP's image self-supervision (Mu et al. 2021): the SimCLR NT-Xent loss between two views of every image.

Each image of the global batch of N = W*n images gives two views a_i, b_i (clipkit/data/views.py); the image tower
and a small MLP head map them to z = normalize(head(visual(view))). NT-Xent (SimCLR; SLIP's SIMCLRLoss) takes each
of the 2N views as an anchor, its other view as the positive, and the other 2N - 2 views as negatives:

    loss = 1/(2N) sum_i [ l(a_i) + l(b_i) ],
    l(a_i) = -log( exp(a_i.b_i / t) / (sum_j exp(a_i.b_j / t) + sum_{j != i} exp(a_i.a_j / t)) ).

As in clipkit/loss.py, each process computes its n local rows against all N columns, gathered with the autograd
all-gather (`gather_with_grad`), labels `arange(n) + rank*n`; with DDP's gradient averaging the W processes give
exactly the gradient of one process holding the N-image batch (tests/test_slip.py). The trap is the same as for
the contrastive loss: a no-grad gather would give the towers 1/W of the gradient.

Which features: the head reads `model.visual(views)`, the image tower's output, which for open_clip's towers is
already projected into the joint embedding space (SLIP reads the pooled features before the projection). It is the
one output every tower family (open_clip ViT and ResNet, timm, CoCa) gives in the same form, and the head's first
Linear stands where SLIP's projection would; the CLIP projection then also learns from the self-supervision.

Cost per sample: two more image-tower forwards and backwards (on the views), the head, and an all-gather of
[n, head_out] twice; the loss matrices are [n, 2N].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clipkit.loss import gather_with_grad, world


def nt_xent_rows(
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    a_cols: torch.Tensor,
    b_cols: torch.Tensor,
    temperature: float,
    offset: int = 0,
) -> torch.Tensor:
    """NT-Xent of local rows against all columns: mean over the 2n local anchors.

    Args:
        a_rows: [n, D] normalized features of the first views of this process's images.
        b_rows: [n, D] of their second views.
        a_cols: [N, D] first views of the global batch (this process's rows at `offset`).
        b_cols: [N, D] second views of the global batch.
        temperature: t.
        offset: where this process's rows sit among the columns (rank * n).
    """
    n = a_rows.shape[0]
    labels = torch.arange(n, device=a_rows.device) + offset
    self_mask = F.one_hot(labels, a_cols.shape[0]).bool()  # [n, N]: an anchor is not its own negative
    ab = a_rows @ b_cols.T / temperature  # [n, N]
    aa = (a_rows @ a_cols.T / temperature).masked_fill(self_mask, float("-inf"))
    ba = b_rows @ a_cols.T / temperature
    bb = (b_rows @ b_cols.T / temperature).masked_fill(self_mask, float("-inf"))
    loss_a = F.cross_entropy(torch.cat([ab, aa], dim=1), labels)  # the positive b_i is column `labels` of ab
    loss_b = F.cross_entropy(torch.cat([ba, bb], dim=1), labels)
    return (loss_a + loss_b) / 2


def nt_xent(
    a: torch.Tensor, b: torch.Tensor, temperature: float, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """NT-Xent of this process's [n, D] view features (normalized here), gathered across processes with grad."""
    gather = gather or gather_with_grad
    dtype = torch.promote_types(a.dtype, torch.float32)  # bf16 / fp16 features: the loss in fp32
    a, b = F.normalize(a.to(dtype), dim=-1), F.normalize(b.to(dtype), dim=-1)
    rank, _ = world()
    return nt_xent_rows(a, b, gather(a), gather(b), temperature, rank * a.shape[0])


class SlipHead(torch.nn.Sequential):
    """The projection MLP: Linear -> LayerNorm -> ReLU -> Linear.

    LayerNorm, not SLIP's BatchNorm: its statistics are per sample, so processes need no synchronized batch
    statistics and the W-process gradient equals the one-process one.
    """

    def __init__(self, in_dim: int, hidden: int, out: int):
        super().__init__(
            torch.nn.Linear(in_dim, hidden), torch.nn.LayerNorm(hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out)
        )


def visual_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The image tower of a model, through torch.compile's and DDP's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if inner is None:
            return model.visual
        model = inner


class SlipObjective:
    """The SLIP auxiliary objective (clipkit/step.py `Objective`): weight * NT-Xent of the micro-batch's views.

    The views, extras["views"] [n, 2, 3, H, W], run through the model's image tower as one [2n, 3, H, W] batch,
    then the head. Calling the tower outside the model's DDP forward is fine: DDP's gradient hooks sit on the
    parameters, and autograd sums both paths' gradients before they fire.

    Args:
        head: the (prepared) SlipHead.
        weight: the loss weight.
        temperature: NT-Xent temperature.
        gather: the autograd all-gather (default `gather_with_grad`).
    """

    name = "slip"

    def __init__(
        self,
        head: torch.nn.Module,
        weight: float,
        temperature: float,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.head, self.weight, self.temperature, self.gather = head, weight, temperature, gather
        self.last = torch.zeros(())

    def begin(self, micro_batches: Sequence) -> None:
        self.last = torch.zeros((), device=micro_batches[0].images.device)

    def __call__(self, model: torch.nn.Module, output, mb) -> torch.Tensor:
        views = mb.extras["views"]  # [n, 2, 3, H, W]
        n = views.shape[0]
        features = visual_tower(model)(views.flatten(0, 1))  # [2n, D]
        if isinstance(features, tuple):  # towers that also return tokens (CoCa): the pooled features
            features = features[0]
        z = self.head(features).view(n, 2, -1)  # [n, 2, head_out]
        loss = self.weight * nt_xent(z[:, 0], z[:, 1], self.temperature, self.gather)
        self.last = self.last + loss.detach()
        return loss
