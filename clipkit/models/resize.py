"""A ViT model at another input size: the position embeddings interpolated to the new patch grid.

Fine-tuning at a higher resolution than pretraining is the usual way to get more out of a ViT (Dosovitskiy et al.
2021, sec. 3.2; Touvron et al. 2019, "FixRes"): more, smaller patches per image for the same weights. The patch
embedding and every transformer weight are kept; only the [1 + g*g, width] position table is resized
(open_clip's `resize_pos_embed`: bicubic over the g x g grid, the class token's row kept).
"""

from __future__ import annotations

import copy

import torch
from open_clip.model import resize_pos_embed

from clipkit.models.factory import ModelBundle, bundle_from_config


def with_image_size(bundle: ModelBundle, size: int, device: str | torch.device = "cpu") -> ModelBundle:
    """The bundle's model taking `size` x `size` images: new config, transforms and interpolated position embeddings.

    Args:
        bundle: a model with an open_clip ViT image tower (`vision_cfg` without `timm_model_name`, integer `layers`).
        size: the new input side in pixels, a multiple of the patch size.
        device: where the new model goes (it is returned in eval mode).

    Returns:
        `bundle` itself when the size is already `size`, else a new bundle whose `config` (model and preprocess) says
        `size`, so a model folder saved from it loads at that size in open_clip.

    Raises:
        ValueError: naming the reason, for another kind of image tower or a size the patches do not tile.
    """
    config = copy.deepcopy(bundle.config)
    vision = config["model_cfg"].get("vision_cfg", {})
    if vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int):
        raise ValueError("image size: only an open_clip ViT image tower can change its input size here")
    patch = vision.get("patch_size", 16)
    if size < patch or size % patch:
        raise ValueError(f"image size {size}: must be a multiple of the patch size {patch}")
    old = vision.get("image_size", 224)
    if old == size:
        return bundle
    vision["image_size"] = size
    config["preprocess_cfg"]["size"] = size
    new = bundle_from_config(config, load_tower_weights=False)
    state = {k: v.detach().cpu() for k, v in bundle.model.state_dict().items()}
    resize_pos_embed(state, new.model)  # in place: visual.positional_embedding [1 + g*g, W] -> [1 + G*G, W]
    new.model.load_state_dict(state)
    new.model.to(device).eval()
    new.source = bundle.source
    return new
