"""Stopping a run on request: SIGTERM / SIGINT handling and the stop vote that every process agrees on.

A preempted run exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), so a scheduler or a shell loop can tell
"resumable, run again with --resume latest" from success (0) and failure (1, 2).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

import torch

EXIT_PREEMPTED = 75


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason it names (too much bad data, non-finite steps in a row)."""


class Preempted(RuntimeError):
    """A stop signal came while no step boundary was in reach (the run was waiting for data)."""


class StopSignals:
    """SIGTERM / SIGINT: the first asks for a checkpoint at the next step boundary, the second exits at once.

    A step boundary is in reach while the process computes, but not when data stops coming (a stalled file system,
    a source with no usable sample). If the first signal finds the loop waiting for data (`waiting_for_data`) and
    no batch comes within `data_grace_s`, the wait ends with `Preempted`, and the run continues later from its
    last complete checkpoint. Exiting early cannot corrupt a checkpoint: a half-written one has no COMPLETE marker
    and is never resumed.

    Args:
        data_grace_s: how long a signalled run may still wait for its next batch (whole seconds, SIGALRM).
    """

    def __init__(self, data_grace_s: int = 30):
        self.received: int | None = None
        self.data_grace_s = data_grace_s
        self._previous = {}
        self._waiting = False

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        signal.alarm(0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Marks the block as a wait for data, which a stop signal bounds to `data_grace_s`."""
        self._waiting = True
        if self.received is not None:
            signal.alarm(self.data_grace_s)
        try:
            yield
        finally:
            self._waiting = False
            signal.alarm(0)

    def _handle(self, signum, frame):
        if signum == signal.SIGALRM:
            if self._waiting:
                self._waiting = False
                raise Preempted(f"no batch came within {self.data_grace_s} s of the stop signal")
            return
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        if self._waiting:
            signal.alarm(self.data_grace_s)
        print(
            f"clipkit: {signal.Signals(signum).name} received: checkpointing at the next step boundary "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )


class StopVote:
    """Whether any process got a stop signal, agreed by all processes at the same step.

    One process: its own flag, no collective. Several: a 1-element MAX all-reduce of a CPU tensor over gloo (the
    default group on CPU; a second, gloo group beside NCCL on GPUs), so the vote never waits on the device queue.
    """

    def __init__(self, world_size: int):
        self.group, self.multi = None, world_size > 1
        if self.multi:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")  # collective: every process builds its StopVote

    def __call__(self, local: bool) -> bool:
        if not self.multi:
            return local
        import torch.distributed as dist

        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
