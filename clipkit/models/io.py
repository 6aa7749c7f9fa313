"""Model folders: open_clip-loadable weights (safetensors) and config, plus clipkit's own info.

A model folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors`: exactly what `open_clip.create_model_and_transforms("local-dir:DIR")` reads. With an
HF text tower the folder also holds that tokenizer's files, because open_clip's `get_tokenizer("local-dir:DIR")`
reads them from DIR. Loading never unpickles: weights are safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipkit.files import atomic_path, write_json_atomic
from clipkit.models.factory import ModelBundle, bundle_from_config
from clipkit.models.weights import load_pretrained

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
INFO_NAME = "clipkit.json"


def save_model(
    out_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor], config: dict, info: dict | None = None
) -> Path:
    """Writes weights, config and info into `out_dir`, each file atomically (temp name, then rename).

    Args:
        out_dir: the model folder (created).
        model: the model (possibly wrapped by DDP or torch.compile), or its full state dict (as gathered by
            `accelerator.get_state_dict` when parameters are sharded).
        config: {"model_cfg", "preprocess_cfg"} as returned by `resolve_config`.
        info: extra facts kept in clipkit.json (recipe name, step, metrics).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = (
        model if isinstance(model, dict) else extract_model_from_parallel(model).state_dict()
    )  # DDP, FSDP, compile wrappers
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    for name, payload in ((CONFIG_NAME, config), (INFO_NAME, info or {})):
        write_json_atomic(out_dir / name, payload, sort_keys=False, default=list)
    save_tokenizer(out_dir, config)
    return out_dir


def save_tokenizer(out_dir: Path, config: dict) -> None:
    """Writes an HF text tower's tokenizer files into `out_dir` (the CLIP BPE ships with open_clip: nothing to do)."""
    name = config["model_cfg"]["text_cfg"].get("hf_tokenizer_name")
    if name and Path(name).resolve() != Path(out_dir).resolve():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(name).save_pretrained(str(out_dir))


def _relocate_hf_tower(config: dict, folder: Path) -> dict:
    # An exported folder names itself as its HF tower; after a move that path is gone, but the files came along.
    text_cfg = config["model_cfg"]["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and Path(name).is_absolute() and not Path(name).exists():
            if (folder / "config.json").is_file() or key == "hf_tokenizer_name":
                text_cfg[key] = str(folder)
    return config


def read_config(cfg_file: Path) -> dict:
    """An open_clip_config.json as a dict; a broken one is a ValueError naming the file and what is wrong."""
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e}); re-export the model or restore the file") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(
            f'{cfg_file}: no "model_cfg" object; an open_clip_config.json holds model_cfg + preprocess_cfg'
        )
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or garbage file is a ValueError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None


def load_model(path: Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Loads a model folder written by `save_model` (or by open_clip's HF-hub export) in eval mode.

    Args:
        path: the folder, or a weights file: the folder's own `open_clip_model.safetensors`, or another
            weights file beside the config (`epoch_9.pt`, `other.safetensors`), which is then what is loaded
            (torch files through `torch.load(weights_only=True)`). `bundle.source` says what was loaded.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: a broken config or weights file, or weights that do not match the config, naming the file.
    """
    path = Path(path)
    folder, weights = (path.parent, path) if path.is_file() else (path, path / WEIGHTS_NAME)
    cfg_file = folder / CONFIG_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; a clipkit model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _relocate_hf_tower(read_config(cfg_file), folder.resolve())
    try:
        bundle = bundle_from_config(config, load_tower_weights=False)
    except (TypeError, KeyError, AssertionError) as e:
        raise ValueError(f"{cfg_file}: open_clip cannot build this model_cfg ({type(e).__name__}: {e})") from None
    if weights.name != WEIGHTS_NAME:
        load_pretrained(bundle.model, weights)  # the named file, strictly; pickled code refused
        bundle.source = str(weights)
    else:
        state = read_weights(weights)
        missing, unexpected = bundle.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights}: weights do not match {cfg_file}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        bundle.source = str(path)
    bundle.model.to(device).eval()
    return bundle
