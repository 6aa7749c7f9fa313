"""The tiny CoCa of tests/test_coca.py and its gloo worker, kept light so that spawned processes import little."""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.distributed as dist

from clipkit.config import ModelCfg
from clipkit.loss import ContrastiveLoss
from clipkit.models.factory import build_model, resolve_config
from clipkit.objectives.caption import CaptionObjective
from clipkit.step import MicroBatch, forward_backward
from tests.conftest import TINY_MODEL

# A tiny but real open_clip CoCa: the tiny CLIP towers, an attentional pooler giving 4 image tokens of width
# embed_dim, and a one-layer decoder over the CLIP BPE vocabulary.
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {**TINY_MODEL["vision_cfg"], "attentional_pool": True, "attn_pooler_queries": 5,
                   "attn_pooler_heads": 2},
    "text_cfg": {**TINY_MODEL["text_cfg"], "embed_cls": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
WORDS = ["red", "blue", "cat", "dog", "tree", "car", "sun", "moon"]


def coca(dtype=torch.float64):
    torch.manual_seed(0)
    return build_model(resolve_config(ModelCfg(config=copy.deepcopy(TINY_COCA)))["model_cfg"]).to(dtype)


def batch(n: int, dtype=torch.float64):
    """[n] images and captions of different lengths (so that micro-batches hold different token counts)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    texts = [" ".join(WORDS[(i * 3 + j) % 8] for j in range(1 + i % 5)) for i in range(n)]
    return images, open_clip.SimpleTokenizer(context_length=16)(texts)


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def two_process_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """This rank's 2 micro-batches of 2 samples under DDP (gloo); rank 0 saves loss, caption loss and gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.dist_workers import init

    init(rank, world_size, port)
    model = DDP(coca().train())
    images, texts = batch(8)
    mine = slice(rank * 4, (rank + 1) * 4)
    images, texts = images[mine], texts[mine]
    micro = [MicroBatch(images[:2], texts[:2]), MicroBatch(images[2:], texts[2:])]
    obj = CaptionObjective(2.0)
    loss = forward_backward(model, micro, ContrastiveLoss("clip"), no_sync=model.no_sync, objectives=[obj])
    parts = torch.stack([loss, obj.last])
    dist.all_reduce(parts)
    if rank == 0:
        torch.save({"parts": parts / world_size, "grads": grads(model.module)}, out)
    dist.destroy_process_group()
