"""The OpenClipart builder: metadata parsing and caption rules on hand-written SVGs, then a build of a real subset."""

from __future__ import annotations

import hashlib
import io
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipkit.data import shards
from clipkit.data.builtin import BUILDERS, build, openclipart, svg_captions
from clipkit.data.builtin.svg_captions import SvgMetadata


def _svg(
    title: str = "",
    keywords: tuple[str, ...] = (),
    creator: str = "",
    body: str = '<rect x="10" y="10" width="80" height="40" fill="#c00000"/>',
    svg_title: str = "",
    size: str = 'width="100" height="100"',
) -> str:
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    agent = f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>" if creator else ""
    title_el = f"<title>{svg_title}</title>" if svg_title else ""
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" {size}>
  {title_el}
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
    {agent}
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""


# --- metadata and captions ----------------------------------------------------------------------------------------


def test_parse_svg_metadata_reads_work_title_keywords_and_creator():
    svg = _svg("  Gattina   Cat ", ("mammal", "", "cat"), creator="Architetto Francesco Rollandin")

    meta = svg_captions.parse_svg_metadata(svg)

    # The publisher's and creator's <dc:title> are not the picture's title.
    assert meta == SvgMetadata("Gattina Cat", "", ("mammal", "cat"), ("Architetto Francesco Rollandin",))


def test_parse_svg_metadata_falls_back_to_the_svg_title_and_rejects_bad_files():
    no_namespace = '<svg width="10" height="10"><title>Sheep</title><rect width="5" height="5"/></svg>'

    assert svg_captions.parse_svg_metadata(_svg(svg_title="Scorpion")).svg_title == "Scorpion"
    assert svg_captions.parse_svg_metadata(no_namespace) == SvgMetadata("", "Sheep", (), ())
    with pytest.raises(ET.ParseError):
        svg_captions.parse_svg_metadata("<svg><g></svg>")
    with pytest.raises(ValueError, match="not <svg>"):
        svg_captions.parse_svg_metadata("<html/>")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Clipart by Nicu Buculei - birthday_cake", "birthday cake"),
        ("Clipart by Pedro A. Gracia Fajardo - Spain - Canary", "Spain - Canary"),
        ("Tigre02", "Tigre"),
        ("Uccello profilo 01", "Uccello profilo"),
        ("Stickyman 001", "Stickyman"),
        ("BlueMan#101", "Blue Man"),
        ("large_braces.svg", "large braces"),
        ("05_fullmoon_openclipart", "05 fullmoon"),
        ("Telefono (email: frollandin@email.it)", "Telefono"),
        ("flamand_bw", "flamand black and white"),
        (" zimbabwe", "zimbabwe"),
        ("ralf@ark.in-berlin.de", ""),
        ("12", ""),
        # Numbers that are part of the name stay.
        ("international maritime signal flag 0", "international maritime signal flag 0"),
        ("Tasto 1", "Tasto 1"),
        ("Route 66", "Route 66"),
        ("MD5", "MD5"),
        ("g8", "g8"),
        ("Alcatel_OXO1", "Alcatel OXO1"),
        ("Iraqi flag 1959-1963", "Iraqi flag 1959-1963"),
    ],
)
def test_clean_title(raw, clean):
    assert svg_captions.clean_title(raw) == clean


def test_useful_keywords_drop_generic_junk_and_authors():
    raw = ["hash", "", "action", "Computer", "icons", "theme", "North_America", "rome,italy", "0x8963570"]
    raw += ["hash(0x8a3ecd4)", "11", "Architetto Francesco Rollandin", "computer", "clip art"]

    assert svg_captions.useful_keywords(raw, ["Architetto Francesco Rollandin"]) == [
        "computer",
        "north america",
        "rome",
        "italy",
    ]


@pytest.mark.parametrize(
    ("title", "count", "expected"),
    [
        ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", 1, True),
        ("gramastar", 26, True),
        ("gramastar", 25, False),
        ("Lemon SVG theme", 2, True),
        ("Lemon SVG theme", 1, False),
        ("AIGA_Symbol_Signs", 2, True),
        ("Clipart by Nicu Buculei - pear", 10, True),
        ("Bullet Hole", 13, False),
        ("", 100, False),
    ],
)
def test_is_collection_title(title, count, expected):
    assert svg_captions.is_collection_title(title, count, max_share=25) is expected


def test_assign_captions_keeps_titles_replaces_collections_and_drops_the_rest():
    flat = "Part of the Flat Icon Collection (Wed Aug 25 2004)"
    metas = [
        SvgMetadata("Tigre02", "", ("mammal", "feline", "hash")),
        SvgMetadata(flat, "", ("hash", "computer", "printer")),
        SvgMetadata(flat, "", ("icons", "theme")),
        *[SvgMetadata("gramastar", "", ("stars", "shapes", "magick"))] * 4,
        SvgMetadata("", "Sheep", ("mammal",)),
        SvgMetadata("Mirjam Meijer", "", ("bird",), ("Mirjam Meijer",)),
        SvgMetadata("Pen", "", ("pen",)),
        SvgMetadata("", "", ()),
    ]

    captions, collections = svg_captions.assign_captions(metas, max_share=3)

    assert [(c.text, c.source, c.reason) for c in captions] == [
        ("Tigre\nmammal, feline", "title", "title"),
        ("computer, printer", "keywords", "collection_title"),
        (None, None, "no_keywords"),
        # "gramastar" is on 4 > 3 images: a collection; its keyword caption is on 4 > 3 images too: dropped.
        *[(None, None, "shared_keywords")] * 4,
        ("Sheep\nmammal", "svg_title", "svg_title"),
        ("bird", "keywords", "no_title"),  # a title that is the author's name is no title
        ("Pen", "title", "title"),  # the keyword line would repeat the title
        (None, None, "no_keywords"),
    ]
    assert collections == {"part of the flat icon collection (wed aug 25 2004)": 2, "gramastar": 4}


def test_sample_key_and_split_rule():
    key = openclipart.sample_key("people/martin_luther_king_jr._h_01.svg")

    assert key == "openclipart_people_martin_luther_king_jr__h_01"
    assert "." not in key
    expected = "test" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0 else "train"
    assert openclipart.split_of(key) == expected


# --- rendering and building on a hand-written tree ----------------------------------------------------------------


def test_render_fits_the_drawing_on_white_and_keeps_its_aspect():
    pytest.importorskip("cairosvg")
    # A transparent page with a small 40x10 red bar in a corner: cropped to the bar, centered, aspect kept.
    svg = _svg(body='<rect x="0" y="0" width="40" height="10" fill="#ff0000"/>', size='width="400" height="400"')

    image = openclipart.render_svg(svg.encode(), 64)

    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (64, 64)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60)
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert 56 <= cols.size <= 62 and 13 <= rows.size <= 17  # about 15/16 of 64 wide, a quarter of that high
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1
    assert (pixels[0] == 255).all()  # white, not black, where the page was transparent
    assert openclipart.render_svg(_svg(body="").encode(), 64) is None


def test_process_svg_times_out_a_slow_render(monkeypatch, tmp_path):
    path = tmp_path / "slow.svg"
    path.write_text(_svg("Slow"))

    def slow(data, image_size):
        time.sleep(5)

    monkeypatch.setattr(openclipart, "render_svg", slow)
    start = time.perf_counter()
    result = openclipart.process_svg(str(path), 32, timeout=0.2)

    assert result["status"] == "timeout" and result["metadata"]["title"] == "Slow"
    assert time.perf_counter() - start < 2


def _circle(color: str) -> str:
    return f'<circle cx="50" cy="50" r="30" fill="{color}"/>'


@pytest.fixture
def svg_tree(tmp_path, monkeypatch):
    root = tmp_path / "svg"
    files = {
        "animals/tiger.svg": _svg("Tigre02", ("mammal", "feline"), body=_circle("orange")),
        # Same drawing as tiger.svg under another folder, with other metadata: kept once.
        "unsorted/tiger_copy.svg": _svg("Tiger", ("unsorted",), body=_circle("orange")),
        "computer/a.svg": _svg("Lemon SVG theme", ("icon", "hash", "printer"), body=_circle("blue")),
        "computer/b.svg": _svg("Lemon SVG theme", ("icons", "theme"), body=_circle("green")),
        "computer/c.svg": _svg("Lemon SVG theme", ("scanner",), body=_circle("purple")),
        "broken/malformed.svg": "<svg><g></svg>",
        "broken/blank.svg": _svg("Nothing", ("empty",), body='<linearGradient id="g"/>'),
        "broken/bad_viewbox.svg": _svg("Bad viewBox", ("x",), size='width="9" height="9" viewBox="0 0 abc"'),
        "broken/huge.svg": _svg("Huge", ("big",), body=_circle("red") + "<!--" + "x" * 5000 + "-->"),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "shapes").mkdir()
    (root / "shapes/tiger_link.svg").symlink_to(root / "animals/tiger.svg")
    monkeypatch.setattr(openclipart, "SVG_DIR", root)
    monkeypatch.setattr(openclipart, "MAX_SVG_BYTES", 4000)
    return root


def _read(out: Path) -> dict[str, dict]:
    samples = wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)
    return {json.loads(s["json"])["path"]: s for s in samples}


def test_build_on_hand_written_svgs_counts_every_outcome(svg_tree, tmp_path):
    pytest.importorskip("cairosvg")
    out = tmp_path / "out"

    summary = openclipart.build_openclipart(out, image_size=32, processes=1, max_share=2)

    assert summary["svg_files"] == 10
    assert summary["skipped"] == {
        "blank_render": 1,
        "caption_no_keywords": 1,
        "duplicate_image": 1,
        "parse_error": 1,
        "render_error": 1,
        "symlink": 1,
        "too_large": 1,
    }
    assert summary["skipped_examples"]["duplicate_image"] == [
        "unsorted/tiger_copy.svg: same render as animals/tiger.svg"
    ]
    assert summary["skipped_examples"]["parse_error"][0].startswith("broken/malformed.svg: ParseError")
    assert summary["captions"] == {
        "title": 1,
        "keywords": 2,
        "dropped": 1,
        "by_reason": {"collection_title": 2, "no_keywords": 1, "title": 1},
    }
    assert summary["collection_titles"] == [["Lemon SVG theme", 3]]
    assert summary["cache"]["hits"] == 0 and summary["cache"]["misses"] == 9

    samples = _read(out)
    assert sorted(samples) == ["animals/tiger.svg", "computer/a.svg", "computer/c.svg"]
    assert samples["animals/tiger.svg"]["txt"].decode() == "Tigre\nmammal, feline"
    assert samples["computer/a.svg"]["txt"].decode() == "icon, printer"
    meta = json.loads(samples["animals/tiger.svg"]["json"])
    assert meta["category"] == "animals" and meta["caption_source"] == "title"
    assert meta["duplicates"] == ["unsorted/tiger_copy.svg"]
    assert meta["split"] == openclipart.split_of(samples["animals/tiger.svg"]["__key__"])
    assert sum(summary["splits"].values()) == 3

    again = openclipart.build_openclipart(out, image_size=32, processes=1, max_share=2)

    assert again["cache"]["hits"] == 9 and again["cache"]["misses"] == 0
    assert {k: v for k, v in again.items() if k != "cache"} == {k: v for k, v in summary.items() if k != "cache"}


def test_missing_openclipart_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(openclipart, "SVG_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="openclipart-svg") as info:
        build("openclipart", tmp_path / "out")
    assert "nowhere" in str(info.value)
    assert BUILDERS["openclipart"] is openclipart.build_openclipart


# --- a real subset ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not openclipart.SVG_DIR.is_dir(), reason="Debian package openclipart-svg is not installed")
def test_build_a_real_subset_twice_reads_back_and_hits_the_cache(tmp_path):
    pytest.importorskip("cairosvg")
    out = tmp_path / "openclipart"

    summary = openclipart.build_openclipart(out, limit=40)

    train, test = summary["splits"]["train"], summary["splits"]["test"]
    captions = summary["captions"]
    assert summary["svg_files"] == 40
    assert summary["cache"]["misses"] + summary["skipped"].get("symlink", 0) == 40
    assert captions["title"] + captions["keywords"] + captions["dropped"] == summary["distinct_images"]
    assert train + test == captions["title"] + captions["keywords"] >= 25
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == train + test
    assert json.loads((out / "dataset.json").read_text()) == json.loads(json.dumps(summary))

    samples = _read(out)
    classnames = (out / "classnames.txt").read_text().splitlines()
    assert len(samples) == train + test
    for path, sample in samples.items():
        meta = json.loads(sample["json"])
        lines = sample["txt"].decode().splitlines()
        assert (openclipart.SVG_DIR / path).is_file()
        assert meta["split"] == openclipart.split_of(sample["__key__"])
        assert classnames[meta["label"]] == path.split("/")[0].replace("_", " ")  # the zero-shot label
        assert 1 <= len(lines) <= 2 and all(line.strip() for line in lines)
        if meta["caption_source"] == "keywords":
            assert lines == [", ".join(meta["keywords"])]
        else:
            assert meta["caption_source"] in {"title", "svg_title"} and lines[1:] in ([], [", ".join(meta["keywords"])])
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.size == (128, 128)
        assert np.asarray(image).min() < 200
    report = shards.validate_shards(sorted(out.glob("*.tar")))
    assert all(r["bad"] == [] and r["error"] is None for r in report.values())

    tars = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = openclipart.build_openclipart(out, limit=40)

    assert again["cache"] == {**summary["cache"], "hits": summary["cache"]["misses"], "misses": 0}
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars  # byte-identical from the cache
