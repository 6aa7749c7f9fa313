"""tools/learning_study.py: arms from overrides, equal-time step plans, the table, and a tiny end-to-end study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tools.learning_study import (
    ARMS,
    BEGIN,
    END,
    arm_recipe,
    doc_block,
    fill_doc,
    fixed_steps,
    main,
    parse_arm,
    plan_steps,
)

ROOT = Path(__file__).resolve().parents[1]


def test_arms_are_names_with_overrides_and_commas_in_brackets_stay():
    assert parse_arm("baseline") == ("baseline", [])
    assert parse_arm("keywords") == ("keywords", ["data.caption=keywords"])
    assert parse_arm("aug=data.augment.scale=[0.5, 1.0],data.augment.color_jitter={a: 1, b: 2}, train.lr=1e-3") == (
        "aug",
        ["data.augment.scale=[0.5, 1.0]", "data.augment.color_jitter={a: 1, b: 2}", "train.lr=1e-3"],
    )
    for bad, says in [("nosuch", "not a built-in arm"), ("x=train.lr", "is not key=value"), ("=a=1", "plain name")]:
        with pytest.raises(ValueError, match=says):
            parse_arm(bad)


def test_equal_time_steps_scale_with_samples_per_second():
    plan = plan_steps({"baseline": 400.0, "slow": 300.0, "fast": 410.0}, "baseline", 800, 80)
    assert plan == {"baseline": {"steps": 800, "warmup": 80}, "slow": {"steps": 600, "warmup": 60},
                    "fast": {"steps": 820, "warmup": 82}}  # fmt: skip


def test_an_arm_that_sets_its_steps_keeps_them():
    plan = plan_steps({"baseline": 400.0, "slip": 300.0}, "baseline", 800, 80)
    arms = {"baseline": [], "slip": ["train.slip.weight=1", "train.steps=352"]}
    assert fixed_steps(plan, arms, 800, 80) == {"baseline": {"steps": 800, "warmup": 80},
                                                "slip": {"steps": 352, "warmup": 35, "fixed": True}}  # fmt: skip


def test_every_built_in_arm_is_a_valid_quickstart_recipe():
    from clipkit.config import load_recipe

    for overrides in ARMS.values():
        load_recipe(*arm_recipe(overrides))


def test_an_arm_can_train_another_recipe(tmp_path, capsys):
    """`recipe=PATH` (the built-in coca arm: recipes/quickstart-coca.yaml) picks the recipe file; others stay."""
    assert parse_arm("coca") == ("coca", ["recipe=recipes/quickstart-coca.yaml"])
    assert arm_recipe(["seed=1", "recipe=recipes/quickstart-coca.yaml", "train.lr=1e-3"]) == (
        ROOT / "recipes/quickstart-coca.yaml",
        ["seed=1", "train.lr=1e-3"],
    )
    assert arm_recipe(["train.lr=1e-3"]) == (ROOT / "recipes/quickstart.yaml", ["train.lr=1e-3"])
    assert arm_recipe([f"recipe={tmp_path}/r.yaml"])[0] == tmp_path / "r.yaml"
    for name in ("emoji", "fashion-mnist", "openclipart"):  # what the data check looks for
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text("{}")
    assert main(["--arms", "x=recipe=recipes/nosuch.yaml", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "arm 'x': recipe=" in capsys.readouterr().err
    # A CoCa arm's recipe is checked as such: its caption weight cannot be dropped.
    argv = ["--arms", "c=recipe=recipes/quickstart-coca.yaml,train.caption_weight=null", "--data", str(tmp_path)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "train.caption_weight" in capsys.readouterr().err


def study_json(arms: dict) -> dict:
    throughput = {"measured_steps": 30, "warmup_steps": 10, "load": [1.5, 1.0, 1.0]}
    return {"date": "2026-12-02 19:00 UTC", "machine": "2 cores", "jobs": 2, "seeds": [0, 1], "reference": "baseline",
            "reference_steps": 800, "command": "python tools/learning_study.py --throughput", "throughput": throughput,
            "arms": arms}  # fmt: skip


def test_the_table_rounds_mean_and_std_from_the_json(tmp_path):
    summary = {"seeds": 2, "train_s": {"mean": 420.0, "std": 6.0}, "samples_per_s": {"mean": 1.0, "std": 0.0},
               "eval/emoji/image_retrieval_recall@5": {"mean": 0.35349, "std": 0.01251}}  # fmt: skip
    arms = {"baseline": {"overrides": [], "samples_per_s": 243.4, "steps": 800, "summary": summary}}
    block = doc_block(study_json(arms))
    row = next(line for line in block.splitlines() if line.startswith("| baseline"))
    assert row.startswith("| baseline | (quickstart) | 2 | 800 | 243 | 7.0 ± 0.1 | 0.353 ± 0.013 | – |")
    assert "1 torch thread per run" in block and "load average 1.5" in block
    doc = tmp_path / "page.md"
    doc.write_text(f"# t\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    fill_doc(doc, block)
    assert doc.read_text() == f"# t\n\n{BEGIN}\n{block}{END}\n\nafter\n"


def test_docs_learning_block_is_what_the_harness_writes_from_its_json():
    """docs/learning.md holds the markers; once docs/bench/learning.json exists, the block is rendered from it."""
    text = (ROOT / "docs/learning.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    measured = ROOT / "docs/bench/learning.json"
    if measured.is_file():
        assert block == "\n" + doc_block(json.loads(measured.read_text()), "images/learning.png")
    else:
        assert "Not measured yet" in block


@pytest.mark.slow
def test_a_tiny_study_runs_measures_and_resumes(tmp_path, quickstart_data):
    """One custom arm, one seed, tiny model and steps: rates measured, steps planned, evals tabulated; a rerun skips."""
    doc = tmp_path / "learning.md"
    doc.write_text(f"{BEGIN}\n{END}\n")
    out, js = tmp_path / "study", tmp_path / "learning.json"
    argv = ["--arms", "kw=data.caption=keywords", "--seeds", "0", "--data", str(quickstart_data), "--out", str(out),
            "--throughput", "--throughput-steps", "2", "--throughput-warmup", "1", "--steps", "3",
            "--tasks", "emoji-retrieval", "emoji-zeroshot", "--json", str(js), "--doc", str(doc),
            "--plot", str(tmp_path / "p.png"), "--set", f"model.config={json.dumps(TINY_MODEL)}",
            "data.batch_size=8", "eval.batch_size=64"]  # fmt: skip
    assert main(argv) == 0
    study = json.loads(js.read_text())
    arm = study["arms"]["kw"]
    assert arm["overrides"] == ["data.caption=keywords"] and arm["steps"] == 3 and arm["warmup"] == 0
    assert len(study["throughput"]["arms"]["kw"]["rounds"]) == 2 and arm["samples_per_s"] > 0
    (run,) = study["runs"]
    assert run["steps"] == 3 and 0 <= run["metrics"]["eval/emoji/acc1"] <= 1
    assert "eval/emoji/image_retrieval_recall@5" in arm["summary"] and (tmp_path / "p.png").stat().st_size > 0
    assert "| kw | `data.caption=keywords` | 1 | 3 |" in doc.read_text()
    log = out / "logs/kw-s0.log"
    before = log.stat().st_mtime_ns
    assert main(argv) == 0  # everything is there: nothing trains again
    assert log.stat().st_mtime_ns == before and json.loads(js.read_text())["runs"] == study["runs"]


def test_missing_data_and_bad_arms_are_refused(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "clipkit data build openclipart" in capsys.readouterr().err
    assert main(["--arms", "x=train.nosuch=1", "--data", str(tmp_path)]) == 2
