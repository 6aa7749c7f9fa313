"""`clipkit finetune` and the classification reports, on the real digits shards with a tiny real open_clip model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.neighbors import NearestCentroid

from clipkit.cli import main
from clipkit.config import ModelCfg, load_finetune_recipe
from clipkit.data.pipeline import read_tar_samples
from clipkit.data.shards import expand_shards, write_shards
from clipkit.evaluate.classification import report_dict
from clipkit.finetune import finetune
from clipkit.finetune.head import HEAD_NAME, load_head
from clipkit.finetune.wise import interpolate
from clipkit.loss import ContrastiveLoss, clip_loss_rows
from clipkit.models import create_model, save_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    bundle = create_model(ModelCfg(config=TINY_MODEL))
    return save_model(tmp_path_factory.mktemp("tiny") / "model", bundle.model, bundle.config)


def _recipe(tmp_path: Path, digits_dir: Path, model: Path, **finetune) -> Path:
    section = {
        "model": str(model),
        "train": "train-*.tar",
        "classnames": "classnames.txt",
        "templates": "templates.txt",
        "eval_sets": [{"name": "test", "shards": "test-*.tar"}],
        "steps": 4,
        "batch_size": 32,
        "warmup": 1,
        "lr": 1e-3,
        "eval_every": 2,
        "wise_alphas": [0.0, 1.0],
        "linear_c_grid": [1.0],
        "log_every": 2,
        **finetune,
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "t", "data_root": str(digits_dir), "finetune": section}))
    return path


# ------------------------------------------------------------------------------------------------ reports


def test_report_numbers_equal_sklearn():
    """report_dict on real predictions (a logistic regression on the real digits) equals sklearn's metrics."""
    x, y = load_digits(return_X_y=True)
    clf = NearestCentroid().fit(x[:900], y[:900])  # real predictions with errors in most classes
    pred = clf.predict(x[900:])
    names = [f"digit {i}" for i in range(10)]
    report = report_dict(y[900:], pred, names)
    p, r, f, s = precision_recall_fscore_support(y[900:], pred, labels=range(10), zero_division=0)
    for i, name in enumerate(names):
        row = report["classes"][name]
        assert (row["precision"], row["recall"], row["f1-score"], row["support"]) == (p[i], r[i], f[i], s[i])
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y[900:], pred, average=avg, zero_division=0)
        assert (report[f"{avg} avg"]["precision"], report[f"{avg} avg"]["recall"]) == (p, r)
        assert report[f"{avg} avg"]["f1-score"] == f
    assert report["accuracy"] == accuracy_score(y[900:], pred) < 1.0


def test_eval_zeroshot_report_agrees_with_its_metrics(digits_dir, tiny_folder, tmp_path):
    out = tmp_path / "zs.json"
    files = ["--classnames", str(digits_dir / "classnames.txt"), "--templates", str(digits_dir / "templates.txt")]
    rc = main(["eval", "zeroshot", "--checkpoint", str(tiny_folder), "--data", str(digits_dir / "test-*.tar"), *files,
               "--workers", "0", "--out", str(out), "--report", str(tmp_path / "rep"),
               "--dataset", "digits"])  # fmt: skip
    assert rc == 0
    metrics = json.loads(out.read_text())["metrics"]
    report = json.loads((tmp_path / "rep" / "digits.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["acc1"], abs=1e-12)
    assert report["macro avg"]["recall"] == pytest.approx(metrics["mean_per_class_recall"], abs=1e-12)
    assert report["n_samples"] == metrics["n_samples"]
    assert (tmp_path / "rep" / "digits_confusion.png").stat().st_size > 1000
    assert "| macro avg |" in (tmp_path / "rep" / "digits.md").read_text()


# ------------------------------------------------------------------------------------------- pieces


def test_flyp_loss_excludes_same_class_pairs():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    exclude = (labels[:, None] == labels[None, :]) & ~torch.eye(6, dtype=torch.bool)
    # No exclusion: ContrastiveLoss's own value.
    assert clip_loss_rows(img, txt, img, txt, scale, exclude=None) == ContrastiveLoss()(img, txt, scale)
    # By hand: each row's softmax runs over its positive and the other classes' columns only.
    want = 0.0
    for i in range(6):
        keep = [j for j in range(6) if j == i or labels[j] != labels[i]]
        for a, b in ((img, txt), (txt, img)):
            logits = scale * a[i] @ b[keep].T
            want += -(logits[keep.index(i)] - torch.logsumexp(logits, 0)) / 12
    assert torch.allclose(clip_loss_rows(img, txt, img, txt, scale, exclude=exclude), want, atol=1e-12)


def test_wise_interpolation_ends_exact_and_linear():
    zs = {"w": torch.randn(4, 3), "n": torch.tensor(3)}
    ft = {"w": torch.randn(4, 3), "n": torch.tensor(5)}
    assert torch.equal(interpolate(zs, ft, 0.0)["w"], zs["w"]) and torch.equal(interpolate(zs, ft, 1.0)["w"], ft["w"])
    assert torch.allclose(interpolate(zs, ft, 0.3)["w"], 0.7 * zs["w"] + 0.3 * ft["w"], atol=1e-6)
    assert interpolate(zs, ft, 0.3)["n"] == 5  # integer buffers are not mixed


def test_augment_flips_and_shifts_by_hand():
    from clipkit.finetune.loop import augment

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    flips = torch.rand(2, generator=torch.Generator().manual_seed(0)) < 0.5
    out = augment(x, flip=True, pad=0, generator=g)
    for i in range(2):
        assert torch.equal(out[i], x[i].flip(-1) if flips[i] else x[i])

    # A shift by (dy, dx) of the edge-padded image: pixel (r, c) comes from (clamp(r + dy - p), clamp(c + dx - p)).
    g, p = torch.Generator().manual_seed(3), 2
    dy, dx = torch.randint(0, 2 * p + 1, (2, 2), generator=torch.Generator().manual_seed(3)).tolist()
    out = augment(x, flip=False, pad=p, generator=g)
    for i in range(2):
        rows = [min(max(r + dy[i] - p, 0), 3) for r in range(4)]
        cols = [min(max(c + dx[i] - p, 0), 3) for c in range(4)]
        assert torch.equal(out[i], x[i][:, rows][:, :, cols]), (dy[i], dx[i])
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_early_stopping_counts_patience_from_its_start_step():
    from clipkit.finetune.early_stop import EarlyStopping

    module = torch.nn.Linear(1, 1)
    accs = {0: 0.8, 100: 0.7, 200: 0.75, 300: 0.79, 400: 0.85, 500: 0.84, 600: 0.83}
    plain, late = EarlyStopping("accuracy", patience=2), EarlyStopping("accuracy", patience=2, start=300)
    stops = {name: [s for s, a in accs.items() if es.update(s, {"accuracy": a}, module)]
             for name, es in (("plain", plain), ("late", late))}  # fmt: skip
    assert stops["plain"][0] == 200  # two evaluations below step 0's 0.8: stops inside the dip
    assert stops["late"][0] == 600  # the dip does not count; 500 and 600 fall short of step 400's 0.85
    assert late.best_step == 400 and late.best_value == 0.85
    assert late.status(600) == "best accuracy 0.8500 at step 400, 2/2 without improvement"
    dip = EarlyStopping("accuracy", patience=2, start=300)
    dip.update(0, {"accuracy": 0.8}, module), dip.update(100, {"accuracy": 0.7}, module)
    assert dip.status(100) == "best accuracy 0.8000 at step 0, patience counts from step 300"


def test_augmentation_refused_for_linear(digits_dir, tiny_folder, tmp_path):
    with pytest.raises(Exception, match="finetune.flip"):
        load_finetune_recipe(_recipe(tmp_path, digits_dir, tiny_folder, mode="linear", flip=True))


@pytest.mark.parametrize(
    ("mode", "key", "value"), [("flyp", "label_smoothing", 0.1), ("ce", "label_smoothing", 1.0), ("linear", "ema", 0.9),
                               ("ce", "ema", 1.0), ("flyp", "mixup", 0.2), ("linear", "cutmix", 1.0)],
)  # fmt: skip
def test_smoothing_and_average_refused_where_they_mean_nothing(mode, key, value, digits_dir, tiny_folder, tmp_path):
    with pytest.raises(Exception, match=f"finetune.{key}"):
        load_finetune_recipe(_recipe(tmp_path, digits_dir, tiny_folder, mode=mode, **{key: value}))


def test_smoothed_loss_curve_by_hand():
    from clipkit.finetune.plots import smooth

    assert smooth([1.0, 3.0], weight=0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])  # debiased EMA
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start


def test_weight_average_by_hand():
    from clipkit.finetune.ema import WeightAverage

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    average = WeightAverage([p], decay=0.5)
    for value in ([3.0, 2.0], [5.0, 0.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        average.update()
    # avg = 0.5 * (0.5 * [1, -2] + 0.5 * [3, 2]) + 0.5 * [5, 0] = [3.5, 0]
    with average.swapped_in():
        assert torch.equal(p.detach(), torch.tensor([3.5, 0.0]))
    assert torch.equal(p.detach(), torch.tensor([5.0, 0.0]))  # the trained weights are back


def test_label_smoothing_loss_by_hand(tiny_folder):
    from clipkit.finetune.modes import CrossEntropyMode
    from clipkit.models import load_model

    bundle = load_model(tiny_folder)
    head = torch.nn.Linear(bundle.model.visual.output_dim, 3)
    mode = CrossEntropyMode(bundle.model, head, label_smoothing=0.2)
    images, labels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, 1, 2])
    logp = torch.log_softmax(mode.module(images), dim=1)  # [4, 3]
    # (1 - e) * NLL of the label + e * the mean NLL over all 3 classes, averaged over the batch
    want = (0.8 * -logp[torch.arange(4), labels] + 0.2 * -logp.mean(dim=1)).mean()
    torch.testing.assert_close(mode.loss(images, labels, torch.Generator()), want)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0)])
def test_mixed_batch_loss_is_cross_entropy_against_the_mixed_target(mixup, cutmix, tiny_folder):
    """Reference: torch's cross-entropy with the soft target lam * onehot(y) + (1 - lam) * onehot(y mirrored),
    smoothed; mixup blends whole images, CutMix copies (1 - lam) of the pixels from the partner."""
    from clipkit.finetune.mix import mix_batch
    from clipkit.finetune.modes import CrossEntropyMode
    from clipkit.models import load_model

    bundle = load_model(tiny_folder)
    mode = CrossEntropyMode(bundle.model, torch.nn.Linear(bundle.model.visual.output_dim, 3), label_smoothing=0.1,
                            mixup=mixup, cutmix=cutmix)  # fmt: skip
    images, labels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, 1, 2])
    mixed, lam = mix_batch(images, mixup, cutmix, torch.Generator().manual_seed(5))
    assert 0 < lam < 1
    if cutmix:
        from_partner = (mixed == images.flip(0)) & (mixed != images)
        assert from_partner.float().mean().item() == pytest.approx(1 - lam)
    else:
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    target = (lam * onehot + (1 - lam) * onehot.flip(0)) * 0.9 + 0.1 / 3
    want = torch.nn.functional.cross_entropy(mode.module(mixed), target)
    torch.testing.assert_close(mode.loss(images, labels, torch.Generator().manual_seed(5)), want)


@pytest.mark.parametrize("mode", ["ce", "flyp"])
def test_layer_decay_rates_by_hand(mode, tiny_folder):
    """Peak lr 1e-2, decay 0.5, towers of L = 2 blocks: embeddings at lr/8, block 0 at lr/4, block 1 at lr/2, final
    norm, projection, head and logit scale at lr; the ratios hold through the warmup + cosine schedule."""
    from clipkit.finetune.layer_decay import layer_decay_groups
    from clipkit.finetune.modes import CrossEntropyMode, FlypMode
    from clipkit.models import load_model
    from clipkit.optim import make_optimizer, make_scheduler

    bundle = load_model(tiny_folder)
    if mode == "ce":
        m = CrossEntropyMode(bundle.model, torch.nn.Linear(bundle.model.visual.output_dim, 3))
    else:
        m = FlypMode(bundle.model, bundle.tokenizer, ["a", "b"], ["a {c}"], "cpu")
    groups = layer_decay_groups(m.module, 0.1, 0.5, m.tower_prefix)
    optimizer = make_optimizer(m.module, 1e-2, 0.1, (0.9, 0.999), 1e-8, groups=groups)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    want = {
        "visual.conv1.weight": 1e-2 / 8, "visual.positional_embedding": 1e-2 / 8, "visual.ln_pre.bias": 1e-2 / 8,
        "visual.transformer.resblocks.0.attn.in_proj_weight": 1e-2 / 4,
        "visual.transformer.resblocks.1.mlp.c_fc.weight": 1e-2 / 2, "visual.ln_post.weight": 1e-2,
        "visual.proj": 1e-2,
    }  # fmt: skip
    if mode == "ce":
        want = {f"model.{k}": v for k, v in want.items()} | {"head.weight": 1e-2}
    else:
        want |= {"token_embedding.weight": 1e-2 / 8, "transformer.resblocks.0.ln_1.weight": 1e-2 / 4,
                 "text_projection": 1e-2, "logit_scale": 1e-2}  # fmt: skip
    params = dict(m.module.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(want) <= trainable and {id(params[n]) for n in trainable} == set(lr_of)
    for name, lr in want.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    # the weight-decay split is the one without layer decay: matrices decay, gains, biases and the scale do not
    plain = make_optimizer(m.module, 1e-2, 0.1, (0.9, 0.999), 1e-8)
    assert decay_of == {id(p): g["weight_decay"] for g in plain.param_groups for p in g["params"]}
    scheduler = make_scheduler(optimizer, 10, 2, 1e-2, 0.0)
    for _ in range(4):
        optimizer.step(), scheduler.step()
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, lr in want.items():
        assert lrs[id(params[name])] == pytest.approx(lr * lrs[id(params[list(want)[-1]])] / want[list(want)[-1]])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("layer_decay", 0.7, "the visual tower has no numbered transformer blocks"),
     ("patch_dropout", 0.5, "only an open_clip ViT image tower drops patches")],
)  # fmt: skip
def test_vit_only_keys_refused_for_a_resnet(key, value, message, digits_dir, tmp_path):
    """Refused before any data is read (the train shards do not exist), and refused for `linear` by the recipe."""
    from clipkit.config import RecipeError

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    bundle = create_model(ModelCfg(config=cfg))
    folder = save_model(tmp_path / "rn", bundle.model, bundle.config)
    recipe = load_finetune_recipe(_recipe(tmp_path, digits_dir, folder, train="absent-*.tar", **{key: value}))
    with pytest.raises(RecipeError, match=f"finetune.{key}: {message}"):
        finetune(recipe, tmp_path / "run")
    with pytest.raises(RecipeError, match=f"finetune.{key}"):
        load_finetune_recipe(_recipe(tmp_path, digits_dir, folder, mode="linear", **{key: value}))


def test_patch_dropout_drops_tokens_in_training_only(tiny_folder):
    from clipkit.finetune.run import _set_patch_dropout
    from clipkit.models import load_model

    model = load_model(tiny_folder).model  # 16 px, patches of 8: 1 + 4 tokens
    _set_patch_dropout(model, 0.5, str(tiny_folder))
    seen = []
    model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    images = torch.randn(3, 3, 16, 16)
    model.train(), model.encode_image(images)
    model.eval(), model.encode_image(images)
    assert seen == [1 + 2, 1 + 4]  # the class token and 2 of 4 patches in training; all in evaluation


def test_test_time_flip_averages_mirror_logits(digits_dir, tiny_folder):
    from clipkit.finetune.data import LabeledImages, Pixels, read_labeled
    from clipkit.finetune.head import ImageClassifier
    from clipkit.finetune.loop import predict_logits
    from clipkit.models import load_model

    bundle = load_model(tiny_folder)
    clf = ImageClassifier(bundle.model, torch.nn.Linear(bundle.model.visual.output_dim, 10)).eval()
    pixels = Pixels(bundle.eval_transform)
    data = read_labeled(str(digits_dir / "test-*.tar"), pixels, 10, "test")
    mirrored = LabeledImages(data.pixels.flip(-1), data.labels, data.keys, data.source, {})
    plain, flipped = (predict_logits(clf, d, pixels, 64, "cpu") for d in (data, mirrored))
    assert not torch.allclose(plain, flipped)  # the tiny model is not mirror-symmetric: the test can fail
    torch.testing.assert_close(predict_logits(clf, data, pixels, 64, "cpu", flip=True), (plain + flipped) / 2)


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("ema", "precision"), [(0.0, "fp32"), (0.5, "fp32"), (0.0, "bf16")])
def test_early_stopping_restores_best_step_bitwise(ema, precision, digits_dir, tiny_folder, tmp_path):
    """With `ema`, what validation saw at the best step (the moving average) is what is restored; under bf16
    autocast the weights stay fp32 and are restored the same way."""
    recipe = load_finetune_recipe(
        _recipe(
            tmp_path,
            digits_dir,
            tiny_folder,
            steps=12,
            eval_every=1,
            patience=3,
            lr=3e-2,
            warmup=1,
            wise_alphas=[],
            ema=ema,
            precision=precision,
        )  # fmt: skip
    )
    snapshots = {}
    finetune(recipe, tmp_path / "run", on_eval=lambda step, m, module: snapshots.setdefault(
        step, {k: v.clone() for k, v in module.state_dict().items()}))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}
    best = max(val, key=lambda s: (val[s], -s))  # the first step reaching the best accuracy
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_step"] == best and summary["precision"] == precision
    assert json.loads((tmp_path / "run" / "model" / "clipkit.json").read_text())["precision"] == precision
    assert summary["stopped_early"] == (summary["steps_run"] < 12)
    assert max(val) > best, "the run went on past its best step (else restoring proves nothing)"
    saved = load_file(str(tmp_path / "run" / "model" / "open_clip_model.safetensors"))
    head = load_head(tmp_path / "run" / "model")
    for k, v in snapshots[best].items():
        got = head.state_dict()[k.removeprefix("head.")] if k.startswith("head.") else saved[k.removeprefix("model.")]
        assert torch.equal(got, v), k
    last = snapshots[max(snapshots)]
    assert any(not torch.equal(last[k], snapshots[best][k]) for k in last)


@pytest.mark.parametrize(("mode", "image_size"), [("ce", 0), ("flyp", 0), ("linear", 0), ("ce", 24)])
def test_mode_through_cli_writes_loadable_model(mode, image_size, digits_dir, tiny_folder, tmp_path):
    """The saved folder is the classifier: open_clip loads it (at the fine-tuned size) and `clipkit eval` agrees."""
    extra = {"train_head": False, "image_size": image_size} if mode == "ce" else {}
    rc = main(["finetune", str(_recipe(tmp_path, digits_dir, tiny_folder, mode=mode, **extra)), "--out",
               str(tmp_path / "run")])  # fmt: skip
    assert rc == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for f in ("curves.png", "wise.png", "wise.json", "reports/finetuned/test.json", "reports/wise/val_confusion.png"):
        assert (run / f).is_file() or (mode == "linear" and f == "curves.png"), f
    assert (run / "model" / HEAD_NAME).is_file() and (run / "wise" / "open_clip_model.safetensors").is_file()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'model'}")
    side = image_size or 16
    assert model.visual.image_size == (side, side) and preprocess.transforms[0].size == side
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--checkpoint", str(run / "model"), "--data", str(digits_dir / "test-*.tar"),
                 "--classnames", str(digits_dir / "classnames.txt"), "--templates",
                 str(digits_dir / "templates.txt"), "--workers", "0", "--out", str(out)]) == 0  # fmt: skip
    acc1 = json.loads(out.read_text())["metrics"]["acc1"]
    if mode in ("ce", "flyp"):  # the head is the text tower's zero-shot head: the folder alone is the classifier
        assert acc1 == pytest.approx(summary["finetuned"]["test"]["accuracy"], abs=1e-6)
    if mode == "linear":  # frozen towers: the folder's zero-shot accuracy is the starting model's
        assert acc1 == pytest.approx(summary["zeroshot"]["test"]["accuracy"], abs=1e-6)


# ---------------------------------------------------------------------------------------- bad input


def _rewrite(src: str, out: Path, prefix: str, change) -> None:
    """Copies the real samples of shard `src` into out/prefix-*.tar, passing each json dict through change()."""

    def samples():
        for s in read_tar_samples(iter([src]), Counter()):
            meta = change(s["__key__"], json.loads(s["json"]))
            yield {"__key__": s["__key__"], "png": s["png"], "txt": s["txt"], "json": meta}

    write_shards(samples(), out, prefix)


@pytest.mark.parametrize("problem", ["label_outside", "missing_label", "class_without_val", "template_without_c"])
def test_bad_input_refused_before_training(problem, digits_dir, tiny_folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("classnames.txt", "templates.txt"):
        (data / name).write_text((digits_dir / name).read_text())
    train, test = expand_shards(str(digits_dir / "train-*.tar"))[0], expand_shards(str(digits_dir / "test-*.tar"))[0]
    bad_key = "digits_0007"
    first = {"key": None}

    def change(key, meta):
        if problem == "label_outside" and first["key"] is None:
            first["key"], meta["label"] = key, 10
        if problem == "missing_label" and first["key"] is None:
            first["key"] = key
            del meta["label"]
        return meta

    _rewrite(train, data, "train", change)
    _rewrite(test, data, "test", lambda k, m: m)
    extra = {}
    if problem == "class_without_val":  # validation without any "nine"
        _rewrite(test, data / "val", "val", lambda k, m: {**m, "label": min(m["label"], 8)})
        extra["val"] = "val/val-*.tar"
    if problem == "template_without_c":
        (data / "templates.txt").write_text("a photo of the digit {c}.\na photo of a number\n")
    recipe = _recipe(tmp_path, data, tiny_folder, **extra)
    rc = main(["finetune", str(recipe), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    want = {
        "label_outside": [str(first["key"]), "label 10", "outside the 10 classnames"],
        "missing_label": [str(first["key"]), "no 'label'"],
        "class_without_val": ["'nine'", "val-*.tar", "no sample"],
        "template_without_c": [str(data / "templates.txt"), "line 2", "'a photo of a number'"],
    }[problem]
    for piece in want:
        assert piece in err, (piece, err)
    assert bad_key  # keys are the real digits keys
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "model").exists()
