"""Writing files so that nothing half-written is ever seen: the one atomic-write helper of clipkit.

Every file clipkit writes (shards' sidecars, model weights, checkpoints' progress records, eval results, index
files) goes through `atomic_path`: the bytes go to a hidden temporary beside the target, which is renamed onto
the target only once complete. A reader sees the old file or the new one, never a mix; a crash or a full disk
leaves the old file and no temporary behind. The temporary gets the mode every other file gets (0666 less the
umask): writers such as safetensors create files 0600, which would otherwise stick.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DiskFullError(OSError):
    """The disk filled up while writing a file; names the file (the target, not the temporary)."""


def _default_mode() -> int:
    umask = os.umask(0)  # the only way to read the umask is to set it: set it back at once
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` when the block ends without error.

    Same folder, so the rename stays on one filesystem; the pid in the name keeps concurrent writers (loader
    workers, several processes) apart. On any error the temporary is removed and the target left as it was.

    Raises:
        DiskFullError: "no space left on device", naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}") from e
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any, sort_keys: bool = True, **kwargs: Any) -> None:
    """Writes `obj` as indented JSON (plus a final newline) to `path` atomically; kwargs go to `json.dumps`."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, **kwargs)
    write_text_atomic(path, text + "\n")
