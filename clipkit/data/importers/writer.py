"""A listing -> a clipkit shard set: split, order, process in workers, drop duplicates, write shards resumably.

The plan is a pure function of the listing and the options: rows get keys (`rows.unique_keys`), a split (the
source's own, ``restval`` counted as ``train``, else **test iff ``int(sha1(key), 16) % 10**6 < fraction * 10**6``**),
are ordered by ``sha1(key)`` within their split (shards mix classes and folders) and cut into shards of
``shard_size`` rows, named ``{split}-%06d.tar``. A shard holds its rows minus the skipped ones, so counts can be lower.

Resume: each shard is written to a temporary and renamed, then its record ``.import/{shard}.json`` (count, skips,
the content hashes kept) is written. A record carries a fingerprint chained over the settings and every row (path,
size, mtime, captions) of its shard and of the shards before it, so a re-run redoes exactly the shards whose inputs or
predecessors changed and skips the rest: an interrupted import re-run with the same arguments writes only the missing
shards and ends byte-identical to an uninterrupted one. ``sizes.json`` and ``dataset.json`` are written last, once
every shard of the plan is recorded (by whichever rank finishes last, with ``rank``/``world_size``).

Duplicates (identical source bytes) are dropped in plan order, keeping the first; with several ranks, within each
rank's shards (``shards[rank::world_size]``) only: ranks do not talk to each other.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from clipkit import faults
from clipkit.data.importers.images import ImageOptions, Result, process_row
from clipkit.data.importers.rows import MAX_EXAMPLES, Listing, Row, unique_keys
from clipkit.data.shards import SIZES_FILE
from clipkit.files import atomic_path, write_json_atomic, write_text_atomic

STATE_DIR = ".import"
DATASET_FILE = "dataset.json"
# Bump when the bytes written for the same input and options change: older shard records are then redone.
WRITER_VERSION = 1
FRACTION_SCALE = 10**6
SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_SPLIT_CHARS_RE = re.compile(r"[^0-9A-Za-z_]")
# Source split names read as training data (Karpathy's JSON calls its extra training images "restval").
TRAIN_ALIASES = {"restval": "train"}


@dataclass(frozen=True)
class ImportOptions:
    """Settings of an import that shape its output (workers and ranks do not change a byte).

    Attributes:
        images: Resize / encode / minimum-size options.
        shard_size: Rows per shard.
        test_fraction: Share of rows in ``test`` by the hash split (rows with a source split keep theirs).
        split: Keep only the rows of this split.
        dedup: Drop exact duplicates (same image bytes).
    """

    images: ImageOptions = field(default_factory=ImageOptions)
    shard_size: int = 1000
    test_fraction: float = 0.0
    split: str | None = None
    dedup: bool = True

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")


@dataclass
class ShardPlan:
    """One shard to write: its name, split, rows (with keys) and the chained fingerprint of its inputs."""

    name: str
    split: str
    rows: list[tuple[str, Row]]
    fingerprint: str = ""


def _hash_int(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16)


def split_of(key: str, row: Row, test_fraction: float) -> str:
    """The split a row goes to: the source's (sanitized, ``restval`` -> ``train``), else the hash split."""
    if row.split:
        name = _SPLIT_CHARS_RE.sub("_", row.split.strip().lower())
        return TRAIN_ALIASES.get(name, name)
    return "test" if _hash_int(key) % FRACTION_SCALE < round(test_fraction * FRACTION_SCALE) else "train"


def _row_fingerprint(row: Row) -> str:
    try:
        st = os.stat(row.image)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    extra = [row.caption_file, row.meta_file]
    for path in filter(None, extra):
        try:
            st = os.stat(path)
            stamp += f":{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp += ":missing"
    return json.dumps([row.rel, stamp, asdict(row)], sort_keys=True, default=str)


def plan_shards(listing: Listing, opts: ImportOptions, world_size: int = 1) -> tuple[list[ShardPlan], Counter]:
    """Splits, orders and cuts the listing into shards, and fingerprints them.

    Args:
        listing: The importer's rows.
        opts: The import options.
        world_size: Ranks sharing the import; the fingerprint chain runs over each rank's shards.

    Returns:
        The shards in split-name order, and the number of rows per split left out by ``opts.split``.
    """
    keys = unique_keys([r.rel for r in listing.rows])
    by_split: dict[str, list[tuple[str, Row]]] = {}
    for key, row in zip(keys, listing.rows, strict=True):
        by_split.setdefault(split_of(key, row, opts.test_fraction), []).append((key, row))
    if opts.split is not None:
        if opts.split not in by_split:
            raise ValueError(f"--split {opts.split}: the source has the splits {', '.join(sorted(by_split))}")
        left_out = Counter({s: len(v) for s, v in by_split.items() if s != opts.split})
        by_split = {opts.split: by_split[opts.split]}
    else:
        left_out = Counter()
    shards = []
    for split in sorted(by_split):
        rows = sorted(by_split[split], key=lambda kr: hashlib.sha1(kr[0].encode()).hexdigest())
        for i in range(0, len(rows), opts.shard_size):
            shards.append(ShardPlan(f"{split}-{i // opts.shard_size:06d}.tar", split, rows[i : i + opts.shard_size]))
    settings = json.dumps([WRITER_VERSION, asdict(opts), listing.classnames, listing.templates], sort_keys=True)
    for rank in range(world_size):
        chain = hashlib.sha1(settings.encode()).hexdigest()
        for shard in shards[rank::world_size]:
            h = hashlib.sha1(chain.encode())
            h.update(shard.name.encode())
            for key, row in shard.rows:
                h.update(key.encode())
                h.update(_row_fingerprint(row).encode())
            shard.fingerprint = chain = h.hexdigest()
    return shards, left_out


def _record_path(out: Path, shard: str) -> Path:
    return out / STATE_DIR / f"{shard}.json"


def read_record(out: Path, shard: ShardPlan) -> dict | None:
    """The shard's record if it is complete for this plan (same fingerprint and its tar present), else None."""
    try:
        record = json.loads(_record_path(out, shard.name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != shard.fingerprint:
        return None
    if record["count"] and not (out / shard.name).is_file():
        return None
    return record


def _sample_bytes(key: str, row: Row, res: Result, split: str, classnames: list[str] | None) -> dict[str, bytes]:
    meta = {**(res.meta or {}), "source": row.rel, "split": split, "width": res.size[0], "height": res.size[1]}
    if res.source_size != res.size:
        meta["source_width"], meta["source_height"] = res.source_size
    if row.label is not None:
        meta["label"] = row.label
        if classnames:
            meta["classname"] = classnames[row.label]
    return {
        f"{key}.{res.ext}": res.image,
        f"{key}.txt": "\n".join(res.captions).encode("utf-8"),
        f"{key}.json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and mtime 0: the same input gives the same bytes (as `write_shards` via webdataset).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def _write_shard(
    out: Path,
    shard: ShardPlan,
    results: Iterator[Result],
    seen: dict[str, str],
    dedup: bool,
    classnames: list[str] | None,
    fault_step: int,
) -> dict:
    """Writes one shard from its rows' results (in row order) and returns its record."""
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    kept: dict[str, str] = {}
    labels: Counter = Counter()
    count = 0

    def record() -> dict:
        return {
            "fingerprint": shard.fingerprint,
            "count": count,
            "skipped": dict(sorted(skipped.items())),
            "examples": examples,
            "digests": kept,
            "labels": {str(k): v for k, v in sorted(labels.items()) if k is not None and v},
        }

    with atomic_path(out / shard.name) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, row in shard.rows:
                res = next(results)
                reason, detail = res.reason, res.detail
                if reason is None and dedup and (res.digest in seen or res.digest in kept):
                    reason, detail = "duplicate", f"same bytes as {seen.get(res.digest) or kept[res.digest]}"
                if reason is not None:
                    skipped[reason] += 1
                    shown = examples.setdefault(reason, [])
                    if len(shown) < MAX_EXAMPLES:
                        named = not detail or detail.startswith(f"{row.rel}:")  # image errors name the file already
                        shown.append((detail or row.rel) if named else f"{row.rel}: {detail}")
                    continue
                kept[res.digest] = row.rel
                for name, data in _sample_bytes(key, row, res, shard.split, classnames).items():
                    _add(tar, name, data)
                count += 1
                labels[row.label] += row.label is not None
                if count == 1:
                    faults.maybe_signal("sigkill_in_import", fault_step, signal.SIGKILL)
        if count == 0:
            raise _EmptyShard(record())  # leaves no tar behind
    return record()


class _EmptyShard(Exception):
    """Every row of a shard was skipped: no tar is written (an empty tar would be a shard with no sample)."""

    def __init__(self, record: dict):
        super().__init__(record["fingerprint"])
        self.record = record


def _results(rows: list[Row], opts: ImageOptions, workers: int) -> tuple[Iterator[Result], object]:
    work = partial(process_row, opts=opts)
    if workers <= 0 or len(rows) < 2:
        return map(work, rows), None
    pool = multiprocessing.get_context("fork").Pool(min(workers, len(rows)))
    # Ordered: the writer needs row order; small chunks keep both workers busy to the end.
    return pool.imap(work, rows, chunksize=8), pool


def write_import(
    listing: Listing,
    out: Path,
    opts: ImportOptions,
    identity: dict,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Writes (or completes) the shard set of a listing in `out`; this process writes shards ``rank::world_size``.

    Args:
        listing: The importer's rows.
        out: The output folder (already checked by `clipkit.data.outdir.claim_output_folder`).
        opts: Options that shape the output.
        identity: What names this import (name, format, source): recorded in ``dataset.json``, read back by the
            output-folder guard.
        workers: Processes that decode and encode images (0: in this process).
        rank: This process's rank.
        world_size: Number of processes sharing the import.

    Returns:
        The summary (also ``dataset.json``) when the set is complete, else ``{"complete": False, ...}`` with this
        rank's counts.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} is not in [0, --world-size {world_size})")
    shards, left_out = plan_shards(listing, opts, world_size)
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    mine = shards[rank::world_size]
    for shard in mine:  # temporaries of a killed run of this rank (never renamed: nothing half-written is read)
        for tmp in out.glob(f".{shard.name}.*.tmp"):  # only this rank's shards: other ranks may be writing theirs
            tmp.unlink(missing_ok=True)
    records = {s.name: read_record(out, s) for s in mine}
    todo = [s for s in mine if records[s.name] is None]
    rows = [row for s in todo for _, row in s.rows]
    results, pool = _results(rows, opts.images, workers)
    bar = tqdm(total=len(rows), desc=f"import {out.name}", unit="img", disable=None if rows else True)
    counted = _with_bar(results, bar)  # one stream over the rows of every shard to write, in order
    seen: dict[str, str] = {}
    written = 0
    try:
        for shard in mine:
            if records[shard.name] is None:
                try:
                    record = _write_shard(out, shard, counted, seen, opts.dedup, listing.classnames, written + 1)
                except _EmptyShard as empty:
                    record = empty.record
                if record["count"] == 0:
                    (out / shard.name).unlink(missing_ok=True)  # a tar of an earlier plan under this name
                write_json_atomic(_record_path(out, shard.name), record)
                records[shard.name] = record
                written += 1
            seen.update({d: rel for d, rel in records[shard.name]["digests"].items() if d not in seen})
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return _finish(out, listing, shards, left_out, identity, opts, rank, world_size, written)


def _with_bar(results: Iterator[Result], bar: tqdm) -> Iterator[Result]:
    for res in results:
        bar.update()
        yield res


def _split_rule(listing: Listing, opts: ImportOptions) -> str:
    if any(r.split for r in listing.rows):
        return "the source's own split (restval counted as train)"
    threshold = round(opts.test_fraction * FRACTION_SCALE)
    return f"test if int(sha1(key).hexdigest(), 16) % {FRACTION_SCALE} < {threshold}, else train"


def _finish(
    out: Path,
    listing: Listing,
    shards: list[ShardPlan],
    left_out: Counter,
    identity: dict,
    opts: ImportOptions,
    rank: int,
    world_size: int,
    written: int,
) -> dict:
    records = {s.name: read_record(out, s) for s in shards}
    missing = [name for name, r in records.items() if r is None]
    if missing:  # other ranks are still at work
        return {"complete": False, "rank": rank, "world_size": world_size, "written": written, "missing": missing}
    sizes = {name: r["count"] for name, r in records.items() if r["count"]}
    for path in out.iterdir():  # shards of an earlier plan (other options) that this one does not have
        if SHARD_RE.match(path.name) and path.name not in sizes:
            path.unlink()
    for path in (out / STATE_DIR).glob("*.tar.json"):
        if path.name[: -len(".json")] not in records:
            path.unlink()

    skipped = Counter(listing.skipped)
    examples = {k: list(v) for k, v in listing.examples.items()}
    splits: dict[str, int] = {}
    per_split: dict[str, dict[str, int]] = {}
    label_counts: dict[str, Counter] = {}
    for shard in shards:
        r = records[shard.name]
        skipped.update(r["skipped"])
        for reason, shown in r["examples"].items():
            examples.setdefault(reason, [])
            examples[reason] += shown[: MAX_EXAMPLES - len(examples[reason])]
        splits[shard.split] = splits.get(shard.split, 0) + r["count"]
        if r["count"]:
            per_split.setdefault(shard.split, {})[shard.name] = r["count"]
        label_counts.setdefault(shard.split, Counter()).update({int(k): v for k, v in r["labels"].items()})

    files = [*sizes, SIZES_FILE, DATASET_FILE]
    if listing.classnames:
        write_text_atomic(out / "classnames.txt", "".join(f"{c}\n" for c in listing.classnames))
        write_text_atomic(out / "templates.txt", "".join(f"{t}\n" for t in listing.templates or ()))
        files += ["classnames.txt", "templates.txt"]
    write_json_atomic(out / SIZES_FILE, sizes)
    summary = {
        **identity,
        "splits": splits,
        "shards": per_split,
        "samples": sum(sizes.values()),
        "rows": sum(len(s.rows) for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "split_rule": _split_rule(listing, opts),
        "options": {**asdict(opts.images), **{k: v for k, v in asdict(opts).items() if k != "images"}},
        "files": sorted(files),
    }
    if left_out:
        summary["not_in_split"] = dict(sorted(left_out.items()))
    if listing.classnames:
        summary["classnames"] = list(listing.classnames)
        summary["templates"] = list(listing.templates or ())
        summary["label_counts"] = {
            split: {listing.classnames[i]: n for i, n in sorted(c.items())} for split, c in sorted(label_counts.items())
        }
    if listing.notes:
        summary["notes"] = list(listing.notes)
    write_json_atomic(out / DATASET_FILE, summary)
    return {"complete": True, "written": written, **summary}
