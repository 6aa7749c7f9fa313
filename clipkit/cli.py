"""`clipkit train|eval|embed|index|data|models`: the only module that reads argv."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from clipkit.config import RecipeError


def _cmd_train(args: argparse.Namespace) -> int:
    from clipkit.config import load_recipe
    from clipkit.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    summary = train(recipe, out, resume=args.resume)
    if summary.get("eval") is not None:
        print(json.dumps(summary, indent=2))
    return 0


def _load(checkpoint: str):
    import torch

    from clipkit.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(Path(checkpoint), device), device


def _cmd_eval(args: argparse.Namespace) -> int:
    from clipkit.evaluate import run as evals

    bundle, device = _load(args.checkpoint)
    if args.task == "zeroshot":
        classnames = evals.read_lines(args.classnames, "classnames")
        templates = evals.read_lines(args.templates, "templates") if args.templates else None
        metrics = evals.zeroshot(bundle, args.data, classnames, templates, args.batch_size, device)
    else:
        metrics = evals.retrieval(bundle, args.data, args.batch_size, device)
    dataset = args.dataset or Path(args.data.split("::")[0]).parent.name
    result = evals.write_result(Path(args.out), dataset, str(args.checkpoint), args.task, metrics)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from clipkit.data.shards import expand_shards
    from clipkit.evaluate.embed import embed_shards, save_embeddings

    bundle, device = _load(args.checkpoint)
    urls = expand_shards(args.data)
    emb = embed_shards(bundle.model, bundle.eval_transform, bundle.tokenizer, urls, args.batch_size, device)
    save_embeddings(Path(args.out), emb, {"model": str(Path(args.checkpoint).resolve()), "shards": urls}, args.dtype)
    print(f"{len(emb.meta)} images, {len(emb.text)} captions -> {args.out} (skipped: {emb.skipped})")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from clipkit.index import build_index_dir

    if args.action == "build":
        info = build_index_dir(Path(args.dir), Path(args.out) if args.out else None, factory=args.factory)
        print(json.dumps(info, indent=2))
        return 0
    return _query(args)


def _query(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from clipkit.evaluate.embed import encode_images, encode_texts
    from clipkit.index import query_index_dir

    if (args.text is None) == (args.image is None):
        raise SystemExit("clipkit index query: give exactly one of --text and --image")
    index_dir = Path(args.dir)
    info_file = index_dir / "embed.json"
    checkpoint = args.checkpoint or (json.loads(info_file.read_text())["model"] if info_file.is_file() else None)
    if checkpoint is None:
        raise SystemExit(f"clipkit index query: {info_file} names no model; pass --checkpoint")
    bundle, device = _load(checkpoint)
    if args.text is not None:
        q = encode_texts(bundle.model, bundle.tokenizer, [args.text], device=device)
    else:
        pixels = bundle.eval_transform(Image.open(args.image).convert("RGB"))[None].to(device)
        q = encode_images(bundle.model, pixels)
    hits = query_index_dir(index_dir, np.ascontiguousarray(q, dtype=np.float32), args.k)[0]
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.3f}  {h['key']:<28} {' | '.join(h['captions'])[:90]}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from clipkit.data.builtin import build

    summary = build(args.name, Path(args.out))
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from clipkit.models import list_architectures

    for name in list_architectures():
        print(name)
    return 0


def _add_train_args(t: argparse.ArgumentParser) -> argparse.ArgumentParser:
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
    t.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    t.add_argument("--resume", help="'latest' or a checkpoint folder")
    t.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    t.set_defaults(fn=_cmd_train, command="train")
    return t


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipkit", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    _add_train_args(sub.add_parser("train", help="train a recipe"))

    e = sub.add_parser("eval", help="evaluate a model folder")
    e.add_argument("task", choices=["zeroshot", "retrieval"])
    e.add_argument("--checkpoint", required=True, help="model folder (open_clip_config.json + weights)")
    e.add_argument("--data", required=True, help="shard spec (braces, globs, '::' lists)")
    e.add_argument("--classnames", help="class names file, one per line in label order (zeroshot)")
    e.add_argument("--templates", help="prompt templates file with {c} (zeroshot; default: open_clip's simple ones)")
    e.add_argument("--dataset", help="dataset name in the result (default: the shards' folder name)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--out", required=True, help="result JSON path")
    e.set_defaults(fn=_cmd_eval)

    m = sub.add_parser("embed", help="export L2-normalized image and text embeddings of shards")
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    m.set_defaults(fn=_cmd_embed)

    i = sub.add_parser("index", help="build or query a FAISS index of an embedding folder")
    isub = i.add_subparsers(dest="action", required=True)
    b = isub.add_parser("build")
    b.add_argument("dir", help="embedding folder written by `clipkit embed`")
    b.add_argument("--out", help="index folder (default: the embedding folder)")
    b.add_argument("--factory", help="FAISS index factory string (default: chosen from the vector count)")
    b.set_defaults(fn=_cmd_index)
    q = isub.add_parser("query")
    q.add_argument("dir", help="index folder")
    q.add_argument("--text")
    q.add_argument("--image")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--checkpoint", help="model folder (default: the one recorded in embed.json)")
    q.add_argument("--json", action="store_true", help="print hits as JSON")
    q.set_defaults(fn=_cmd_index)

    d = sub.add_parser("data", help="build the embedded real datasets as WebDataset shards")
    dsub = d.add_subparsers(dest="action", required=True)
    db = dsub.add_parser("build")
    db.add_argument("name", choices=["emoji", "fashion-mnist", "digits"])
    db.add_argument("--out", required=True)
    db.set_defaults(fn=_cmd_data)

    ms = sub.add_parser("models", help="list the open_clip architectures a recipe can name")
    ms.set_defaults(fn=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # optionals mixed with free-form overrides: `--out X a.b=1 --resume latest c.d=2`
        train_parser = _add_train_args(argparse.ArgumentParser(prog="clipkit train"))
        args = train_parser.parse_intermixed_args(argv[1:])
    else:
        args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU feature probe at INFO
    try:
        return args.fn(args)
    except (RecipeError, FileNotFoundError, ValueError) as e:
        print(f"clipkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
