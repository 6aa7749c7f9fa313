"""Several real processes (gloo on CPU) against one process: the loss across processes must be exact.

2 processes x batch b vs 1 process x batch 2b, same data and init: loss and every gradient equal (fp64), for the
CLIP and SigLIP losses, with and without feature-cached accumulation; and the data stream never hangs.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from clipkit.loss import ContrastiveLoss
from clipkit.step import forward_backward
from tests import dist_workers

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, start_method="spawn", join=True)


def single_process(
    model_cfg: dict, kind: str, n: int, accum: int = 1, dtype: torch.dtype = torch.float64, groups_mod: int = 0
):
    model = dist_workers.make_model(model_cfg, kind, dtype)
    images, texts = dist_workers.global_batch(n, dtype=dtype)
    m = n // accum
    groups = (torch.arange(n) % groups_mod,) if groups_mod else ()
    micro = [tuple(x[j * m : (j + 1) * m] for x in (images, texts, *groups)) for j in range(accum)]
    loss = forward_backward(model, micro, ContrastiveLoss(kind))
    return loss, dist_workers.grads_of(model)


def assert_same(ref_loss, ref, got, atol=1e-10):
    assert torch.allclose(got["loss"], ref_loss, atol=atol, rtol=0), (got["loss"].item(), ref_loss.item())
    assert got["grads"].keys() == ref.keys() and "logit_scale" in ref
    worst = max((got["grads"][k] - ref[k]).abs().max().item() for k in ref)
    assert worst < atol, f"max abs gradient difference {worst:.3e}"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_cfg, kind):
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, kind, 4, 1, True)
    ref_loss, ref = single_process(tiny_model_cfg, kind, 8)
    assert_same(ref_loss, ref, torch.load(out))


def test_two_processes_with_accumulation_equal_one_big_batch(tmp_path, tiny_model_cfg):
    """2 processes x K=4 micro-batches of 2 == 1 process x 16, logit scale included."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, "clip", 2, 4, True)
    ref_loss, ref = single_process(tiny_model_cfg, "clip", 16)
    assert_same(ref_loss, ref, torch.load(out))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_multi_positive_two_processes_with_accumulation_equal_one_big_batch(tmp_path, tiny_model_cfg, kind):
    """Groups spanning processes and micro-batches (i % 3): 2 processes x K=2 x 2 == 1 process x 8, exactly."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, kind, 2, 2, True, torch.float64, None, True, 3)
    ref_loss, ref = single_process(tiny_model_cfg, kind, 8, groups_mod=3)
    plain_loss, _ = single_process(tiny_model_cfg, kind, 8)
    assert (ref_loss - plain_loss).abs() > 1e-6
    assert_same(ref_loss, ref, torch.load(out))


def test_two_processes_fp32(tmp_path, tiny_model_cfg):
    """The same equality in fp32, where only rounding differs (summation order of the all-reduce)."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, "clip", 4, 1, True, torch.float32)
    ref_loss, ref = single_process(tiny_model_cfg, "clip", 8, dtype=torch.float32)
    assert_same(ref_loss, ref, torch.load(out), atol=1e-5)


def test_bf16_gather_is_close_but_not_exact(tmp_path, tiny_model_cfg):
    """Casting features to bf16 for the exchange halves its bytes; the gradient moves by bf16 rounding only."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, "clip", 4, 1, True, torch.float32, torch.bfloat16)
    ref_loss, ref = single_process(tiny_model_cfg, "clip", 8, dtype=torch.float32)
    got = torch.load(out)
    assert abs(got["loss"].item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
    for k in ref:
        scale = ref[k].abs().max().item() + 1e-12
        assert (got["grads"][k] - ref[k]).abs().max().item() < 0.05 * scale, k


def test_gather_without_grad_is_wrong(tmp_path, tiny_model_cfg):
    """open_clip's default (gathered copies without gradient) does NOT give the big-batch gradient."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, "clip", 4, 1, False)
    ref_loss, ref = single_process(tiny_model_cfg, "clip", 8)
    got = torch.load(out)
    assert torch.allclose(got["loss"], ref_loss, atol=1e-10)  # the loss value is the same...
    tower = "visual.conv1.weight"
    assert not torch.allclose(got["grads"][tower], ref[tower], atol=1e-6)  # ...its encoder gradient is not


def test_global_loss_without_grad_gather_gives_towers_one_over_w(tmp_path, tiny_model_cfg):
    """open_clip's default (global loss, no-grad gather): the towers get exactly 1/W of the true gradient."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, "clip", 4, 1, False, torch.float64, None, False)
    ref_loss, ref = single_process(tiny_model_cfg, "clip", 8)
    got = torch.load(out)
    for name in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        assert torch.allclose(got["grads"][name] * 2, ref[name], atol=1e-10), name
    assert torch.allclose(got["grads"]["logit_scale"], ref["logit_scale"], atol=1e-10)  # its own param: exact


def test_global_loss_with_grad_gather_is_exact(tmp_path, tiny_model_cfg):
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.contrastive_grads, 2, out, tiny_model_cfg, "clip", 4, 1, True, torch.float64, None, False)
    ref_loss, ref = single_process(tiny_model_cfg, "clip", 8)
    assert_same(ref_loss, ref, torch.load(out))


def _write_uneven_shards(root, sizes):
    from clipkit.data.shards import write_shards

    i = 0
    for s, n in enumerate(sizes):
        samples = [{"__key__": f"s{s}_{j:03d}", "txt": "x", "png": _PNG, "json": {}} for j in range(n)]
        write_shards(samples, root, f"part{s}", maxcount=10_000)
        i += n
    return i


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


_PNG = _tiny_png()


def test_uneven_shards_never_hang_and_give_equal_steps(tmp_path):
    """Shards of 37, 5, 20 and 3 samples over 2 processes x 1 worker: equal step counts, no hang."""
    total = _write_uneven_shards(tmp_path, [37, 5, 20, 3])
    out = str(tmp_path / "keys")
    spawn(dist_workers.epoch_steps, 2, out, str(tmp_path), 4, 1)
    runs = [json.loads((tmp_path / f"keys.{r}.json").read_text()) for r in range(2)]
    assert runs[0]["steps"] == runs[1]["steps"] == total // (2 * 1 * 4)


def test_even_epoch_sees_every_sample_exactly_once(tmp_path):
    """8 shards of 12 samples, 2 processes x 2 workers, batch 3: the multiset of keys equals the dataset."""
    _write_uneven_shards(tmp_path, [12] * 8)
    out = str(tmp_path / "keys")
    spawn(dist_workers.epoch_steps, 2, out, str(tmp_path), 3, 2)
    keys = [k for r in range(2) for k in json.loads((tmp_path / f"keys.{r}.json").read_text())["keys"]]
    expected = [f"s{s}_{j:03d}" for s in range(8) for j in range(12)]
    assert sorted(keys) == sorted(expected)
