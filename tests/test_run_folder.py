"""Where a run starts: an existing run is never replaced, a resume keeps what defines the run, a broken RNG state or
a stalled data source never loses a run silently (smoke tests on the real digits, tiny model, in-process)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from clipkit import faults, train
from clipkit.cli import main
from clipkit.stopping import EXIT_PREEMPTED
from tests.test_resilience import write_recipe


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits_dir):
    """A finished 4-step run with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(root / "r.yaml", digits_dir, steps=4, checkpoint_every=2, log_every=2)
    assert main(["train", str(recipe), "--out", str(root / "run"), "data.workers=0"]) == 0
    return recipe, root / "run"


def test_training_into_a_run_without_resume_is_refused_and_changes_nothing(finished, capsys):
    recipe, run = finished
    before = snapshot(run)
    assert main(["train", str(recipe), "--out", str(run), "data.workers=0"]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume latest" in err and "new --out" in err
    assert snapshot(run) == before


def test_resume_with_a_changed_stream_setting_is_refused_naming_each_key(finished, capsys):
    recipe, run = finished
    before = snapshot(run)
    args = ["train", str(recipe), "--out", str(run), "--resume", "latest", "data.workers=0"]
    assert main([*args, "data.batch_size=4", "model.config.embed_dim=16"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 8 in recipe.yaml -> 4 now" in err
    assert "model.config" in err and "new --out" in err
    assert snapshot(run) == before


def test_resume_with_more_steps_warns_and_keeps_the_first_recipe(tmp_path, finished, caplog):
    recipe, run0 = finished
    run = tmp_path / "run"
    import shutil

    shutil.copytree(run0, run)
    first = (run / "recipe.yaml").read_text()
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest", "data.workers=0", "train.steps=6"]) == 0
    assert (run / "recipe.yaml").read_text() == first  # still what the first 4 steps used
    assert yaml.safe_load((run / "recipe.resumed-step-4.yaml").read_text())["train"]["steps"] == 6
    assert "train.steps" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and len(steps) == len(set(steps)) + 2  # evals rows aside


def test_a_broken_rng_state_is_refused_naming_the_file(tmp_path, finished, capsys):
    recipe, run0 = finished
    run = tmp_path / "run"
    import shutil

    shutil.copytree(run0, run)
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "state" / "random_states_0.pkl").write_bytes(b"not a pickle")
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest", "data.workers=0", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "random_states_0.pkl" in err and "earlier checkpoint" in err


def test_resume_auto_starts_a_new_run_or_continues(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=2, warmup=1, checkpoint_every=0, log_every=1)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--resume", "auto", "data.workers=0"]) == 0  # new run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and Path(summary["model"]).is_dir()
    before = (run / "model/open_clip_model.safetensors").read_bytes()
    assert main(["train", str(recipe), "--out", str(run), "--resume", "auto", "data.workers=0"]) == 0  # nothing to do
    assert (run / "model/open_clip_model.safetensors").read_bytes() == before


def test_a_stop_signal_ends_a_run_whose_data_never_comes(tmp_path, digits_dir, monkeypatch, capsys):
    """The data of step 3 never comes; SIGTERM then ends the run within the grace, exit 75, nothing half-written."""
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=6, checkpoint_every=2, log_every=1)
    run = tmp_path / "run"
    monkeypatch.setitem(faults._FAULTS, "stall_data", {3})
    monkeypatch.setattr(train, "DATA_GRACE_S", 1)

    def preempt_when_stalled():
        deadline = time.time() + 120
        while not (run / "checkpoints/step-00000002/COMPLETE").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt_when_stalled, daemon=True).start()
    start = time.time()
    assert main(["train", str(recipe), "--out", str(run), "data.workers=0"]) == EXIT_PREEMPTED
    assert time.time() - start < 120
    assert "resumable" in capsys.readouterr().err
    assert not (run / "summary.json").exists() and not (run / "model").exists()  # no model/ named or written
    monkeypatch.setitem(faults._FAULTS, "stall_data", set())
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest", "data.workers=0"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_a_recipe_from_before_a_new_key_resumes_and_the_key_is_fixed(tmp_path, finished, capsys):
    """A saved recipe without `data.augment` (an older clipkit) resumes with the default; changing it is refused."""
    import shutil

    recipe, run0 = finished
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["data"]["augment"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    args = ["train", str(recipe), "--out", str(run), "--resume", "latest", "data.workers=0"]
    assert main([*args, "train.steps=5"]) == 0  # the key absent before is not compared
    capsys.readouterr()
    shutil.rmtree(run)
    shutil.copytree(run0, run)
    assert main([*args, "data.augment.gray_scale_prob=0.5"]) == 2
    assert "data.augment.gray_scale_prob: None in recipe.yaml -> 0.5 now" in capsys.readouterr().err
