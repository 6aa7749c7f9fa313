"""Training that survives: exact resume, preemption, kills mid-checkpoint, bad data and non-finite steps.

Stop-and-resume must reach bitwise the weights of a run never stopped (CPU, fp32): the data position, every RNG,
optimizer and scheduler state all travel in the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from clipkit import faults
from clipkit.cli import main
from clipkit.data.pipeline import stream_seed
from clipkit.data.shards import write_shards
from clipkit.stopping import EXIT_PREEMPTED
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, data_root: Path, **train) -> Path:
    recipe = {
        "name": "resilience",
        "data_root": str(data_root),
        "model": {"config": TINY_MODEL},
        "data": {"sources": [{"shards": "train-*.tar"}], "batch_size": 8, "workers": 1, "shuffle_buffer": 50},
        "train": {"steps": 9, "warmup": 2, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3, **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "open_clip_model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k] == b[k]).all()]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def run_cli(args: list[str], fault: str = "", nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    # One process uses 2 threads, like the in-process reference runs (thread count changes float summation order).
    env = dict(os.environ, CLIPKIT_FAULT=fault, OMP_NUM_THREADS="1" if nproc > 1 else "2")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]  # fmt: skip
    return subprocess.run([*launcher, "-m", "clipkit.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, digits_dir):
    """The reference: 9 steps, never stopped (checkpoints at 3 and 6 as in every other run here)."""
    root = tmp_path_factory.mktemp("straight")
    recipe = write_recipe(root / "r.yaml", digits_dir)
    assert main(["train", str(recipe), "--out", str(root / "run")]) == 0
    return recipe, root / "run"


def test_preempted_and_resumed_equals_uninterrupted(tmp_path, straight_run, monkeypatch):
    """SIGTERM after step 5 (mid-segment): checkpoint at 5, clean exit; the resumed run ends bitwise equal."""
    recipe, straight = straight_run
    run = tmp_path / "run"
    monkeypatch.setitem(faults._FAULTS, "sigterm", {5})
    assert main(["train", str(recipe), "--out", str(run)]) == EXIT_PREEMPTED
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted_at"] == 5 and (run / "checkpoints/step-00000005/COMPLETE").exists()
    monkeypatch.setitem(faults._FAULTS, "sigterm", set())
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest"]) == 0
    assert_bitwise_equal(weights(run), weights(straight))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in ref if "loss" in r]


def test_two_processes_preempted_and_resumed_equal_uninterrupted(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=6, checkpoint_every=4)
    a, b = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(["train", str(recipe), "--out", str(a)], nproc=2).returncode == 0
    stopped = run_cli(["train", str(recipe), "--out", str(b)], fault="sigterm@3", nproc=2)
    # Each worker exits EXIT_PREEMPTED; torchrun reports any non-zero worker exit as 1.
    assert stopped.returncode == 1 and f"exitcode  : {EXIT_PREEMPTED}" in stopped.stderr, stopped.stderr[-2000:]
    assert json.loads((b / "summary.json").read_text())["preempted_at"] == 3
    resumed = run_cli(["train", str(recipe), "--out", str(b), "--resume", "latest"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # It continued from the step-3 checkpoint: a restart from step 0 would end with the same weights.
    assert "resumed from" in resumed.stderr and "step-00000003 at step 3" in resumed.stderr
    logged = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert logged == [1, 2, 3, 4, 5, 6]
    assert_bitwise_equal(weights(b), weights(a))


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, straight_run):
    recipe, straight = straight_run
    run = tmp_path / "run"
    killed = run_cli(["train", str(recipe), "--out", str(run)], fault="sigkill_in_checkpoint@6")
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints/step-00000006/state").is_dir()  # written, but never marked complete
    assert not (run / "checkpoints/step-00000006/COMPLETE").exists()
    resumed = run_cli(["train", str(recipe), "--out", str(run), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step-00000003" in resumed.stderr
    assert_bitwise_equal(weights(run), weights(straight))


def test_external_sigterm_checkpoints_and_exits_cleanly(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=100_000, warmup=1, checkpoint_every=0)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "clipkit.cli", "train", str(recipe), "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    stopped = json.loads((run / "summary.json").read_text())["preempted_at"]
    assert (run / f"checkpoints/step-{stopped:08d}/COMPLETE").exists() and "--resume latest" in err


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, digits_dir, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=5, checkpoint_every=0)
    monkeypatch.setitem(faults._FAULTS, "nan_grad", {3})
    assert main(["train", str(recipe), "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 5
    assert all(t.isfinite().all() for t in weights(tmp_path / "a").values())


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, digits_dir, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=8, checkpoint_every=2, max_nonfinite=3)
    monkeypatch.setitem(faults._FAULTS, "nan_grad", {3, 4, 5})
    assert main(["train", str(recipe), "--out", str(tmp_path / "a")]) == 3
    assert "3 steps in a row" in capsys.readouterr().err
    assert (tmp_path / "a/checkpoints/step-00000002/COMPLETE").exists()


def test_retention_keeps_the_last_k(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=8, checkpoint_every=2, keep_checkpoints=2)
    assert main(["train", str(recipe), "--out", str(tmp_path / "a")]) == 0
    names = sorted(p.name for p in (tmp_path / "a/checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]


# ------------------------------------------------------------------------------------------------ planted faults


def png(size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (random.randrange(256), 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def good(key: str) -> dict:
    return {"__key__": key, "png": png(), "txt": f"a picture of {key}", "json": {}}


def plant(root: Path, seed: int) -> dict:
    """Four shards: sample-level faults, a truncated tar, an empty tar, and a clean one read last.

    Returns the planted counts by reason. The clean shard is placed where epoch 0's shuffled order reads it last, so
    a run that consumes every good sample has met every fault exactly once.
    """
    names = [root / f"train-{i:06d}.tar" for i in range(4)]
    order = [str(p) for p in names]
    random.Random(stream_seed(seed, 0, -1, -1)).shuffle(order)
    faulty, truncated, empty, clean = (Path(p) for p in order)
    samples = (
        [good(f"f{i}") for i in range(3)]
        + [
            {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n garbage", "txt": "x"},
            good("f3"),
            {"__key__": "cut_image", "png": png((64, 64))[:70], "txt": "x"},
            {"__key__": "no_caption", "png": png()},
            {"__key__": "bad_utf8", "png": png(), "txt": b"\xff\xfe\xfd"},
            {"__key__": "huge", "png": png((300, 300)), "txt": "x"},
        ]
        + [good(f"f{i}") for i in range(4, 6)]
    )
    write_shards(samples, root, "tmp_f", maxcount=100)
    os.replace(root / "tmp_f-000000.tar", faulty)
    write_shards([good(f"t{i}") for i in range(6)], root, "tmp_t", maxcount=100)
    os.replace(root / "tmp_t-000000.tar", truncated)
    write_shards([good(f"c{i}") for i in range(6)], root, "tmp_c", maxcount=100)
    os.replace(root / "tmp_c-000000.tar", clean)
    empty.write_bytes(b"")
    # Cut the truncated shard 1 byte into the data of the first member of its 5th sample (its 2-byte json): reading
    # that member fails, so 4 whole samples stay readable and no partial sample leaks out.
    import tarfile

    with tarfile.open(truncated) as tf:
        first_of_fifth = [m for m in tf.getmembers() if m.name.startswith("t4.")][0]
    data = truncated.read_bytes()
    assert first_of_fifth.size > 1
    truncated.write_bytes(data[: first_of_fifth.offset_data + 1])
    sizes = {faulty.name: 11, truncated.name: 6, empty.name: 0, clean.name: 6}
    (root / "sizes.json").write_text(json.dumps(sizes))
    return {"bad_image": 2, "no_caption": 1, "bad_text": 1, "image_too_large": 1, "bad_shard": 2}


@pytest.fixture
def planted(tmp_path, monkeypatch):
    from clipkit.data import pipeline

    monkeypatch.setattr(pipeline, "MAX_IMAGE_PIXELS", 200 * 200)  # the 300x300 sample is "absurd" here
    root = tmp_path / "shards"
    root.mkdir()
    return root, plant(root, seed=7)


def test_planted_faults_are_skipped_and_counted_exactly(tmp_path, planted):
    root, expected = planted
    recipe = write_recipe(tmp_path / "r.yaml", root, steps=4, checkpoint_every=0)
    # 6 + 4 + 6 = 16 good samples = 4 batches of 4 in one epoch, read in one process.
    overrides = ["seed=7", "data.batch_size=4", "data.workers=0", "data.resampled=false", "data.shuffle_buffer=0"]
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), *overrides]) == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["skipped"] == expected
    last = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert last[-1]["skipped"] == expected


def test_too_much_bad_data_stops_naming_the_worst_shard(tmp_path, planted, monkeypatch, capsys):
    from clipkit import steplog

    root, _ = planted
    monkeypatch.setattr(steplog, "MIN_SAMPLES_FOR_SKIP_RATE", 10)
    recipe = write_recipe(tmp_path / "r.yaml", root, steps=4, checkpoint_every=0)
    overrides = ["seed=7", "data.batch_size=4", "data.workers=0", "data.resampled=false", "data.shuffle_buffer=0",
                 "data.max_skip_rate=0.05"]  # fmt: skip
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), *overrides]) == 3
    err = capsys.readouterr().err
    faulty = sorted(root.glob("train-*.tar"))
    assert "max_skip_rate" in err and any(p.name in err for p in faulty)


def test_retention_spares_the_best_checkpoint_and_drops_stale_incomplete_ones(tmp_path):
    from clipkit.checkpoint import COMPLETE, Progress, prune_checkpoints

    for step, acc in [(2, 0.5), (4, 0.9), (6, 0.7), (8, 0.6)]:
        d = tmp_path / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "progress-0.json").write_text(json.dumps(vars(Progress(step=step, metrics={"eval/x/acc1": acc}))))
        (d / COMPLETE).write_text("")
    (tmp_path / "checkpoints" / "step-00000007").mkdir()  # a killed write: older than the newest complete one
    prune_checkpoints(tmp_path, keep_last=1, keep_best="eval/x/acc1")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
