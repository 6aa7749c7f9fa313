"""Emoji image-text pairs: Noto Color Emoji renders captioned with Unicode names and CLDR keywords.

Sources (Debian packages): ``fonts-noto-color-emoji`` for the images, ``unicode-data`` for ``emoji-test.txt``
(names, groups, subgroups) and ``unicode-cldr-core`` for the English keywords.

Kept: fully-qualified emoji without skin-tone variants (about 1,870). Split: a sample is in ``test`` when
``int(sha1(key).hexdigest(), 16) % 10 == 0`` (about 10%), else in ``train``; the rule depends only on the key, so it
is stable across Unicode versions. Within a split, samples are ordered by that same hash, so each shard mixes all
groups instead of holding only smileys or only flags.

Each sample's json also holds a ``label``: the index of its Unicode group (Smileys & Emotion, ..., Flags, in file
order) in ``classnames.txt``, so the test split doubles as a 9-way zero-shot task with ``templates.txt``.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from clipkit.data.shards import encode_png, write_shards
from clipkit.files import write_json_atomic

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_ANNOTATIONS_PATH = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
# Keywords of sequences (flags, keycaps, ZWJ people); optional, from the same package as CLDR_ANNOTATIONS_PATH.
CLDR_DERIVED_PATH = Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml")

# NotoColorEmoji holds bitmaps (CBDT) at this one size only; other sizes fail to load.
FONT_SIZE = 109
# Its bitmaps are 136x128; a canvas of that size holds any glyph the font draws as one image.
CANVAS_SIZE = (136, 128)
SKIN_TONES = range(0x1F3FB, 0x1F400)
SHARD_MAXCOUNT = 1000
TEST_MODULUS = 10
TEMPLATES = ("an emoji of {c}.", "{c}", "a picture of {c}.")

_LINE_RE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([\w-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+?)\s*$")


@dataclass(frozen=True)
class EmojiEntry:
    """One line of ``emoji-test.txt``.

    Attributes:
        codepoints: The code points of the sequence.
        status: ``fully-qualified``, ``minimally-qualified``, ``unqualified`` or ``component``.
        name: The CLDR short name, e.g. "grinning face" or "flag: France".
        group: The ``# group:`` the line is under.
        subgroup: The ``# subgroup:`` the line is under.
    """

    codepoints: tuple[int, ...]
    status: str
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(map(chr, self.codepoints))

    @property
    def key(self) -> str:
        """The sample key, e.g. ``emoji_1f600``: unique per sequence and free of dots."""
        return "emoji_" + "_".join(f"{cp:x}" for cp in self.codepoints)

    @property
    def codepoints_hex(self) -> str:
        """The code points as written in ``emoji-test.txt``, e.g. ``263A FE0F``."""
        return " ".join(f"{cp:04X}" for cp in self.codepoints)


def parse_emoji_test(text: str) -> list[EmojiEntry]:
    """Parses every emoji line of ``emoji-test.txt``, whatever its status.

    Args:
        text: The file contents.

    Returns:
        The entries in file order.
    """
    entries = []
    group = subgroup = ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif match := _LINE_RE.match(line):
            codepoints = tuple(int(cp, 16) for cp in match.group(1).split())
            entries.append(EmojiEntry(codepoints, match.group(2), match.group(3), group, subgroup))
    return entries


def skip_reason(entry: EmojiEntry) -> str | None:
    """Says why an entry is left out of the dataset, or None to keep it.

    Only fully-qualified sequences are kept: the other forms draw the same image. Skin-tone variants are dropped
    because they repeat the base image in another color under a near-identical caption.

    Args:
        entry: A parsed line.

    Returns:
        ``"not_fully_qualified"``, ``"skin_tone"`` or None.
    """
    if entry.status != "fully-qualified":
        return "not_fully_qualified"
    if any(cp in SKIN_TONES for cp in entry.codepoints) or "skin tone" in entry.name:
        return "skin_tone"
    return None


def select_emoji(entries: Iterable[EmojiEntry]) -> tuple[list[EmojiEntry], Counter[str]]:
    """Keeps the entries that go into the dataset.

    Args:
        entries: Parsed lines.

    Returns:
        The kept entries in input order, and the number left out per reason.
    """
    kept, skipped = [], Counter()
    for entry in entries:
        if reason := skip_reason(entry):
            skipped[reason] += 1
        else:
            kept.append(entry)
    return kept, skipped


def parse_cldr_annotations(xml_text: str) -> dict[str, list[str]]:
    """Reads the keyword annotations of a CLDR ``annotations/*.xml`` file.

    Args:
        xml_text: The file contents.

    Returns:
        Keywords per annotated string; the ``type="tts"`` entries (names, not keywords) are left out.
    """
    root = ET.fromstring(xml_text)
    keywords = {}
    for node in root.iter("annotation"):
        if node.get("type") is None and node.text:
            keywords[node.get("cp")] = [k.strip() for k in node.text.split("|") if k.strip()]
    return keywords


def keywords_for(emoji: str, annotations: dict[str, list[str]]) -> list[str]:
    """Looks up an emoji's CLDR keywords.

    CLDR strips U+FE0F from its keys, so the emoji is also tried without it.

    Args:
        emoji: The emoji string.
        annotations: Output of :func:`parse_cldr_annotations`.

    Returns:
        The keywords, or an empty list.
    """
    for cp in (emoji, emoji.replace("\ufe0f", "")):
        if cp in annotations:
            return annotations[cp]
    return []


def render_emoji(emoji: str, font: ImageFont.FreeTypeFont, image_size: int) -> Image.Image | None:
    """Draws an emoji centered on a white square.

    Args:
        emoji: The emoji string.
        font: NotoColorEmoji loaded at :data:`FONT_SIZE`.
        image_size: Side of the output image in pixels.

    Returns:
        An RGB image, or None when the font drew nothing.
    """
    canvas = Image.new("RGBA", CANVAS_SIZE, (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), emoji, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    side = max(glyph.size) * 17 // 16  # about 3% white on each side of the longer axis
    square = Image.new("RGB", (side, side), "white")
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), mask=glyph)
    return square.resize((image_size, image_size), Image.Resampling.LANCZOS)


def split_of(key: str) -> str:
    """The split of a sample: ``test`` for about one key in :data:`TEST_MODULUS`, else ``train``."""
    return "test" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % TEST_MODULUS == 0 else "train"


def caption(entry: EmojiEntry, keywords: list[str]) -> str:
    """The ``txt`` of a sample: the name, then the keywords (if any) on a second line."""
    return entry.name if not keywords else f"{entry.name}\n{', '.join(keywords)}"


def _require(path: Path, package: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install it with `apt-get install -y {package}`")


def _load_annotations() -> dict[str, list[str]]:
    annotations = parse_cldr_annotations(CLDR_ANNOTATIONS_PATH.read_text(encoding="utf-8"))
    if CLDR_DERIVED_PATH.is_file():
        derived = parse_cldr_annotations(CLDR_DERIVED_PATH.read_text(encoding="utf-8"))
        annotations = derived | annotations
    return annotations


def _samples(
    entries: list[EmojiEntry],
    split: str,
    annotations: dict[str, list[str]],
    font: ImageFont.FreeTypeFont,
    image_size: int,
    tally: Counter[str],
    groups: list[str],
) -> Iterator[dict]:
    for entry in tqdm(entries, desc=f"emoji {split}", unit="emoji", disable=None):
        image = render_emoji(entry.text, font, image_size)
        if image is None:
            tally["blank_render"] += 1
            continue
        keywords = keywords_for(entry.text, annotations)
        tally["without_keywords"] += not keywords
        meta = {
            "name": entry.name,
            "codepoints": entry.codepoints_hex,
            "group": entry.group,
            "subgroup": entry.subgroup,
            "keywords": keywords,
            "label": groups.index(entry.group),
            "split": split,
        }
        yield {"__key__": entry.key, "png": encode_png(image), "txt": caption(entry, keywords), "json": meta}


def build_emoji(out: Path, image_size: int = 72) -> dict:
    """Renders the emoji dataset into ``train-*.tar`` and ``test-*.tar`` shards.

    Args:
        out: Output folder.
        image_size: Side of the square images in pixels.

    Returns:
        The summary also written to ``{out}/dataset.json``: samples and shards per split, files, skip counts.

    Raises:
        FileNotFoundError: A source file is missing; the message names the Debian package that provides it.
    """
    out = Path(out)
    _require(FONT_PATH, "fonts-noto-color-emoji")
    _require(EMOJI_TEST_PATH, "unicode-data")
    _require(CLDR_ANNOTATIONS_PATH, "unicode-cldr-core")

    entries, skipped = select_emoji(parse_emoji_test(EMOJI_TEST_PATH.read_text(encoding="utf-8")))
    annotations = _load_annotations()
    font = ImageFont.truetype(str(FONT_PATH), size=FONT_SIZE)
    ordered = sorted(entries, key=lambda e: hashlib.sha1(e.key.encode()).hexdigest())
    groups = list(dict.fromkeys(e.group for e in entries))  # file order: Smileys & Emotion first, Flags last

    tally: Counter[str] = Counter()
    shards = {}
    for split in ("train", "test"):
        in_split = [e for e in ordered if split_of(e.key) == split]
        samples = _samples(in_split, split, annotations, font, image_size, tally, groups)
        shards[split] = write_shards(samples, out, split, maxcount=SHARD_MAXCOUNT)

    (out / "classnames.txt").write_text("".join(f"{g.lower()}\n" for g in groups))
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    summary = {
        "name": "emoji",
        "image_size": image_size,
        "splits": {split: sum(counts.values()) for split, counts in shards.items()},
        "shards": shards,
        "skipped": {**dict(sorted(skipped.items())), "blank_render": tally["blank_render"]},
        "without_keywords": tally["without_keywords"],
        "split_rule": f"test if int(sha1(key).hexdigest(), 16) % {TEST_MODULUS} == 0, else train",
        "sources": {
            "font": str(FONT_PATH),
            "emoji_test": str(EMOJI_TEST_PATH),
            "cldr_annotations": str(CLDR_ANNOTATIONS_PATH),
            "cldr_derived": str(CLDR_DERIVED_PATH) if CLDR_DERIVED_PATH.is_file() else None,
        },
        "classes": groups,
        "files": sorted(
            [*shards["train"], *shards["test"], "sizes.json", "dataset.json", "classnames.txt", "templates.txt"]
        ),
    }
    write_json_atomic(out / "dataset.json", summary)
    return summary
