"""torch's intra-op thread count: one policy for training, evaluation and embedding, whatever launched the process.

Auto rule: the cores this process may run on (its CPU affinity: `taskset`, cgroup cpusets, SLURM's binding), shared
equally by the job's processes on this machine, minus one core for each DataLoader worker of this process (workers
decode on their own core), at least 1:

    threads = max(1, cores // processes_on_this_machine - workers)

Why workers count: an OpenMP parallel region waits for its slowest thread, so with the workers decoding on the same
cores a descheduled model thread stalls every layer (docs/benchmarks.md: 2.4x at 1 worker on 2 cores).
Why not OMP_NUM_THREADS: launchers set it without seeing each other. torchrun sets 1 when it starts several
processes; `accelerate launch` sets cores / (processes ITS config puts on the node); so two launchers on one 2-core
machine ran 2 threads each, ~10x slower than one launcher with 2 processes (docs/distributed.md). A recipe pins the
count with `train.threads`.

The count changes float summation order: a resumed run must use the count of the run it resumes (auto gives the same
count on the same machine, recipe and number of processes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_counted_on_host: int | None = None  # set once a process group has counted its processes on this machine


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def note_processes_on_host(count: int) -> None:
    """Records how many processes of the job share this machine (clipkit.distributed counts them at setup)."""
    global _counted_on_host
    _counted_on_host = count


def processes_on_host() -> int:
    """The job's processes on this machine: the count noted by the process group if any, else LOCAL_WORLD_SIZE.

    torchrun, `accelerate launch` and SLURM through torchrun set LOCAL_WORLD_SIZE to the processes of ONE launcher;
    two launchers on one machine each say 1, which only the process group's count (by host name) corrects.
    """
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), _counted_on_host or 1)


def threads_for(workers: int, requested: int = 0, processes: int | None = None, cores: int | None = None) -> int:
    """The thread count of the policy.

    Args:
        workers: DataLoader worker processes of this process.
        requested: a pinned count (train.threads); 0 = auto.
        processes: the job's processes on this machine (default: `processes_on_host()`).
        cores: cores this process may use (default: `available_cores()`).
    """
    if requested > 0:
        return requested
    processes = processes or processes_on_host()
    cores = cores or available_cores()
    return max(1, cores // processes - workers)


@contextlib.contextmanager
def using_threads(count: int | None) -> Iterator[int]:
    """Runs the body on `count` torch threads (None: the body sets them itself), then restores the previous count.

    Yields:
        The count in use at the start of the body.
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
