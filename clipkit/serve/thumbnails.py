"""The image bytes of an index row, read from the shard it was embedded from at a cached tar member offset.

A row id is the only name a client gives: the shard path and the member come from the index folder's own
records (`IndexDir.source_of`: "sources" in index.json plus the row's key), never from the request.
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass

from clipkit.data.pipeline import IMAGE_EXTS
from clipkit.index import IndexDir

CACHED_SHARDS = 256  # member tables kept (one dict of key -> offset per shard, ~100 bytes per sample)
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class ImageUnavailable(LookupError):
    """The row's image cannot be served (no shard recorded, shard gone or changed, member missing)."""


@dataclass(frozen=True)
class _Member:
    offset: int  # byte offset of the member's data in the tar
    size: int
    ext: str


@dataclass(frozen=True)
class _Table:
    stamp: tuple[int, int]  # (size, mtime_ns) of the shard when scanned: a changed shard is scanned again
    members: dict[str, _Member]


class ShardImages:
    """Reads row images from uncompressed tar shards; each shard's member table is scanned once and cached.

    Args:
        index: the opened index folder (its "sources" and metadata keys locate each row).
        max_shards: member tables kept in memory (least recently used dropped first).
    """

    def __init__(self, index: IndexDir, max_shards: int = CACHED_SHARDS):
        self.index, self.max_shards = index, max_shards
        self._tables: OrderedDict[str, _Table] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return bool(self.index.info.get("sources"))

    def get(self, row: int) -> tuple[bytes, str]:
        """(image bytes, content type) of image row `row`.

        Raises:
            IndexError: if row is not in [0, count).
            ImageUnavailable: naming why the image cannot be read.
        """
        source = self.index.source_of(row)
        if source is None:
            raise ImageUnavailable("this index records no shards (rebuild it with this clipkit version)")
        shard, key = source
        member = self._table(shard).members.get(key)
        if member is None:
            raise ImageUnavailable(f"row {row}: no image member for key {key!r} in its shard")
        with open(shard, "rb") as f:
            data = os.pread(f.fileno(), member.size, member.offset)
        if len(data) != member.size:
            raise ImageUnavailable(f"row {row}: its shard is shorter than recorded (changed since it was scanned?)")
        return data, CONTENT_TYPES[member.ext]

    def _table(self, shard: str) -> _Table:
        try:
            st = os.stat(shard)
        except OSError:
            raise ImageUnavailable("the row's shard is no longer on disk") from None
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            table = self._tables.get(shard)
            if table is not None and table.stamp == stamp:
                self._tables.move_to_end(shard)
                return table
        table = _Table(stamp, _scan(shard))  # outside the lock: a scan reads every header of the tar
        with self._lock:
            self._tables[shard] = table
            self._tables.move_to_end(shard)
            while len(self._tables) > self.max_shards:
                self._tables.popitem(last=False)
        return table


def _scan(shard: str) -> dict[str, _Member]:
    """key -> the sample's image member, with webdataset's key rule (the name up to the first dot of its base name)
    and the pipeline's preference among image extensions."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTS)}
    members: dict[str, _Member] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only, so offsets index the file itself
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                stem, dot, ext = base.partition(".")
                ext = ext.lower()
                if not dot or ext not in rank:
                    continue
                key = info.name[: len(info.name) - len(base)] + stem
                held = members.get(key)
                if held is None or rank[ext] < rank[held.ext]:
                    members[key] = _Member(info.offset_data, info.size, ext)
    except (tarfile.TarError, OSError) as e:
        raise ImageUnavailable(f"the row's shard is not a readable uncompressed tar ({e})") from None
    return members
