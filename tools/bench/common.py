"""Shared pieces of the clipkit vs open_clip_train benchmarks: machine facts, the lock, FLOPs, peak, step clocks.

Every timed measurement of tools/bench holds an exclusive lock on /tmp/clipkit-bench.lock (the lock other
benchmarking jobs on the same machine take too), one A/B pair at a time, so two benchmarks never time each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from clipkit.files import write_json_atomic

LOCK_PATH = "/tmp/clipkit-bench.lock"
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# A small ViT at 224 px for the JPEG benchmark: 49 patches of 32 px, width 128, 2 layers; text: 2 layers of 128.
# 0.22 GFLOP a sample (forward + backward), ~3 ms of one core: about what decoding and preprocessing its 256-512 px
# JPEG costs, so the loader decides the step as it does when a GPU runs the model. 7.3M parameters (6.3M of them the
# token embedding). "photo224-wide" is the quickstart's towers at 224 px (0.6 GFLOP a sample), where it decides less.
PHOTO224_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 128, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}


def photo224_model(width: int) -> dict:
    """PHOTO224_MODEL with both towers `width` wide (2 layers each): the model-cost sweep of the JPEG benchmark.

    At 224 px the patch embedding (3072 inputs a patch) dominates, so the cost grows about linearly with the width,
    and the sweep crosses from loader-bound to model-bound (bench_step measures each width's step).
    """
    cfg = json.loads(json.dumps(PHOTO224_MODEL))
    cfg["vision_cfg"]["width"] = cfg["text_cfg"]["width"] = width
    cfg["text_cfg"]["heads"] = width // 32
    return cfg


PHOTO224_WIDE_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 192, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4, "mlp_ratio": 2.0},
}


def quickstart_model() -> dict:
    """The model config of recipes/quickstart.yaml (read from the recipe, so the benchmark follows it)."""
    import yaml

    return yaml.safe_load(QUICKSTART.read_text())["model"]["config"]


# A convolutional image tower (open_clip's ModifiedResNet, one block a stage, width 32) at 128 px: where
# channels-last memory matters (train.channels_last).
RN128_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}


def open_clip_model(name: str) -> dict:
    """An architecture of open_clip's zoo by name (its JSON config), e.g. ViT-B-16 for the GPU figures."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"open_clip has no model config {name!r}")
    return json.loads(json.dumps(cfg))


PRESETS = {
    "quickstart": quickstart_model,
    "ViT-B-16": lambda: open_clip_model("ViT-B-16"),
    "ViT-B-32": lambda: open_clip_model("ViT-B-32"),
    "photo224": lambda: json.loads(json.dumps(PHOTO224_MODEL)),
    "photo224-w64": lambda: photo224_model(64),
    "photo224-w96": lambda: photo224_model(96),
    "photo224-wide": lambda: json.loads(json.dumps(PHOTO224_WIDE_MODEL)),
    "rn128": lambda: json.loads(json.dumps(RN128_MODEL)),
}


def add_model_arguments(parser, default: str = "quickstart") -> None:
    """Adds --preset and --model-config (a model config JSON file instead of the preset); see `model_config`."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default, help="the model config")
    parser.add_argument("--model-config", help="a model config JSON file instead of the preset")


def model_config(args) -> dict:
    """The model config that parsed --model-config or --preset name."""
    return json.loads(Path(args.model_config).read_text()) if args.model_config else PRESETS[args.preset]()


def add_round_arguments(parser, threads: int, rounds: int, steps: int, steps_help: str) -> None:
    """Adds --threads, --rounds, --steps, --json (where the figures go) and --lock ('' for none)."""
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--lock", default=LOCK_PATH, help="benchmark lock file ('' for none)")


def model_from_args(args) -> torch.nn.Module:
    """A randomly initialized model of `model_config(args)`, on the CPU."""
    from clipkit.models.factory import bundle_from_config

    return bundle_from_config({"model_cfg": model_config(args), "preprocess_cfg": {}}).model


@contextlib.contextmanager
def bench_lock(path: str | None = LOCK_PATH) -> Iterator[None]:
    """Holds the machine-wide benchmark lock (flock) for the block; `path=None` takes no lock."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_threads(workers: int) -> int:
    """Intra-op threads that leave a core to each loader worker: cores - workers, at least 1.

    Both sides of every comparison get the same count (OMP_NUM_THREADS). More threads than free cores make each
    parallel region wait for a descheduled thread (docs/benchmarks.md, `train.threads=2` beside one worker).
    """
    return max(1, (os.cpu_count() or 1) - workers)


def thread_env(threads: int) -> dict:
    """The environment of a benchmark child process: offline, `threads` intra-op threads, and this checkout on
    PYTHONPATH (children run as `python -m tools.bench.<module>` from any folder)."""
    n = str(threads)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)  # fmt: skip


def machine() -> dict:
    """What the figures were measured on, and the load the machine carried when they were."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import open_clip

    import clipkit

    return {
        "clipkit": str(Path(clipkit.__file__).parent),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def matmul_peak(precision: str = "fp32", seconds: float = 1.0) -> float:
    """The machine's dense matmul rate in FLOP/s at the training precision, measured now: the denominator of MFU.

    On the device the training runs on (the GPU when there is one, else this process's CPU threads), in the dtype
    its matmuls run in (bf16 under bf16 autocast). An [n, n] @ [n, n] product costs 2 n^3 FLOPs (n = 2048 on CPU:
    17 GFLOP, ~0.1 s on one AVX-512 core; n = 8192 on a GPU: 1.1 TFLOP); the best of the repeats within `seconds`.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool or CUDA context, kernel selection
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def synthetic_model(model_cfg: dict, batch: int, device: torch.device | str = "cpu"):
    """(model in train mode, images [B, 3, S, S] random, tokens [B, L] of one caption) for timing and counting."""
    from clipkit.models.factory import bundle_from_config

    bundle = bundle_from_config({"model_cfg": model_cfg, "preprocess_cfg": {}})
    size = model_cfg["vision_cfg"].get("image_size", 224)
    images = torch.randn(batch, 3, size, size, device=device)
    texts = bundle.tokenizer(["a photo of a red apple and a rocket"] * batch).to(device)
    return bundle.model.train().to(device), images, texts


@functools.cache
def clip_loss():
    """The clipkit CLIP loss module, built once for every step counted or timed here."""
    from clipkit.loss import ContrastiveLoss

    return ContrastiveLoss("clip")


def loss_backward(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> None:
    """Forward, the CLIP loss and backward: the part of a training step that FLOPs are counted over."""
    image_features, text_features, logit_scale = model(image=images, text=texts)[:3]
    clip_loss()(image_features, text_features, logit_scale, None).backward()


def train_flops_per_sample(model_cfg: dict, batch: int) -> float:
    """FLOPs of one training sample: forward + backward of the model and the CLIP loss, counted by torch.

    torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention in one real fwd+bwd at
    `batch` (the loss's [B, B] logits grow with the batch, so the count is per batch size), divided by the batch.
    On the GPU when there is one (a ViT-B/16 step at batch 256 is ~9 TFLOP: minutes on a CPU), else on the CPU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counter = FlopCounterMode(display=False)
    model, images, texts = synthetic_model(model_cfg, batch, device)
    with counter:
        loss_backward(model, images, texts)
    return counter.get_total_flops() / batch


class StepClock:
    """Timestamps of every optimizer step of this process, from torch's global optimizer step hook.

    The hook is framework-neutral: the same clock times clipkit and open_clip_train, each in its own process, and
    knows nothing of either loop. `dump` writes {"times": [...]} (seconds, perf_counter) for the parent to read.
    """

    def __init__(self):
        self.times: list[float] = []
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: self.times.append(time.perf_counter()))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"times": self.times}))


def throughput(times: list[float], batch: int, skip: int) -> float:
    """Samples/s over the steps after the first `skip` (warm-up, compile, worker start): both sides alike."""
    if len(times) < skip + 2:
        raise ValueError(f"{len(times)} steps timed; need more than skip={skip} + 1")
    return batch * (len(times) - 1 - skip) / (times[-1] - times[skip])


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: str | None, obj: dict) -> None:
    """Writes a benchmark's results (indented JSON) when --json was given, creating its folder."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, obj, sort_keys=False)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
