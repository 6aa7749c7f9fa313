"""Reading weights from files made elsewhere, without ever running code stored in them.

A `.pt` / `.bin` checkpoint is a pickle, and a pickle can name any callable to run on load (`os.system`...).
clipkit reads safetensors, or torch files through `torch.load(weights_only=True)`, whose unpickler accepts tensors
and plain containers only; anything else is refused with `UnsafeCheckpointError`, naming the file and the object.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects beyond tensors and plain containers, which could run code on load."""


@contextlib.contextmanager
def refuse_pickled_code(path: str | Path) -> Iterator[None]:
    """Turns the weights-only unpickler's refusal, raised inside the block, into an `UnsafeCheckpointError`."""
    try:
        yield
    except pickle.UnpicklingError as e:
        # torch's message is long (it suggests weights_only=False, the very thing not to do): keep the object name.
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line), "")
        raise UnsafeCheckpointError(
            f"{path}: refused: it holds a pickled object that would run code when loaded ({detail or 'see cause'}). "
            "clipkit loads safetensors, or torch files of plain tensors (torch.load weights_only=True). "
            "If you trust the file, convert it once to safetensors where you trust it."
        ) from e


def load_pretrained(model: torch.nn.Module, path: str | Path) -> None:
    """Loads an open_clip checkpoint into `model` in place (strict: every key must match).

    Args:
        model: the open_clip model built from the same architecture.
        path: an open_clip checkpoint: `open_clip_train`'s `epoch_N.pt` ({"state_dict": ...}, `module.` prefixes
            stripped), a plain state-dict `.pt` / `.bin`, a `.safetensors` file, or a model folder (its
            `open_clip_model.safetensors`).

    Raises:
        FileNotFoundError: the file (or the folder's weights) is missing.
        UnsafeCheckpointError: the file would run code on load.
        ValueError: keys or shapes do not match the architecture, naming the first ones.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "open_clip_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found")
    with refuse_pickled_code(path):
        try:
            # open_clip's loader knows its layouts: state_dict nesting, `module.` prefixes, safetensors, and the
            # resizing of position embeddings for another image size or context length.
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except RuntimeError as e:
            if "state_dict" not in str(e) and "size mismatch" not in str(e):
                raise
            raise ValueError(f"model.pretrained: {path} does not fit the recipe's architecture: {e}") from None
