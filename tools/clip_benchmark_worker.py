"""CLIP_benchmark's own metrics on clipkit shards: run in CLIP_benchmark's environment, not clipkit's.

Called by tools/compare_clip_benchmark.py with the interpreter of a separate venv holding `clip-benchmark`,
`numpy<2.4`, `open_clip_torch` and `torch` (clipkit itself is not imported here). It loads the model folder with
open_clip (`local-dir:`), reads the same WebDataset tar shards in the same order with the standard library,
decodes images exactly as clipkit does (transparency over white, then RGB), and calls
`clip_benchmark.metrics.zeroshot_classification.evaluate` / `zeroshot_retrieval.evaluate` with amp=False.
Prints one JSON object: {task name: metrics} plus "image_emb" checksums for cross-checking.

    /tmp/cbenv/bin/python tools/clip_benchmark_worker.py --checkpoint MODEL --tasks tasks.json

With `--bench-zeroshot SPEC.json` it is instead the CLIP_benchmark side of tools/bench/bench_zeroshot.py: one timed
zero-shot evaluation as `clip_benchmark eval --dataset wds/...` runs it (see `bench_zeroshot`). That mode also runs
in clipkit's own environment: where `clip_benchmark` cannot be imported (or with "reference": true in the spec) it
uses `reference_zeroshot_evaluate`, a line-for-line copy of CLIP_benchmark 1.6.2's zero-shot loop, and says so in
its output, so CI can check the benchmark without CLIP_benchmark's venv.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from contextlib import suppress

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # clipkit.data.pipeline.IMAGE_EXTS, in its order of preference


def read_samples(shards: list[str]) -> list[dict]:
    """Samples of the tars in order, grouped as webdataset groups them (key = name up to the first dot)."""
    samples = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            current, key = None, None
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    continue
                k = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower()
                if k != key:
                    if current is not None:
                        samples.append(current)
                    current, key = {"__key__": k}, k
                current[ext] = tar.extractfile(member).read()
            if current is not None:
                samples.append(current)
    return samples


def decode(sample: dict) -> tuple[Image.Image, list[str], dict] | None:
    """clipkit's decode_image / decode_captions / decode_json; None for a sample clipkit would skip."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "txt" not in sample:
        return None
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
    except Exception:
        return None
    if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode != "P"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    lines = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if not lines:
        return None
    return img, lines, json.loads(sample["json"]) if "json" in sample else {}


class Samples(Dataset):
    """(image tensor, label) for classification or (image tensor, captions) for retrieval."""

    def __init__(self, shards: list[str], transform, classes: list[str] | None = None):
        decoded = [d for d in (decode(s) for s in read_samples(shards)) if d is not None]
        self.images = [img for img, _, _ in decoded]
        self.captions = [caps for _, caps, _ in decoded]
        self.labels = [meta.get("label") for _, _, meta in decoded]
        self.transform, self.classes = transform, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.transform(self.images[i])
        return (x, self.labels[i]) if self.classes is not None else (x, self.captions[i])


def captions_collate(batch):
    images, texts = zip(*batch, strict=True)
    return default_collate(images), list(texts)


# ----------------------------------------------------------------------------- zero-shot throughput (bench mode)


def reference_zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=True):
    """CLIP_benchmark 1.6.2 `zeroshot_classification.zero_shot_classifier` (MIT), list templates only: [D, C]."""
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        zeroshot_weights = []
        for classname in classnames:
            texts = [template.format(c=classname) for template in templates]
            texts = tokenizer(texts).to(device)  # tokenize
            class_embeddings = model.encode_text(texts)
            class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        zeroshot_weights = torch.stack(zeroshot_weights, dim=1).to(device)
    return zeroshot_weights


def reference_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2 `zeroshot_classification.accuracy`: top-k accuracies of [N, C] logits.

    One change: `.item()` where CLIP_benchmark calls float() on a [1] numpy array, which numpy >= 2.4 refuses
    (the reason CLIP_benchmark needs numpy<2.4); the value is the same float32 count.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().item() / n for k in topk]


def reference_run_classification(model, classifier, dataloader, device, amp=True):
    """CLIP_benchmark 1.6.2 `zeroshot_classification.run_classification`: ([N, C] logits, [N] targets)."""
    pred = []
    true = []
    with torch.no_grad():
        for images, target in dataloader:
            images = images.to(device)
            target = target.to(device)
            with torch.autocast(device, enabled=amp):
                image_features = model.encode_image(images)
                image_features = F.normalize(image_features, dim=-1)
                logits = 100.0 * image_features @ classifier
            true.append(target.cpu())
            pred.append(logits.float().cpu())
    pred = torch.cat(pred)
    true = torch.cat(true)
    return pred, true


def reference_zeroshot_evaluate(model, dataloader, tokenizer, classnames, templates, device, amp=True):
    """CLIP_benchmark 1.6.2 `zeroshot_classification.evaluate`, single-label branch, without its progress bars.

    Kept line for line (tqdm aside: a few microseconds per batch; see `reference_accuracy`) so that the benchmark
    and its CI smoke measure CLIP_benchmark's loop where CLIP_benchmark itself (numpy<2.4) cannot be installed.
    """
    classifier = reference_zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=amp)
    logits, target = reference_run_classification(model, classifier, dataloader, device, amp=amp)
    pred = logits.argmax(axis=1)
    if len(dataloader.dataset.classes) >= 5:
        acc1, acc5 = reference_accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,) = reference_accuracy(logits, target, topk=(1,))
        acc5 = float("nan")
    mean_per_class_recall = balanced_accuracy_score(target, pred)
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mean_per_class_recall}


class CountingLoader:
    """A DataLoader that counts the images it yields; keeps `.dataset` (CLIP_benchmark reads `.dataset.classes`)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.dataset, self.n_images = loader, loader.dataset, 0

    def __iter__(self):
        for images, target in self.loader:
            self.n_images += len(target)
            yield images, target


def wds_zeroshot_loader(shards: list[str], transform, classnames: list[str], batch_size: int, workers: int):
    """CLIP_benchmark's loader for a `wds/...` classification dataset, over clipkit shards.

    As `clip_benchmark.datasets.builder.build_wds_dataset` and `clip_benchmark.cli` build it: WebDataset over the
    shards (split among DataLoader workers by shard), PIL decoding of the image, the model's transform, batched in
    the pipeline, DataLoader(batch_size=None). Two differences, neither a cost: the label comes from the sample's
    json "label" (clipkit shards have no .cls member), and shardshuffle=False is explicit (CLIP_benchmark leaves
    None, which webdataset 1.0.2 treats as no shuffling, with a warning).
    """
    import webdataset as wds

    exts = ["webp", "png", "jpg", "jpeg"]
    dataset = (
        wds.WebDataset(shards, nodesplitter=lambda src: src, shardshuffle=False)
        .decode(wds.autodecode.ImageHandler("pil", extensions=exts))
        .to_tuple(exts, "json")
        .map_tuple(transform, lambda meta: meta["label"])
    )
    dataset.classes = classnames
    loader = DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers)
    return CountingLoader(loader)


def record_threads(model: torch.nn.Module) -> set[int]:
    """Wraps `model.encode_image` to record torch's intra-op thread count at each call; returns the (live) set.

    Both sides of tools/bench/bench_zeroshot.py report the counts their images were encoded with, so the benchmark
    can check that they were equal.
    """
    seen: set[int] = set()
    encode = model.encode_image

    def encode_image(*args, **kwargs):
        seen.add(torch.get_num_threads())
        return encode(*args, **kwargs)

    model.encode_image = encode_image
    return seen


def bench_zeroshot(spec: dict) -> dict:
    """One timed zero-shot evaluation, CLIP_benchmark's way; spec as written by tools/bench/bench_zeroshot.py.

    The model is loaded (open_clip `local-dir:`) before the clock starts; the clock covers building the loader,
    the class embeddings (tokenize + encode every prompt), every image (read, decode, transform, encode) and the
    metrics, i.e. everything `zeroshot_classification.evaluate` and its loader do. The model runs on
    spec["threads"] torch threads (DataLoader workers run on 1 each, torch's setting in a worker).
    """
    evaluate, implementation = zeroshot_evaluate_impl(spec.get("reference", False))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{spec['checkpoint']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{spec['checkpoint']}")
    model.eval()
    torch.set_num_threads(spec["threads"])
    threads = record_threads(model)
    start = time.perf_counter()
    loader = wds_zeroshot_loader(spec["shards"], preprocess, spec["classnames"], spec["batch_size"], spec["workers"])
    metrics = evaluate(model, loader, tokenizer, spec["classnames"], spec["templates"], "cpu", amp=False)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "n_images": loader.n_images,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "implementation": implementation,
        "torch_threads": sorted(threads),
        "versions": versions(),
    }


def zeroshot_evaluate_impl(reference: bool):
    """(evaluate function, its name): CLIP_benchmark's own unless `reference` or it is not installed."""
    if not reference:
        with suppress(ImportError):
            from clip_benchmark.metrics import zeroshot_classification

            return zeroshot_classification.evaluate, f"clip_benchmark {version_of('clip-benchmark')}"
    why = "asked for" if reference else "clip_benchmark not importable here"
    return reference_zeroshot_evaluate, f"reference copy of clip_benchmark 1.6.2's loop ({why})"


def version_of(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "clip_benchmark": version_of("clip-benchmark"),
    }


# ----------------------------------------------------------------------------- metric comparison (default mode)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model folder (comparison mode)")
    p.add_argument("--tasks", help="JSON list of {name, task, shards, classnames?, templates?} (comparison mode)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--bench-zeroshot", metavar="SPEC", help="JSON spec: run one timed zero-shot evaluation instead")
    args = p.parse_args()
    if args.bench_zeroshot:
        with open(args.bench_zeroshot) as f:
            print(json.dumps(bench_zeroshot(json.load(f))), flush=True)
        return 0
    if not (args.checkpoint and args.tasks):
        p.error("--checkpoint and --tasks are required without --bench-zeroshot")
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.checkpoint}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.checkpoint}")
    model.eval()
    out = {"versions": versions()}
    for task in json.load(open(args.tasks)):
        if task["task"] == "zeroshot":
            ds = Samples(task["shards"], preprocess, task["classnames"])
            dl = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
            metrics = zeroshot_classification.evaluate(
                model, dl, tokenizer, task["classnames"], task["templates"], "cpu", amp=False
            )
        else:
            ds = Samples(task["shards"], preprocess)
            dl = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0, collate_fn=captions_collate)
            metrics = zeroshot_retrieval.evaluate(model, dl, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
        with torch.no_grad():  # for the cross-check of inputs: the first batch's normalized image embeddings
            first = torch.stack([ds[i][0] for i in range(min(len(ds), args.batch_size))])
            emb = torch.nn.functional.normalize(model.encode_image(first), dim=-1).numpy()
        out[task["name"]] = {"metrics": metrics, "n_images": len(ds), "first_batch_image_emb": emb.tolist()}
        print(f"{task['name']}: {metrics}", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
