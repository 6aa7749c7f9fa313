"""clipkit's side of many processes on many nodes: elastic restarts, one resume decision, bounded waits, threads.

torchrun's elastic agent (c10d rendezvous, `--max-restarts`) is the engine that restarts a failed group; clipkit
does not launch anything. What a process must do for that engine to work:

- `check_elastic_launch`: refuse, at the first start, restarts that torch cannot perform (a restarted group reads
  the dead group's addresses from the rendezvous store the agents share and fails to connect: pytorch#135712).
- `agree_resume`: every process continues from the same checkpoint, decided once by the main process. The elastic
  restart counter cannot decide it alone: it only grows on the node whose worker failed (pytorch#108158), so the
  healthy nodes' restarted workers see 0.
- `process_group_kwargs` + `Watchdog`: no process waits forever. A collective waits `timeout` seconds at most; a
  process that makes no step for as long (stuck outside any collective, e.g. a loader that never yields a batch)
  prints its stacks and exits, so its launcher, and through it every other process, stops too.
- `apply_thread_policy`: counts the job's processes on this machine (by host name, whatever launched them) for
  clipkit/threads.py.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from clipkit import threads

log = logging.getLogger("clipkit")
SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
WATCHDOG_EXIT = 4  # the exit status of a process stopped by its watchdog (2: user error, 3: the run stopped itself)


class LaunchError(ValueError):
    """The launch cannot work as configured (a user error: exit status 2)."""


def restart_count() -> int:
    """How many times torchrun's agent on this node restarted its workers (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def check_elastic_launch(env: dict | None = None) -> None:
    """Refuses `--max-restarts N > 0` when the workers share the agents' rendezvous store.

    With the c10d rendezvous, torch (2.5 .. at least 2.14) lets the workers' process group use the agents' TCPStore,
    which outlives a restart. The restarted group then reads the addresses that the dead group published there:
    gloo fails in connectFullMesh (connection refused), NCCL connects to stale ports, and the other nodes' new
    workers wait in the process-group rendezvous until its timeout. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the
    LAUNCHER's environment gives each round a fresh store (hosted by the new rank 0). The static rendezvous always
    shares its store: it cannot restart a group either.

    Raises:
        LaunchError: restarts are allowed but would fail.
    """
    env = os.environ if env is None else env
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise LaunchError(
            f"torchrun --max-restarts {restarts}: a restarted group would fail to connect (its processes read the "
            "dead group's addresses from the rendezvous store the agents share, pytorch/pytorch#135712). Start every "
            f"launcher with {SHARED_STORE_FIX} in its environment and --rdzv_backend c10d (docs/distributed.md)"
        )


def process_group_kwargs(timeout: float) -> InitProcessGroupKwargs:
    """Accelerate's handler that sets the process group's collective timeout (seconds).

    torch's defaults are 30 minutes for gloo and 10 for NCCL; a collective that waits longer raises on the waiting
    process (gloo) or aborts its communicator (NCCL with TORCH_NCCL_ASYNC_ERROR_HANDLING, torch's default).
    """
    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))


def count_processes_on_host(accelerator: Accelerator) -> int:
    """The job's processes on this machine: the ranks whose host name is this one's (one small gather at setup).

    At least LOCAL_WORLD_SIZE: two launchers on one machine (or two containers with distinct names) each count
    only their own processes there.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if accelerator.num_processes == 1:
        return local
    host = socket.gethostname()
    return max(local, gather_object([host]).count(host))


def apply_thread_policy(accelerator: Accelerator, requested: int, workers: int) -> int:
    """Sets torch's thread count by clipkit/threads.py's policy, counting this machine's processes; returns it.

    Collective: every process calls it once its process group is up (before training starts).
    """
    on_host = count_processes_on_host(accelerator)
    threads.note_processes_on_host(on_host)
    count = threads.threads_for(workers, requested)
    torch.set_num_threads(count)
    if accelerator.is_main_process:
        log.info(
            "%d torch thread(s) per process: %d core(s), %d process(es) on this host, %d loader worker(s) each",
            count,
            threads.available_cores(),
            on_host,
            workers,
        )
    return count


def wanted_resume(resume: str | None) -> str | None:
    """This process's wish: `--resume` as given, or "auto" in a worker torchrun has restarted."""
    if resume is None and restart_count() > 0:
        return "auto"
    return resume


def agree_resume(accelerator: Accelerator, resume: str | None, resolve: Callable[[str | None], object]):
    """The checkpoint every process resumes from (or None), decided by the main process for all.

    A restarted worker wants "auto" (see `wanted_resume`); if any process wants to resume, all do: after an elastic
    restart only the failed node's workers know it. The main process then resolves the agreed wish, so no process
    can see a different newest checkpoint (a shared filesystem's caches), and a refusal reaches every process.
    Collective: every process calls it.

    Args:
        accelerator: the run's Accelerator.
        resume: this process's `--resume` value (None, "auto", "latest" or a folder).
        resolve: wish -> checkpoint folder or None (e.g. `lambda w: resume.start_checkpoint(out_dir, w)`); its
            ValueError or FileNotFoundError is raised on every process.

    Raises:
        LaunchError: the processes were given different explicit `--resume` values.
    """
    wish = wanted_resume(resume)
    if accelerator.num_processes == 1:
        return resolve(wish)
    wishes = gather_object([wish])
    explicit = sorted({w for w in wishes if w not in (None, "auto")})
    if len(explicit) > 1:
        raise LaunchError(f"--resume differs between processes: {explicit}; give every launcher the same value")
    agreed = explicit[0] if explicit else ("auto" if "auto" in wishes else None)
    decision = [None]
    if accelerator.is_main_process:
        try:
            decision = [(True, resolve(agreed))]
        except (ValueError, FileNotFoundError) as e:  # user errors (exit status 2): every process raises them
            decision = [(False, e)]
    broadcast_object_list(decision)
    ok, value = decision[0]
    if not ok:
        raise value
    if value is not None and accelerator.is_main_process and wish != agreed:
        log.info("resuming (%s) because another process was restarted by torchrun", agreed)
    return value


class Watchdog:
    """Exits this process when it makes no progress for `timeout` seconds: a stuck process must not stall the job.

    A process stuck outside any collective (a loader whose every sample is unusable never yields a batch; a
    filesystem that stops answering) is invisible to the collective timeout and to its launcher, which sees a live
    worker; the other processes would wait for it forever, or, on another node, outlive it. The watchdog prints
    one line naming the process and the step, every thread's stack (faulthandler), and exits with WATCHDOG_EXIT.
    A checker thread wakes once a second; `pet` costs one clock read.

    Use as a context manager around the loop and call `pet(step)` at each step's start. The timeout must exceed
    the longest step, evals and checkpoint writes included (train.timeout).

    Args:
        timeout: seconds without a `pet` before the process exits (0 = off).
        name: who this is in the message, e.g. "rank 3".
    """

    def __init__(self, timeout: float, name: str = "process"):
        self.timeout, self.name = timeout, name
        self.step, self.since = None, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="clipkit-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self.since = time.monotonic()
        if self.timeout > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def pet(self, step: int) -> None:
        """Marks the start of step `step` (the clock restarts)."""
        self.step, self.since = step, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.since
            if idle > self.timeout:
                print(
                    f"clipkit: {self.name}: no progress for {idle:.0f} s (train.timeout={self.timeout:g}) in step "
                    f"{self.step}; exiting so that no process waits for this one forever. Stacks:",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT)
