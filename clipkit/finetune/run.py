"""`clipkit finetune`: read and check the data, fine-tune, sweep WiSE-FT, save model folders, write reports.

Run folder:
    recipe.yaml            the resolved recipe
    metrics.jsonl          training rows and validation rows, one JSON object a line
    model/                 the fine-tuned model (best validation step), an open_clip `local-dir:` folder, plus its
                           head (classifier.safetensors)
    wise/                  the WiSE-FT mix with the best validation accuracy (same layout); only with a sweep
    wise.json, wise.png    accuracy of every set against a
    reports/<model>/<set>.json|.md|_confusion.png
                           classification reports of the zero-shot, fine-tuned and best WiSE-FT models on every set
    curves.png             training loss and validation metrics, the restored step marked
    summary.json           what ran, how long, and each model's accuracy on each set
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from open_clip.transformer import PatchDropout

from clipkit.config import FinetuneCfg, Recipe, RecipeError, save_recipe, to_dict
from clipkit.evaluate.classification import write_report
from clipkit.files import write_json_atomic
from clipkit.finetune import data as fdata
from clipkit.finetune.head import save_head, zeroshot_head
from clipkit.finetune.layer_decay import layer_ids
from clipkit.finetune.loop import features, fit, predict_logits, scores
from clipkit.finetune.modes import CrossEntropyMode, FlypMode, LinearMode
from clipkit.finetune.plots import plot_curves, plot_wise
from clipkit.finetune.wise import best_alpha, interpolate, sweep
from clipkit.models import load_model
from clipkit.models.io import save_model
from clipkit.models.resize import with_image_size
from clipkit.precision import resolve

log = logging.getLogger(__name__)


def load_data(recipe: Recipe, pixels: fdata.Pixels) -> dict:
    """Reads and checks everything before training: classnames, templates, train, validation and extra sets.

    Returns:
        {"classnames", "templates", "train", "val", "sets": {name: LabeledImages}}.

    Raises:
        FinetuneDataError: naming the file or sample (see `clipkit.finetune.data`).
    """
    f = recipe.finetune
    classnames = fdata.read_classnames(Path(recipe.path(f.classnames)))
    if f.templates is not None:
        templates = fdata.read_templates(Path(recipe.path(f.templates)))
    else:
        templates = [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]
    n = len(classnames)
    train = fdata.read_labeled(recipe.path(f.train), pixels, n, "training")
    if f.val is not None:
        val = fdata.read_labeled(recipe.path(f.val), pixels, n, "validation")
    else:
        train, val = fdata.split_train_val(train, f.val_fraction)
    fdata.check_every_class(val, classnames, "validation set")
    sets = {s.name: fdata.read_labeled(recipe.path(s.shards), pixels, n, f"eval set {s.name!r}") for s in f.eval_sets}
    return {"classnames": classnames, "templates": templates, "train": train, "val": val, "sets": sets}


def finetune(recipe: Recipe, out_dir: str | Path, on_eval=None) -> dict:
    """Runs a fine-tuning recipe into `out_dir` with `finetune.threads` torch threads; see `_finetune`."""
    before = torch.get_num_threads()
    if recipe.finetune.threads > 0:
        torch.set_num_threads(recipe.finetune.threads)
    try:
        return _finetune(recipe, out_dir, on_eval)
    finally:
        torch.set_num_threads(before)


def _finetune(recipe: Recipe, out_dir: str | Path, on_eval=None) -> dict:
    """Runs a fine-tuning recipe into `out_dir`; returns the summary (also written to summary.json).

    Args:
        recipe: a recipe with a `finetune` section (`clipkit.config.load_finetune_recipe`).
        out_dir: the run folder (created).
        on_eval: passed to `clipkit.finetune.loop.fit` (tests use it to snapshot the weights at each validation).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out / "recipe.yaml")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(recipe.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # From here on `f.precision` is the dtype used ("auto" decided once for this machine).
    f: FinetuneCfg = dataclasses.replace(recipe.finetune, precision=resolve(recipe.finetune.precision, device))
    bundle = load_model(Path(f.model), device)
    if f.image_size:
        try:
            bundle = with_image_size(bundle, f.image_size, device)
        except ValueError as e:
            raise RecipeError(f"finetune.image_size: {e} ({f.model})") from None
    if f.patch_dropout:
        _set_patch_dropout(bundle.model, f.patch_dropout, f.model)
    if f.layer_decay < 1:  # the image tower trains in both modes; open_clip's and HF's text towers all have blocks
        try:
            layer_ids([(n, p) for n, p in bundle.model.named_parameters() if n.startswith("visual.")])
        except ValueError as e:
            raise RecipeError(f"finetune.{e} ({f.model})") from None
    pixels = fdata.Pixels(bundle.eval_transform)
    d = load_data(recipe, pixels)
    log.info("finetune %s: %d train, %d val (%s), sets %s, %s", f.mode, len(d["train"]), len(d["val"]),
             d["val"].source, {k: len(v) for k, v in d["sets"].items()}, f.precision)  # fmt: skip
    tracker = _wandb(recipe, out) if f.wandb else None

    def record(row: dict) -> None:
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if tracker is not None:
            tracker.log(row, step=row["step"])

    mode = _make_mode(f, bundle, d, device)
    zeroshot_state = {k: v.detach().clone() for k, v in mode.module.state_dict().items()}
    result = _train(mode, bundle.model, d, pixels, f, recipe.seed, device, record, on_eval)
    finetuned_state = {k: v.detach().clone() for k, v in mode.module.state_dict().items()}
    info = {
        "recipe": recipe.name,
        "mode": f.mode,
        "classnames": d["classnames"],
        "source": str(f.model),
        "test_time_flip": f.test_time_flip,
        "precision": f.precision,
    }  # how the reported figures were scored
    _save(out / "model", mode.classifier(), bundle.config, {**info, **_jsonable(result)})

    t_eval = time.perf_counter()
    sets = {"val": d["val"], **d["sets"]}
    by_alpha, preds = _sweep(mode, zeroshot_state, finetuned_state, sets, pixels, f, device)
    summary = {"recipe": to_dict(recipe)["finetune"], "mode": f.mode, "seed": recipe.seed, "precision": f.precision,
               **_jsonable(result)}  # fmt: skip
    summary["n"] = {"train": len(d["train"]), **{k: len(v) for k, v in sets.items()}}
    models = {"zeroshot": 0.0, "finetuned": 1.0}
    if f.wise_alphas:
        wise_rows = [by_alpha[a] for a in sorted(set(f.wise_alphas))]
        models["wise"] = chosen = best_alpha(wise_rows)
        write_json_atomic(out / "wise.json", {"chosen_on_val": chosen, "rows": wise_rows}, sort_keys=False)
        plot_wise(wise_rows, list(sets), chosen, out / "wise.png")
        mode.module.load_state_dict(interpolate(zeroshot_state, finetuned_state, chosen))
        _save(out / "wise", mode.classifier(), bundle.config, {**info, "wise_alpha": chosen})
        mode.module.load_state_dict(finetuned_state)
    for name, alpha in models.items():
        summary[name] = {**({"alpha": alpha} if name == "wise" else {}),
                         **{k: v for k, v in by_alpha[alpha].items() if k != "alpha"}}  # fmt: skip
        for set_name, data in sets.items():
            title = f"{name} (a={alpha:g}) on {set_name}" if name == "wise" else f"{name} on {set_name}"
            write_report(out / "reports" / name, set_name, data.labels.numpy(), preds[alpha][set_name],
                         d["classnames"], title)  # fmt: skip
    summary["eval_seconds"] = time.perf_counter() - t_eval
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["threads"] = torch.get_num_threads()
    if mode.trains:
        rows_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        plot_curves(rows_logged, result["best_step"], f.monitor, out / "curves.png")
    write_json_atomic(out / "summary.json", summary, sort_keys=False)
    _print_results(out, models, by_alpha, sets, tracker)
    return summary


def _set_patch_dropout(model: torch.nn.Module, prob: float, source: str) -> None:
    """Training drops a `prob` share of each image's patch tokens (open_clip's `PatchDropout`, FLIP); evaluation, in
    eval mode, sees them all. The saved config is left without it."""
    if not isinstance(getattr(model.visual, "patch_dropout", None), (torch.nn.Identity, PatchDropout)):
        raise RecipeError(f"finetune.patch_dropout: only an open_clip ViT image tower drops patches ({source})")
    model.visual.patch_dropout = PatchDropout(prob)


def _make_mode(f: FinetuneCfg, bundle, d: dict, device):
    """The `clipkit.finetune.modes` mode `f.mode`, its head built from the class names x templates of `d`."""
    if f.mode == "flyp":
        return FlypMode(bundle.model, bundle.tokenizer, d["classnames"], d["templates"], device)
    head = zeroshot_head(bundle.model, bundle.tokenizer, d["classnames"], d["templates"], device)
    if f.mode == "ce":
        return CrossEntropyMode(bundle.model, head, f.train_head, f.label_smoothing, f.mixup, f.cutmix)
    return LinearMode(bundle.model, head)


def _train(mode, model, d: dict, pixels: fdata.Pixels, f: FinetuneCfg, seed: int, device, record, on_eval) -> dict:
    """Trains `mode` (gradient steps with early stopping, or the linear probe's C grid on `model`'s image features);
    returns what it reports."""
    if mode.trains:
        return fit(mode, d["train"], d["val"], pixels, f, seed, device, record, on_eval)
    t0 = time.perf_counter()
    feats = {k: features(model, d[k], pixels, f.eval_batch_size, device, f.precision) for k in ("train", "val")}
    tried = mode.fit(feats["train"], d["train"].labels.numpy(), feats["val"], d["val"].labels.numpy(),
                     f.linear_c_grid, seed)  # fmt: skip
    for row in tried:
        log.info("linear: C=%g val accuracy %.4f%s", row["C"], row["val_accuracy"], " (chosen)" * row["chosen"])
    return {"linear_c": tried, "train_seconds": time.perf_counter() - t0}


def _sweep(mode, zeroshot_state: dict, finetuned_state: dict, sets: dict, pixels, f: FinetuneCfg, device):
    """Evaluates every WiSE-FT mix (a = 0 and 1 always) on every set.

    Returns:
        ({a: {"alpha", set: scores}}, {a: {set: [N] predicted labels}}); the fine-tuned weights are loaded after.
    """
    preds: dict[float, dict] = {}

    def evaluate(alpha: float) -> dict:
        clf = mode.classifier()
        logits = {
            name: predict_logits(clf, s, pixels, f.eval_batch_size, device, f.test_time_flip, f.precision)
            for name, s in sets.items()
        }
        preds[alpha] = {name: lg.argmax(dim=1).numpy() for name, lg in logits.items()}
        return {name: scores(lg, sets[name].labels) for name, lg in logits.items()}

    alphas = sorted(set(f.wise_alphas) | {0.0, 1.0})
    rows = sweep(mode.module, zeroshot_state, finetuned_state, alphas, evaluate)
    return {r["alpha"]: r for r in rows}, preds


def _print_results(out: Path, models: dict, by_alpha: dict, sets: dict, tracker) -> None:
    """Logs each model's accuracy per set, prints the fine-tuned model's reports, sends the finals to wandb."""
    for name, alpha in models.items():
        accs = ", ".join(f"{s} {by_alpha[alpha][s]['accuracy']:.4f}" for s in sets)
        log.info("%s%s accuracy: %s", name, f" (a={alpha:g})" if name == "wise" else "", accs)
    for set_name in sets:
        print((out / "reports" / "finetuned" / f"{set_name}.md").read_text(encoding="utf-8"))
    if tracker is not None:
        tracker.log({f"final/{m}/{s}/accuracy": by_alpha[a][s]["accuracy"] for m, a in models.items() for s in sets})
        tracker.finish()


def _save(folder: Path, classifier, config: dict, info: dict) -> None:
    save_model(folder, classifier.model, config, info)
    save_head(folder, classifier.head)


def _jsonable(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}


def _wandb(recipe: Recipe, out: Path):
    import os

    import wandb

    return wandb.init(project="clipkit-finetune", name=recipe.name, dir=str(out), config=to_dict(recipe),
                      mode=os.environ.get("WANDB_MODE", "offline"))  # fmt: skip
