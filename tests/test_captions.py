"""Caption sampling (`data.caption`): first, random, all lines, keyword subsets; exact resume through training."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest
import torch
import yaml
from PIL import Image

from clipkit import faults
from clipkit.cli import main
from clipkit.config import RecipeError, load_recipe
from clipkit.data.pipeline import Source, TrainStream, choose_caption, keyword_line
from clipkit.data.shards import write_shards
from clipkit.stopping import EXIT_PREEMPTED
from tests.conftest import TINY_MODEL
from tests.test_resilience import assert_bitwise_equal, weights

EMOJI = ["page with curl", "curl, document, page, page with curl"]  # the emoji builder's two lines
KEYWORDS = ["curl", "document", "page", "page with curl"]


def test_keyword_line_is_the_last_comma_list_of_two_or_more_items():
    assert keyword_line(EMOJI) == (1, KEYWORDS)
    assert keyword_line(["flag: Libya", "flag"]) is None  # one keyword is not a list
    assert keyword_line(["a photo of a dress.", "a picture of a dress."]) is None
    assert keyword_line(["cat", "pet, cat", " a ,, b , a "]) == (2, ["a", "b"])  # last list; stripped, deduplicated


def test_first_and_all_are_fixed_texts():
    rng = random.Random(0)
    state = rng.getstate()
    assert choose_caption(EMOJI, "first", rng) == "page with curl"
    assert choose_caption(EMOJI, "all", rng) == "page with curl; curl, document, page, page with curl"
    assert choose_caption(["one"], "all", rng) == "one"
    assert rng.getstate() == state  # neither draws


def test_keywords_on_a_sample_without_a_keyword_line_is_random_with_the_same_draws():
    lines = ["a photo of a dress.", "a picture of a dress.", "flag"]
    a, b = random.Random(5), random.Random(5)
    assert [choose_caption(lines, "keywords", a) for _ in range(50)] == [
        choose_caption(lines, "random", b) for _ in range(50)
    ]
    assert a.getstate() == b.getstate()


def test_keywords_for_a_fixed_seed_follow_the_rule():
    """Seed 3: the line index, then (on the keyword line) the size k, then rng.sample(keywords, k), in that order."""
    rng, replay = random.Random(3), random.Random(3)
    got = [choose_caption(EMOJI, "keywords", rng) for _ in range(6)]
    want = []
    for _ in range(6):
        i = replay.randrange(2)
        if i == 0:
            want.append(EMOJI[0])
        else:
            want.append(", ".join(replay.sample(KEYWORDS, replay.randint(1, 4))))
    assert got == want


def test_keyword_subsets_are_non_empty_distinct_redrawn_and_bounded():
    rng = random.Random(0)
    draws = [choose_caption(EMOJI, "keywords", rng) for _ in range(2000)]
    names = sum(d == EMOJI[0] for d in draws)
    assert 850 < names < 1150  # the name line half the time (2 lines)
    subsets = [d.split(", ") for d in draws if d != EMOJI[0]]
    assert all(s and set(s) <= set(KEYWORDS) and len(set(s)) == len(s) for s in subsets)
    assert Counter(len(s) for s in subsets).keys() == {1, 2, 3, 4}  # every size
    assert len({tuple(s) for s in subsets if len(s) == 4}) > 1  # the order is drawn too
    assert len({tuple(s) for s in subsets}) > 30
    capped = [choose_caption(EMOJI, "keywords", rng, max_keywords=2) for _ in range(500)]
    assert {len(c.split(", ")) for c in capped if c != EMOJI[0]} == {1, 2}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def NO_IMAGE(img):  # noqa: N802 (a transform: the images do not matter here)
    return torch.zeros(1)


def texts_of(urls, caption, epoch=0, seed=0, **kw):
    stream = TrainStream([Source(tuple(urls))], 4, NO_IMAGE, list, seed=seed, shuffle_size=8, caption=caption, **kw)
    stream.epoch.value = epoch
    out = []
    for batch in stream:
        out += batch["text"]
        if len(out) >= 40:
            return out


def test_the_stream_draws_keywords_per_visit_from_its_seed_and_epoch(tmp_path):
    samples = [
        {"__key__": f"s{i:02d}", "png": png(), "txt": f"name {i}\nk{i}a, k{i}b, k{i}c", "json": {}} for i in range(10)
    ]
    write_shards(samples, tmp_path, "train", maxcount=5)
    urls = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    texts = texts_of(urls, "keywords")
    assert texts == texts_of(urls, "keywords")  # a function of (seed, epoch, rank, worker)
    assert texts != texts_of(urls, "keywords", epoch=1) and texts != texts_of(urls, "keywords", seed=1)
    for t in texts:
        i = t.split()[-1] if t.startswith("name ") else t.split(", ")[0][1:-1]
        assert t == f"name {i}" or set(t.split(", ")) <= {f"k{i}a", f"k{i}b", f"k{i}c"}
    assert len(set(texts)) > 20  # the same samples seen again get other subsets
    assert set(texts_of(urls, "all")) == {f"name {i}; k{i}a, k{i}b, k{i}c" for i in range(10)}
    with pytest.raises(ValueError, match="'some'"):
        TrainStream([Source(tuple(urls))], 4, NO_IMAGE, list, caption="some")


@pytest.mark.parametrize(
    "override, named",
    [
        ("data.caption=keyword", "data.caption: 'keyword' is not one of"),
        ("data.caption_max_keywords=-1", "data.caption_max_keywords: -1 must be >= 0"),
        ("data.caption_max_keywords=2", "data.caption_max_keywords: 2 applies to data.caption keywords only"),
    ],
)
def test_a_bad_caption_setting_is_refused_naming_the_key(tmp_path, capsys, override, named):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"config": TINY_MODEL}, "data": {"sources": [{"shards": "x.tar"}]}}))
    with pytest.raises(RecipeError, match=named):
        load_recipe(recipe, [override])
    assert main(["train", str(recipe), override, "--out", str(tmp_path / "run")]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "run").exists()
    load_recipe(recipe, ["data.caption=keywords", "data.caption_max_keywords=2"])  # the good pair passes


def test_resume_with_keyword_captions_equals_the_uninterrupted_run(tmp_path, quickstart_data, monkeypatch):
    """Emoji (name + keyword lines): stopped after step 4, resumed from the step-3 checkpoint, bitwise equal."""
    recipe = tmp_path / "r.yaml"
    data = {"sources": [{"shards": "emoji/train-*.tar"}], "batch_size": 8, "workers": 1, "shuffle_buffer": 50,
            "caption": "keywords"}  # fmt: skip
    train = {"steps": 6, "warmup": 1, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3}
    recipe.write_text(yaml.safe_dump({"data_root": str(quickstart_data), "model": {"config": TINY_MODEL},
                                      "data": data, "train": train}))  # fmt: skip
    assert main(["train", str(recipe), "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "stopped"
    monkeypatch.setitem(faults._FAULTS, "sigterm", {4})
    assert main(["train", str(recipe), "--out", str(run)]) == EXIT_PREEMPTED
    monkeypatch.setitem(faults._FAULTS, "sigterm", set())
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest"]) == 0
    assert_bitwise_equal(weights(run), weights(tmp_path / "straight"))
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for r in (run, tmp_path / "straight")]  # fmt: skip
    assert losses[0] == losses[1]
