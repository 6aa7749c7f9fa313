"""tools/finetune_study.py: the shifted test set keeps keys, labels and captions; the figure shows both rows."""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import finetune_study  # noqa: E402

from clipkit.config import load_finetune_recipe  # noqa: E402
from clipkit.data.pipeline import read_tar_samples  # noqa: E402
from clipkit.data.shards import expand_shards  # noqa: E402


def _samples(folder: Path) -> list[dict]:
    return list(read_tar_samples(iter(expand_shards(str(folder / "test-*.tar"))), Counter()))


def test_shifted_set_keeps_keys_labels_and_captions(digits_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data / "digits")
    monkeypatch.setitem(finetune_study.STUDIES, "digits", (None, finetune_study.gray_blur, "grayscale + blurred"))
    out = finetune_study.build_shifted(data, "digits")
    src, shifted = _samples(data / "digits"), _samples(out)
    assert [s["__key__"] for s in shifted] == [s["__key__"] for s in src]
    assert [json.loads(s["json"])["label"] for s in shifted] == [json.loads(s["json"])["label"] for s in src]
    assert [s["txt"] for s in shifted] == [s["txt"] for s in src]
    a, b = (Image.open(io.BytesIO(x["png"])).convert("RGB") for x in (src[0], shifted[0]))
    assert a.size == b.size and a.tobytes() != b.tobytes()
    assert (out / "classnames.txt").read_text() == (data / "digits" / "classnames.txt").read_text()

    fig = finetune_study.shift_figure(data, "digits", tmp_path / "fig.png", n=4, size=16)
    assert Image.open(fig).size == (64, 32)


@pytest.mark.parametrize("dataset", sorted(finetune_study.STUDIES))
@pytest.mark.parametrize("mode", ["linear", "ce", "flyp"])
def test_every_mode_of_a_study_is_a_valid_recipe(dataset, mode, tmp_path):
    """The recipes are tuned for `ce` (flips, mixup); the study turns off what `linear` and `flyp` refuse."""
    args = finetune_study.parse_args(["--dataset", dataset, "--model", "m", "--data", str(tmp_path)])
    recipe = load_finetune_recipe(finetune_study.STUDIES[dataset][0], finetune_study.study_overrides(mode, 0, args))
    assert recipe.finetune.mode == mode and [s.name for s in recipe.finetune.eval_sets] == ["test", "shifted"]
