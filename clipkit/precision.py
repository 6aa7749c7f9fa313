"""Which autocast dtype a device runs fastest, and the context that applies it.

bf16 autocast pays on GPUs and on CPUs with AMX (Intel Sapphire Rapids and later), where oneDNN runs bf16 matmuls on
the tile units at several times the fp32 rate: a `clipkit finetune` step of the quickstart model ran 1.66x as fast as
in fp32 on 2 such cores, a quickstart training step 1.48x (docs/finetune.md, docs/benchmarks.md). Without AMX the bf16
matmuls and the casts around them halve a training step, so `auto` picks bf16 only where it pays.

On a CPU the context also routes `scaled_dot_product_attention` to its math backend. The CPU flash-attention kernel's
bf16 backward is slow: with it, the same two steps ran at 0.63x and 0.75x fp32. The math backend's bf16 matmuls run on
AMX like the rest of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("fp32", "bf16", "auto")


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices on AMX tiles (torch's CPU capabilities; else /proc/cpuinfo)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return bool(capabilities().get("amx_bf16", False))
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve(precision: str, device: str | torch.device) -> str:
    """The dtype to run: `precision` itself, or for "auto" bf16 where it is fast (a GPU with bf16, an AMX CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_amx_bf16() else "fp32"


def cpu_attention(device: str | torch.device) -> contextlib.AbstractContextManager:
    """On a CPU, `scaled_dot_product_attention` on its math backend for bf16 (see above); elsewhere nothing."""
    return sdpa_kernel([SDPBackend.MATH]) if torch.device(device).type == "cpu" else contextlib.nullcontext()


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device) -> Iterator[None]:
    """Runs the body under `precision` ("fp32": as it is; "bf16": bf16 autocast, math attention on a CPU).

    Weights, gradients and optimizer state stay fp32; only the autocast ops (matmuls, convolutions) run in bf16.
    The backward pass follows the kernels the forward chose, so it need not run inside.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: resolve 'auto' first (clipkit.precision.resolve)")
    if precision == "fp32":
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16), cpu_attention(device):
        yield
