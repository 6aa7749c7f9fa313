"""Bad input, planted one at a time: each is named, counted or refused; nothing is deleted; nothing is left running.

Issue 18's careless-user probes as tests: truncated shards (training counts them, eval refuses them), sources with
no usable sample (an error instead of a spin), broken YAML, a wrong or full `--out`, repeated class names, an
undecodable image, a closed stdout pipe.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from clipkit.cli import main
from clipkit.config import RecipeError, load_recipe
from clipkit.data.pipeline import DataError, SkipSample, Source, TrainStream, decode_image, iter_eval_samples
from clipkit.data.shards import write_shards
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------- helpers


def digits_samples(digits_dir: Path, split: str = "test", n: int | None = None) -> list[dict]:
    """The real digits samples of a split, as write_shards takes them."""
    members: dict[str, dict] = {}
    with tarfile.open(digits_dir / f"{split}-000000.tar") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [{"__key__": k, **members[k]} for k in sorted(members)][:n]


def cut_between_members(shard: Path, keep: int) -> None:
    """Truncates a tar right before the header of sample `keep`: tarfile then reads the first samples quietly."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))  # in the order they are stored
    first = next(m for m in members if m.name.split(".")[0] == keys[keep])
    shard.write_bytes(shard.read_bytes()[: first.offset])


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under a folder with its size: compared before and after to show nothing was deleted."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.tensor(img.resize((4, 4)).getpixel((0, 0)), dtype=torch.float32)


def lengths(texts: list[str]) -> torch.Tensor:
    return torch.tensor([len(t) for t in texts])


def no_children_left() -> bool:
    return not [p for p in multiprocessing.active_children() if p.is_alive()]


def run_cli(args: list[str], timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    """`python -m clipkit.cli ARGS` in its own process group; asserts that no process of the group outlives it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipkit.cli", *args], env=env, cwd=ROOT, start_new_session=True, text=True, **kw
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    with pytest.raises(ProcessLookupError):  # loader workers and every other child ended with the command
        os.killpg(proc.pid, 0)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny real open_clip CLIP (random weights) saved as a clipkit model folder."""
    import copy

    from clipkit.config import ModelCfg
    from clipkit.models import bundle_from_config, save_model
    from clipkit.models.factory import resolve_config

    torch.manual_seed(0)
    bundle = bundle_from_config(resolve_config(ModelCfg(config=copy.deepcopy(TINY_MODEL))))
    return save_model(tmp_path_factory.mktemp("model") / "model", bundle.model, bundle.config)


@pytest.fixture
def two_shards(tmp_path, digits_dir) -> Path:
    """120 real digits as 2 shards of 60, with sizes.json, classnames.txt and templates.txt."""
    out = tmp_path / "digits"
    write_shards(digits_samples(digits_dir, n=120), out, "test", maxcount=60)
    for name in ("classnames.txt", "templates.txt"):
        shutil.copy(digits_dir / name, out / name)
    return out


# ------------------------------------------------------------------------------------- truncated shards: training


def test_training_counts_and_names_a_shard_cut_between_members(two_shards, caplog):
    shards = sorted(str(p) for p in two_shards.glob("test-*.tar"))
    cut_between_members(Path(shards[1]), keep=20)  # tarfile reads 20 of 60 samples and stops without an error
    stream = TrainStream([Source(tuple(shards))], 10, to_tensor, lengths, resampled=False, shuffle_size=0)
    skipped, by_shard, keys = Counter(), Counter(), []
    with caplog.at_level(logging.WARNING, logger="clipkit.data.pipeline"):
        for batch in stream:  # epoch mode: 120 // 10 = 12 batches, so the 40 lost samples are made up by repeats
            skipped.update(batch["skipped"])
            by_shard.update(batch["skipped_shards"])
            keys += batch["key"]
    # Counted once per opening: the wrap-around to make up the 40 lost samples may open the cut shard again.
    assert set(by_shard) == {shards[1]} and skipped == {"bad_shard": by_shard[shards[1]]} and skipped["bad_shard"] >= 1
    assert len(keys) == 120 and len(set(keys)) == 80
    assert any(shards[1] in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    stats = Counter()
    assert len(list(iter_eval_samples(shards, stats))) == 80 and stats == {"bad_shard": 1}


# ------------------------------------------------------------------------------- no usable sample: error, not spin


def planted_sources(root: Path, digits_dir: Path) -> dict[str, list[str]]:
    """Shard lists with nothing to train on, each of one kind."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "zero-000000.tar").write_bytes(b"")
    write_shards([{"__key__": f"t{i}", "txt": "a caption without its image"} for i in range(7)], root, "noimg")
    broken = [{**s, "png": s["png"][:40]} for s in digits_samples(digits_dir, n=6)]  # every image cut short
    write_shards(broken, root, "cutimg")
    (root / "folder" / "sub").mkdir(parents=True)  # a glob that matches a folder, not a tar
    (root / "notes.tar").write_text("not a tar at all")
    return {
        "zero-byte tar": [str(root / "zero-000000.tar")],
        "tar without images": [str(root / "noimg-000000.tar")],
        "undecodable images": [str(root / "cutimg-000000.tar")],
        "a folder as a shard": [str(root / "folder" / "sub")],
        "not a tar": [str(root / "notes.tar"), str(root / "zero-000000.tar")],
    }


@pytest.mark.parametrize("resampled", [True, False])
def test_a_stream_without_usable_samples_raises_naming_the_shards(tmp_path, digits_dir, resampled):
    for kind, urls in planted_sources(tmp_path / "bad", digits_dir).items():
        if not resampled:  # epoch mode sizes its epochs from sizes.json
            (tmp_path / "bad" / "folder" / "sizes.json").write_text(json.dumps({"sub": 6}))
            sizes = json.loads((tmp_path / "bad" / "sizes.json").read_text())
            (tmp_path / "bad" / "sizes.json").write_text(json.dumps({**sizes, "zero-000000.tar": 6, "notes.tar": 6}))
        stream = TrainStream([Source(tuple(urls))], 2, to_tensor, lengths, resampled=resampled, shuffle_size=5)
        with pytest.raises(DataError) as e:
            next(iter(stream))
        assert Path(urls[0]).name in str(e.value), kind


def test_the_error_reaches_the_main_process_from_loader_workers(tmp_path, digits_dir):
    from clipkit.data.pipeline import train_loader

    urls = planted_sources(tmp_path, digits_dir)["tar without images"]
    stream = TrainStream([Source(tuple(urls))], 2, to_tensor, lengths, shuffle_size=5)
    batches = iter(train_loader(stream, workers=1))
    with pytest.raises(DataError, match=Path(urls[0]).name):
        next(batches)
    # Collected after the error (a reference cycle through the traceback), the loader finds its queues closed and
    # waits 5 s for each worker before terminating it; `clipkit train` ends its daemonic workers when it exits.
    del batches
    gc.collect()
    assert no_children_left()


def test_a_mix_with_one_empty_source_raises_instead_of_spinning(tmp_path, digits_dir, two_shards):
    """Resampled mixing draws from every source: an empty one would block its draws forever."""
    empty = planted_sources(tmp_path / "bad", digits_dir)["zero-byte tar"]
    good = tuple(str(p) for p in two_shards.glob("test-*.tar"))
    stream = TrainStream([Source(good), Source(tuple(empty), 0.5)], 8, to_tensor, lengths, shuffle_size=5)
    with pytest.raises(DataError, match="data source 1"):
        for _ in zip(range(50), stream, strict=False):
            pass


@pytest.mark.parametrize(
    "kind,workers",
    [pytest.param("zero-byte tar", 0, marks=pytest.mark.slow), ("tar without images", 2)],  # one interpreter each
)
def test_train_cli_exits_2_naming_the_shard_instead_of_spinning(tmp_path, digits_dir, kind, workers):
    urls = planted_sources(tmp_path / "bad", digits_dir)[kind]
    recipe = {
        "name": "nothing",
        "data_root": str(tmp_path / "bad"),
        "model": {"config": TINY_MODEL},
        "data": {"sources": [{"shards": Path(urls[0]).name}], "batch_size": 4, "workers": workers},
        "train": {"steps": 2, "warmup": 0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    before = snapshot(tmp_path / "bad")
    done = run_cli(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")], timeout=240, stderr=-1)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("clipkit train: error:") and Path(urls[0]).name in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path / "bad") == before


def test_a_folder_as_the_shard_spec_is_its_tars_or_a_named_error(tmp_path, two_shards, capsys):
    from clipkit.data.shards import expand_shards

    assert expand_shards(str(two_shards)) == sorted(str(p) for p in two_shards.glob("*.tar"))
    (tmp_path / "empty").mkdir()
    recipe = {"name": "x", "data_root": str(tmp_path), "model": {"config": TINY_MODEL},
              "data": {"sources": [{"shards": "empty"}]}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.sources.0.shards" in err and "matches no file" in err and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- truncated shards: eval


def eval_args(task: str, model_dir: Path, data: Path, out: Path) -> list[str]:
    extra = ["--classnames", str(data / "classnames.txt")] if task == "zeroshot" else []
    return ["eval", task, "--checkpoint", str(model_dir), "--data", str(data), "--out", str(out), "--workers", "0",
            "--batch-size", "64", *extra]  # fmt: skip


@pytest.mark.parametrize("task", ["retrieval", "zeroshot"])
def test_eval_refuses_a_truncated_shard_unless_allowed(tmp_path, model_dir, two_shards, capsys, task):
    cut_between_members(two_shards / "test-000001.tar", keep=20)
    before = snapshot(two_shards)
    out = tmp_path / "result.json"
    assert main(eval_args(task, model_dir, two_shards, out)) == 2
    err = capsys.readouterr().err
    assert "test-000001.tar" in err and "truncated" in err and "--allow-missing" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main([*eval_args(task, model_dir, two_shards, out), "--allow-missing"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["n_expected"] == 120 and metrics["missing"] == {str(two_shards / "test-000001.tar"): 40}
    assert metrics["skipped"] == {"bad_shard": 1}
    assert metrics["n_images" if task == "retrieval" else "n_samples"] == 80
    assert snapshot(two_shards) == before


def test_eval_refuses_fewer_usable_samples_than_sizes_json_lists(tmp_path, model_dir, two_shards, capsys):
    """Complete tars, but sizes.json promises more (a shard rewritten short) and one image is broken."""
    sizes = json.loads((two_shards / "sizes.json").read_text())
    (two_shards / "sizes.json").write_text(json.dumps({**sizes, "test-000000.tar": 65}))
    out = tmp_path / "result.json"
    assert main(eval_args("retrieval", model_dir, two_shards, out)) == 2
    err = capsys.readouterr().err
    assert "60 usable, 5 missing" in err and "test-000000.tar" in err and "120 of 125" in err
    assert not out.exists()


def test_eval_of_complete_shards_reports_as_before(tmp_path, model_dir, two_shards, capsys):
    out = tmp_path / "result.json"
    assert main(eval_args("zeroshot", model_dir, two_shards, out)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["metrics"]["n_samples"] == 120 and "missing" not in printed["metrics"]


# ----------------------------------------------------------------------------------------- --out and a full disk


def test_eval_out_is_a_folder_or_under_a_file_refused_before_any_work(tmp_path, model_dir, two_shards, capsys):
    (tmp_path / "a_file").write_text("keep me")
    for out, what in [(tmp_path, "is a folder"), (tmp_path / "a_file" / "r.json", "is a file, not a folder")]:
        assert main(eval_args("retrieval", model_dir, two_shards, out)) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and what in captured.err and len(captured.err.splitlines()) == 1
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_eval_result_survives_a_failed_write(tmp_path, model_dir, two_shards, capsys):
    """--out under a dangling symlink: passes the check, fails at the write; the result is on stdout."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert main(eval_args("retrieval", model_dir, two_shards, tmp_path / "gone" / "r.json")) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["metrics"]["n_images"] == 120
    assert "result is printed above on stdout" in captured.err and len(captured.err.splitlines()) == 1


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    return (
        subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm (a private tmpfs) to fill a disk")
def test_a_full_disk_is_one_line_exit_2_and_the_output_is_kept(tmp_path):
    run, disk = tmp_path / "run", tmp_path / "disk"
    (run / "eval").mkdir(parents=True)
    result = {"dataset": "digits", "model": "m", "task": "zeroshot", "metrics": {"acc1": 0.5, "n_samples": 10}}
    (run / "eval" / "zeroshot-digits.json").write_text(json.dumps(result))
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=16k tmpfs {disk} && (head -c 1M /dev/zero > {disk}/fill 2>/dev/null; true) && "
        f"exec {sys.executable} -m clipkit.cli eval report {run} --out {disk}/table.md"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.startswith("clipkit eval: error: no space left on device while writing")
        and "table.md" in done.stderr
    )
    assert len(done.stderr.splitlines()) == 1 and "| digits | zeroshot | 0.5000 |" in done.stdout


# ------------------------------------------------------------------------------------------------------ recipes


def test_yaml_errors_name_the_file_and_line(tmp_path):
    cases = {
        "indent.yaml": ("name: x\ndata:\n  batch_size: 4\n   workers: 2\n", "line 4"),
        "twice.yaml": ("name: x\nseed: 1\nname: y\n", "line 3"),
        "open.yaml": ("name: x\nmodel: {name: ViT-B-32\n", "line 3"),
        "tab.yaml": ("name: x\n\tseed: 1\n", "line 2"),
    }
    for name, (text, line) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(RecipeError) as e:
            load_recipe(tmp_path / name)
        assert str(e.value).startswith(f"recipe {tmp_path / name}, {line},"), str(e.value)
    (tmp_path / "ok.yaml").write_text("name: x\n")
    with pytest.raises(RecipeError, match=r"override 'seed=\[1'.*line 1, column 3"):
        load_recipe(tmp_path / "ok.yaml", ["seed=[1"])
    (tmp_path / "binary.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path / "binary.yaml")
    with pytest.raises(RecipeError, match="a folder, not a file"):
        load_recipe(tmp_path)


def test_a_yaml_error_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("name: x\ndata:\n  batch_size: 4\n   workers: 2\n")
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "r.yaml") in err[0] and "line 4" in err[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- class names, images, pipes


def test_repeated_class_names_are_refused_and_unused_ones_warned(tmp_path, model_dir, two_shards, capsys, caplog):
    names = (two_shards / "classnames.txt").read_text().splitlines()
    (tmp_path / "twice.txt").write_text("\n".join([names[0], *names[1:4], names[3].upper(), *names[5:]]))
    args = eval_args("zeroshot", model_dir, two_shards, tmp_path / "r.json")
    assert main([*args, "--classnames", str(tmp_path / "twice.txt")]) == 2
    assert "class names 4 and 5 are the same" in capsys.readouterr().err
    (tmp_path / "extra.txt").write_text("\n".join([*names, "a dog", "a cat"]))
    with caplog.at_level(logging.WARNING, logger="clipkit.evaluate.run"):
        assert main([*args, "--classnames", str(tmp_path / "extra.txt")]) == 0
    assert any("2 of 12 class names have no sample" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["classes_without_samples"] == 2


def test_an_image_error_names_the_sample_not_a_buffer(digits_dir):
    sample = digits_samples(digits_dir, n=1)[0]
    for data in (b"not an image", sample["png"][:60]):
        with pytest.raises(SkipSample) as e:
            decode_image({"__url__": "shards/test-000003.tar", "__key__": "s42", "png": data})
        assert "shards/test-000003.tar:s42" in e.value.detail and "BytesIO" not in str(e.value)


def closed_pipe(args: list[str]) -> tuple[int, str]:
    """Runs the CLI with its stdout's reader gone before anything was written (`| head -0`): (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "clipkit.cli", *args], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    (tmp_path / "eval").mkdir()
    result = {"dataset": "digits", "model": "m", "task": "zeroshot", "metrics": {"acc1": 0.5}}
    (tmp_path / "eval" / "zeroshot-digits.json").write_text(json.dumps(result))
    code, err = closed_pipe(["eval", "report", str(tmp_path)])
    assert code == 0 and err == "", err


@pytest.mark.slow
def test_models_into_a_closed_pipe_ends_quietly():
    code, err = closed_pipe(["models"])
    assert code == 0 and "Error" not in err and "Traceback" not in err, err


def test_an_error_in_a_loader_worker_is_reported_as_its_message():
    from clipkit.cli import _reason
    from clipkit.files import DiskFullError

    loader = torch.utils.data.DataLoader(_Raising(), batch_size=None, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value) and _reason(e.value) == "shard x.tar: no sample"
    full = DiskFullError(28, "no space left on device while writing out/r.json")
    assert _reason(full).startswith("no space left on device while writing out/r.json: free some space")
    assert _reason(IsADirectoryError(21, "Is a directory", "out")) == "out: Is a directory"


class _Raising(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise DataError("shard x.tar: no sample")
        yield
