"""Memory-mapped rows: .npy files read window by window (`MappedRows`), and the same interface over arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.index.errors import IndexFileError

TAKE_WINDOW_ROWS = 8192  # rows mapped at once when gathering scattered rows (training samples, re-ranking)


@dataclass(frozen=True)
class _Segment:
    path: Path
    offset: int  # byte offset of row 0 in the file
    rows: int


class MappedRows:
    """Rows of one or several 2-D .npy files, row-concatenated, read window by window from disk.

    Each read maps only the window it needs and releases the map afterwards, so the pages it touched leave
    the process (they stay in the OS page cache): reading a file larger than RAM keeps resident memory at
    one window. Indexing returns float32 arrays (copies).

    Args:
        paths: .npy files of shape [rows_i, D], all with the same D and dtype (C order).

    Raises:
        IndexFileError: naming a file that is not a readable 2-D C-order .npy or disagrees with the first.
    """

    ndim = 2

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("MappedRows: no .npy file given")
        self.segments: list[_Segment] = []
        d = dtype = None
        for path in self.paths:
            shape, seg_dtype, offset = _npy_header(path)
            if len(shape) != 2:
                raise IndexFileError(f"{path}: expected a 2-D array, got shape {shape}")
            if shape[0] == 0:  # an empty part (e.g. a shard without usable samples) may store [0, 0]
                self.segments.append(_Segment(path, offset, 0))
                continue
            if d is None:
                d, dtype = shape[1], seg_dtype
            elif shape[1] != d:
                raise IndexFileError(f"{path}: dim {shape[1]} but {self.paths[0]} has dim {d}")
            elif seg_dtype != dtype:
                raise IndexFileError(f"{path}: dtype {seg_dtype} but the other parts have {dtype}")
            self.segments.append(_Segment(path, offset, shape[0]))
        self.dtype = np.dtype(dtype if dtype is not None else np.float32)
        self.shape = (sum(s.rows for s in self.segments), int(d or 0))
        self.starts = np.cumsum([0] + [s.rows for s in self.segments])  # [S + 1] first global row per segment

    @classmethod
    def from_memmap(cls, array: np.memmap) -> MappedRows:
        """The windowed reader of a whole-file memory map from `np.load(path, mmap_mode="r")`."""
        return cls([Path(array.filename)])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"MappedRows(shape={self.shape}, dtype={self.dtype}, files={len(self.paths)})"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float32 [stop - start, D] array."""
        start, stop = max(0, int(start)), min(int(stop), self.shape[0])
        out = np.empty((max(stop - start, 0), self.shape[1]), np.float32)
        if stop <= start:
            return out
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for s in range(first, len(self.segments)):
            seg_start = int(self.starts[s])
            if seg_start >= stop:
                break
            lo, hi = max(start, seg_start) - seg_start, min(stop, int(self.starts[s + 1])) - seg_start
            if hi > lo:
                window = self._window(s, lo, hi)
                out[seg_start + lo - start : seg_start + hi - start] = window
                del window  # unmaps: the touched pages leave this process
        return out

    def take(self, rows: np.ndarray, window_rows: int = TAKE_WINDOW_ROWS) -> np.ndarray:
        """Rows at arbitrary indices as float32 [len(rows), D], in the order given.

        Indices are visited in sorted order, one map of at most `window_rows` rows at a time. The window bounds
        resident memory: the kernel maps 64 KiB around each faulted page (fault-around), so scattered reads
        make most of a window resident.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"MappedRows.take: rows must lie in [0, {self.shape[0]})")
        out = np.empty((rows.size, self.shape[1]), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        seg_of = np.searchsorted(self.starts, sorted_rows, side="right") - 1  # segment of each sorted row
        i = 0
        while i < sorted_rows.size:
            s = int(seg_of[i])
            local = sorted_rows[i] - int(self.starts[s])
            lo = local  # window [lo, hi) of segment s, starting at the next row to fetch
            hi = min(lo + window_rows, self.segments[s].rows)
            j = int(np.searchsorted(sorted_rows, int(self.starts[s]) + hi, side="left"))
            window = self._window(s, lo, hi)
            out[order[i:j]] = window[sorted_rows[i:j] - int(self.starts[s]) - lo]
            del window
            i = j
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                return self.take(np.arange(start, stop, step))
            return self.read(start, stop)
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.shape[0] if key < 0 else 0)
            return self.read(k, k + 1)[0]
        return self.take(np.asarray(key))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # Materializes every row (np.asarray(rows)): for the small sets of metrics code, not for index builds.
        out = self.read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)

    def _window(self, s: int, lo: int, hi: int) -> np.ndarray:
        seg = self.segments[s]
        row_bytes = self.shape[1] * self.dtype.itemsize
        return np.memmap(
            seg.path, dtype=self.dtype, mode="r", offset=seg.offset + lo * row_bytes, shape=(hi - lo, self.shape[1])
        )


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, from its header alone."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise IndexFileError(f"{path}: not a readable .npy file ({e})") from e
    if fortran and len(shape) > 1:
        raise IndexFileError(f"{path}: Fortran-order arrays are not supported (save with np.save of a C array)")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = Path(path).stat().st_size
    if actual < expected:
        raise IndexFileError(f"{path}: {actual} bytes but shape {shape} {dtype} needs {expected} (truncated?)")
    return tuple(int(s) for s in shape), dtype, offset


def row_reader(vectors: Any, name: str) -> Any:
    """A row reader with shape/dtype/read/take: MappedRows for files and memory maps, else an in-RAM array."""
    if isinstance(vectors, MappedRows):
        x = vectors
    elif isinstance(vectors, np.memmap) and getattr(vectors, "filename", None) and _is_whole_npy(vectors):
        x = MappedRows.from_memmap(vectors)
    else:
        x = _ArrayRows(np.asarray(vectors))
    if len(x.shape) != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point vectors, got dtype {x.dtype}")
    return x


def _is_whole_npy(array: np.memmap) -> bool:
    try:
        shape, dtype, offset = _npy_header(Path(array.filename))
    except (IndexFileError, OSError):
        return False
    return shape == array.shape and dtype == array.dtype and offset == array.offset and array.flags.c_contiguous


class _ArrayRows:
    """The MappedRows interface over an in-RAM array."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[start:stop], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.array[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
