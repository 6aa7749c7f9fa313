"""Benchmarks: a tiny smoke of every tools/bench script (each prints or writes its ratio), and the speed work they
measure: the fast image path against open_clip's transform, the device-side non-finite skip, compiled training.

The real benchmarks (minutes, timed under a lock) are run by hand; see docs/benchmarks.md.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from clipkit.cli import main
from clipkit.data.pipeline import FastCrop, decode_image
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str, timeout: int = 300) -> str:
    """Runs `python -m tools.bench.<module>` from the repository root, as docs/benchmarks.md does."""
    proc = subprocess.run([sys.executable, "-m", f"tools.bench.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def photos(tmp_path_factory, digits_dir):
    """Eight small JPEG "photos" composed from the real digits images."""
    out = tmp_path_factory.mktemp("photos")
    run_tool("make_photo_shards", "--source", str(digits_dir / "train-*.tar"), "--out", str(out), "--n", "8",
             "--per-shard", "4", "--min-side", "64", "--max-side", "96")  # fmt: skip
    return out


def test_make_photo_shards_writes_captioned_jpegs(photos):
    stats = json.loads((photos / "stats.json").read_text())
    assert stats["photos"] == 8 and stats["shards"] == 2 and 64 <= stats["mean_width"] <= 96
    assert json.loads((photos / "sizes.json").read_text()) == {"photos-000000.tar": 4, "photos-000001.tar": 4}


@pytest.mark.slow  # ~20 s; the same harness as bench_train's smoke
def test_bench_loader_prints_a_ratio(photos, tmp_path):
    out = run_tool("bench_loader", "--data", str(photos / "photos-*.tar"), "--batch", "4", "--batches", "2",
                   "--skip", "1", "--pairs", "1", "--workers", "0", "--lock", "",
                   "--json", str(tmp_path / "l.json"))  # fmt: skip
    assert re.search(r"loader ratio clipkit/open_clip_train \(median of 1\): \d+\.\d+", out), out
    result = json.loads((tmp_path / "l.json").read_text())
    shapes = result["pairs"][0]["last_batch"]
    assert shapes["clipkit"] == shapes["open_clip"] == [[4, 3, 224, 224], "torch.float32", [4, 32]]


def test_bench_train_prints_ratio_and_mfu_and_plots(photos, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_MODEL))
    out = run_tool("bench_train", "--model-config", str(cfg), "--data", str(photos / "photos-*.tar"), "--batch",
                   "4,8", "--steps", "4", "--skip", "1", "--warmup", "1", "--pairs", "1", "--workers", "0", "--lock",
                   "", "--json", str(tmp_path / "t.json"))  # fmt: skip
    assert re.search(r"ratio clipkit/open_clip_train at batch 8 \(median of 1\): \d+\.\d+", out), out
    assert re.search(r"clipkit [\d.]+ samples/s \(MFU [\d.]+%\), open_clip_train [\d.]+ samples/s \(MFU", out), out
    result = json.loads((tmp_path / "t.json").read_text())
    assert [r["batch"] for r in result["results"]] == [4, 8] and result["results"][0]["flops_per_sample"] > 0
    for by in ("batch", "flops"):
        run_tool("plot_throughput", str(tmp_path / "t.json"), "--by", by, "--out", str(tmp_path / f"{by}.png"))
        assert Image.open(tmp_path / f"{by}.png").size[0] > 100


def test_variant_specs_take_overrides_with_or_without_another_code_copy():
    from tools.bench.bench_variants import parse_variant

    assert parse_variant("fast=") == ("fast", [], None)
    assert parse_variant("pil=data.fast_images=false train.steps=3") == (
        "pil", ["data.fast_images=false", "train.steps=3"], None)  # fmt: skip
    assert parse_variant("before=@/tmp/base") == ("before", [], "/tmp/base")
    assert parse_variant("before=@/tmp/base train.precision=bf16") == ("before", ["train.precision=bf16"], "/tmp/base")


@pytest.mark.slow  # ~50 s; test_bench_train_prints_ratio_and_mfu_and_plots smokes the bench harness
def test_bench_variants_optim_step_and_stages_print_their_figures(photos, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_MODEL))
    out = run_tool("bench_variants", "--model-config", str(cfg), "--data", str(photos / "photos-*.tar"),
                   "--batch", "4", "--steps", "3", "--skip", "1", "--warmup", "1", "--rounds", "1", "--workers", "0",
                   "--lock", "", "--variant", "fast=", "--variant", "pil=data.fast_images=false")  # fmt: skip
    assert re.search(r"pil: median [\d.]+ samples/s \[[\d.]+\] \(MFU [\d.]+%\); x\d+\.\d+ of fast", out), out
    out = run_tool("bench_optim", "--model-config", str(cfg), "--rounds", "1", "--steps", "1", "--lock", "")
    assert re.search(r"fused: [\d.]+ ms a step", out), out
    out = run_tool("bench_patch_dropout", "--model-config", str(cfg), "--batch", "4", "--rounds", "1", "--steps", "1",
                   "--lock", "")  # fmt: skip
    assert re.search(r"patch_dropout 0.5: [\d.]+ samples/s, [\d.]+x p=0$", out, re.M), out
    out = run_tool("bench_precision", "--model-config", str(cfg), "--batch", "4", "--rounds", "1", "--steps", "1",
                   "--lock", "")  # fmt: skip
    assert re.search(r"^bf16: [\d.]+ samples/s, [\d.]+x fp32$", out, re.M), out
    out = run_tool("bench_step", "--model-config", str(cfg), "--batch", "4", "--repeats", "1", "--profile", "3",
                   "--lock", "")  # fmt: skip
    assert re.search(r"tiny: [\d.]+ ms a step of 4, [\d.]+ ms a sample, [\d.]+ samples/s, MFU [\d.]+%", out), out
    assert len(re.findall(r"^  \S.* +[\d.]+ ms a step \(\d+ calls\)$", out, re.M)) == 3, out  # any op kind
    out = run_tool("bench_stages", "--data", str(photos / "photos-*.tar"), "--n", "8", "--repeats", "1", "--lock", "")
    assert re.search(r"sum, open_clip_train stages: [\d.]+ ms; clipkit stages .*: [\d.]+ ms an image", out), out


# --------------------------------------------------------------------------------------- the fast image path


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=size[::-1], mode="bilinear")
    img = Image.fromarray((smooth[0].permute(1, 2, 0) * 255).byte().numpy())
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_fast_crop_matches_open_clips_training_transform():
    transform = open_clip.image_transform(64, is_train=True)
    fast = FastCrop.of(transform)
    assert fast is not None and fast.size == (64, 64)
    for i, size in enumerate([(80, 70), (100, 150), (300, 280)]):  # the last one is decoded at 1/4 size
        sample = {"__key__": "x", "jpg": jpeg(size, i)}
        torch.manual_seed(i)
        ref = transform(decode_image(sample))
        torch.manual_seed(i)
        pixels = fast(sample)
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
        got = fast.normalize(pixels[None])[0]
        assert got.shape == ref.shape and got.dtype == torch.float32
        # Same crop and interpolation: mean difference well under one 8-bit level (1/255/std ~ 0.015).
        assert (got - ref).abs().mean() < (0.01 if size[0] < 128 else 0.03), size


def test_fast_crop_only_takes_the_plain_transform():
    assert FastCrop.of(open_clip.image_transform(64, is_train=False)) is None  # eval: resize + center crop
    aug = {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 1.0}
    jitter = open_clip.image_transform(64, is_train=True, aug_cfg=aug)
    assert FastCrop.of(jitter) is None
    assert FastCrop.of(lambda img: img) is None


# ------------------------------------------------------------------------------------ the training loop's syncs


def test_fused_adamw_found_inf_skips_the_step_bitwise():
    """The device-side skip of a non-finite step leaves weights and optimizer state exactly as they were."""
    from clipkit.optim import NonFiniteGuard, make_optimizer
    from clipkit.stopping import TrainingStopped

    model = torch.nn.Linear(4, 3)
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.98), 1e-6)
    guard = NonFiniteGuard(opt, torch.device("cpu"), max_in_a_row=2)
    assert guard.on_device and opt.defaults["fused"]
    for bad in (False, True):
        model(torch.randn(2, 4)).sum().backward()
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state.items()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) * (float("nan") if bad else 1.0)
        guard.step(opt, norm)
        same = all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert same == bad and all(p.grad is None for p in model.parameters())
        if bad:
            assert all(torch.equal(state[k][n], t) for k, s in opt.state.items() for n, t in s.items())
    assert guard.sync(2, Path(".")) == 1
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        guard.step(opt, torch.tensor(float("inf")))
    with pytest.raises(TrainingStopped, match="3 steps in a row"):  # the streak goes on across syncs
        guard.sync(4, Path("."))


@pytest.mark.slow
def test_compiled_training_saves_plain_keys(tmp_path, digits_dir):
    """train.compile: the compiled model trains; checkpoints and the model folder have open_clip's own keys."""
    recipe = {
        "name": "compiled",
        "data_root": str(digits_dir),
        "model": {"config": TINY_MODEL},
        "data": {"sources": [{"shards": "train-*.tar"}], "batch_size": 8, "workers": 0},
        "train": {"steps": 3, "warmup": 1, "log_every": 1, "checkpoint_every": 2, "compile": True},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    keys = set(load_file(str(tmp_path / "run/model/open_clip_model.safetensors")))
    assert keys == set(open_clip.CLIP(**TINY_MODEL).state_dict()) and not any("_orig_mod" in k for k in keys)
    assert (tmp_path / "run/checkpoints/step-00000002/COMPLETE").exists()


def test_docs_table_holds_every_measured_configuration_rounded_from_its_json():
    """docs/benchmarks.md shows each row `python -m tools.bench.report` prints from docs/bench/*.json, unedited."""
    from tools.bench.report import ROWS, table

    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    rows = table(ROOT / "docs" / "bench").splitlines()
    assert len(rows) == 2 + len(ROWS), "a JSON file of the table is missing from docs/bench"
    missing = [r for r in rows if r not in doc]
    assert not missing, f"not in docs/benchmarks.md: {missing}"
