"""`clipkit data import|inspect|validate` on real files in a temp folder: every source format imports real images
(Noto emoji renders, scikit-learn digits) into a shard set that `clipkit train` trains on and `clipkit eval`
evaluates; one bad row of each kind is counted exactly; an interrupted import resumes byte-identical; the output
folder guard refuses folders it does not own; retrieval on an imported Karpathy set equals CLIP_benchmark's."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipkit.cli import main
from clipkit.data.importers import FORMATS, ImageOptions, ImportOptions, import_source
from clipkit.data.importers.images import process_row, target_size
from clipkit.data.importers.rows import Row
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- real source files


@pytest.fixture(scope="module")
def emoji_images() -> list[tuple[str, Image.Image]]:
    """48 real emoji (Noto Color Emoji renders, 96 px) with their Unicode names, spread over all groups."""
    from PIL import ImageFont

    from clipkit.data.builtin import emoji as E

    entries, _ = E.select_emoji(E.parse_emoji_test(E.EMOJI_TEST_PATH.read_text(encoding="utf-8")))
    font = ImageFont.truetype(str(E.FONT_PATH), size=E.FONT_SIZE)
    return [(e.name, E.render_emoji(e.text, font, 96)) for e in entries[::38][:48]]


@pytest.fixture(scope="module")
def digit_images() -> dict[str, list[Image.Image]]:
    """Real scikit-learn digits as 32 px images, 6 per class for 3 classes."""
    from sklearn.datasets import load_digits

    from clipkit.data.builtin.digits import to_image

    digits = load_digits()
    out: dict[str, list[Image.Image]] = {}
    for name, label in (("zero", 0), ("one", 1), ("seven", 7)):
        out[name] = [to_image(digits.images[i], 32) for i in np.flatnonzero(digits.target == label)[:6]]
    return out


def _save(img: Image.Image, path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


def make_folder(root: Path, images) -> Path:
    """Sidecar layout: a/x.jpg + a/x.txt (two caption lines), nested folders, one sidecar json."""
    for i, (name, img) in enumerate(images):
        stem = root / ("animals" if i % 2 else "things/more") / f"img {i:02d}"
        _save(img, stem.with_suffix(".jpg"))
        stem.with_suffix(".txt").write_text(f"{name}\nan emoji of {name}\n", encoding="utf-8")
    (root / "animals" / "img 01.json").write_text(json.dumps({"author": "noto"}))
    return root


def make_classes(root: Path, digits) -> Path:
    for cls, imgs in digits.items():
        for i, img in enumerate(imgs):
            _save(img, root / cls / f"{cls}_{i}.png", "PNG")
    return root


def make_csv(root: Path, images) -> Path:
    """open_clip's CsvDataset convention: tab-separated `filepath` / `title`, paths relative to the table."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for i, (name, img) in enumerate(images):
            _save(img, root / "img" / f"{i}.jpg")
            w.writerow([f"img/{i}.jpg", name])
    return root / "pairs.csv"


def make_parquet(root: Path, images) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for i, (_, img) in enumerate(images):
        _save(img, root / "pics" / f"p{i}.png", "PNG")
        paths.append(str((root / "pics" / f"p{i}.png").resolve()))  # absolute paths
    captions = [[name, f"a picture of {name}"] for name, _ in images]  # a list column: several captions
    pq.write_table(pa.table({"image": paths, "caption": captions}), root / "pairs.parquet")
    return root / "pairs.parquet"


def make_jsonl(root: Path, images) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, img) in enumerate(images):
        _save(img, root / "j" / f"{i}.jpg")
        lines.append(json.dumps({"file_name": f"file://{(root / 'j' / f'{i}.jpg').resolve()}", "text": name}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "pairs.jsonl"


def make_coco(root: Path, images) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i, (name, img) in enumerate(images):
        file_name = f"{i:012d}.jpg"
        _save(img, root / "val2017" / file_name)
        imgs.append({"id": 1000 + i, "file_name": file_name, "width": img.width, "height": img.height})
        anns += [
            {"id": 2 * i + 1, "image_id": 1000 + i, "caption": f"a {name}"},
            {"id": 2 * i, "image_id": 1000 + i, "caption": name},
        ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": imgs, "annotations": anns}))
    return root


def make_karpathy(root: Path, images, splits=("train", "restval", "val", "test")) -> Path:
    """A Karpathy split JSON (Flickr-style, no filepath) with two captions per image and all four splits."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, img) in enumerate(images):
        _save(img, root / "images" / f"{i}.jpg")
        sentences = [{"raw": name, "tokens": name.split()}, {"raw": f"an emoji of {name}"}]
        entries.append({"filename": f"{i}.jpg", "imgid": i, "split": splits[i % len(splits)], "sentences": sentences})
    (root / "dataset_emoji.json").write_text(json.dumps({"images": entries, "dataset": "emoji"}))
    return root / "dataset_emoji.json"


def make_hf(root: Path, images) -> Path:
    """HF imagefolder: train/metadata.jsonl and test/metadata.csv with file_name + text."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(images) // 2
    rows = {"train": [], "test": []}
    for i, (name, img) in enumerate(images):
        split = "train" if i < half else "test"
        _save(img, root / split / f"{i}.jpg")
        rows[split].append({"file_name": f"{i}.jpg", "text": name})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["train"]))
    with open(root / "test" / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["file_name", "text"])
        w.writeheader()
        w.writerows(rows["test"])
    return root


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_wds(root: Path, images) -> Path:
    """Shards in img2dataset's output layout: 00000.tar ({key}.jpg/.txt/.json), 00000_stats.json, 00000.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    per = (len(images) + 1) // 2
    for s in range(2):
        chunk = images[s * per : (s + 1) * per]
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for j, (name, img) in enumerate(chunk):
                key = f"{s:05d}{j:04d}"
                for ext, data in (("jpg", _jpeg(img)), ("txt", name.encode()), ("json", b'{"status": "success"}')):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(chunk), "successes": len(chunk)}))
        pq.write_table(pa.table({"key": [f"{s:05d}{j:04d}" for j in range(len(chunk))]}), root / f"{s:05d}.parquet")
    return root


def _import(source: Path, out: Path | None, *flags: str) -> int:
    args = ["data", "import", str(source), *(["--out", str(out)] if out else []), "--workers", "0", *flags]
    return main(args)


def _dataset(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())


def _sizes(out: Path) -> dict:
    return json.loads((out / "sizes.json").read_text())


def _tar_names(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


# ------------------------------------------------------------------------------------------- every format


def test_every_format_imports_detects_trains_and_evaluates(emoji_images, digit_images, tmp_path, capsys):
    src, data = tmp_path / "src", tmp_path / "data"
    e = emoji_images
    sources = {
        "folder": (make_folder(src / "folder", e[:12]), ["--test-fraction", "0.25", "--workers", "2"]),
        "classes": (make_classes(src / "classes", digit_images), ["--test-fraction", "0.3", "--resize", "24"]),
        "csv": (make_csv(src / "csv", e[12:22]), ["--test-fraction", "0.3"]),
        "parquet": (make_parquet(src / "parquet", e[22:30]), ["--encode", "jpg"]),
        "jsonl": (make_jsonl(src / "jsonl", e[30:38]), ["--resize", "64", "--resize-mode", "center-crop"]),
        "coco": (make_coco(src / "coco", e[38:46]), []),
        "karpathy": (
            make_karpathy(src / "karpathy", e[:16]),
            ["--resize", "48", "--resize-mode", "border", "--images", str(src / "karpathy" / "images")],
        ),
        "hf": (make_hf(src / "hf", e[16:32]), []),
    }
    detected = {"csv": "table", "parquet": "table", "jsonl": "table"}
    for name, (source, flags) in sources.items():
        assert _import(source, data / name, *flags) == 0, name
        summary = _dataset(data / name)
        assert summary["format"] == detected.get(name, name)
        assert summary["skipped"] == {}, (name, summary["skipped"])
        assert summary["samples"] == summary["rows"] == sum(_sizes(data / name).values())
    out = capsys.readouterr().out
    assert "format folder (detected)" in out and "format karpathy (detected)" in out

    # What each format must have produced.
    assert _dataset(data / "classes")["classnames"] == ["one", "seven", "zero"]  # sorted folders: torchvision order
    assert (data / "classes" / "classnames.txt").read_text() == "one\nseven\nzero\n"
    assert (data / "classes" / "templates.txt").read_text() == "a photo of a {c}.\n"
    assert _dataset(data / "karpathy")["splits"] == {"test": 4, "train": 8, "val": 4}  # restval counted as train
    assert _dataset(data / "coco")["splits"] == {"val": 8}
    assert _dataset(data / "hf")["splits"] == {"test": 8, "train": 8}
    samples = _read_samples(data / "karpathy" / "test-000000.tar")
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (48, 48) for s in samples)  # border: padded squares
    assert all(len(s["txt"].decode().splitlines()) == 2 for s in samples)  # every caption of the image
    coco = _read_samples(data / "coco" / "val-000000.tar")
    first = json.loads(coco[0]["json"])
    assert coco[0]["txt"].decode().splitlines()[0] in [n for n, _ in e[38:46]]  # annotation-id order: name first
    assert "coco_id" in first and first["split"] == "val"
    folder = _read_samples(data / "folder" / "train-000000.tar") + _read_samples(data / "folder" / "test-000000.tar")
    metas = [json.loads(s["json"]) for s in folder]
    assert {"author": "noto"} in [m.get("meta") for m in metas]  # the sidecar json is kept
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (96, 96) for s in folder)  # no resize: bytes kept
    assert all(
        Image.open(io.BytesIO(s["jpg"])).size == (64, 64) for s in _read_samples(data / "jsonl" / "train-000000.tar")
    )

    # Existing shards in img2dataset's layout: sizes.json written beside them, nothing else touched.
    shards = make_wds(data / "wds", e[:10])
    before = sorted(p.name for p in shards.iterdir())
    assert _import(shards, None) == 0
    assert _sizes(shards) == {"00000.tar": 5, "00001.tar": 5}
    assert sorted(p.name for p in shards.iterdir()) == sorted([*before, "sizes.json"])
    assert "10 samples counted into sizes.json (format wds (detected))" in capsys.readouterr().out

    # One real training run reads every set (epoch mode: each train shard of every source is read), then evaluates.
    train_sets = ["folder", "classes", "csv", "parquet", "jsonl", "karpathy", "hf"]
    sources_cfg = [{"shards": f"{n}/train-*.tar"} for n in train_sets]
    sources_cfg += [{"shards": "coco/val-*.tar"}, {"shards": "wds/*.tar"}]
    total = sum(sum(_sizes(data / n).values()) for n in [*train_sets, "coco", "wds"] if n != "wds") + 10
    total -= sum(v for k, v in _sizes(data / "karpathy").items() if not k.startswith("train"))
    total -= sum(
        v for n in ("folder", "classes", "csv", "hf") for k, v in _sizes(data / n).items() if k.startswith("test")
    )
    recipe = {
        "name": "imported",
        "data_root": str(data),
        "model": {"config": TINY_MODEL},
        "data": {"sources": sources_cfg, "batch_size": 8, "workers": 0, "resampled": False},
        "train": {"steps": total // 8, "warmup": 1, "lr": 1e-3, "log_every": 5, "checkpoint_every": 0},
        "eval": {
            "tasks": [
                {"task": "zeroshot", "dataset": "classes", "shards": "classes/test-*.tar",
                 "classnames": "classes/classnames.txt", "templates": "classes/templates.txt"},
                {"task": "retrieval", "dataset": "karpathy", "shards": "karpathy/test-*.tar"},
                {"task": "retrieval", "dataset": "coco", "shards": "coco/val-*.tar"},
                {"task": "retrieval", "dataset": "hf", "shards": "hf/test-*.tar"},
            ]
        },
    }  # fmt: skip
    recipe_file = tmp_path / "imported.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert not summary.get("skipped"), summary.get("skipped")
    zs = json.loads((run / "eval" / "zeroshot-classes.json").read_text())["metrics"]
    assert zs["n_samples"] == sum(v for k, v in _sizes(data / "classes").items() if k.startswith("test"))
    for name in ("karpathy", "coco", "hf"):
        assert (
            0
            <= json.loads((run / "eval" / f"retrieval-{name}.json").read_text())["metrics"]["image_retrieval_recall@1"]
            <= 1
        )

    # `clipkit eval` and `clipkit embed` read the folders as they are.
    for name in ("folder", "parquet"):
        assert main(["eval", "retrieval", "--checkpoint", str(run / "model"), "--data", str(data / name),
                     "--out", str(tmp_path / f"ret-{name}.json")]) == 0  # fmt: skip
    zs_args = ["eval", "zeroshot", "--checkpoint", str(run / "model"), "--data", str(data / "classes")]
    assert main([*zs_args, "--out", str(tmp_path / "zs.json")]) == 0  # classnames.txt + templates.txt found
    assert json.loads((tmp_path / "zs.json").read_text())["metrics"]["n_samples"] == 18
    assert main(["embed", "--checkpoint", str(run / "model"), "--data", str(data / "folder"), "--out",
                 str(tmp_path / "emb")]) == 0  # fmt: skip


def _read_samples(shard: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


# ------------------------------------------------------------------------------------------- bad rows


def test_one_bad_row_of_each_kind_is_counted_exactly(emoji_images, tmp_path, capsys):
    src = make_folder(tmp_path / "src", emoji_images[:8])
    a = src / "animals"
    (a / "garbage.jpg").write_bytes(b"this is not an image")  # bad_image
    (a / "garbage.txt").write_text("garbage")
    (a / "cut.jpg").write_bytes(_jpeg(emoji_images[9][1].resize((300, 300)))[:2500])  # truncated: bad_image
    (a / "cut.txt").write_text("cut")
    Image.new("1", (9000, 8000)).save(a / "bomb.png")  # 72 Mpixel in a few KB: a decompression bomb
    (a / "bomb.txt").write_text("bomb")
    _save(emoji_images[10][1].resize((20, 20)), a / "tiny.jpg")  # too_small under --min-size 32
    (a / "tiny.txt").write_text("tiny")
    _save(emoji_images[11][1], a / "blank.jpg")
    (a / "blank.txt").write_text("  \n\n")  # no_caption: blank lines only
    _save(emoji_images[12][1], a / "nocap.jpg")  # no_caption: no .txt at all
    _save(emoji_images[13][1], a / "latin1.jpg")
    (a / "latin1.txt").write_bytes("café".encode("latin-1"))  # bad_text
    (a / "orphan.txt").write_text("a caption without its image")  # missing_image
    (a / "copy.jpg").write_bytes((a / "img 01.jpg").read_bytes())  # duplicate
    (a / "copy.txt").write_text("the same picture again")

    out = tmp_path / "out"
    assert _import(src, out, "--min-size", "32") == 0
    summary = _dataset(out)
    assert summary["skipped"] == {
        "bad_image": 2,
        "bad_text": 1,
        "duplicate": 1,
        "image_too_large": 1,
        "missing_image": 1,
        "no_caption": 2,
        "too_small": 1,
    }
    assert summary["samples"] == 8 and summary["rows"] == 8 + 7  # 8 good, 7 bad rows; 2 bad files were never rows
    ex = summary["skipped_examples"]
    assert ex["duplicate"] == ["animals/copy.jpg: same bytes as animals/img 01.jpg"] or ex["duplicate"] == [
        "animals/img 01.jpg: same bytes as animals/copy.jpg"
    ]
    assert ex["bad_text"][0].startswith("animals/latin1.jpg: latin1.txt is not UTF-8")
    assert ex["image_too_large"] == ["animals/bomb.png: 9000x8000"]
    assert any("truncated" in x for x in ex["bad_image"]) and ex["missing_image"][0].startswith("animals/orphan.txt")
    printed = capsys.readouterr().out
    assert "skipped: bad_image 2, bad_text 1, duplicate 1, image_too_large 1, missing_image 1, no_caption 2" in printed

    # Table rows: a URL (not fetched), a path to nothing, a line that is not JSON, a row that is not UTF-8.
    table = tmp_path / "t"
    _save(emoji_images[0][1], table / "ok.jpg")
    (table / "rows.jsonl").write_bytes(
        b'{"image": "ok.jpg", "caption": "fine"}\n'
        b'{"image": "https://example.com/x.jpg", "caption": "remote"}\n'
        b'{"image": "gone.jpg", "caption": "missing"}\n'
        b"{not json\n"
        b'{"image": "ok2.jpg", "caption": "caf\xe9"}\n'
    )
    assert _import(table / "rows.jsonl", tmp_path / "tout") == 0
    t = _dataset(tmp_path / "tout")
    assert t["skipped"] == {"bad_row": 1, "bad_text": 1, "missing_image": 1, "url": 1} and t["samples"] == 1
    assert any("img2dataset" in n for n in t["notes"])


def test_unknown_column_is_an_error_listing_the_columns(emoji_images, tmp_path, capsys):
    table = make_csv(tmp_path, emoji_images[:2])
    assert _import(table, tmp_path / "out", "--caption-col", "text") == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "the table has: filepath, title" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- resume, bytes


def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_import_resumes_byte_identical(emoji_images, tmp_path):
    src = make_folder(tmp_path / "src", emoji_images[:20])
    flags = ["--shard-size", "4", "--test-fraction", "0.2", "--resize", "64", "--encode", "png"]
    ref = tmp_path / "ref"
    assert _import(src, ref, *flags) == 0
    assert len(_sizes(ref)) >= 5

    # SIGKILL in the middle of the 3rd shard (after its first sample): two shards are complete, the third is not.
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "clipkit.cli", "data", "import", str(src), "--out", str(out), "--workers", "0", *flags]
    env = dict(os.environ, CLIPKIT_FAULT="sigkill_in_import@3", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "sizes.json").exists() and not (out / "dataset.json").exists()
    assert len(list(out.glob("*.tar"))) == 2  # the cut shard was never renamed into place
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    # The same command again finishes only the missing shards and ends byte-identical to the uninterrupted import.
    assert _import(src, out, *flags) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in done} == done  # not rewritten
    assert _all_bytes(out) == _all_bytes(ref)

    # A re-import of unchanged input writes identical bytes (and no shard); so do 2 worker processes.
    assert _import(src, out, *flags) == 0
    assert _all_bytes(out) == _all_bytes(ref) and _dataset(out)["files"] == _dataset(ref)["files"]
    assert main(["data", "import", str(src), "--out", str(tmp_path / "w2"), "--workers", "2", *flags]) == 0
    assert _all_bytes(tmp_path / "w2") == _all_bytes(ref)

    # Two ranks writing shards 0::2 and 1::2 (no duplicates here, so no difference) give the same set; only their
    # resume records differ (each rank chains its own shards' fingerprints).
    for rank in (0, 1):
        assert _import(src, tmp_path / "ranks", *flags, "--rank", str(rank), "--world-size", "2") == 0
    shown = lambda folder: {k: v for k, v in _all_bytes(folder).items() if not k.startswith(".import/")}  # noqa: E731
    assert shown(tmp_path / "ranks") == shown(ref)


# ------------------------------------------------------------------------------------------- options


def test_resize_modes_sizes_and_reduced_jpeg_decoding(emoji_images, tmp_path):
    # Hand-computed target sizes of a 400x300 image at 128: shorter side -> 128 (keep, center-crop), longer (border).
    assert target_size(400, 300, ImageOptions(resize=128, mode="keep")) == (0.4266666666666667, (171, 128))
    assert target_size(400, 300, ImageOptions(resize=128, mode="border"))[1] == (128, 96)
    assert target_size(64, 48, ImageOptions(resize=128)) == (1.0, (64, 48))  # never enlarged ...
    assert target_size(64, 48, ImageOptions(resize=96, upscale=True))[1] == (128, 96)  # ... unless asked

    photo = emoji_images[5][1].resize((400, 300), Image.Resampling.BICUBIC)
    _save(photo, tmp_path / "p.jpg")
    row = Row(rel="p.jpg", image=str(tmp_path / "p.jpg"), captions=("x",))
    sizes = {}
    for mode in ("keep", "center-crop", "border"):
        res = process_row(row, ImageOptions(resize=128, mode=mode, encode="png"))
        assert res.reason is None
        sizes[mode] = Image.open(io.BytesIO(res.image)).size
    assert sizes == {"keep": (171, 128), "center-crop": (128, 128), "border": (128, 128)}
    # 400 -> 100 is a 4x reduction: the JPEG is decoded at 1/2 or smaller (DCT scaling), then resized; the pixels stay
    # within a few levels of a full-size decode + resize.
    res = process_row(row, ImageOptions(resize=75, encode="png"))
    fast = np.asarray(Image.open(io.BytesIO(res.image)), dtype=np.float64)
    full = np.asarray(Image.open(tmp_path / "p.jpg").convert("RGB").resize((100, 75), Image.Resampling.BOX))
    assert fast.shape == full.shape and np.abs(fast - full).mean() < 4.0
    with pytest.raises(ValueError, match="--resize-mode"):
        ImageOptions(mode="stretch")


def test_split_option_and_hash_split_are_deterministic(emoji_images, tmp_path):
    source = make_karpathy(tmp_path / "k", emoji_images[:12])
    images = ["--images", str(tmp_path / "k" / "images")]
    assert _import(source, tmp_path / "test", "--split", "test", *images) == 0
    d = _dataset(tmp_path / "test")
    assert d["splits"] == {"test": 3} and d["not_in_split"] == {"train": 6, "val": 3}
    assert _import(source, tmp_path / "none", "--split", "nope", *images) == 2
    # The hash split depends on the key only: the same rows land in test whatever else is imported.
    folder = make_folder(tmp_path / "f", emoji_images[:20])
    opts = ImportOptions(test_fraction=0.3)
    a = import_source(folder, tmp_path / "a", "folder", opts, workers=0)
    (folder / "animals" / "img 01.jpg").unlink()
    (folder / "animals" / "img 01.txt").unlink()
    b = import_source(folder, tmp_path / "b", "folder", opts, workers=0)
    keys = {n: {s["__key__"] for s in _read_samples(tmp_path / n / "test-000000.tar")} for n in ("a", "b")}
    assert keys["b"] == keys["a"] - {"animals_img_01"} and a["splits"]["test"] >= 3 and b["skipped"] == {}


# ------------------------------------------------------------------------------------------- guard, validate, inspect


def test_output_folder_guard_refuses_and_deletes_nothing(emoji_images, tmp_path, capsys):
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    (notes / "train-000000.tar").write_bytes(b"someone else's shard")
    assert main(["data", "build", "digits", "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert str(notes) in err and "notes.txt" in err and "nothing was changed" in err
    assert (notes / "notes.txt").read_text() == "precious" and (notes / "train-000000.tar").read_bytes()

    src = make_folder(tmp_path / "src", emoji_images[:4])
    assert _import(src, notes) == 2  # the same guard for import
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt", "train-000000.tar"]

    built = tmp_path / "digits"
    assert main(["data", "build", "digits", "--out", str(built)]) == 0
    assert main(["data", "build", "digits", "--out", str(built)]) == 0  # a rebuild of the same dataset: fine
    (built / "dataset.json").unlink()  # as a build killed before its end leaves it: its claim lets it re-run
    assert main(["data", "build", "digits", "--out", str(built)]) == 0
    assert main(["data", "build", "emoji", "--out", str(built)]) == 2  # but not as another dataset
    assert _import(src, built) == 2  # another dataset's folder
    assert "a build of another dataset" in capsys.readouterr().err
    (built / "keep.me").write_text("x")
    assert main(["data", "build", "digits", "--out", str(built)]) == 2 and (built / "keep.me").is_file()

    other = make_folder(tmp_path / "src2", emoji_images[4:8])
    assert _import(src, tmp_path / "imp") == 0
    assert _import(src, tmp_path / "imp", "--resize", "32") == 0  # same source, new options: redone in place
    assert _import(other, tmp_path / "imp") == 2  # another source


def test_validate_names_truncated_and_miscounted_shards(digits_dir, tmp_path, capsys):
    assert main(["data", "validate", str(digits_dir)]) == 0
    assert "all good" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in digits_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    data = (bad / "test-000000.tar").read_bytes()
    (bad / "test-000000.tar").write_bytes(data[: len(data) // 2])  # truncated
    sizes = _sizes(bad)
    sizes["train-000000.tar"] += 1  # miscounted
    sizes["train-000001.tar"] = 5  # listed, missing
    (bad / "sizes.json").write_text(json.dumps(sizes))
    assert main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {bad / 'test-000000.tar'}" in out and "truncated" in out
    assert f"BAD {bad / 'train-000000.tar'}" in out and "sizes.json lists 1438 samples, tar has 1437" in out
    assert "train-000001.tar: listed in sizes.json but missing" in out
    assert out.strip().endswith("3 bad: test-000000.tar, train-000000.tar, train-000001.tar")


def test_inspect_reports_counts_labels_skips_and_draws_a_contact_sheet(digit_images, tmp_path, capsys):
    src = make_classes(tmp_path / "src", digit_images)
    (src / "zero" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert _import(src, out, "--test-fraction", "0.3") == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json", "--samples", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 18 and sum(s["samples"] for s in report["splits"].values()) == 18
    assert report["labels"] == {"one": 6, "seven": 6, "zero": 6}
    assert report["skipped"] == {"bad_image": 1}
    assert report["image_width"]["p50"] == 32 and report["captions_per_sample"]["p100"] == 1
    sheet = Image.open(report["contact_sheet"])
    assert sheet.format == "PNG" and sheet.width > 200
    assert main(["data", "inspect", str(out), "--no-sheet"]) == 0
    assert "skipped when the set was written: bad_image 1" in capsys.readouterr().out


def test_registry_lists_every_format():
    assert set(FORMATS) == {"wds", "table", "karpathy", "coco", "hf", "folder", "classes"}


# ------------------------------------------------------------------------------------------- CLIP_benchmark


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_karpathy_retrieval_equals_clip_benchmark(emoji_images, tmp_path):
    """The same exported model on the same imported Karpathy test split: clipkit's `eval retrieval` metrics against
    CLIP_benchmark's own `zeroshot_retrieval.evaluate` (PyPI clip-benchmark, test extra), every R@k within 1e-6."""
    import copy

    import torch
    from clip_benchmark.metrics import zeroshot_retrieval
    from torch.utils.data import DataLoader

    from clipkit.config import ModelCfg
    from clipkit.evaluate import run as evals
    from clipkit.models import bundle_from_config, load_model, save_model
    from clipkit.models.factory import resolve_config

    cbw = _load_tool("clip_benchmark_worker.py")
    source = make_karpathy(tmp_path / "k", emoji_images, splits=("test",))  # 48 images x 2 captions
    images = str(tmp_path / "k" / "images")
    assert _import(source, tmp_path / "set", "--split", "test", "--shard-size", "20", "--images", images) == 0
    shards = sorted(str(p) for p in (tmp_path / "set").glob("test-*.tar"))
    assert len(shards) == 3

    torch.manual_seed(0)
    bundle = bundle_from_config(resolve_config(ModelCfg(config=copy.deepcopy(TINY_MODEL))))
    model_dir = save_model(tmp_path / "model", bundle.model, bundle.config)
    ours = evals.retrieval(load_model(model_dir), "::".join(shards), 16, "cpu")

    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    ds = cbw.Samples(shards, preprocess)
    loader = DataLoader(ds, batch_size=16, shuffle=False, num_workers=0, collate_fn=cbw.captions_collate)
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert len(ds) == ours["n_images"] == 48 and ours["n_texts"] == 96 and not ours["skipped"]
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= 1e-6, (key, ours[key], value)
    assert len(theirs) == 6


# ------------------------------------------------------------------------------------------- the speed benchmark


def test_bench_import_smoke_writes_ratio_json(digits_dir, tmp_path, capsys):
    """tools/bench/bench_import.py end to end on 6 photos composed from real digits, the plain PIL reference."""
    from tools.bench import bench_import

    out = tmp_path / "bench.json"
    args = ["--source", str(digits_dir / "test-*.tar"), "--photos", str(tmp_path / "photos"), "--n", "6"]
    args += ["--resize", "128", "--pairs", "2", "--workers", "2", "--no-lock", "--json", str(out)]
    assert bench_import.main(args) == 0
    assert "import ratio clipkit / pil: median" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [p["order"][0] for p in report["pairs"]] == ["clipkit", "reference"]  # alternating order
    assert all(p["ratio"] > 0 and p["seconds"]["clipkit"] > 0 for p in report["pairs"])
    assert report["settings"]["workers"] == 2 and report["reference"] == "pil"
    photos = sorted((tmp_path / "photos").glob("*.jpg"))
    assert len(photos) == 6 and all(256 <= min(Image.open(p).size) <= 512 for p in photos)


@pytest.mark.slow
def test_real_img2dataset_output_gets_a_valid_sizes_json(emoji_images, tmp_path):
    """img2dataset itself (from local files, file:// URLs) writes the shards; `--format wds` counts them.

    img2dataset pins webdataset<0.3 and pandas<3, so it is not installed beside clipkit: point
    CLIPKIT_IMG2DATASET_PATH at a `pip install --no-deps --target DIR img2dataset opencv-python-headless
    albumentations==1.4.24 albucore==0.0.23 simsimd stringzilla fire termcolor ExifRead-nocycle` folder."""
    i2d = os.environ.get("CLIPKIT_IMG2DATASET_PATH", "/tmp/i2d")
    if not (Path(i2d) / "img2dataset").is_dir():
        pytest.skip(f"no img2dataset files in {i2d} (set CLIPKIT_IMG2DATASET_PATH)")
    src = make_folder(tmp_path / "src", emoji_images[:12])
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for jpg in sorted(src.rglob("*.jpg")):
            w.writerow([f"file://{jpg}", jpg.with_suffix(".txt").read_text().splitlines()[0]])
    script = (
        "from img2dataset import download; download(url_list='urls.csv', input_format='csv', url_col='url', "
        "caption_col='caption', output_folder='shards', output_format='webdataset', image_size=64, "
        "processes_count=1, thread_count=2, number_sample_per_shard=5, distributor='multiprocessing')"
    )
    env = dict(os.environ, PYTHONPATH=i2d)
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    shards = tmp_path / "shards"
    assert _import(shards, None) == 0
    assert _sizes(shards) == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}
    assert main(["data", "validate", str(shards)]) == 0
