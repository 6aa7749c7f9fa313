"""Worker functions run in real spawned processes (gloo) by tests/test_distributed.py.

Kept in their own module so `torch.multiprocessing` can import them by name in the children.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def global_batch(n: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    """The same [n] images and token ids on every process (each takes its slice)."""
    import open_clip

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    words = ["red", "blue", "cat", "dog", "tree", "car", "sun", "moon"]
    texts = [f"a {words[i % 8]} {words[(i * 3 + 1) % 8]} number {i}" for i in range(n)]
    return images, open_clip.SimpleTokenizer(context_length=16)(texts)


def make_model(model_cfg: dict, kind: str, dtype: torch.dtype = torch.float64):
    from clipkit.models.factory import build_model

    torch.manual_seed(0)
    cfg = dict(model_cfg, init_logit_bias=-5.0) if kind == "siglip" else model_cfg
    return build_model(cfg).to(dtype).train()


def grads_of(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def contrastive_grads(
    rank: int,
    world_size: int,
    port: int,
    out: str,
    model_cfg: dict,
    kind: str,
    per_rank: int,
    accum: int,
    gather_grad: bool,
    dtype: torch.dtype = torch.float64,
    gather_dtype: torch.dtype | None = None,
    local_loss: bool = True,
    groups_mod: int | None = None,
) -> None:
    """One optimizer step's gradients under DDP: this rank holds `accum` micro-batches of `per_rank` samples.

    With `groups_mod`, sample i of the global batch is in group i % groups_mod (multiple positives).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clipkit.loss import ContrastiveLoss
    from clipkit.step import forward_backward

    init(rank, world_size, port)
    model = DDP(make_model(model_cfg, kind, dtype))
    images, texts = global_batch(world_size * per_rank * accum, dtype=dtype)
    # Global order (rank, micro-batch, row), as forward_backward assumes.
    mine = slice(rank * per_rank * accum, (rank + 1) * per_rank * accum)
    img, txt = images[mine], texts[mine]
    grp = (torch.arange(len(images)) % groups_mod)[mine] if groups_mod else None
    micro = [
        (img[j * per_rank : (j + 1) * per_rank], txt[j * per_rank : (j + 1) * per_rank])
        + ((grp[j * per_rank : (j + 1) * per_rank],) if grp is not None else ())
        for j in range(accum)
    ]
    loss = forward_backward(
        model,
        micro,
        ContrastiveLoss(kind, local_loss=local_loss, gather_grad=gather_grad, gather_dtype=gather_dtype),
        no_sync=model.no_sync,
    )
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world_size, "grads": grads_of(model.module)}, out)
    dist.destroy_process_group()


def no_transform(image):
    return torch.zeros(1)


def no_tokenizer(texts):
    return torch.zeros(len(texts))


def epoch_steps(rank: int, world_size: int, port: int, out: str, shard_dir: str, batch_size: int, workers: int) -> None:
    """Iterates one epoch-mode epoch with a collective per batch (as DDP would) and records the keys seen."""
    import json

    from clipkit.data.pipeline import Source, TrainStream, train_loader
    from clipkit.data.shards import expand_shards

    init(rank, world_size, port)
    urls = expand_shards(f"{shard_dir}/*.tar")
    stream = TrainStream(
        [Source(tuple(urls))],
        batch_size,
        no_transform,
        no_tokenizer,
        rank=rank,
        world_size=world_size,
        seed=3,
        resampled=False,
        shuffle_size=0,
    )
    keys, steps = [], 0
    for batch in train_loader(stream, workers):
        dist.all_reduce(torch.ones(1))  # a rank with fewer batches would leave the other waiting here forever
        keys.extend(batch["key"])
        steps += 1
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps({"steps": steps, "keys": keys}))
    dist.barrier()
    dist.destroy_process_group()


def slip_global_views(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same [n, 2, 3, 16, 16] views on every process (each takes its slice)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)


def slip_model_and_head(model_cfg: dict, dtype: torch.dtype = torch.float64):
    from clipkit.objectives import SlipHead

    model = make_model(model_cfg, "clip", dtype)
    torch.manual_seed(1)
    return model, SlipHead(model_cfg["embed_dim"], 16, 8).to(dtype).train()


def slip_grads(rank: int, world_size: int, port: int, out: str, model_cfg: dict, per_rank: int) -> None:
    """One step of CLIP + SLIP under DDP (model and head wrapped, as Accelerate does): loss parts and gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clipkit.loss import ContrastiveLoss
    from clipkit.objectives import SlipObjective
    from clipkit.step import MicroBatch, forward_backward

    init(rank, world_size, port)
    model, head = slip_model_and_head(model_cfg)
    model, head = DDP(model), DDP(head)
    images, texts = global_batch(world_size * per_rank)
    views = slip_global_views(world_size * per_rank)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    objective = SlipObjective(head, 0.5, 0.2)
    mb = MicroBatch(images[mine], texts[mine], extras={"views": views[mine]})
    loss = forward_backward(model, [mb], ContrastiveLoss("clip"), objectives=[objective])
    parts = torch.stack([loss, objective.last])
    dist.all_reduce(parts)
    if rank == 0:
        grads = {**grads_of(model.module), **{f"head.{k}": v for k, v in grads_of(head.module).items()}}
        torch.save({"loss": parts / world_size, "grads": grads}, out)
    dist.destroy_process_group()
