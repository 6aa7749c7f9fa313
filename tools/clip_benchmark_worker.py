"""CLIP_benchmark's own metrics on clipkit shards: run in CLIP_benchmark's environment, not clipkit's.

Called by tools/compare_clip_benchmark.py with the interpreter of a separate venv holding `clip-benchmark`,
`numpy<2.4`, `open_clip_torch` and `torch` (clipkit itself is not imported here). It loads the model folder with
open_clip (`local-dir:`), reads the same WebDataset tar shards in the same order with the standard library,
decodes images exactly as clipkit does (transparency over white, then RGB), and calls
`clip_benchmark.metrics.zeroshot_classification.evaluate` / `zeroshot_retrieval.evaluate` with amp=False.
Prints one JSON object: {task name: metrics} plus "image_emb" checksums for cross-checking.

    /tmp/cbenv/bin/python tools/clip_benchmark_worker.py --checkpoint MODEL --tasks tasks.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

import numpy as np
import open_clip
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from PIL import Image
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", required=True, help="JSON list of {name, task, shards, classnames?, templates?}")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.checkpoint}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.checkpoint}")
    model.eval()
    out = {"versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": np.__version__}}
    from importlib.metadata import version

    out["versions"]["clip_benchmark"] = version("clip-benchmark")
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
