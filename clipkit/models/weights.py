"""Reading weights from files made elsewhere, without ever running code stored in them.

A `.pt` / `.bin` checkpoint is a pickle, and a pickle can name any callable to run on load (`os.system`...).
clipkit reads safetensors, or torch files through `torch.load(weights_only=True)`, whose unpickler accepts tensors
and plain containers only; anything else is refused with `UnsafeCheckpointError`, naming the file and the object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors import SafetensorError
from safetensors.torch import load_file

from clipkit.models.transformers_io import (
    NotMappableError,
    clip_mapping_problems,
    from_transformers_state,
    is_transformers_folder,
    open_clip_config,
)


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


def load_pretrained(model: torch.nn.Module, path: str | Path, model_cfg: dict | None = None) -> None:
    """Loads an open_clip checkpoint, or a transformers CLIPModel folder, into `model` in place (strict).

    Args:
        model: the open_clip model built from the same architecture.
        path: an open_clip checkpoint: `open_clip_train`'s `epoch_N.pt` ({"state_dict": ...}, `module.` prefixes
            stripped), a plain state-dict `.pt` / `.bin`, a `.safetensors` file, or a model folder (its
            `open_clip_model.safetensors`); or a transformers `CLIPModel` folder (config.json + model.safetensors),
            whose weights are mapped back to open_clip's (`clipkit.models.transformers_io`).
        model_cfg: the recipe's open_clip model config; with a transformers folder it must describe the same
            network (checked key by key: shapes alone would not catch gelu vs quick_gelu or a LayerNorm eps).

    Raises:
        FileNotFoundError: the file (or the folder's weights) is missing.
        UnsafeCheckpointError: the file would run code on load.
        ValueError: keys or shapes do not match the architecture, naming the first ones.
    """
    path = Path(path)
    if path.is_dir() and is_transformers_folder(path):
        load_transformers_folder(model, path, model_cfg)
        return
    if path.is_dir():
        path = path / "open_clip_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found")
    with refuse_pickled_code(path):
        try:
            # open_clip's loader knows its layouts: state_dict nesting, `module.` prefixes, safetensors, and the
            # resizing of position embeddings for another image size or context length.
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None
        except RuntimeError as e:
            if "state_dict" not in str(e) and "size mismatch" not in str(e):
                raise
            raise ValueError(f"model.pretrained: {path} does not fit the recipe's architecture: {e}") from None


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def architecture_differences(recipe_cfg: dict, folder_cfg: dict) -> list[str]:
    """Keys where a recipe's open_clip model config and a folder's (translated) one describe different networks.

    A key the recipe leaves out counts as open_clip's default (`CLIPVisionCfg` / `CLIPTextCfg`, quick_gelu False).
    """
    defaults = {"quick_gelu": False, "vision_cfg.norm_kwargs.eps": 1e-5, "text_cfg.norm_kwargs.eps": 1e-5}
    for section, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        defaults.update({f"{section}.{f.name}": f.default for f in dataclasses.fields(cls)})
    ours, theirs = _flat(recipe_cfg), _flat(folder_cfg)
    diffs = []
    for key in sorted(set(theirs) | {"quick_gelu", "vision_cfg.norm_kwargs.eps", "text_cfg.norm_kwargs.eps"}):
        a, b = ours.get(key, defaults.get(key)), theirs.get(key, defaults.get(key))
        same = math.isclose(a, b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else a == b
        if not same:
            diffs.append(f"model.config.{key}: recipe {a!r}, folder {b!r}")
    return diffs


def load_transformers_folder(model: torch.nn.Module, folder: Path, model_cfg: dict | None) -> None:
    """Loads a transformers `CLIPModel` folder into an open_clip CLIP built from the same architecture.

    Raises:
        NotMappableError: the folder is not a CLIP model open_clip can build, or the recipe's model is not one
            transformers' CLIP can hold.
        ValueError: the recipe's architecture differs from the folder's, naming the keys and the config to use.
    """
    hf_config = json.loads((folder / "config.json").read_text())
    pre = folder / "preprocessor_config.json"
    theirs = open_clip_config(hf_config, json.loads(pre.read_text()) if pre.is_file() else None)
    if model_cfg is not None:
        problems = clip_mapping_problems(model_cfg)
        if problems:
            raise NotMappableError(f"model.pretrained: {folder} is a transformers CLIPModel, but {'; '.join(problems)}")
        diffs = architecture_differences(model_cfg, theirs["model_cfg"])
        if diffs:
            raise ValueError(
                f"model.pretrained: {folder} is another architecture than the recipe's: {'; '.join(diffs)}. "
                f"The folder's as a recipe: model.config: {json.dumps(theirs['model_cfg'])}"
            )
    weights = folder / "model.safetensors"
    try:
        hf_state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    state = from_transformers_state(hf_state, "text." if hasattr(model, "text") else "")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"model.pretrained: {folder} does not fit the recipe's architecture: {e}") from None
