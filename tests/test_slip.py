"""SLIP (train.slip): the NT-Xent loss, its exactness across processes, the views, and `clipkit train` with it on.

Unit: NT-Xent on hand-computed features and against a naive loop over the 2N anchors. Reference: 2 gloo processes
x 3 images vs 1 process x 6 images, CLIP + SLIP in one step through `forward_backward`: same losses and gradients
(fp64). Smoke: `clipkit train` on the digits shards with SLIP on: loss/slip logged, the model folder loads in
open_clip without the head, and a run stopped at step 2 and resumed ends bitwise equal to a straight run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipkit.cli import main
from clipkit.config import RecipeError, load_recipe
from clipkit.data.views import SimCLRViews
from clipkit.loss import ContrastiveLoss
from clipkit.objectives import SlipObjective, nt_xent
from clipkit.step import MicroBatch, forward_backward
from tests import dist_workers
from tests.conftest import TINY_MODEL, train_until_preempted
from tests.test_distributed import spawn

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


# ------------------------------------------------------------------------------------------------- unit


def test_nt_xent_on_orthonormal_views_is_the_hand_value():
    """Two images, each view equal to its image's unit vector, orthogonal to the other's: every anchor has its
    positive at similarity 1 and two negatives (the other image's two views) at 0, so each of the 4 anchors gives
    -log(e^(1/t) / (e^(1/t) + 2))."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = 0.5
    want = math.log(1 + 2 * math.exp(-1 / t))
    assert nt_xent(a, a.clone(), t).item() == pytest.approx(want, abs=1e-12)
    # Scaling a feature changes nothing (features are normalized); swapping the views neither.
    assert nt_xent(3 * a, a, t).item() == pytest.approx(want, abs=1e-12)


def test_nt_xent_with_a_hard_negative_is_the_hand_value():
    """Image 0's second view points at image 1: anchor a0 sees its positive b0 = a1 at similarity 0."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # b0 = b1 = a1
    e = math.e  # t = 1; similarities: a0.a1 = 0, a0.b0 = 0, a0.b1 = 0, a1.b0 = a1.b1 = 1, b0.b1 = 1
    l_a0 = -math.log(1 / (1 + 1 + 1))  # positive b0 (0); negatives a1 (0), b1 (0)
    l_a1 = -math.log(e / (e + e + 1))  # positive b1 (1); negatives a0 (0), b0 (1)
    l_b0 = -math.log(1 / (1 + e + e))  # positive a0 (0); negatives a1 (1), b1 (1)
    l_b1 = -math.log(e / (e + 1 + e))  # positive a1 (1); negatives a0 (0), b0 (1)
    assert nt_xent(a, b, 1.0).item() == pytest.approx((l_a0 + l_a1 + l_b0 + l_b1) / 4, abs=1e-12)


def naive_nt_xent(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """SimCLR's definition, one anchor at a time over the 2N views."""
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=-1).tolist()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sim = [sum(x * y for x, y in zip(z[i], z[k], strict=True)) / t for k in range(n2)]
        total -= sim[pos] - math.log(sum(math.exp(sim[k]) for k in range(n2) if k != i))
    return total / n2


def test_nt_xent_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert nt_xent(a, b, 0.1).item() == pytest.approx(naive_nt_xent(a, b, 0.1), abs=1e-10)


# -------------------------------------------------------------------------------------------- reference


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_cfg):
    """CLIP + 0.5 x SLIP through forward_backward, model and head under DDP: the same losses and every gradient
    (towers, projections, head) as one process holding all 6 images."""
    out = str(tmp_path / "r.pt")
    spawn(dist_workers.slip_grads, 2, out, tiny_model_cfg, 3)
    model, head = dist_workers.slip_model_and_head(tiny_model_cfg)
    images, texts = dist_workers.global_batch(6)
    objective = SlipObjective(head, 0.5, 0.2)
    mb = MicroBatch(images, texts, extras={"views": dist_workers.slip_global_views(6)})
    loss = forward_backward(model, [mb], ContrastiveLoss("clip"), objectives=[objective])
    ref = {**dist_workers.grads_of(model), **{f"head.{k}": v for k, v in dist_workers.grads_of(head).items()}}
    got = torch.load(out)
    assert torch.allclose(got["loss"], torch.stack([loss, objective.last]), atol=1e-12, rtol=0)
    assert got["grads"].keys() == ref.keys() and "head.0.weight" in ref and "visual.conv1.weight" in ref
    worst = max((got["grads"][k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-10, f"max abs gradient difference {worst:.3e}"


# ---------------------------------------------------------------------------------------------- views


def test_views_are_two_different_draws_reproduced_by_the_seed():
    views = SimCLRViews(size=(16, 16))
    image = torch.randint(0, 256, (3, 40, 30), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = views(image, torch.Generator().manual_seed(5))
    b = views(image, torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    x = views.normalize(a)
    assert x.dtype == torch.float32 and x.shape == a.shape


@pytest.mark.parametrize("fast", [True, False], ids=["fast-images", "plain-transform"])
def test_stream_views_leave_the_rest_of_the_batch_unchanged(digits_dir, fast):
    """Views draw from their own generator: images, captions and keys are those of the stream without views."""
    from clipkit.config import ModelCfg, SlipAugmentCfg
    from clipkit.data.pipeline import Source, TrainStream
    from clipkit.data.shards import expand_shards
    from clipkit.models.factory import bundle_from_config, resolve_config

    config = resolve_config(ModelCfg(config=TINY_MODEL))
    bundle = bundle_from_config(config)
    urls = tuple(expand_shards(str(digits_dir / "train-*.tar")))

    def first(views, on_device=False):
        stream = TrainStream(
            [Source(urls)], 4, bundle.train_transform, bundle.tokenizer, seed=1, fast=fast, views=views,
            normalize_on_device=on_device,
        )  # fmt: skip
        return stream, next(iter(stream))

    views = SimCLRViews.of(SlipAugmentCfg(), config["preprocess_cfg"])
    _, plain = first(None)
    _, with_views = first(views)
    assert with_views["views"].shape == (4, 2, 3, 16, 16) and with_views["views"].dtype == torch.float32
    assert torch.equal(plain["image"], with_views["image"]) and torch.equal(plain["text"], with_views["text"])
    assert plain["key"] == with_views["key"]
    stream, raw = first(views, on_device=True)  # GPU training: uint8 through the queues, normalized on the device
    assert raw["views"].dtype == torch.uint8 and torch.equal(stream.finish_views(raw["views"]), with_views["views"])


# ------------------------------------------------------------------------------------------------ smoke


def write_recipe(path: Path, data_root: Path, **slip) -> Path:
    recipe = {
        "name": "slip",
        "data_root": str(data_root),
        "model": {"config": TINY_MODEL},
        "data": {"sources": [{"shards": "train-*.tar"}], "batch_size": 8, "workers": 1, "shuffle_buffer": 50},
        "train": {
            "steps": 4,
            "warmup": 1,
            "lr": 1e-3,
            "log_every": 1,
            "checkpoint_every": 2,
            "slip": {"weight": 1.0, "head_hidden": 32, "head_out": 16, **slip},
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, digits_dir):
    root = tmp_path_factory.mktemp("slip")
    recipe = write_recipe(root / "r.yaml", digits_dir)
    assert main(["train", str(recipe), "--out", str(root / "run")]) == 0
    return recipe, root / "run"


def slip_rows(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/slip"] for r in rows if "loss/slip" in r]


def test_train_logs_slip_and_exports_an_open_clip_folder_without_the_head(straight_run):
    import open_clip

    _, run = straight_run
    losses = slip_rows(run)
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    assert losses[0] == pytest.approx(math.log(2 * 8 - 1), abs=0.5)  # ~log(2N - 1) before learning
    weights = load_file(str(run / "model" / "open_clip_model.safetensors"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'model'}")
    assert set(weights) == set(model.state_dict())  # nothing but the CLIP model
    head = load_file(str(run / "checkpoints/step-00000004/state/model_1.safetensors"))
    assert set(head) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}


def test_preempted_and_resumed_equals_uninterrupted(tmp_path, straight_run, monkeypatch):
    """Stopped after step 2 and resumed: model, head and every loss row bitwise those of the straight run."""
    recipe, straight = straight_run
    run = tmp_path / "run"
    train_until_preempted(recipe, run, 2, monkeypatch)
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest"]) == 0
    for f in ("model/open_clip_model.safetensors", "checkpoints/step-00000004/state/model_1.safetensors"):
        a, b = load_file(str(run / f)), load_file(str(straight / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert slip_rows(run) == slip_rows(straight)


def test_resume_with_changed_slip_settings_is_refused(straight_run, capsys):
    recipe, run = straight_run
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest", "train.slip.temperature=0.2"]) == 2
    assert "train.slip.temperature: 0.1 in recipe.yaml -> 0.2 now" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- config

BAD = [
    (["train.slip.wieght=1"], "train.slip.wieght"),
    (["train.slip.weight=-1"], "train.slip.weight"),
    (["train.slip.temperature=0"], "train.slip.temperature"),
    (["train.slip.head_hidden=0"], "train.slip.head_hidden"),
    (["train.slip.head_out=1.5"], "train.slip.head_out"),
    (["train.slip.augment.scale=[0.5, 0.2]"], "train.slip.augment.scale"),
    (["train.slip.augment.color_jitter=[0.4, 0.4, 0.4, 0.7]"], "train.slip.augment.color_jitter"),
    (["train.slip.augment.gray_scale_prob=1.5"], "train.slip.augment.gray_scale_prob"),
    (["train.slip.augment.flip_prob=-0.1"], "train.slip.augment.flip_prob"),
    (["train.slip.weight=1", "model.lock_image=true"], "train.slip.weight"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o[0]) for o in BAD])
def test_bad_slip_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(QUICKSTART, overrides)
    assert str(e.value).startswith(key)


def test_accumulation_with_slip_is_refused_and_allowed_without():
    with pytest.raises(RecipeError, match=r"^train.accum_freq: 2 cannot be used with train.slip"):
        load_recipe(QUICKSTART, ["train.slip.weight=1", "train.accum_freq=2"])
    assert load_recipe(QUICKSTART, ["train.accum_freq=2"]).train.slip.weight == 0  # off by default
    r = load_recipe(QUICKSTART, ["train.slip.weight=0.5"])
    assert (r.train.slip.temperature, r.train.slip.augment.scale) == (0.1, (0.08, 1.0))
