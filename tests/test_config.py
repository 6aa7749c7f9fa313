"""Recipes: YAML + dotted overrides into frozen dataclasses; every bad key, type or value refused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from clipkit.config import Recipe, RecipeError, load_recipe, to_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_quickstart_loads_and_is_frozen():
    r = load_recipe(QUICKSTART)
    assert isinstance(r, Recipe) and r.name == "quickstart"
    assert len(r.data.sources) == 2 and isinstance(r.data.sources, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.lr = 1.0  # type: ignore[misc]


def test_overrides_parse_as_yaml_and_reach_list_items():
    r = load_recipe(
        QUICKSTART,
        ["train.steps=7", "train.warmup=2", "train.lr=1e-4", "data.sources.1.weight=3", "train.betas=[0.8, 0.9]"],
    )
    assert r.train.steps == 7 and r.train.lr == 1e-4
    assert r.data.sources[1].weight == 3.0 and r.train.betas == (0.8, 0.9)


def test_round_trip_through_dict():
    r = load_recipe(QUICKSTART)
    from clipkit.config import from_dict

    assert from_dict(Recipe, to_dict(r)) == r


def test_data_root_resolves_relative_paths_only():
    r = load_recipe(QUICKSTART, ["data_root=/x"])
    assert r.path("a/b-*.tar") == "/x/a/b-*.tar"
    assert r.path("/abs/c.tar::rel/d.tar") == "/abs/c.tar::/x/rel/d.tar"


BAD = [
    (["train.lrr=1"], "train.lrr"),  # misspelled key
    (["trian.lr=1"], "trian"),  # misspelled section
    (["train.lr=-1"], "train.lr"),
    (["train.lr=fast"], "train.lr"),
    (["train.steps=1.5"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["train.warmup=5000"], "train.warmup"),
    (["train.precision=fp16"], "train.precision"),
    (["train.loss=triplet"], "train.loss"),
    (["train.accum_freq=0"], "train.accum_freq"),
    (["train.betas=[0.9]"], "train.betas"),
    (["train.wandb=yes please"], "train.wandb"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.sources.0.weight=0"], "data.sources.0.weight"),
    (["data.sources.5.weight=1"], "data.sources.5"),
    (["data.caption=longest"], "data.caption"),
    (["model.name=ViT-B-32"], "model"),  # both name and config
    (["eval.tasks.0.classnames=null"], "eval.tasks.0.classnames"),
    (["eval.tasks.0.task=caption"], "eval.tasks.0.task"),
    (["seed=abc"], "seed"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[o[0][0] for o in BAD])
def test_bad_recipes_are_refused_naming_the_key(overrides, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(QUICKSTART, overrides)
    assert key in str(e.value)


def test_unknown_architecture_is_refused(tmp_path):
    from clipkit.config import ModelCfg
    from clipkit.models.factory import resolve_config

    with pytest.raises(RecipeError, match="ViT-Q-99"):
        resolve_config(ModelCfg(name="ViT-Q-99"))


def test_missing_shards_are_refused_before_work(tmp_path):
    from clipkit.train import preflight

    r = load_recipe(QUICKSTART, [f"data_root={tmp_path}"])
    with pytest.raises(RecipeError, match=r"data\.sources\.0\.shards"):
        preflight(r)


def test_unknown_architecture_is_refused_in_preflight(tmp_path):
    from clipkit.train import preflight

    r = load_recipe(QUICKSTART, ["model.config=null", "model.name=ViT-Q-99"])
    with pytest.raises(RecipeError, match="model.name"):
        preflight(r)


def test_missing_recipe_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)
