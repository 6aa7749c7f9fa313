"""`clipkit export`: model folders that other tools load, each checked against clipkit's own embeddings.

Two formats:

- `open_clip`: `open_clip_config.json` + `open_clip_model.safetensors` (+ the tokenizer files of an HF text tower),
  what `open_clip.create_model_and_transforms("local-dir:DIR")` loads.
- `hf`: a Hugging Face hub style folder for sharing: the open_clip files, the tokenizer files (`vocab.json` +
  `merges.txt` for the CLIP BPE, as `transformers.CLIPTokenizer` reads them; the HF tokenizer's own files for an
  HF text tower, whose `config.json` is copied too) and a model card `README.md`.

Every export is loaded back with open_clip and compared with clipkit's model on probe images and captions; the
maximum absolute differences of the embeddings are returned (and printed by the CLI).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from clipkit.models.factory import ModelBundle
from clipkit.models.io import CONFIG_NAME, INFO_NAME, load_model, save_model

FORMATS = ("open_clip", "hf")
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
PROBE_CAPTIONS = ("a photo of a cat", "a red apple on a table", "an emoji of a grinning face", "")


def model_folder(checkpoint: str | Path) -> Path:
    """The model folder a user's path means: a model folder, its weights file, a checkpoint or a run folder.

    Raises:
        FileNotFoundError: naming what was looked for.
    """
    path = Path(checkpoint)
    for candidate in (path, path.parent if path.is_file() else None, path / "model"):
        if candidate is not None and (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{checkpoint}: no model folder here ({CONFIG_NAME} in it, in its model/ subfolder, or beside the file)"
    )


def probe_images(size: int, n: int = 3, seed: int = 0) -> list[Image.Image]:
    """Deterministic RGB pictures (gradients plus noise), larger than the model input so resizing is exercised."""
    rng = np.random.default_rng(seed)
    side = 2 * size + 3
    yy, xx = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(n):
        base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * rng.uniform(0.3, 1.0, size=3)
        pixels = np.clip(base * 255 + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


@torch.no_grad()
def embedding_diff(bundle: ModelBundle, model, preprocess, tokenizer) -> dict[str, float]:
    """Max |clipkit - other| over the probe embeddings, each side with its own preprocessing and tokenizer.

    Args:
        bundle: clipkit's model (in eval mode), transforms and tokenizer.
        model, preprocess, tokenizer: the other tool's model, eval transform and tokenizer.

    Returns:
        {"image": max abs diff, "text": max abs diff} of the normalized embeddings, as Python floats.
    """
    size = bundle.config["preprocess_cfg"]["size"]
    size = size if isinstance(size, int) else max(size)
    images = probe_images(size)
    ours_img = bundle.model.encode_image(torch.stack([bundle.eval_transform(im) for im in images]), normalize=True)
    theirs_img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    ours_txt = bundle.model.encode_text(bundle.tokenizer(list(PROBE_CAPTIONS)), normalize=True)
    theirs_txt = model.encode_text(tokenizer(list(PROBE_CAPTIONS)), normalize=True)
    return {
        "image": (ours_img - theirs_img).abs().max().item(),
        "text": (ours_txt - theirs_txt).abs().max().item(),
    }


def verify_open_clip(bundle: ModelBundle, out: Path) -> dict[str, float]:
    """Loads `out` with `open_clip.create_model_and_transforms("local-dir:...")` and compares embeddings."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    return embedding_diff(bundle, model.eval(), preprocess, tokenizer)


def write_clip_bpe_files(tokenizer: open_clip.SimpleTokenizer, out: Path, context_length: int) -> None:
    """The CLIP BPE in `transformers.CLIPTokenizer`'s files: vocab.json, merges.txt and the tokenizer config."""
    # open_clip names the two special tokens <start_of_text> / <end_of_text>; HF's CLIP files spell them <|...|>.
    vocab = {HF_SPECIAL.get(tok, tok): i for tok, i in tokenizer.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    # open_clip pads with id 0 ("!"); the HF side pads with <|endoftext|>, which the pooling (argmax) never reads.
    special["pad_token"] = "<|endoftext|>"
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def model_card(config: dict, info: dict, params: int) -> str:
    """A short README.md: what the model is, how it was trained, how to load it."""
    mc = config["model_cfg"]
    vision = mc["vision_cfg"].get("timm_model_name") or f"open_clip vision tower {mc['vision_cfg']}"
    text = mc["text_cfg"].get("hf_model_name") or f"open_clip text transformer {mc['text_cfg']}"
    lines = [
        "---",
        "library_name: open_clip",
        "tags: [clip, clipkit, zero-shot-image-classification]",
        "---",
        f"# {info.get('recipe', 'clipkit model')}",
        "",
        f"A CLIP dual encoder trained with clipkit: {params / 1e6:.1f}M parameters, embedding size {mc['embed_dim']}.",
        "",
        f"- image tower: {vision}",
        f"- text tower: {text}",
        f"- preprocessing: {json.dumps(config['preprocess_cfg'])}",
    ]
    if info:
        lines += ["", "## Training", "", "```json", json.dumps(info, indent=2, default=str), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import open_clip",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
        'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "open_clip") -> dict:
    """Exports a clipkit model (folder, checkpoint or run) to `out` and verifies it with open_clip.

    Args:
        checkpoint: anything `model_folder` accepts.
        out: the folder to write (created; files of the same names are replaced).
        fmt: "open_clip" or "hf".

    Returns:
        {"format", "out", "max_abs_diff": {"image", "text"}}.

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {FORMATS}")
    src, out = model_folder(checkpoint), Path(out).resolve()
    bundle = load_model(src)
    config = json.loads((src / CONFIG_NAME).read_text())
    info = json.loads((src / INFO_NAME).read_text()) if (src / INFO_NAME).is_file() else {}
    text_cfg = config["model_cfg"]["text_cfg"]
    if fmt == "hf" and "hf_model_name" in text_cfg:
        # The text tower's architecture config travels with the folder, which then names itself as the tower.
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(text_cfg["hf_model_name"]) / "config.json", out / "config.json")
        text_cfg["hf_model_name"] = str(out)
    save_model(out, bundle.model, config)
    (out / INFO_NAME).unlink(missing_ok=True)  # clipkit's own notes: not part of an export
    if fmt == "hf":
        if "hf_tokenizer_name" not in text_cfg:
            write_clip_bpe_files(bundle.tokenizer, out, text_cfg.get("context_length", 77))
        params = sum(p.numel() for p in bundle.model.parameters())
        (out / "README.md").write_text(model_card(config, info, params))
    return {"format": fmt, "out": str(out), "max_abs_diff": verify_open_clip(bundle, out)}
