"""Fault injection for tests of what must survive faults (preemption, kills mid-write, non-finite gradients).

`CLIPKIT_FAULT` holds comma-separated `name@step` entries, e.g. `sigterm@5,nan_grad@3`. Unset (always, outside
tests), every check is a dictionary lookup on an empty dict.

- `sigterm@k`: the process sends itself SIGTERM after step k (a preemption notice arriving mid-run).
- `sigkill_in_checkpoint@k`: SIGKILL while writing the step-k checkpoint, after its state, before it is marked
  complete (a machine lost mid-write).
- `nan_grad@k`: the gradients of step k are set to NaN before the optimizer step.
- `stall_data@k`: the data of step k never comes (a stalled file system).
- `sigkill_in_import@k`: SIGKILL while `clipkit data import` writes its k-th shard, after the shard's first sample.
- `sigkill@k`: the process SIGKILLs itself after step k (a process lost mid-run: OOM killer, a dead GPU).
- `eval_error@k`: the evals at step k raise (they run on the main process only: one rank fails, the others wait).

A fault is an event that happens once: a worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) has none,
so a restarted group replays the faulty step cleanly. Plant a fault on one process by giving only its launcher the
variable (tests/test_multinode.py runs one launcher per simulated node).
"""

from __future__ import annotations

import os
import signal
import threading

_FAULTS: dict[str, set[int]] = {}
_PLANTED = "" if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 else os.environ.get("CLIPKIT_FAULT", "")
for _entry in filter(None, _PLANTED.split(",")):
    _name, _, _step = _entry.partition("@")
    _FAULTS.setdefault(_name.strip(), set()).add(int(_step))


def armed(name: str, step: int) -> bool:
    """Whether fault `name` is set for `step`."""
    return step in _FAULTS.get(name, ())


def maybe_signal(name: str, step: int, sig: signal.Signals) -> None:
    """Sends `sig` to this process if fault `name` is set for `step`."""
    if armed(name, step):
        os.kill(os.getpid(), sig)


def maybe_stall(name: str, step: int) -> None:
    """Blocks forever if fault `name` is set for `step` (a signal handler that raises still ends the wait)."""
    if armed(name, step):
        threading.Event().wait()


class PlantedFault(RuntimeError):
    """The error a planted fault raises (a stand-in for any bug or failure in that place)."""


def maybe_raise(name: str, step: int) -> None:
    """Raises PlantedFault if fault `name` is set for `step`."""
    if armed(name, step):
        raise PlantedFault(f"planted fault {name}@{step} (CLIPKIT_FAULT)")
