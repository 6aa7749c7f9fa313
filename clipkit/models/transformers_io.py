"""open_clip CLIP <-> Hugging Face transformers `CLIPModel` (and SigLIP-style models -> `SiglipModel`): config
translation, weight mapping, tokenizer and image-processor files.

The two hold the same network under other names (transformers' `convert_clip_original_pytorch_to_hf.py` does the
OpenAI-checkpoint half of this). The traps, each handled below:

- Attention: open_clip's `nn.MultiheadAttention` keeps q, k, v in one `in_proj_weight` [3w, w] (rows q, then k,
  then v); transformers has `q_proj`, `k_proj`, `v_proj` [w, w] each. Split on export, concatenated on import
  (bit-exact both ways).
- Projections: open_clip's `visual.proj` and `text_projection` are matrices used as `x @ P` ([width, embed_dim]);
  transformers' `visual_projection` / `text_projection` are bias-free `nn.Linear` (weight [embed_dim, width]):
  transposed.
- Activation: open_clip's model-level `quick_gelu` flag -> `hidden_act: quick_gelu`, else `gelu` (exact erf GELU,
  what `nn.GELU()` computes). LayerNorm eps: open_clip's 1e-5 unless `norm_kwargs` says otherwise.
- Text pooling: open_clip takes the hidden state at `argmax(token ids)` (the end-of-text id 49407 is the largest
  CLIP BPE id); transformers' CLIP text model takes the first `eos_token_id` (49407) position. The same token, as
  long as the text tower is causal (open_clip's `attn_mask`: transformers' CLIP text model is always causal), so
  padding after it never matters: open_clip pads with id 0, transformers with `<|endoftext|>` and a mask.
- Vision: class token + learned positions ([1 + grid^2, w] -> an `nn.Embedding`), the pre-norm `ln_pre`
  (transformers' `pre_layrnorm`), the class token's output through `ln_post` (`post_layernorm`) then `proj`.
- `logit_scale`: the same log-scale scalar (open_clip may hold it as shape [1]).

Anything open_clip can build that this does not cover (timm or HF towers, ResNets, CoCa, attentional pooling,
layer scale, QK-norm and the other custom-block options, a logit bias, non-causal or non-argmax text pooling) is
listed by `clip_mapping_problems`, so an export can refuse before writing a byte. The SigLIP half (at the end)
maps a timm SigLIP ViT (MAP head) + open_clip's non-causal text transformer onto `SiglipModel`, one way.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

# open_clip's defaults (CLIPVisionCfg / CLIPTextCfg) that transformers' CLIP layers hard-wire.
BLOCK_FIXED = {  # open_clip's custom attention-block options: transformers' encoder layer has none of them
    "ls_init_value": None,
    "final_ln_after_pool": False,
    "act_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
VISION_FIXED = {
    **BLOCK_FIXED,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
}
TEXT_FIXED = {
    **BLOCK_FIXED,
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
}
CLIP_BPE_VOCAB = 49408  # open_clip's SimpleTokenizer: 49406 <start_of_text>, 49407 <end_of_text>
BOS_ID, EOS_ID = 49406, 49407
OPEN_CLIP_EPS = 1e-5
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
INTERPOLATION = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL resample codes, as transformers stores them


class NotMappableError(ValueError):
    """A model transformers cannot represent; the message names each part that does not map."""


# ------------------------------------------------------------------------------------------------ config


def _eps(cfg: dict, where: str, problems: list[str]) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    extra = sorted(set(kwargs) - {"eps"})
    if extra:
        problems.append(f"{where}.norm_kwargs {extra} (transformers' LayerNorm takes only eps)")
    return float(kwargs.get("eps", OPEN_CLIP_EPS))


def clip_mapping_problems(model_cfg: dict) -> list[str]:
    """What in an open_clip model config has no place in a transformers `CLIPModel`; empty when it maps.

    Each entry names the config key (as in open_clip_config.json) and why.
    """
    problems = []
    if "multimodal_cfg" in model_cfg:
        problems.append("multimodal_cfg (a CoCa captioner)")
    if model_cfg.get("init_logit_bias") is not None:
        problems.append("init_logit_bias (a SigLIP-style logit bias: CLIPModel has none)")
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        problems.append(f"vision_cfg.timm_model_name={vision['timm_model_name']!r} (a timm image tower)")
    elif isinstance(vision.get("layers", 12), (list, tuple)):
        problems.append("vision_cfg.layers is a list (open_clip's ModifiedResNet image tower)")
    else:
        for key, value in VISION_FIXED.items():
            if vision.get(key, value) != value:
                problems.append(f"vision_cfg.{key}={vision[key]!r} (transformers' CLIP vision tower: {value!r})")
        size = vision.get("image_size", 224)
        if isinstance(size, (list, tuple)) and len(set(size)) > 1:
            problems.append(f"vision_cfg.image_size={list(size)} (transformers' CLIP takes square images)")
        _eps(vision, "vision_cfg", problems)
    if text.get("hf_model_name"):
        problems.append(f"text_cfg.hf_model_name={text['hf_model_name']!r} (a Hugging Face text tower)")
    else:
        for key, value in TEXT_FIXED.items():
            if text.get(key, value) != value:
                problems.append(f"text_cfg.{key}={text[key]!r} (transformers' CLIP text tower: {value!r})")
        if text.get("vocab_size", CLIP_BPE_VOCAB) < CLIP_BPE_VOCAB:
            problems.append(f"text_cfg.vocab_size={text['vocab_size']} (the CLIP BPE needs {CLIP_BPE_VOCAB})")
        _eps(text, "text_cfg", problems)
    return problems


def clip_config(model_cfg: dict, logit_scale: float) -> dict:
    """transformers `CLIPConfig` keyword arguments for an open_clip CLIP config (one that maps).

    Args:
        model_cfg: {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"} as in open_clip_config.json.
        logit_scale: the trained log-scale, kept as the config's init value too.
    """
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    size = vision.get("image_size", 224)
    text_config = {
        "vocab_size": text.get("vocab_size", CLIP_BPE_VOCAB),
        "hidden_size": t_width,
        "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),  # open_clip: mlp_width = int(w * ratio)
        "projection_dim": model_cfg["embed_dim"],
        "num_hidden_layers": text.get("layers", 12),
        "num_attention_heads": text.get("heads", 8),
        "max_position_embeddings": text.get("context_length", 77),
        "hidden_act": act,
        "layer_norm_eps": _eps(text, "text_cfg", []),
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,  # not 2: 2 selects transformers' legacy argmax pooling, which is the same here
        "pad_token_id": EOS_ID,
    }
    vision_config = {
        "hidden_size": v_width,
        "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
        "projection_dim": model_cfg["embed_dim"],
        "num_hidden_layers": vision.get("layers", 12),
        "num_attention_heads": v_width // vision.get("head_width", 64),
        "image_size": size if isinstance(size, int) else size[0],
        "patch_size": vision.get("patch_size", 16),
        "hidden_act": act,
        "layer_norm_eps": _eps(vision, "vision_cfg", []),
    }
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "projection_dim": model_cfg["embed_dim"],
        "logit_scale_init_value": float(logit_scale),
    }


def open_clip_config(hf_config: dict, preprocessor: dict | None = None) -> dict:
    """The open_clip_config.json dict ({"model_cfg", "preprocess_cfg"}) of a transformers CLIP `config.json`.

    Args:
        hf_config: the parsed config.json of a `CLIPModel` folder.
        preprocessor: the parsed preprocessor_config.json, if any (size, mean, std, resample).

    Raises:
        NotMappableError: not a CLIP model, or one open_clip's CLIP cannot build (two activations, ...).
    """
    if hf_config.get("model_type") != "clip":
        raise NotMappableError(f"model_type {hf_config.get('model_type')!r}: only transformers CLIP models map")
    vision, text = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) > 1 or not acts <= {"gelu", "quick_gelu"}:
        raise NotMappableError(f"hidden_act {sorted(acts)}: open_clip uses one of gelu / quick_gelu for both towers")
    embed_dim = hf_config.get("projection_dim", 512)
    v_width, t_width = vision.get("hidden_size", 768), text.get("hidden_size", 512)
    vision_cfg = {
        "image_size": vision.get("image_size", 224),
        "patch_size": vision.get("patch_size", 32),
        "width": v_width,
        "layers": vision.get("num_hidden_layers", 12),
        "head_width": v_width // vision.get("num_attention_heads", 12),
        "mlp_ratio": vision.get("intermediate_size", 3072) / v_width,
    }
    text_cfg = {
        "context_length": text.get("max_position_embeddings", 77),
        "vocab_size": text.get("vocab_size", CLIP_BPE_VOCAB),
        "width": t_width,
        "heads": text.get("num_attention_heads", 8),
        "layers": text.get("num_hidden_layers", 12),
        "mlp_ratio": text.get("intermediate_size", 2048) / t_width,
    }
    for cfg, src in ((vision_cfg, vision), (text_cfg, text)):
        eps = src.get("layer_norm_eps", OPEN_CLIP_EPS)
        if not math.isclose(eps, OPEN_CLIP_EPS):
            cfg["norm_kwargs"] = {"eps": eps}
    model_cfg = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if acts == {"quick_gelu"}:
        model_cfg["quick_gelu"] = True
    preprocess_cfg = {"size": vision_cfg["image_size"]}
    if preprocessor:
        inverse = {v: k for k, v in INTERPOLATION.items()}
        preprocess_cfg.update(
            mean=tuple(preprocessor.get("image_mean", ())) or None,
            std=tuple(preprocessor.get("image_std", ())) or None,
            interpolation=inverse.get(preprocessor.get("resample"), "bicubic"),
        )
        preprocess_cfg = {k: v for k, v in preprocess_cfg.items() if v is not None}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# ----------------------------------------------------------------------------------------------- weights

# open_clip (suffix after the tower prefix) -> transformers, per transformer block; qkv handled separately.
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_BLOCK["attn.out_proj"] = "self_attn.out_proj"
_VISION = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT = {  # after the text prefix ("" in open_clip's CLIP, "text." in CustomTextCLIP)
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def _text_prefix(state: dict) -> str:
    return "text." if any(k.startswith("text.") for k in state) else ""


def _block(tower: str, index: str, rest: str, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One open_clip transformer-block tensor (`rest` after `resblocks.N.`) under transformers' names."""
    base = f"{tower}.encoder.layers.{index}"
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]  # weight | bias
        chunks = value.chunk(3, dim=0)  # rows: q, then k, then v
        return {f"{base}.self_attn.{part}_proj.{kind}": c for part, c in zip("qkv", chunks, strict=True)}
    module, _, kind = rest.rpartition(".")
    if module not in _BLOCK:
        raise NotMappableError(f"weight {key}: no place in a transformers encoder layer")
    return {f"{base}.{_BLOCK[module]}.{kind}": value}


def _text_tensor(name: str, key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """An open_clip text-transformer tensor (`name`: its key without the tower prefix) under transformers' names
    (shared by CLIP and SigLIP); None for the projection, which differs between the two."""
    if name in _TEXT:
        return {_TEXT[name]: value}
    if m := _RESBLOCK.match(name):
        if not m.group(1):
            return _block("text_model", m.group(2), m.group(3), key, value)
    return None


def to_transformers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict -> a transformers `CLIPModel` state dict (new tensors, contiguous).

    Raises:
        NotMappableError: a key with no place in `CLIPModel`, naming it.
    """
    prefix = _text_prefix(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None  # None: not a text-tower key
        if key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif key in _VISION:
            out[_VISION[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t()
        elif (m := _RESBLOCK.match(key)) and m.group(1):
            out.update(_block("vision_model", m.group(2), m.group(3), key, value))
        elif name == "text_projection":
            out["text_projection.weight"] = value.t()
        elif name is not None and (mapped := _text_tensor(name, key, value)) is not None:
            out.update(mapped)
        else:
            raise NotMappableError(f"weight {key}: no place in transformers' CLIPModel")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_transformers_state(hf: dict[str, torch.Tensor], text_prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `to_transformers_state`: a `CLIPModel` state dict -> open_clip's keys (bit-exact).

    Args:
        hf: transformers CLIPModel weights (`model.safetensors`).
        text_prefix: "" for open_clip's `CLIP`, "text." for `CustomTextCLIP`.

    Raises:
        NotMappableError: a transformers key with no open_clip counterpart, naming it.
    """
    inverse = {v: k for k, v in _VISION.items()}
    inverse.update({v: text_prefix + k for k, v in _TEXT.items()})
    layer = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif key in inverse:
            out[inverse[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t()
        elif key == "text_projection.weight":
            out[text_prefix + "text_projection"] = value.t()
        elif key.endswith("position_ids"):
            continue  # a buffer of arange(n) some transformers versions save
        elif m := layer.match(key):
            tower = "visual." if m.group(1) == "vision_model" else text_prefix
            base, rest = f"{tower}transformer.resblocks.{m.group(2)}", m.group(3)
            module, _, kind = rest.rpartition(".")
            if qm := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                qkv.setdefault(f"{base}.attn.in_proj_{kind}", {})[qm.group(1)] = value
            elif module in block:
                out[f"{base}.{block[module]}.{kind}"] = value
            else:
                raise NotMappableError(f"weight {key}: no place in open_clip's CLIP")
        else:
            raise NotMappableError(f"weight {key}: no place in open_clip's CLIP")
    for key, parts in qkv.items():
        if set(parts) != set("qkv"):
            raise NotMappableError(f"weights {key}: q, k and v projections incomplete ({sorted(parts)})")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ------------------------------------------------------------------------------------- tokenizer, images


def clip_tokenizer(tokenizer, context_length: int, siglip: bool = False):
    """open_clip's CLIP BPE (`SimpleTokenizer`) as a transformers `CLIPTokenizer` (tokenizers-backed).

    Same vocabulary and merge ranks; open_clip's special tokens <start_of_text> / <end_of_text> under the names
    transformers' CLIP files use (<|startoftext|> / <|endoftext|>), same ids. Known difference: open_clip unescapes
    HTML entities (`&amp;` -> `&`) and runs ftfy's mojibake repair before tokenizing; transformers does neither.

    Args:
        siglip: for a SigLIP text tower, which attends to the padding and pools the last position: pad with id 0
            ("!") as open_clip does, and hand the model no attention mask (as transformers' SigLIP tokenizer).
    """
    from transformers import CLIPTokenizer

    vocab = {HF_SPECIAL.get(tok, tok): i for tok, i in tokenizer.encoder.items()}
    merges = [tuple(m) for m in sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)]
    extra = {"pad_token": "!", "model_input_names": ["input_ids"]} if siglip else {}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length, **extra)


def image_processor_config(preprocess_cfg: dict) -> dict:
    """`CLIPImageProcessor` settings (preprocessor_config.json) equal to open_clip's eval transform.

    open_clip's eval transform for resize_mode "shortest" (its default): resize the shorter side to `size`,
    center-crop `size` x `size`, to RGB, /255, normalize. "squash" resizes straight to size x size.

    Raises:
        NotMappableError: a resize mode CLIPImageProcessor has no equal for ("longest" pads).
    """
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    mode = preprocess_cfg.get("resize_mode", "shortest")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if mode not in ("shortest", "squash") or interpolation not in INTERPOLATION:
        raise NotMappableError(
            f"preprocess_cfg resize_mode={mode!r}, interpolation={interpolation!r}: CLIPImageProcessor resizes "
            "shortest-side or squash, with bicubic / bilinear / nearest"
        )
    resize = {"shortest_edge": min(h, w)} if mode == "shortest" else {"height": h, "width": w}
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": resize,
        "resample": INTERPOLATION[interpolation],
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "image_std": list(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "do_convert_rgb": True,
    }


def is_transformers_folder(path: str | Path) -> bool:
    """A folder written by transformers' `save_pretrained` (config.json with a model_type + model.safetensors)."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# ------------------------------------------------------------------------------------------------ SigLIP

# A SigLIP-style open_clip model maps onto transformers' `SiglipModel` when its image tower is a timm SigLIP ViT
# (no class token, MAP attention-pool head, `timm_proj: none`) and its text tower open_clip's transformer as SigLIP
# uses it (no causal mask, the last position pooled, a projection with bias). Both towers end in their own head:
# SiglipModel has no separate projections. The logit bias comes along.
SIGLIP_TEXT = {
    **{k: v for k, v in TEXT_FIXED.items() if k not in ("no_causal_mask", "pool_type", "proj_bias")},
    "no_causal_mask": True,
    "pool_type": "last",
    "proj_bias": True,
}
_TIMM_ACT = {"GELUTanh": "gelu_pytorch_tanh", "GELU": "gelu"}


def siglip_mapping_problems(model_cfg: dict, model: torch.nn.Module) -> list[str]:
    """What in a SigLIP-style open_clip model has no place in a transformers `SiglipModel`; empty when it maps.

    Args:
        model_cfg: the open_clip model config.
        model: the built model: the timm trunk's own settings (class token, pooling, norms) are read from it.
    """
    problems = []
    if model_cfg.get("init_logit_bias") is None:
        problems.append("init_logit_bias is not set (SiglipModel is the SigLIP loss's model, with a logit bias)")
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if not vision.get("timm_model_name"):
        problems.append("vision_cfg: SiglipModel's image tower is a timm SigLIP ViT (timm_model_name: vit_*_siglip_*)")
    else:
        if vision.get("timm_pool") != "map" or vision.get("timm_proj") not in ("none", ""):
            problems.append("vision_cfg.timm_pool/timm_proj: SiglipModel needs the MAP head ('map') and no projection")
        problems += _timm_siglip_problems(getattr(model.visual, "trunk", None))
    if text.get("hf_model_name"):
        problems.append(f"text_cfg.hf_model_name={text['hf_model_name']!r} (a Hugging Face text tower)")
    else:
        for key, value in SIGLIP_TEXT.items():
            if text.get(key, TEXT_FIXED.get(key)) != value:
                problems.append(f"text_cfg.{key}={text.get(key)!r} (transformers' SigLIP text tower: {value!r})")
        _eps(text, "text_cfg", problems)
    return problems


def _timm_siglip_problems(trunk) -> list[str]:
    if trunk is None or type(trunk).__name__ != "VisionTransformer":
        return [f"vision_cfg.timm_model_name: {type(trunk).__name__} is not a timm VisionTransformer"]
    checks = {
        "a class token": trunk.cls_token is not None,
        "register tokens": getattr(trunk, "reg_token", None) is not None,
        "a pre-norm": type(trunk.norm_pre).__name__ != "Identity",
        "a norm after pooling": type(trunk.fc_norm).__name__ != "Identity",
        "a patch norm": type(trunk.patch_embed.norm).__name__ != "Identity",
        "dynamic image size": bool(getattr(trunk, "dynamic_img_size", False)),
        "pooling other than MAP": trunk.global_pool != "map" or getattr(trunk.attn_pool, "pool", "") != "token",
        "layer scale or QK-norm": any(
            type(m).__name__ != "Identity"
            for b in trunk.blocks
            for m in (b.ls1, b.ls2, b.attn.q_norm, b.attn.k_norm, b.drop_path1)
            if m is not None
        ),
        "an activation other than gelu / gelu_tanh": type(trunk.blocks[0].mlp.act).__name__ not in _TIMM_ACT,
        "non-square images or patches": len(set(trunk.patch_embed.img_size)) > 1
        or len(set(trunk.patch_embed.patch_size)) > 1,
    }
    return [f"the timm image tower has {what} (SiglipModel's has not)" for what, bad in checks.items() if bad]


def siglip_config(model_cfg: dict, model: torch.nn.Module) -> dict:
    """transformers `SiglipConfig` keyword arguments for a SigLIP-style open_clip model (one that maps)."""
    trunk, text = model.visual.trunk, model_cfg["text_cfg"]
    block = trunk.blocks[0]
    t_width = text.get("width", 512)
    return {
        "text_config": {
            "vocab_size": text.get("vocab_size", CLIP_BPE_VOCAB),
            "hidden_size": t_width,
            "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
            "layer_norm_eps": _eps(text, "text_cfg", []),
            "projection_size": model_cfg["embed_dim"],
            "pad_token_id": 0,  # open_clip's SimpleTokenizer pads with 0, and the last (pooled) position sees it
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        },
        "vision_config": {
            "hidden_size": trunk.embed_dim,
            "intermediate_size": block.mlp.fc1.out_features,
            "num_hidden_layers": len(trunk.blocks),
            "num_attention_heads": block.attn.num_heads,
            "image_size": trunk.patch_embed.img_size[0],
            "patch_size": trunk.patch_embed.patch_size[0],
            "hidden_act": _TIMM_ACT[type(block.mlp.act).__name__],
            "layer_norm_eps": trunk.norm.eps,
            "vision_use_head": True,
        },
    }


_TIMM_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TIMM_BLOCK["attn.proj"] = "self_attn.out_proj"
_SIGLIP_VISION = {
    "visual.trunk.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.trunk.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual.trunk.norm.weight": "vision_model.post_layernorm.weight",
    "visual.trunk.norm.bias": "vision_model.post_layernorm.bias",
    "visual.trunk.attn_pool.proj.weight": "vision_model.head.attention.out_proj.weight",
    "visual.trunk.attn_pool.proj.bias": "vision_model.head.attention.out_proj.bias",
    "visual.trunk.attn_pool.norm.weight": "vision_model.head.layernorm.weight",
    "visual.trunk.attn_pool.norm.bias": "vision_model.head.layernorm.bias",
    "visual.trunk.attn_pool.mlp.fc1.weight": "vision_model.head.mlp.fc1.weight",
    "visual.trunk.attn_pool.mlp.fc1.bias": "vision_model.head.mlp.fc1.bias",
    "visual.trunk.attn_pool.mlp.fc2.weight": "vision_model.head.mlp.fc2.weight",
    "visual.trunk.attn_pool.mlp.fc2.bias": "vision_model.head.mlp.fc2.bias",
    "visual.trunk.attn_pool.latent": "vision_model.head.probe",  # [1, 1, D] both
}
_TIMM_RESBLOCK = re.compile(r"^visual\.trunk\.blocks\.(\d+)\.(.+)$")


def to_siglip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SigLIP-style open_clip state dict (timm SigLIP ViT + open_clip text transformer) -> `SiglipModel`'s.

    Raises:
        NotMappableError: a key with no place in `SiglipModel`, naming it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(1)
        elif key in _SIGLIP_VISION:
            out[_SIGLIP_VISION[key]] = value
        elif key == "visual.trunk.pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = value[0]  # [1, N, D] -> [N, D]
        elif key in ("visual.trunk.attn_pool.q.weight", "visual.trunk.attn_pool.q.bias"):
            # nn.MultiheadAttention's in_proj rows: q, then k, then v; timm keeps q apart and k, v fused (kv).
            kind = key.rsplit(".", 1)[1]
            kv = state[f"visual.trunk.attn_pool.kv.{kind}"]
            out[f"vision_model.head.attention.in_proj_{kind}"] = torch.cat([value, kv], dim=0)
        elif key.startswith("visual.trunk.attn_pool.kv."):
            continue  # went into in_proj with q
        elif m := _TIMM_RESBLOCK.match(key):
            base, rest = f"vision_model.encoder.layers.{m.group(1)}", m.group(2)
            module, _, kind = rest.rpartition(".")
            if module == "attn.qkv":
                for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{base}.self_attn.{part}_proj.{kind}"] = chunk
            elif module in _TIMM_BLOCK:
                out[f"{base}.{_TIMM_BLOCK[module]}.{kind}"] = value
            else:
                raise NotMappableError(f"weight {key}: no place in transformers' SigLIP vision layer")
        elif key in ("text.text_projection.weight", "text.text_projection.bias"):
            out["text_model.head." + key.rsplit(".", 1)[1]] = value  # Linear -> Linear: no transpose
        elif key.startswith("text.") and (mapped := _text_tensor(key[len("text.") :], key, value)) is not None:
            out.update(mapped)  # the text transformer's names are the same in CLIP and SigLIP
        else:
            raise NotMappableError(f"weight {key}: no place in transformers' SiglipModel")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
