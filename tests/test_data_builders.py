"""Shard writing/reading and the built-in dataset builders, on the real font and data installed on this machine."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipkit.data import shards
from clipkit.data.builtin import BUILDERS, build, digits, emoji, fashion_mnist


def _read_samples(paths: list[str]) -> list[dict]:
    return list(wds.WebDataset(paths, shardshuffle=False))


def _image(sample: dict) -> Image.Image:
    return Image.open(io.BytesIO(sample["png"]))


def _sizes(folder: Path) -> dict[str, int]:
    return json.loads((folder / "sizes.json").read_text())


def _toy_samples(n: int) -> list[dict]:
    samples = []
    for i in range(n):
        img = Image.new("RGB", (8, 8), (i * 10 % 256, 0, 255 - i))
        samples.append(
            {
                "__key__": f"toy_{i:03d}",
                "png": shards.encode_png(img),
                "txt": f"caption {i}\nsecond caption {i}",
                "json": {"index": i, "name": f"toy {i}"},
            }
        )
    return samples


# --- shards -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3)])
def test_encode_png_array_round_trips_through_pillow(shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)

    decoded = Image.open(io.BytesIO(shards.encode_png_array(pixels)))

    assert decoded.mode == ("L" if len(shape) == 2 else "RGB")
    np.testing.assert_array_equal(np.asarray(decoded), pixels)
    with pytest.raises(ValueError, match="uint8"):
        shards.encode_png_array(pixels.astype(np.float32))


def test_write_shards_splits_by_maxcount_and_records_sizes(tmp_path):
    counts = shards.write_shards(_toy_samples(25), tmp_path, "train", maxcount=10)

    assert counts == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 5}
    assert _sizes(tmp_path) == counts
    paths = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    assert shards.read_sizes(paths) == [10, 10, 5]


def test_written_shards_read_back_exactly_with_webdataset(tmp_path):
    written = _toy_samples(25)
    shards.write_shards(written, tmp_path, "train", maxcount=10)

    read = _read_samples(shards.expand_shards(str(tmp_path / "train-{000000..000002}.tar")))

    assert [s["__key__"] for s in read] == [s["__key__"] for s in written]
    assert [s["txt"].decode() for s in read] == [s["txt"] for s in written]
    assert [json.loads(s["json"]) for s in read] == [s["json"] for s in written]
    assert [s["png"] for s in read] == [s["png"] for s in written]


def test_sizes_json_merges_prefixes_and_rewrites_replace_stale_shards(tmp_path):
    shards.write_shards(_toy_samples(25), tmp_path, "train", maxcount=10)
    shards.write_shards(_toy_samples(4), tmp_path, "test", maxcount=10)
    assert _sizes(tmp_path) == {
        "train-000000.tar": 10,
        "train-000001.tar": 10,
        "train-000002.tar": 5,
        "test-000000.tar": 4,
    }

    shards.write_shards(_toy_samples(12), tmp_path, "train", maxcount=10)

    assert _sizes(tmp_path) == {"train-000000.tar": 10, "train-000001.tar": 2, "test-000000.tar": 4}
    assert not (tmp_path / "train-000002.tar").exists()


def test_write_shards_rejects_keys_with_dots(tmp_path):
    sample = {**_toy_samples(1)[0], "__key__": "a.b"}
    with pytest.raises(ValueError, match="a.b"):
        shards.write_shards([sample], tmp_path, "train")


def test_read_sizes_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        shards.read_sizes([str(tmp_path / "train-000000.tar")])
    shards.write_shards(_toy_samples(3), tmp_path, "train")
    with pytest.raises(KeyError, match="train-000007.tar"):
        shards.read_sizes([str(tmp_path / "train-000007.tar")])


def test_expand_shards_braces_lists_and_globs(tmp_path):
    shards.write_shards(_toy_samples(25), tmp_path, "train", maxcount=10)
    shards.write_shards(_toy_samples(4), tmp_path, "test", maxcount=10)
    train = [str(tmp_path / f"train-00000{i}.tar") for i in range(3)]
    test = str(tmp_path / "test-000000.tar")

    assert shards.expand_shards(str(tmp_path / "train-{000000..000002}.tar")) == train
    assert shards.expand_shards(f"{tmp_path}/test-000000.tar::{tmp_path}/train-{{000000..000001}}.tar") == [
        test,
        *train[:2],
    ]
    assert shards.expand_shards(f"{tmp_path}/train-*.tar") == train


def test_expand_shards_names_the_pattern_that_matches_nothing(tmp_path):
    shards.write_shards(_toy_samples(3), tmp_path, "train")
    missing = f"{tmp_path}/val-*.tar"
    with pytest.raises(FileNotFoundError, match="val-"):
        shards.expand_shards(f"{tmp_path}/train-000000.tar::{missing}")
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        shards.expand_shards(str(tmp_path / "train-{000000..000001}.tar"))


def _member_offset(path: Path, index: int) -> int:
    with tarfile.open(path) as tar:
        return tar.getmembers()[index].offset


@pytest.mark.parametrize("where", ["inside_member", "between_members"])
def test_validate_shards_reports_a_truncated_tar_and_keeps_going(tmp_path, where):
    shards.write_shards(_toy_samples(20), tmp_path, "train", maxcount=10)
    good, cut = tmp_path / "train-000000.tar", tmp_path / "train-000001.tar"
    # Member 13 is the png of the 5th sample (members go json, png, txt). Cut in its data (after the 512-byte header)
    # or right at its header, where tarfile itself just stops without an error.
    offset = _member_offset(cut, 13) + (512 + 40 if where == "inside_member" else 0)
    cut.write_bytes(cut.read_bytes()[:offset])

    report = shards.validate_shards([good, cut])

    assert report[str(good)] == {"samples": 10, "bad": [], "error": None}
    assert report[str(cut)]["error"] is not None
    assert report[str(cut)]["samples"] == 5
    assert "toy_014: no image" in report[str(cut)]["bad"]
    assert "sizes.json lists 10 samples, tar has 5" in report[str(cut)]["bad"]


def test_validate_shards_flags_samples_without_image_or_text(tmp_path):
    samples = _toy_samples(3)
    del samples[1]["png"]
    del samples[2]["txt"]
    shards.write_shards(samples, tmp_path, "train")

    report = shards.validate_shards([tmp_path / "train-000000.tar"])

    assert report[str(tmp_path / "train-000000.tar")]["bad"] == ["toy_001: no image", "toy_002: no txt"]


# --- emoji --------------------------------------------------------------------------------------------------------

EMOJI_TEST_SNIPPET = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone

# subgroup: person
1F9D1 200D 1F9B0                                       ; fully-qualified     # 🧑‍🦰 E12.1 person: red hair
1F468 1F3FF 200D 1F9B0 ; fully-qualified     # 👨🏿‍🦰 E11.0 man: dark skin tone, red hair
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: Flags

# subgroup: country-flag
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E2.0 flag: France
0031 FE0F 20E3                                         ; fully-qualified     # 1️⃣ E0.6 keycap: 1
0031 20E3                                              ; unqualified         # 1⃣ E0.6 keycap: 1
"""

CLDR_SNIPPET = """\
<?xml version="1.0" encoding="UTF-8" ?>
<!DOCTYPE ldml SYSTEM "../../common/dtd/ldml.dtd">
<ldml>
    <identity><language type="en"/></identity>
    <annotations>
        <annotation cp="😀">face | grin | grinning face</annotation>
        <annotation cp="😀" type="tts">grinning face</annotation>
        <annotation cp="☺">face | outlined | relaxed | smile | smiling face</annotation>
        <annotation cp="☺" type="tts">smiling face</annotation>
    </annotations>
</ldml>
"""


def test_parse_emoji_test_keeps_fully_qualified_without_skin_tones():
    kept, skipped = emoji.select_emoji(emoji.parse_emoji_test(EMOJI_TEST_SNIPPET))

    assert [(e.name, e.group, e.subgroup) for e in kept] == [
        ("grinning face", "Smileys & Emotion", "face-smiling"),
        ("smiling face", "Smileys & Emotion", "face-smiling"),
        ("waving hand", "People & Body", "hand-fingers-open"),
        ("person: red hair", "People & Body", "person"),
        ("flag: France", "Flags", "country-flag"),
        ("keycap: 1", "Flags", "country-flag"),
    ]
    assert skipped == {"not_fully_qualified": 3, "skin_tone": 2}
    assert kept[1].text == "\u263a\ufe0f"
    assert kept[1].codepoints_hex == "263A FE0F"
    assert [e.key for e in kept[::2]] == ["emoji_1f600", "emoji_1f44b", "emoji_1f1eb_1f1f7"]


def test_parse_cldr_annotations_reads_keywords_and_tries_without_fe0f():
    annotations = emoji.parse_cldr_annotations(CLDR_SNIPPET)

    assert annotations == {
        "😀": ["face", "grin", "grinning face"],
        "☺": ["face", "outlined", "relaxed", "smile", "smiling face"],
    }
    assert emoji.keywords_for("\u263a\ufe0f", annotations)[:3] == ["face", "outlined", "relaxed"]
    assert emoji.keywords_for("🫠", annotations) == []


def test_emoji_split_rule_is_the_documented_hash():
    assert emoji.split_of("emoji_1f600") == (
        "test" if int(hashlib.sha1(b"emoji_1f600").hexdigest(), 16) % 10 == 0 else "train"
    )


@pytest.fixture(scope="module")
def emoji_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji")
    return out, emoji.build_emoji(out)


def test_emoji_build_counts_and_split(emoji_build):
    out, summary = emoji_build
    train, test = summary["splits"]["train"], summary["splits"]["test"]

    assert train + test > 1700
    assert train > 0 and test > 0
    assert 0.07 <= test / (train + test) <= 0.13
    assert sum(_sizes(out).values()) == train + test
    assert summary["skipped"]["blank_render"] == 0
    assert json.loads((out / "dataset.json").read_text()) == json.loads(json.dumps(summary))


def test_emoji_grinning_face_sample(emoji_build):
    out, _ = emoji_build
    split = emoji.split_of("emoji_1f600")
    sample = next(
        s for s in _read_samples(shards.expand_shards(f"{out}/{split}-*.tar")) if s["__key__"] == "emoji_1f600"
    )

    lines = sample["txt"].decode().splitlines()
    meta = json.loads(sample["json"])
    assert lines[0] == "grinning face"
    assert "grin" in lines[1].split(", ")
    assert "grin" in meta["keywords"]
    assert meta["codepoints"] == "1F600" and meta["group"] == "Smileys & Emotion" and meta["split"] == split
    classnames = (out / "classnames.txt").read_text().splitlines()
    assert meta["label"] == 0 and classnames[0] == "smileys & emotion" and classnames[-1] == "flags"
    assert len(classnames) == 9 and "component" not in classnames  # components are not fully qualified
    image = _image(sample)
    assert image.mode == "RGB" and image.size == (72, 72)
    assert np.asarray(image).min() < 200  # drawn, not a blank white square


def test_emoji_shards_are_valid(emoji_build):
    out, _ = emoji_build
    report = shards.validate_shards(sorted(out.glob("*.tar")))

    assert all(r["bad"] == [] and r["error"] is None for r in report.values())


# --- fashion-mnist ------------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_read_idx_parses_images_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    _write_idx(tmp_path / "images.gz", images, 2051)
    _write_idx(tmp_path / "labels.gz", labels, 2049)

    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "images.gz", 2051), images)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "labels.gz", 2049), labels)
    with pytest.raises(ValueError, match="magic 2049"):
        fashion_mnist.read_idx(tmp_path / "labels.gz", 2051)


@pytest.fixture(scope="module")
def fashion_mnist_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion-mnist")
    return out, fashion_mnist.build_fashion_mnist(out)


def test_fashion_mnist_build_sizes(fashion_mnist_build):
    out, summary = fashion_mnist_build
    sizes = _sizes(out)

    assert sum(n for name, n in sizes.items() if name.startswith("train-")) == 60000
    assert sum(n for name, n in sizes.items() if name.startswith("test-")) == 10000
    assert sorted(sizes) == [f"test-00000{i}.tar" for i in range(2)] + [f"train-00000{i}.tar" for i in range(6)]
    assert summary["splits"] == {"train": 60000, "test": 10000}
    assert (out / "classnames.txt").read_text().splitlines()[9] == "ankle boot"
    assert len((out / "classnames.txt").read_text().splitlines()) == 10
    assert len((out / "templates.txt").read_text().splitlines()) == 8


def test_fashion_mnist_sample_label_matches_caption(fashion_mnist_build):
    out, _ = fashion_mnist_build
    classnames = (out / "classnames.txt").read_text().splitlines()
    train = next(iter(wds.WebDataset([str(out / "train-000003.tar")], shardshuffle=False)))
    test = next(iter(wds.WebDataset([str(out / "test-000001.tar")], shardshuffle=False)))

    for sample in (train, test):
        meta = json.loads(sample["json"])
        assert meta["classname"] == classnames[meta["label"]]
        assert all(classnames[meta["label"]] in line for line in sample["txt"].decode().splitlines())
        image = _image(sample)
        assert image.mode == "RGB" and image.size == (28, 28)
    assert train["__key__"] == "fmnist_train_30000" and len(train["txt"].decode().splitlines()) == 8
    assert test["__key__"] == "fmnist_test_05000"
    assert test["txt"].decode() == f"a photo of a {json.loads(test['json'])['classname']}."


# --- digits -------------------------------------------------------------------------------------------------------


def test_digits_build(tmp_path):
    summary = digits.build_digits(tmp_path, image_size=16)

    # Indices 0, 5, ..., 1795 are test: 360 of 1797.
    assert summary["splits"] == {"train": 1437, "test": 360}
    assert _sizes(tmp_path) == {"train-000000.tar": 1437, "test-000000.tar": 360}
    sample = next(iter(wds.WebDataset([str(tmp_path / "test-000000.tar")], shardshuffle=False)))
    assert sample["__key__"] == "digits_0000"
    assert sample["txt"].decode() == "a photo of the digit zero."
    assert json.loads(sample["json"]) == {"label": 0, "classname": "zero", "split": "test"}
    image = _image(sample)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert len(np.unique(np.asarray(image))) > 2
    report = shards.validate_shards(sorted(tmp_path.glob("*.tar")))
    assert [r["samples"] for r in report.values()] == [360, 1437]


# --- dispatch and missing sources ---------------------------------------------------------------------------------


def test_build_rejects_unknown_names_listing_the_known_ones(tmp_path):
    assert set(BUILDERS) == {"emoji", "fashion-mnist", "digits", "openclipart"}
    with pytest.raises(ValueError, match="emoji, fashion-mnist, digits"):
        build("cifar", tmp_path)


def test_missing_emoji_font_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "FONT_PATH", tmp_path / "NoFont.ttf")
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji") as info:
        emoji.build_emoji(tmp_path / "out")
    assert "NoFont.ttf" in str(info.value)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        build("fashion-mnist", tmp_path / "out")
    assert "nowhere" in str(info.value)
