"""Model folders: open_clip-loadable weights (safetensors) and config, plus clipkit's own info.

A model folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
`open_clip_model.safetensors`: exactly what `open_clip.create_model_and_transforms("local-dir:DIR")` reads.
Loading never unpickles: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipkit.models.factory import ModelBundle, bundle_from_config

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
INFO_NAME = "clipkit.json"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / torch.compile wrappers keep the real module under these attributes.
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


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
    state = model if isinstance(model, dict) else _unwrap(model).state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    for name, payload in ((CONFIG_NAME, config), (INFO_NAME, info or {})):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, default=list))
        os.replace(tmp, out_dir / name)
    return out_dir


def load_model(path: Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Loads a model folder written by `save_model` (or by open_clip's HF-hub export) in eval mode.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: when weights do not match the config, naming the keys.
    """
    path = Path(path)
    if path.is_file():  # a weights file given directly: its folder holds the config
        path = path.parent
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; a clipkit model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    bundle = bundle_from_config(json.loads(cfg_file.read_text()), load_tower_weights=False)
    state = load_file(str(weights))
    missing, unexpected = bundle.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match {cfg_file}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bundle.model.to(device).eval()
    return bundle
