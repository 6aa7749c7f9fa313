"""`clipkit.models.resize.with_image_size`: a ViT at another input size, on the tiny real open_clip model."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import ModelCfg
from clipkit.models import create_model
from clipkit.models.resize import with_image_size
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model(ModelCfg(config=TINY_MODEL))  # 16 px, patches of 8: a 2 x 2 grid


def test_grid_grows_and_every_other_weight_is_kept(tiny):
    big = with_image_size(tiny, 24)  # a 3 x 3 grid
    old, new = tiny.model.state_dict(), big.model.state_dict()
    assert new["visual.positional_embedding"].shape == (1 + 9, old["visual.positional_embedding"].shape[1])
    assert torch.equal(new["visual.positional_embedding"][0], old["visual.positional_embedding"][0])  # class token
    assert all(torch.equal(v, old[k]) for k, v in new.items() if k != "visual.positional_embedding")
    assert big.config["model_cfg"]["vision_cfg"]["image_size"] == 24 and big.config["preprocess_cfg"]["size"] == 24
    assert tiny.config["model_cfg"]["vision_cfg"]["image_size"] == 16  # the original bundle is untouched
    assert big.model.encode_image(torch.rand(2, 3, 24, 24)).shape == (2, TINY_MODEL["embed_dim"])


def test_constant_position_grid_stays_constant():
    """Interpolating a grid whose patch rows are all equal gives that row at every new position."""
    bundle = create_model(ModelCfg(config=TINY_MODEL))
    with torch.no_grad():
        bundle.model.visual.positional_embedding[1:] = torch.arange(32.0)
    grid = with_image_size(bundle, 32).model.visual.positional_embedding[1:]  # [16, 32]
    torch.testing.assert_close(grid, torch.arange(32.0).expand(16, 32))


def test_same_size_is_the_same_bundle_and_bad_sizes_are_refused(tiny):
    assert with_image_size(tiny, 16) is tiny
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        with_image_size(tiny, 20)
