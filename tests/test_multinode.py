"""Many nodes, proven on one machine: each launcher on 127.0.0.1 is a "node" (real gloo processes, c10d rendezvous).

- Two `torchrun --nnodes 2 --nproc_per_node 1` launchers, and two `accelerate launch` ones with the multi-node
  config, train the final weights of one launcher with 2 processes, bitwise.
- A worker SIGKILLed mid-run (`--max-restarts 1`): torchrun restarts the group, every process resumes from the
  newest complete checkpoint by itself, and the final weights equal an uninterrupted run's, bitwise. The same when a
  whole node (launcher and workers) is killed and started again with `--resume auto`.
- No hang: a failure on one process (an eval error on rank 0; a rank whose data is all unusable, which never yields
  a batch) makes every process of both nodes exit non-zero within the recipe's train.timeout, the error in the log.

Each launch is bounded by a timeout; the tests print their times (`pytest -s`).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from clipkit import distributed, threads
from clipkit.checkpoint import COMPLETE
from clipkit.resume import start_checkpoint
from tests.conftest import TINY_MODEL
from tests.test_resilience import assert_bitwise_equal, weights

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 420  # seconds for one launcher, start to exit (a few dozen on an idle 2-core machine)
STEPS, CHECKPOINT_EVERY = 8, 4


def write_recipe(path: Path, data_root: Path, data: dict | None = None, evals: dict | None = None, **train) -> Path:
    recipe = {
        "name": "multinode",
        "data_root": str(data_root),
        "model": {"config": TINY_MODEL},
        "data": {"sources": [{"shards": "train-*.tar"}], "batch_size": 8, "workers": 1, "shuffle_buffer": 50,
                 **(data or {})},
        "train": {"steps": STEPS, "warmup": 2, "lr": 1e-3, "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY,
                  **train},
        "eval": evals or {},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(fault: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="offline", CLIPKIT_FAULT=fault)
    env[distributed.SHARED_STORE_FIX.split("=")[0]] = "1"  # restarts need a fresh store per round (docs)
    return env


class Node:
    """One launcher (a simulated node): its process, its log, and the processes it started."""

    def __init__(self, cmd: list[str], log: Path, env: dict):
        self.log = log
        with open(log, "wb") as f:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)  # fmt: skip

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log.name}: still running after {timeout:.0f} s (a hang); log tail:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL for the launcher and every process under it (torchrun starts workers in their own sessions)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def torchrun(port: int, args: list[str], nnodes: int = 2, nproc: int = 1, max_restarts: int = 0) -> list[str]:
    rdzv = ["--standalone"] if nnodes == 1 else ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                                                 "--rdzv_id", "test"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
            *rdzv, "--max-restarts", str(max_restarts), "-m", "clipkit.cli", *args]  # fmt: skip


def accelerate(port: int, machine: int, args: list[str], max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "tools/accelerate/multi_node.yaml"), "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--rdzv_backend", "c10d", "--max_restarts", str(max_restarts), "-m", "clipkit.cli", *args]  # fmt: skip


def wait_listening(port: int, timeout: float = 120) -> None:
    """Until the first launcher hosts the rendezvous (so that it, not the second, owns the store)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"no rendezvous listening on 127.0.0.1:{port} after {timeout} s")


def two_nodes(tmp: Path, command, faults: tuple[str, str] = ("", "")) -> tuple[Node, Node, int]:
    """Starts node 0, waits until it hosts the rendezvous, starts node 1. `command(port, node)` -> argv."""
    port = free_port()
    first = Node(command(port, 0), tmp / "node0.log", node_env(faults[0]))
    wait_listening(port)
    return first, Node(command(port, 1), tmp / "node1.log", node_env(faults[1])), port


def wait_all(*nodes: Node, timeout: float = LAUNCH_TIMEOUT) -> tuple[list[int], float]:
    """Waits for every launcher; returns their exit codes and the seconds between the first exit and the last."""
    deadline, exits = time.time() + timeout, {}
    while len(exits) < len(nodes) and time.time() < deadline:
        for i, n in enumerate(nodes):
            if i not in exits and n.proc.poll() is not None:
                exits[i] = time.time()
        time.sleep(0.1)
    codes = [n.wait(timeout=max(1.0, deadline - time.time())) for n in nodes]
    return codes, max(exits.values()) - min(exits.values())


def report(what: str, start: float) -> None:
    print(f"\n{what}: {time.time() - start:.0f} s (load {os.getloadavg()[0]:.1f})")


@pytest.fixture(scope="module")
def one_launcher(tmp_path_factory, digits_dir):
    """The reference: one torchrun launcher, 2 processes, never interrupted."""
    root = tmp_path_factory.mktemp("one-launcher")
    recipe = write_recipe(root / "r.yaml", digits_dir)
    start = time.time()
    node = Node(torchrun(0, ["train", str(recipe), "--out", str(root / "run")], nnodes=1, nproc=2),
                root / "node.log", node_env())  # fmt: skip
    assert node.wait() == 0, node.tail()
    report("one launcher x 2 processes", start)
    return recipe, root / "run"


def test_two_torchrun_nodes_equal_one_launcher(tmp_path, one_launcher):
    recipe, reference = one_launcher
    start = time.time()
    args = ["train", str(recipe), "--out", str(tmp_path / "run")]
    a, b, _ = two_nodes(tmp_path, lambda port, node: torchrun(port, args))
    assert (a.wait(), b.wait()) == (0, 0), a.tail() + b.tail()
    report("two torchrun nodes", start)
    assert_bitwise_equal(weights(tmp_path / "run"), weights(reference))
    # The thread policy counted both launchers' processes on this machine (LOCAL_WORLD_SIZE says 1 in each).
    logs = a.text() + b.text()
    assert f"{threads.threads_for(1, processes=2)} torch thread(s) per process" in logs
    assert "2 process(es) on this host" in logs


@pytest.mark.slow  # ~20 s; the torchrun variant is in the default path
def test_two_accelerate_nodes_equal_one_launcher(tmp_path, one_launcher):
    recipe, reference = one_launcher
    start = time.time()
    args = ["train", str(recipe), "--out", str(tmp_path / "run")]
    a, b, _ = two_nodes(tmp_path, lambda port, node: accelerate(port, node, args))
    assert (a.wait(), b.wait()) == (0, 0), a.tail() + b.tail()
    report("two accelerate nodes", start)
    assert_bitwise_equal(weights(tmp_path / "run"), weights(reference))


def test_killed_worker_group_restarts_and_resumes_exactly(tmp_path, one_launcher):
    """Node 1's worker SIGKILLs itself after step 6 (checkpoint at 4): the group restarts once, resumes at 4."""
    assert CHECKPOINT_EVERY < 6 < STEPS
    recipe, reference = one_launcher
    start = time.time()
    run = tmp_path / "run"
    args = ["train", str(recipe), "--out", str(run)]
    a, b, _ = two_nodes(tmp_path, lambda port, node: torchrun(port, args, max_restarts=1), faults=("", "sigkill@6"))
    assert (a.wait(), b.wait()) == (0, 0), a.tail() + b.tail()
    report("killed worker, restarted group", start)
    logs = a.text() + b.text()
    assert "exitcode: -9" in logs and f"resumed from {run / 'checkpoints/step-00000004'} at step 4" in logs
    assert_bitwise_equal(weights(run), weights(reference))


def test_killed_node_started_again_resumes_exactly(tmp_path, one_launcher):
    """Node 1 (launcher + worker) is SIGKILLed after the step-4 checkpoint and started again with --resume auto."""
    recipe, reference = one_launcher
    start = time.time()
    run = tmp_path / "run"
    args = ["train", str(recipe), "--out", str(run)]
    a, b, port = two_nodes(tmp_path, lambda port, node: torchrun(port, args, max_restarts=1))
    marker = run / "checkpoints/step-00000004" / COMPLETE
    deadline = time.time() + LAUNCH_TIMEOUT
    while not marker.exists() and time.time() < deadline and a.proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), a.tail()
    b.kill()
    again = Node(torchrun(port, [*args, "--resume", "auto"], max_restarts=1), tmp_path / "node1-again.log", node_env())
    assert (a.wait(), again.wait()) == (0, 0), a.tail() + again.tail()
    report("killed node, started again", start)
    assert "resumed from" in a.text() + again.text()
    assert_bitwise_equal(weights(run), weights(reference))


# ------------------------------------------------------------------------------------------------ no hang

FAIL_TIMEOUT = 20  # train.timeout of the failure tests (s)


def test_eval_error_on_rank0_stops_every_process(tmp_path, digits_dir):
    """The evals of step 2 raise on the main process (the only one running them) while the other waits for it."""
    task = {"task": "zeroshot", "dataset": "digits", "shards": "test-*.tar", "classnames": "classnames.txt",
            "templates": "templates.txt"}  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, evals={"every": 2, "tasks": [task]}, timeout=FAIL_TIMEOUT)
    args = ["train", str(recipe), "--out", str(tmp_path / "run")]
    start = time.time()
    a, b, _ = two_nodes(tmp_path, lambda port, node: torchrun(port, args), faults=("eval_error@2", "eval_error@2"))
    codes, spread = wait_all(a, b)
    report(f"eval error on rank 0 (exits {spread:.1f} s apart)", start)
    assert all(c != 0 for c in codes) and spread < FAIL_TIMEOUT, (codes, spread)
    assert "PlantedFault: planted fault eval_error@2" in a.text() + b.text()


def all_bad_on_rank1(root: Path, digits_dir: Path) -> int:
    """Two real digits shards, the second with every image cut short; returns a seed whose epoch 0 gives it to rank 1.

    Epoch mode gives rank r the shards [r::2] of a seeded shuffle: rank 1 then never completes a batch.
    """
    from clipkit.data.pipeline import stream_seed
    from clipkit.data.shards import write_shards

    with tarfile.open(digits_dir / "train-000000.tar") as tf:
        members = {}
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    samples = list(members.values())[:256]
    for s in samples[128:]:
        s["png"] = s["png"][:24]  # a PNG header and nothing else: unusable (bad_image)
    write_shards(samples, root, "train", maxcount=128)
    names = [str(root / f"train-{i:06d}.tar") for i in range(2)]
    for seed in range(100):
        order = list(names)
        random.Random(stream_seed(seed, 0, -1, -1)).shuffle(order)
        if order[1] == names[1]:
            return seed
    raise AssertionError("no seed gives the bad shard to rank 1")


def test_rank_with_only_unusable_data_stops_every_process(tmp_path, digits_dir):
    """Rank 1 never yields a batch (every sample of its shard is unusable): its pipeline raises, naming the shard,
    while rank 0 waits in the gradient all-reduce, which times out within train.timeout."""
    seed = all_bad_on_rank1(tmp_path / "shards", digits_dir)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "shards", data={"resampled": False, "shuffle_buffer": 0},
                          timeout=FAIL_TIMEOUT)  # fmt: skip
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), f"seed={seed}"]
    start = time.time()
    a, b, _ = two_nodes(tmp_path, lambda port, node: torchrun(port, args))
    codes, spread = wait_all(a, b)
    report(f"rank with only unusable data (exits {spread:.1f} s apart)", start)
    assert all(c != 0 for c in codes) and spread < FAIL_TIMEOUT, (codes, spread)
    assert "no usable sample among the first" in a.text() + b.text()


@pytest.mark.slow  # ~35 s; the planted one-rank failures stay in the default path
def test_rank_whose_data_stalls_is_ended_by_its_watchdog(tmp_path, digits_dir):
    """Rank 1's data never comes (a stalled file system, no error to raise): its watchdog ends it with every
    thread's stack, and rank 0's collective timeout ends the other within train.timeout."""
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, timeout=FAIL_TIMEOUT)
    args = ["train", str(recipe), "--out", str(tmp_path / "run")]
    start = time.time()
    a, b, _ = two_nodes(tmp_path, lambda port, node: torchrun(port, args), faults=("", "stall_data@3"))
    codes, spread = wait_all(a, b)
    report(f"rank whose data stalls (exits {spread:.1f} s apart)", start)
    assert all(c != 0 for c in codes) and spread < FAIL_TIMEOUT, (codes, spread)
    logs = a.text() + b.text()
    assert "rank 1: no progress for" in logs and "train.timeout" in logs  # the watchdog, with its stacks


# ------------------------------------------------------------------------------------------------ units


def test_thread_policy_counts_processes_on_the_machine(monkeypatch):
    assert threads.threads_for(workers=1, processes=1, cores=8) == 7
    assert threads.threads_for(workers=1, processes=2, cores=8) == 3
    assert threads.threads_for(workers=4, processes=2, cores=8) == 1  # at least one
    assert threads.threads_for(workers=0, requested=5, processes=2, cores=8) == 5  # train.threads pins it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # what a launcher set: not consulted
    assert threads.processes_on_host() == 4
    assert threads.threads_for(workers=0, cores=8) == 2


def test_restarts_with_a_shared_rendezvous_store_are_refused():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with pytest.raises(distributed.LaunchError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed.check_elastic_launch(shared)
    distributed.check_elastic_launch({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"})  # a fresh store per round
    distributed.check_elastic_launch({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"})  # no restarts: nothing to fail


def test_resume_resolution(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    assert start_checkpoint(tmp_path, "auto") is None  # nothing yet: from the start
    for step, complete in [(4, True), (8, False)]:
        (ckpts / f"step-{step:08d}").mkdir(parents=True)
        if complete:
            (ckpts / f"step-{step:08d}" / COMPLETE).write_text("")
    assert start_checkpoint(tmp_path, "auto") == ckpts / "step-00000004"  # 8 was never completed
    with pytest.raises(FileNotFoundError):
        start_checkpoint(tmp_path, str(ckpts / "step-00000008"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.wanted_resume(None) == "auto"  # a restarted worker resumes by itself
    assert distributed.wanted_resume("latest") == "latest"


def load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comm_profile_counts_bytes_like_the_tables():
    tool = load_tool("comm_profile")
    # W=2, features [8, 32] fp32: all-gather receives the other half, 1 x 8 x 32 x 4 bytes.
    assert tool.received_bytes("all_gather", 8 * 32, 4, 2) == 1024
    assert tool.received_bytes("all_reduce", 1000, 4, 4) == 2 * 3 / 4 * 1000 * 4  # ring
    assert tool.kind_of("all_gather", "float", [8, 32]) == "gather"
    assert tool.kind_of("all_reduce", "float", [16, 32]) == "scatter"  # gloo's reduce-scatter is an all-reduce
    assert tool.kind_of("all_reduce", "float", [1000]) == "grads"
    assert tool.kind_of("all_gather", "unsigned char", [23]) == "other"  # gather_object of skip counts


def test_ddp_vs_fsdp_comparison():
    tool = load_tool("ddp_vs_fsdp")
    ddp = {s: {"loss": 2.0, "samples_per_s": 100.0} for s in range(1, 11)}
    fsdp = {s: {"loss": 2.0 * (1 + 1e-5 * s), "samples_per_s": 90.0} for s in range(1, 11)}
    result = tool.compare(ddp, fsdp, check_steps=5, tol=1e-4)
    assert result["ok"] and result["steps"] == 10 and result["first_step_above_tol"] is None
    assert abs(result["max_rel_diff"] - 1e-4) < 1e-12 and result["samples_per_s"] == {"ddp": 100.0, "fsdp": 90.0}
    assert not tool.compare(ddp, fsdp, check_steps=10, tol=5e-5)["ok"]
