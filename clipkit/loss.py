"""Contrastive losses (CLIP's symmetric InfoNCE, SigLIP's sigmoid) and the only cross-process code they use.

Every process holds n local pairs. Features are all-gathered WITH autograd, so the backward pass routes each
process's share of d(loss)/d(features) back to the process that owns them (a reduce-scatter). Each process
then computes its local rows against all W*n columns; with DDP's gradient averaging this is exactly the
gradient of the single-process loss on the global batch (see tests/test_distributed.py). `accelerator.gather`
would carry no gradient and give the towers 1/W of it.

The losses are written over (rows, columns, row offset) so that the same code serves one process, many
processes, the full global matrix, and feature-cached gradient accumulation (clipkit/step.py).

Multiple positives: with a group id per pair (same caption, same label), every column of the row's group is a
positive, not a negative. InfoNCE then takes soft targets spread evenly over the row's positives (the pair itself
always among them); SigLIP labels them +1. With all groups distinct this is exactly the plain loss; so is InfoNCE's
for pairs whose captions are identical (their logits are equal, so any split of the target is the same). Group ids
cross processes with the features (a no-grad all-gather of [n] int64), so the reference tests hold as for the
plain loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gathers [n, D] from every process into [W*n, D], rank-major, with gradient flowing back.

    Every process must pass the same n. Cost: W*n*D elements received per call.
    """
    _, w = world()
    if w == 1:
        return x
    gather = _autograd_all_gather()
    if gather is not None:
        return gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather  # torch < 2.3: deprecated, but has the same gradient

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _autograd_all_gather():
    """torch's functional autograd all-gather under its current name (renamed in torch 2.15), or None."""
    try:
        import torch.distributed._functional_collectives as fc
    except ImportError:
        return None
    return getattr(fc, "all_gather_single_autograd", None) or getattr(fc, "all_gather_tensor_autograd", None)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gathers [n, D] into [W*n, D] without autograd (for cached features and metrics)."""
    _, w = world()
    if w == 1:
        return x
    out = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def positives(row_groups: torch.Tensor, col_groups: torch.Tensor) -> torch.Tensor:
    """[n, N] bool: whether column j is in row i's group (row i's own pair always is)."""
    return row_groups[:, None] == col_groups[None, :]


def clip_loss_rows(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int = 0,
    row_groups: torch.Tensor | None = None,
    col_groups: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of some rows against all columns.

    Row i is paired with column i + row_offset. Logits are [n, N] in each direction (memory: 2*n*N floats).
    With groups, the targets of row i are spread evenly over the columns of its group (multiple positives).
    `exclude` ([n, N] bool, True where a column is no negative of the row, e.g. another sample of the same class in
    FLYP) instead drops those logits from both softmaxes; it must leave each row's own positive False.

    Args:
        image_rows: [n, D] normalized image features of the rows this process owns.
        text_rows: [n, D] normalized text features of the same rows.
        image_cols: [N, D] normalized image features of all columns (the global batch).
        text_cols: [N, D] normalized text features of all columns.
        logit_scale: the temperature, already exponentiated (a scalar).
        row_offset: the column index of row 0.
        row_groups: [n] int64 group ids of the rows (None: every pair its own group).
        col_groups: [N] int64 group ids of the columns.

    Returns:
        The mean over rows of (image->text CE + text->image CE) / 2.
    """
    labels = torch.arange(image_rows.shape[0], device=image_rows.device) + row_offset
    if row_groups is not None:
        same = positives(row_groups, col_groups).to(image_rows.dtype)
        labels = same / same.sum(dim=1, keepdim=True)  # [n, N] soft targets (the same in both directions)
    logits_per_image = logit_scale * image_rows @ text_cols.T
    logits_per_text = logit_scale * text_rows @ image_cols.T
    if exclude is not None:
        logits_per_image = logits_per_image.masked_fill(exclude, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(exclude, float("-inf"))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_rows(
    image_rows: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    row_offset: int = 0,
    row_groups: torch.Tensor | None = None,
    col_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss (SigLIP) of some image rows against all text columns.

    Every (image, text) pair is an independent binary problem: +1 for row i with column i + row_offset (with
    groups: with every column of its group), -1 otherwise. Normalized by the number of rows, as in the SigLIP
    paper and open_clip's SigLipLoss, so that the mean over processes equals the single-process loss of the
    global batch.

    Args:
        image_rows: [n, D] normalized image features.
        text_cols: [N, D] normalized text features of all columns.
        logit_scale: exponentiated scale (a scalar).
        logit_bias: the learnable bias (a scalar).
        row_offset: the column index of row 0.
        row_groups: [n] int64 group ids of the rows (None: every pair its own group).
        col_groups: [N] int64 group ids of the columns.
    """
    n = image_rows.shape[0]
    logits = logit_scale * image_rows @ text_cols.T + logit_bias  # [n, N]
    if row_groups is not None:
        signs = positives(row_groups, col_groups).to(logits.dtype) * 2 - 1
    else:
        signs = -torch.ones_like(logits)
        signs[torch.arange(n, device=logits.device), torch.arange(n, device=logits.device) + row_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


class ContrastiveLoss:
    """The training loss on one process's local features, exchanging features with the other processes.

    Args:
        kind: "clip" or "siglip".
        local_loss: True: local rows against all columns (memory n x W*n). False: every process computes the
            full W*n x W*n matrix (same gradient, W times the memory and compute).
        gather_grad: gather with autograd (exact). False reproduces open_clip's default: the gathered copies
            carry no gradient, so towers get 1/W of the true gradient; kept for comparison only.
        gather_dtype: dtype the features are cast to for the exchange (bf16 halves its bytes).
    """

    def __init__(
        self,
        kind: str = "clip",
        local_loss: bool = True,
        gather_grad: bool = True,
        gather_dtype: torch.dtype | None = None,
    ):
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss kind {kind!r}: expected 'clip' or 'siglip'")
        self.kind, self.local_loss, self.gather_grad, self.gather_dtype = kind, local_loss, gather_grad, gather_dtype

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, D] local -> [W*n, D] global, as configured. Own rows keep their gradient in either mode."""
        rank, w = world()
        if w == 1:
            return x
        dtype = x.dtype
        y = x.to(self.gather_dtype) if self.gather_dtype is not None else x
        if self.gather_grad:
            return gather_with_grad(y).to(dtype)
        out = gather_no_grad(y).to(dtype)
        n = x.shape[0]
        return torch.cat([out[: rank * n], x, out[(rank + 1) * n :]])  # own rows keep their graph

    def from_global(
        self,
        image_local: torch.Tensor,
        text_local: torch.Tensor,
        image_all: torch.Tensor,
        text_all: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        groups_local: torch.Tensor | None = None,
        groups_all: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss given local features [n, D] and already-gathered global ones [W*n, D] (and group ids)."""
        rank, _ = world()
        n = image_local.shape[0]
        if self.local_loss:
            rows_i, rows_t, offset, rows_g = image_local, text_local, rank * n, groups_local
        else:
            rows_i, rows_t, offset, rows_g = image_all, text_all, 0, groups_all
        if self.kind == "clip":
            return clip_loss_rows(rows_i, rows_t, image_all, text_all, logit_scale, offset, rows_g, groups_all)
        if logit_bias is None:
            raise ValueError("the SigLIP loss needs a model with logit_bias (init_logit_bias in the model config)")
        loss = siglip_loss_rows(rows_i, text_all, logit_scale, logit_bias, offset, rows_g, groups_all)
        # Global rows: each process holds the sum over all W*n rows / (W*n); local: its n rows / n. Both average
        # to the global loss under DDP.
        return loss

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of this process's [n, D] normalized features (and [n] group ids for multiple positives)."""
        # SigLIP's local rows read only the text columns: gathering the images would be wasted traffic.
        skip_images = self.kind == "siglip" and self.local_loss
        image_all = image_features if skip_images else self.gather(image_features)
        text_all = self.gather(text_features)
        groups_all = gather_no_grad(groups) if groups is not None else None
        return self.from_global(
            image_features, text_features, image_all, text_all, logit_scale, logit_bias, groups, groups_all
        )
