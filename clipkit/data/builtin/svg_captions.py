"""Captions of OpenClipart SVGs from their own metadata: parsing, title cleaning and the collection rules.

The rules (documented in full in :mod:`clipkit.data.builtin.openclipart`): the cleaned ``dc:title`` (else the SVG's
``<title>``) then the useful keywords; a title that names a collection rather than the picture is replaced by the
keywords, and a sample is dropped when no useful keyword remains or its keyword caption names too many pictures.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# A title or keyword caption shared by more distinct images than this names a collection, not a picture.
MAX_SHARE = 25

NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "svg": "http://www.w3.org/2000/svg",
}
# Inkscape's newer files use creativecommons.org's namespace for cc:Work.
_WORK_TAGS = ("{http://web.resource.org/cc/}Work", "{http://creativecommons.org/ns#}Work")

# Keywords that say nothing about the picture: the package's tree and icon-theme categories, tool and tagging
# artifacts ("hash", "magick"), and openclipart.org's site-wide tags. Compared after lower-casing and "_" -> " ".
GENERIC_KEYWORDS = frozenset(
    "action,appicon,application,clip art,clip-art,clipart,externalsource,filesystem,hash,icons,image,images,"
    "lemon theme icon,magick,mapsym,media,mime-types,mimetypes,miscellany,musicsym,networksym,openclipart,png,"
    "public domain,signs and symbols,special,stock,svg,theme,united nations member,unsorted,weathersym".split(",")
)
COLLECTION_RE = re.compile(
    r"\bcollection\b|\btheme\b|\bicon ?set\b|\bicons\b|\bclip ?arts?\b|\bs[ui]bmission\b|symbol[ _]signs"
    r"|\broad signs\b|\bmap symbols\b",
    re.IGNORECASE,
)
_PART_OF_COLLECTION_RE = re.compile(r"^part of the .*\bcollection\b", re.IGNORECASE)
_CLIPART_BY_RE = re.compile(r"^clip ?art by .+? - (?P<rest>.+)$", re.IGNORECASE)
_CONTACT_IN_PARENS_RE = re.compile(r"\s*\([^)]*(?:@|https?://|www\.)[^)]*\)")
_CONTACT_RE = re.compile(r"\S+@\S+|https?://\S+|www\.\S+", re.IGNORECASE)
_EXTENSION_RE = re.compile(r"\.(?:svgz?|png|jpe?g|gif|eps|ai)$", re.IGNORECASE)
_OPENCLIPART_WORD_RE = re.compile(r"\bopenclipart\b", re.IGNORECASE)
_CAMEL_RE = re.compile(r"(?<=[a-z]{2})(?=[A-Z][a-z])")
_BW_RE = re.compile(r"\bbw\b", re.IGNORECASE)
_HASH_NUMBER_RE = re.compile(r"\s*#\d+$")
_PADDED_NUMBER_RE = re.compile(r"\s+0\d+$")
_GLUED_NUMBER_RE = re.compile(r"(?<=[a-z]{3})\d+$")
# Object addresses that an old export tool wrote as keywords: "0x8963570", "hash(0x8a3ecd4)".
_ADDRESS_RE = re.compile(r"^(?:hash\()?0x[0-9a-f]+\)?$")


@dataclass(frozen=True)
class SvgMetadata:
    """The text an SVG carries about itself.

    Attributes:
        title: The ``<dc:title>`` of the ``cc:Work``, whitespace-collapsed ("" when absent).
        svg_title: The SVG's ``<title>`` child, whitespace-collapsed ("" when absent).
        keywords: The ``<dc:subject>`` bag entries as written, empty ones left out.
        creators: The ``<dc:creator>`` agent names (used to drop author names from titles and keywords).
    """

    title: str = ""
    svg_title: str = ""
    keywords: tuple[str, ...] = ()
    creators: tuple[str, ...] = ()


@dataclass(frozen=True)
class Caption:
    """How one sample is captioned.

    Attributes:
        text: The ``txt`` lines joined by newlines, or None when the sample is dropped.
        source: ``"title"``, ``"svg_title"``, ``"keywords"``, or None when dropped.
        reason: Why: ``"title"``/``"svg_title"`` (kept), ``"collection_title"``/``"no_title"`` (captioned by
            keywords, or dropped for that reason with ``"no_keywords"``/``"shared_keywords"``).
        title: The cleaned title used, or "".
        keywords: The useful keywords.
    """

    text: str | None
    source: str | None
    reason: str
    title: str = ""
    keywords: tuple[str, ...] = ()


def _text(node: ET.Element | None) -> str:
    return " ".join("".join(node.itertext()).split()) if node is not None else ""


def parse_svg_metadata(data: bytes | str) -> SvgMetadata:
    """Reads the title, keywords and creators embedded in an SVG.

    Args:
        data: The SVG file contents.

    Returns:
        The metadata; fields are empty when the file does not have them.

    Raises:
        xml.etree.ElementTree.ParseError: The file is not well-formed XML.
        ValueError: The root element is not ``<svg>``.
    """
    root = ET.fromstring(data)
    if root.tag.rsplit("}", 1)[-1] != "svg":
        raise ValueError(f"root element is <{root.tag}>, not <svg>")
    work = next((node for tag in _WORK_TAGS for node in root.iter(tag)), None)
    title, keywords, creators = "", [], []
    if work is not None:
        title = _text(work.find("dc:title", NS))
        keywords = [k for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS) if (k := _text(li))]
        creators = [c for agent in work.findall("dc:creator//dc:title", NS) if (c := _text(agent))]
    svg_title = _text(root.find("svg:title", NS)) or _text(root.find("title"))
    return SvgMetadata(title, svg_title, tuple(keywords), tuple(creators))


def clean_title(title: str) -> str:
    """Strips file-name-ish junk from a title; conservative, so a real title comes out as it went in.

    Args:
        title: A raw title.

    Returns:
        The cleaned title, or "" when nothing with a letter remains.
    """
    text = " ".join(title.split())
    text = _CONTACT_RE.sub("", _CONTACT_IN_PARENS_RE.sub("", text)).strip()
    if match := _CLIPART_BY_RE.match(text):
        text = match.group("rest")
    text = _EXTENSION_RE.sub("", text).replace("_", " ")
    text = _OPENCLIPART_WORD_RE.sub("", text)
    text = _CAMEL_RE.sub(" ", text)
    text = _BW_RE.sub("black and white", text)
    text = " ".join(text.split())
    text = _HASH_NUMBER_RE.sub("", text)
    text = _PADDED_NUMBER_RE.sub("", text)
    text = _GLUED_NUMBER_RE.sub("", text)
    text = " ".join(text.split()).strip(" -_.,;:#")
    return text if any(c.isalpha() for c in text) else ""


def title_group(title: str) -> str:
    """The form under which titles are counted to find collections: lower-cased, whitespace collapsed."""
    return " ".join(title.split()).casefold()


def is_collection_title(title: str, count: int, max_share: int = MAX_SHARE) -> bool:
    """Says whether a raw title names a collection rather than the picture.

    Args:
        title: The raw title.
        count: How many distinct images carry it (same :func:`title_group`).
        max_share: A title on more images than this is a collection whatever it says.

    Returns:
        True for "Part of the ... Collection", for titles on more than ``max_share`` images, and for titles on two or
        more images that match :data:`COLLECTION_RE`.
    """
    if not title.strip():
        return False
    if _PART_OF_COLLECTION_RE.match(title.strip()) or count > max_share:
        return True
    return count >= 2 and COLLECTION_RE.search(title) is not None


def useful_keywords(keywords: Iterable[str], creators: Iterable[str] = ()) -> list[str]:
    """Normalizes keywords and removes those that say nothing about the picture.

    Entries are split on commas and semicolons, lower-cased, with underscores as spaces; generic ones
    (:data:`GENERIC_KEYWORDS`), numbers, object addresses (``0x8963570``), single characters, author names and repeats
    are removed.

    Args:
        keywords: Raw keywords.
        creators: The authors' names.

    Returns:
        The useful keywords in first-seen order.
    """
    names = {title_group(c) for c in creators}
    out: list[str] = []
    for raw in keywords:
        for part in re.split(r"[,;]", raw):
            word = " ".join(part.replace("_", " ").split()).casefold().strip(" -.:")
            junk = len(word) < 2 or word.isdigit() or _ADDRESS_RE.match(word) is not None
            if not junk and word not in GENERIC_KEYWORDS and word not in names and word not in out:
                out.append(word)
    return out


def _usable_title(raw: str, creators: Iterable[str]) -> str:
    cleaned = clean_title(raw)
    if not cleaned or title_group(cleaned) in {title_group(c) for c in creators}:
        return ""
    return cleaned


def _title_caption(title: str, keywords: list[str]) -> str:
    line2 = ", ".join(keywords)
    return title if not keywords or line2.casefold() == title.casefold() else f"{title}\n{line2}"


def assign_captions(metas: list[SvgMetadata], max_share: int = MAX_SHARE) -> tuple[list[Caption], dict[str, int]]:
    """Captions a set of distinct images; collection titles are found from the set itself.

    Args:
        metas: The metadata of every image of the build (the counts that find collections are over this list).
        max_share: See :func:`is_collection_title`; also the most images one keyword caption may describe.

    Returns:
        One :class:`Caption` per input, and the collection titles found (their :func:`title_group`) with the number of
        images that carry each.
    """
    counts = Counter(title_group(t) for m in metas for t in {m.title, m.svg_title} if t)
    collections = {g: n for g, n in counts.items() if is_collection_title(g, n, max_share)}
    captions = []
    for meta in metas:
        keywords = useful_keywords(meta.keywords, meta.creators)
        chosen, reason = None, "no_title"
        for source, raw in (("title", meta.title), ("svg_title", meta.svg_title)):
            if title_group(raw) in collections:
                reason = "collection_title"
            elif title := _usable_title(raw, meta.creators):
                chosen = Caption(_title_caption(title, keywords), source, source, title, tuple(keywords))
                break
        if chosen is None:
            text = ", ".join(keywords) or None
            chosen = Caption(text, "keywords" if text else None, reason if text else "no_keywords", "", tuple(keywords))
        captions.append(chosen)
    shared = Counter(c.text.casefold() for c in captions if c.source == "keywords")
    return [
        Caption(None, None, "shared_keywords", "", c.keywords)
        if c.source == "keywords" and shared[c.text.casefold()] > max_share
        else c
        for c in captions
    ], collections
