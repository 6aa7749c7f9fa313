"""`clipkit export`: model folders that other tools load, each checked against clipkit's own embeddings.

Three formats:

- `open_clip`: `open_clip_config.json` + `open_clip_model.safetensors` (+ the tokenizer files of an HF text tower),
  what `open_clip.create_model_and_transforms("local-dir:DIR")` loads.
- `hf`: a Hugging Face hub style folder for sharing: the open_clip files, the tokenizer files (`vocab.json` +
  `merges.txt` for the CLIP BPE, as `transformers.CLIPTokenizer` reads them; the HF tokenizer's own files for an
  HF text tower, whose `config.json` is copied too) and a model card `README.md`.
- `transformers`: a `CLIPModel` folder (`config.json`, `model.safetensors`, a `CLIPTokenizer` `tokenizer.json`,
  `preprocessor_config.json`, a model card) that `from_pretrained` and `pipeline(...)` load; the mapping is in
  `clipkit.models.transformers_io`, and an architecture it cannot hold is refused before anything is written.

Every export is written under a hidden name beside the target, loaded back (open_clip, or transformers) and
compared with clipkit's model on images and captions; only a folder that passes is moved into place. The maximum
absolute differences of the embeddings are returned (and printed by the CLI).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from clipkit.files import atomic_path, write_json_atomic, write_text_atomic
from clipkit.models.factory import ModelBundle
from clipkit.models.io import CONFIG_NAME, INFO_NAME, load_model, save_model
from clipkit.models.transformers_io import (
    NotMappableError,
    clip_config,
    clip_mapping_problems,
    clip_tokenizer,
    image_processor_config,
    siglip_config,
    siglip_mapping_problems,
    to_siglip_state,
    to_transformers_state,
)

FORMATS = ("open_clip", "hf", "transformers")
# Max |difference| of unit-norm fp32 embeddings between clipkit and the exported model. The two run the same
# arithmetic in another order (q/k/v as three matmuls vs one fused in_proj; SDPA vs nn.MultiheadAttention), which
# measured <= 1e-6 on CPU; a mapping error (a projection not transposed, gelu for quick_gelu, a wrong eps of
# 1e-6 for 1e-5 aside) moves embeddings by 1e-3 or more.
TOLERANCE = 1e-5
SIGLIP_PIPELINE_LENGTH = 64  # transformers 5.x's zero-shot pipeline: padding="max_length", max_length=64 for SigLIP
LONG_CAPTION = " ".join(["a very long caption that runs past the context length"] * 12)  # truncation check
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
PROBE_CAPTIONS = ("a photo of a cat", "a red apple on a table", "an emoji of a grinning face", "")


class ExportVerificationError(ValueError):
    """The exported folder, loaded back, does not reproduce clipkit's model; `report` holds the measured checks."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


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


def transformers_model_card(config: dict, info: dict, params: int, kind: str = "CLIPModel") -> str:
    """README.md of a transformers export: what the model is, how it was trained and scored, how to load it."""
    mc = config["model_cfg"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, clipkit, open_clip]",
        "---",
        f"# {info.get('recipe', 'clipkit model')}",
        "",
        f"A CLIP dual encoder trained with clipkit ({params / 1e6:.1f}M parameters, embedding size {mc['embed_dim']}),",
        f"converted to transformers' `{kind}`. Its image and text embeddings equal the open_clip model's (checked",
        "when this folder was written).",
        "",
        f"- open_clip config: `{json.dumps(mc)}`",
        f"- preprocessing: `{json.dumps(config['preprocess_cfg'])}`",
    ]
    if info:
        lines += ["", "## Training and evaluation", "", "```json", json.dumps(info, indent=2, default=str), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, pipeline",
        f'model = AutoModel.from_pretrained("PATH/TO/THIS/FOLDER")  # {kind}',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
        'image_processor = AutoImageProcessor.from_pretrained("PATH/TO/THIS/FOLDER")',
        'classify = pipeline("zero-shot-image-classification", model="PATH/TO/THIS/FOLDER")',
        'classify("image.png", candidate_labels=["cat", "dog"], hypothesis_template="a photo of a {}.")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_transformers(bundle: ModelBundle, out: Path, info: dict) -> None:
    """Writes `bundle` as a transformers `CLIPModel` (or, SigLIP-style, `SiglipModel`) folder: config, weights,
    tokenizer, image processor, model card.

    Raises:
        NotMappableError: the architecture or preprocessing has no transformers equal, naming each part.
    """
    from transformers import CLIPConfig, SiglipConfig

    config = bundle.config
    model_cfg = config["model_cfg"]
    problems, siglip = clip_mapping_problems(model_cfg), False
    if problems and model_cfg.get("init_logit_bias") is not None:  # SigLIP-style: SiglipModel, if the towers match
        problems = siglip_mapping_problems(model_cfg, bundle.model)
        siglip, kind = True, "SiglipModel"
    else:
        kind = "CLIPModel"
    preprocessor = None
    try:
        preprocessor = image_processor_config(config["preprocess_cfg"])
    except NotMappableError as e:
        problems.append(str(e))
    if problems:
        raise NotMappableError(f"transformers {kind} cannot represent this model: " + "; ".join(problems))
    if siglip:
        state = to_siglip_state(bundle.model.state_dict())
        hf_config = SiglipConfig(**siglip_config(model_cfg, bundle.model))
    else:
        state = to_transformers_state(bundle.model.state_dict())
        hf_config = CLIPConfig(**clip_config(model_cfg, bundle.model.logit_scale.item()))
    hf_config.architectures = [kind]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", hf_config.to_json_string())
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / "preprocessor_config.json", preprocessor, sort_keys=False)
    context_length = config["model_cfg"]["text_cfg"].get("context_length", 77)
    clip_tokenizer(bundle.tokenizer, context_length, siglip).save_pretrained(str(out))  # tokenizer.json + its config
    params = sum(p.numel() for p in bundle.model.parameters())
    write_text_atomic(out / "README.md", transformers_model_card(config, info, params, kind))


def real_images() -> list[Image.Image]:
    """The two real photographs scikit-learn ships (china.jpg, flower.jpg; 640x427), read as files: importing
    scikit-learn for them would cost seconds."""
    import importlib.util

    folder = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images"
    return [Image.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]


def tokenizer_mismatches(ours, theirs, captions: list[str], context_length: int) -> list[str]:
    """Captions whose transformers token ids differ from open_clip's (truncated at the context length).

    open_clip pads with id 0, transformers' CLIP with <|endoftext|> and a mask: the ids compared are those before
    padding, and open_clip's row must be all padding after them. A SigLIP export pads with 0 and has no mask: whole
    rows are compared.
    """
    rows = ours(captions)  # [N, context_length]
    enc = theirs(captions, padding="max_length", truncation=True, max_length=context_length)
    masks = enc.get("attention_mask") or [[1] * context_length for _ in captions]
    bad = []
    for caption, row, ids, mask in zip(captions, rows.tolist(), enc["input_ids"], masks, strict=True):
        n = sum(mask)
        if ids[:n] != row[:n] or any(row[n:]):
            bad.append(caption)
    return bad


@torch.no_grad()
def verify_transformers(bundle: ModelBundle, out: Path) -> dict:
    """Loads `out` with transformers and compares it with clipkit's model on real images and captions.

    Returns:
        {"max_abs_diff": {"image", "text"}: normalized embeddings, the same pixels into both models (image) and
        each side's own tokenizer (text); "preprocess_max_abs_diff": {"torchvision", "pil"}: {"square",
        "photos"}: the pixels of transformers' image processor (each backend) against open_clip's eval transform,
        and the image embedding difference when each side preprocesses the images itself (default backend);
        "tokenizer": {"captions", "identical"}}.

    Raises:
        ExportVerificationError: an embedding differs by more than `TOLERANCE`, the token ids differ, the PIL
            image processor's pixels differ on square images (wrong size, mean or std), or weights did not load.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model, loading = AutoModel.from_pretrained(str(out), output_loading_info=True)  # CLIPModel or SiglipModel
    if any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise ExportVerificationError(f"{out}: transformers loaded the weights with problems: {loading}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ours = bundle.model.eval()
    context_length = bundle.config["model_cfg"]["text_cfg"].get("context_length", 77)
    captions = [*PROBE_CAPTIONS, LONG_CAPTION, "Grinning Face with Big Eyes", "flag: United Kingdom", "naïve café 123"]
    bad_ids = tokenizer_mismatches(bundle.tokenizer, tokenizer, captions, context_length)

    size = bundle.config["preprocess_cfg"]["size"]
    images = real_images() + probe_images(size if isinstance(size, int) else max(size))
    pixels = torch.stack([bundle.eval_transform(im) for im in images])  # [N, 3, H, W]
    ours_img = ours.encode_image(pixels, normalize=True)
    theirs_img = _normalized(model.get_image_features(pixel_values=pixels))
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    ours_txt = ours.encode_text(bundle.tokenizer(captions), normalize=True)
    theirs_txt = _normalized(model.get_text_features(**enc))
    # Pixels of transformers' image processor against open_clip's eval transform: on square pictures (the
    # probes; Fashion-MNIST, emoji) the PIL backend is exact and torchvision's within one uint8 level. On others
    # the center crop can sit half a pixel apart (open_clip rounds the crop offset, transformers floors it).
    preprocess, square = {}, slice(len(images) - 3, None)
    for backend in ("torchvision", "pil"):
        processor = AutoImageProcessor.from_pretrained(str(out), backend=backend)
        theirs_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        diff = (theirs_pixels - pixels).abs().amax(dim=(1, 2, 3))  # [N]
        preprocess[backend] = {"square": diff[square].max().item(), "photos": diff[: square.start].max().item()}
        if backend == "torchvision":  # the default backend, what `pipeline(...)` uses
            own = _normalized(model.get_image_features(pixel_values=theirs_pixels)) - ours_img
            preprocess["image_embedding_own_preprocessing"] = own.abs().max().item()
    notes = []
    if model.config.model_type == "siglip" and context_length != SIGLIP_PIPELINE_LENGTH:
        notes.append(
            f"transformers' zero-shot pipeline pads SigLIP text to {SIGLIP_PIPELINE_LENGTH} tokens, this model takes "
            f"{context_length}: use SiglipModel with the tokenizer (padding='max_length', max_length={context_length})"
        )
    report = {
        "notes": notes,
        "max_abs_diff": {
            "image": (ours_img - theirs_img).abs().max().item(),
            "text": (ours_txt - theirs_txt).abs().max().item(),
        },
        "preprocess_max_abs_diff": preprocess,
        "tokenizer": {"captions": len(captions), "identical": not bad_ids},
    }
    if max(report["max_abs_diff"].values()) > TOLERANCE or bad_ids or preprocess["pil"]["square"] > TOLERANCE:
        raise ExportVerificationError(
            f"{out}: transformers' model does not reproduce clipkit's (tolerance {TOLERANCE}): {report}"
            + (f"; token ids differ for {bad_ids}" if bad_ids else ""),
            report,
        )
    return report


def _normalized(features) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    features = getattr(features, "pooler_output", features)
    return torch.nn.functional.normalize(features, dim=-1)


def check_target(out: Path, src: Path, overwrite: bool) -> None:
    """Refuses an export target that would lose data: the source model folder itself, a file, a non-empty folder.

    Raises:
        ValueError: naming the folder and the ways on.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a folder (new or empty)")
    if out == src.resolve():
        raise ValueError(f"--out {out}: is the model folder being exported; give another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        raise ValueError(
            f"--out {out}: not empty ({len(names)} entries, e.g. {names[:3]}); give a new or empty folder, or pass "
            "--overwrite to replace the files an export writes (others are kept)"
        )


def publish(stage: Path, out: Path) -> None:
    """Moves each file of the finished, verified `stage` folder onto `out` (one rename per file)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(stage.iterdir()):
        target = out / f.name
        if f.is_dir() and target.is_dir():
            shutil.rmtree(target)  # only reached with --overwrite: a subfolder the export itself writes
        os.replace(f, target)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "open_clip", overwrite: bool = False) -> dict:
    """Exports a clipkit model (folder, checkpoint, run or weights file) to `out` and verifies it by loading it back.

    The folder is written beside `out` under a hidden name, loaded back (open_clip for "open_clip" / "hf",
    transformers for "transformers") and compared with clipkit's model; only then are its files moved into `out`.
    A failed check, or an architecture the format cannot hold, leaves `out` untouched.

    Args:
        checkpoint: anything `model_folder` accepts; a weights file other than the folder's own is what is loaded.
        out: the folder to write: new or empty, unless `overwrite` (files of the same names are then replaced,
            other files kept). Never the model folder being exported.
        fmt: "open_clip", "hf" or "transformers".

    Returns:
        {"format", "out", "loaded", "max_abs_diff": {"image", "text"}, ...}; "transformers" adds the
        preprocessing and tokenizer checks (see `verify_transformers`).

    Raises:
        ValueError: an unknown format, or a target that would lose data (see `check_target`).
        NotMappableError: the model has no equal in transformers, naming what does not map.
        ExportVerificationError: the written folder does not reproduce the model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {FORMATS}")
    src, out = model_folder(checkpoint), Path(out).resolve()
    check_target(out, src, overwrite)
    named = Path(checkpoint)
    bundle = load_model(named if named.is_file() else src)
    config = json.loads(json.dumps(bundle.config, default=list))  # a copy: the hf format edits the text tower path
    info = json.loads((src / INFO_NAME).read_text()) if (src / INFO_NAME).is_file() else {}
    stage = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)  # a leftover of a killed export by this same pid
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "transformers":
            write_transformers(bundle, stage, info)
            report = verify_transformers(bundle, stage)
        else:
            report = {"max_abs_diff": write_open_clip(bundle, config, info, stage, out, fmt)}
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"format": fmt, "out": str(out), "loaded": bundle.source, **report}


def write_open_clip(bundle: ModelBundle, config: dict, info: dict, stage: Path, out: Path, fmt: str) -> dict:
    """Writes the "open_clip" / "hf" folder into `stage` and verifies it with open_clip; returns the max diffs."""
    text_cfg = config["model_cfg"]["text_cfg"]
    stage.mkdir(parents=True)
    if fmt == "hf" and "hf_model_name" in text_cfg:
        # The text tower's architecture config travels with the folder, which then names itself as the tower.
        shutil.copyfile(Path(text_cfg["hf_model_name"]) / "config.json", stage / "config.json")
        text_cfg["hf_model_name"] = str(stage)
    save_model(stage, bundle.model, config)
    (stage / INFO_NAME).unlink()  # clipkit's own notes: not part of an export
    if fmt == "hf":
        if "hf_tokenizer_name" not in text_cfg:
            write_clip_bpe_files(bundle.tokenizer, stage, text_cfg.get("context_length", 77))
        params = sum(p.numel() for p in bundle.model.parameters())
        write_text_atomic(stage / "README.md", model_card(config, info, params))
    diff = verify_open_clip(bundle, stage)
    if fmt == "hf" and "hf_model_name" in text_cfg:  # verified in the stage; the published folder names itself
        text_cfg["hf_model_name"] = str(out)
        write_json_atomic(stage / CONFIG_NAME, config, sort_keys=False, default=list)
    return diff
