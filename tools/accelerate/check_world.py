"""Prints what `Accelerator(cpu=True)` sees in each launched process: rank, world size, backend.

Used to check which `accelerate launch` configuration really starts several CPU processes (see
docs/distributed.md). One line per process; the all-reduce proves the processes share one process group.

    accelerate launch --config_file tools/accelerate/cpu_2proc.yaml tools/accelerate/check_world.py
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def main() -> None:
    accelerator = Accelerator(cpu=True)
    state = accelerator.state
    # Sum of (rank + 1) over all processes: W * (W + 1) / 2 only if every process joined the same group.
    total = accelerator.reduce(torch.tensor(float(accelerator.process_index + 1)), "sum").item()
    print(
        f"pid={os.getpid()} rank={accelerator.process_index} local_rank={accelerator.local_process_index} "
        f"world_size={accelerator.num_processes} backend={state.backend} distributed_type={state.distributed_type} "
        f"device={accelerator.device} reduce_sum={total:g}",
        flush=True,
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
