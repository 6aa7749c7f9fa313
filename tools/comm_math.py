"""On-paper communication and loss memory of clipkit's contrastive training at scale (docs/distributed.md).

    python tools/comm_math.py > /tmp/tables.md      # a few seconds, most of it importing open_clip

Prints markdown tables, per GPU and per optimizer step, for ViT-B/32 and ViT-L/14 at 32k and 90k global batch on
256 and 1024 GPUs. Parameter counts and embedding widths come from open_clip's own configs (the models are built on
the meta device: no weights, no memory). The logits-memory factor is measured here, on the CPU, with torch's
MemTracker on clipkit's own loss.

Assumptions (also printed under the tables):
- "32k" and "90k" are 32 x 1024 = 32,768 and 90 x 1024 = 92,160: divisible by 256 and 1024, because every process
  must hold the same number of samples. Per-GPU batch n = N / W. train.accum_freq = 1 unless said otherwise.
- Bytes are what ONE GPU receives (a ring sends as much as it receives), at the algorithm level: how NCCL splits
  them between NVLink and the network depends on its topology. MiB/GiB are 2^20/2^30 bytes.
- Feature all-gather (clipkit/loss.py): image and text features, [n, D] each, gathered into [N, D]: each GPU
  receives (W - 1) * n * D elements per tensor. Its backward is a reduce-scatter of the same size, in the same
  dtype (a bf16 gather casts the gradient to bf16 before the reduce-scatter).
- Gradient all-reduce (DDP): every parameter trainable, gradients fp32 (parameters stay fp32 under bf16 autocast).
  A ring all-reduce moves 2 * (W - 1) / W * P * 4 bytes per GPU (reduce-scatter + all-gather halves).
- Logits: the CLIP loss builds a [rows, N] fp32 matrix per direction (image->text, text->image). Local loss: rows =
  n; global loss (train.local_loss false): rows = N. LOGITS_COPIES such matrices are alive at the loss's peak
  (both directions together), measured by `measure_logits_copies`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = ("ViT-B-32", "ViT-L-14")
GLOBAL_BATCHES = {"32k": 32 * 1024, "90k": 90 * 1024}
WORLD_SIZES = (256, 1024)
FP32, BF16 = 4, 2  # bytes per element
# Live fp32 [rows, N] matrices at the peak of the CLIP loss, both directions: forward holds each direction's logits
# and log-softmax output; backward holds the saved log-softmax output, its incoming gradient and the logits'
# gradient of one direction plus the other direction's saved output. `measure_logits_copies` checks this.
LOGITS_COPIES = 4
GPU_MEMORY_GIB = 80  # H100 80GB: the reference card for "fits"
# A judgement call, not a measurement: below this share of a step's communicated bytes, the bf16 feature exchange
# is not worth giving up the exactness of fp32 (see docs/distributed.md).
BF16_GATHER_MIN_SAVING = 0.10
# Standard estimate: a backward pass costs about 2 forward passes, so GradCache's extra forward adds 1 / (1 + 2).
GRADCACHE_EXTRA_COMPUTE = 1 / 3


@dataclass(frozen=True)
class Model:
    name: str
    params: int
    embed_dim: int


def load_model_facts(name: str) -> Model:
    """Parameter count and embedding width of an open_clip architecture, built on the meta device.

    Args:
        name: an open_clip model name, e.g. "ViT-B-32".
    """
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"open_clip has no model config {name!r}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "No pretrained weights loaded": expected, none are wanted
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, device="meta")
    finally:
        root.setLevel(level)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Model(name, params, int(cfg["embed_dim"]))


def gather_bytes(n: int, world: int, dim: int, itemsize: int) -> int:
    """Bytes one GPU receives in the forward feature all-gather (image + text). The backward reduce-scatter: same."""
    return 2 * (world - 1) * n * dim * itemsize


def allreduce_bytes(params: int, world: int, itemsize: int = FP32) -> float:
    """Bytes one GPU receives (and sends) in a ring all-reduce of `params` gradients."""
    return 2 * (world - 1) / world * params * itemsize


def columns_bytes(big_n: int, dim: int) -> int:
    """fp32 bytes of the gathered image and text features, [N, D] each, that every process holds."""
    return 2 * big_n * dim * FP32


def logits_bytes(rows: int, cols: int, copies: int = 2) -> int:
    """fp32 bytes of `copies` [rows, cols] matrices (2 = the two directions' logits alone)."""
    return copies * rows * cols * FP32


def measure_logits_copies(rows: int = 128, cols: int = 4096, dim: int = 8, bf16_autocast: bool = False) -> float:
    """Peak memory of clipkit's CLIP loss (forward + backward, on the CPU) in units of one [rows, cols] fp32 matrix.

    Uses torch's MemTracker (torch.distributed._tools, a private API): the inputs are registered as external, so
    what is left is the loss's own activations and gradients. Returns NaN if the tracker is unavailable.

    Args:
        rows: local rows n.
        cols: columns N.
        dim: feature width (small, so that [n, D] and [N, D] tensors stay negligible next to [n, N]).
        bf16_autocast: run the forward under CPU bf16 autocast, as `train.precision: bf16` does on GPU (the logits
            matmul then returns bf16, the cross-entropy runs in fp32).
    """
    # The checkout's clipkit, also when it is not pip-installed (a script in tools/ sees only tools/ on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from torch.distributed._tools.mem_tracker import MemTracker

        from clipkit.loss import clip_loss_rows
    except ImportError:
        return math.nan
    g = torch.Generator().manual_seed(0)
    image_cols = F.normalize(torch.randn(cols, dim, generator=g), dim=-1).requires_grad_()
    text_cols = F.normalize(torch.randn(cols, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    tracker = MemTracker()
    tracker.track_external(image_cols, text_cols, scale)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext()
    with tracker:
        with autocast:
            loss = clip_loss_rows(image_cols[:rows], text_cols[:rows], image_cols, text_cols, scale)
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    own = sum(v for k, v in peak.items() if getattr(k, "name", "") in ("ACT", "TEMP"))
    return own / logits_bytes(rows, cols, copies=1)


def fmt(b: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB (binary units)."""
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    start = time.perf_counter()
    models = [load_model_facts(name) for name in MODELS]
    # D = 8: the [N, D] feature copies stay negligible next to the [n, N] matrices being counted. Smaller N under
    # autocast: bf16 matmuls are slow on AVX2 CPUs.
    copies = measure_logits_copies(rows=128, cols=4096, dim=8)
    copies_bf16 = measure_logits_copies(rows=256, cols=2048, dim=8, bf16_autocast=True)

    out = ["### Models (open_clip configs, built on the meta device)", ""]
    out.append(
        table(
            ["model", "parameters P", "embed dim D", "fp32 gradient bytes 4P"],
            [[m.name, f"{m.params:,}", str(m.embed_dim), fmt(4 * m.params)] for m in models],
        )
    )

    comm_rows, rec_rows = [], []
    for m in models:
        for label, big_n in GLOBAL_BATCHES.items():
            for w in WORLD_SIZES:
                n = big_n // w
                g32, g16 = gather_bytes(n, w, m.embed_dim, FP32), gather_bytes(n, w, m.embed_dim, BF16)
                ar = allreduce_bytes(m.params, w)
                step32, step16 = 2 * g32 + ar, 2 * g16 + ar  # gather forward + reduce-scatter backward + grads
                share32 = 2 * g32 / step32
                saving = (step32 - step16) / step32
                comm_rows.append(
                    [
                        m.name,
                        f"{label} ({big_n:,})",
                        str(w),
                        str(n),
                        fmt(g32),
                        fmt(g16),
                        fmt(ar),
                        f"{share32:.1%}",
                        f"{saving:.1%}",
                    ]
                )
                dtype = f"bf16 (saves {saving:.0%})" if saving >= BF16_GATHER_MIN_SAVING else "fp32"
                rec_rows.append([m.name, label, str(w), str(n), "true", "true", dtype])

    out += ["", "### Communication per GPU per optimizer step (train.accum_freq 1)", ""]
    out.append(
        table(
            [
                "model",
                "global batch N",
                "GPUs W",
                "per-GPU n",
                "feature all-gather fwd, fp32",
                "same, bf16",
                "gradient all-reduce, fp32",
                "features' share of step bytes (fp32 gather)",
                "bf16 gather saves",
            ],
            comm_rows,
        )
    )
    out += [
        "",
        "The backward reduce-scatter of the features receives as many bytes as the forward all-gather (same dtype); "
        "step bytes = 2 x all-gather + all-reduce.",
    ]

    mem_rows = []
    for label, big_n in GLOBAL_BATCHES.items():
        for w in WORLD_SIZES:
            n = big_n // w
            local, glob = logits_bytes(n, big_n), logits_bytes(big_n, big_n)
            local_peak, glob_peak = logits_bytes(n, big_n, LOGITS_COPIES), logits_bytes(big_n, big_n, LOGITS_COPIES)
            fits = "yes" if glob_peak < GPU_MEMORY_GIB * 2**30 else "no"
            mem_rows.append(
                [f"{label} ({big_n:,})", str(w), str(n), fmt(local), fmt(local_peak), fmt(glob), fmt(glob_peak), fits]
            )
    out += ["", "### Logits memory per GPU (fp32, both directions; any model: it depends on n and N only)", ""]
    out.append(
        table(
            [
                "global batch N",
                "GPUs W",
                "per-GPU n",
                "local loss: logits 2nN",
                f"local: peak {LOGITS_COPIES}nN",
                "global loss: logits 2N^2",
                f"global: peak {LOGITS_COPIES}N^2",
                f"global peak < {GPU_MEMORY_GIB} GiB",
            ],
            mem_rows,
        )
    )

    feat_rows = [
        [m.name, str(m.embed_dim), f"{label} ({big_n:,})", fmt(columns_bytes(big_n, m.embed_dim))]
        for m in models
        for label, big_n in GLOBAL_BATCHES.items()
    ]
    out += ["", "### Gathered features per GPU (any W)", ""]
    out.append(table(["model", "D", "global batch N", "image + text columns [N, D], fp32: 2ND x 4 B"], feat_rows))
    out += [
        "",
        "Every process holds all N columns in either loss mode; their gradient is as large again during backward. "
        "They are of the same order as the local loss's logits peak above (larger at small n), so count both.",
    ]

    out += ["", "### Recommended settings", ""]
    out.append(
        table(
            ["model", "global batch", "GPUs W", "per-GPU n", "train.local_loss", "train.gather_with_grad",
             "train.gather_dtype (with train.precision bf16)"],
            rec_rows,
        )
    )  # fmt: skip
    out += [
        "",
        "train.accum_freq: 1 while the per-GPU batch n fits; otherwise the smallest K with n / K fitting (a measured "
        "micro-batch size, not computed here). K leaves the logits memory of the table unchanged (each micro-step's "
        "rows are this process's whole share n = N / W, not one micro-batch) and the gradient all-reduce too (once "
        "per step, after the last micro-step), adds one forward pass "
        f"(~{GRADCACHE_EXTRA_COMPUTE:.0%} compute if backward = 2 x forward) and 1.5x the feature bytes (a no-grad "
        "gather of the cache, then K live gathers and their reduce-scatters).",
        "",
        "Assumptions: 32k = 32 x 1024, 90k = 90 x 1024 (divisible by W); bytes received per GPU, ring algorithms; "
        "all parameters trainable, fp32 gradients; "
        f"logits peak = {LOGITS_COPIES} fp32 [rows, N] matrices (measured on the CPU with MemTracker: "
        f"{copies:.2f} in fp32, {copies_bf16:.2f} fp32-matrix equivalents under bf16 autocast); "
        f"'fits' = below {GPU_MEMORY_GIB} GiB for the logits alone (activations of the towers come on top); "
        f"bf16 gather recommended when it saves >= {BF16_GATHER_MIN_SAVING:.0%} of a step's bytes (a judgement call).",
        "",
        f"_Generated by `python tools/comm_math.py` (torch {torch.__version__.split('+')[0]}, "
        f"open_clip {_open_clip_version()})._",
    ]
    print("\n".join(out))
    # On stderr, so that the printed tables are identical on every run.
    print(f"comm_math: {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _open_clip_version() -> str:
    with contextlib.suppress(Exception):
        import open_clip

        return open_clip.__version__
    return "?"


if __name__ == "__main__":
    main()
