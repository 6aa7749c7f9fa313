"""Runs one training job of a benchmark, clipkit or open_clip_train, and writes its optimizer-step timestamps.

    python -m tools.bench.runner clipkit --times T.json -- train RECIPE --out DIR [key=value ...]
    python -m tools.bench.runner open_clip --times T.json --model-config NAME.json -- [open_clip_train args]

Both get the same clock (common.StepClock: torch's global optimizer-step hook), installed before the framework
starts. The open_clip side also
- registers the model config file with open_clip (its stem is the `--model` name), and
- replaces `open_clip_train.data.group_by_keys_nothrow` with a copy that skips webdataset 1.0.2's end-of-shard
  markers (dicts without "fname"), on which 3.3.0 raises KeyError 'fname' (open_clip issue 935). The copy is
  otherwise the same function (same grouping, same yields), so nothing that is measured changes.
"""

from __future__ import annotations

import argparse
import sys

from tools.bench.common import StepClock


def patch_open_clip_train_eof() -> None:
    """Makes open_clip_train's sample grouping skip end-of-shard markers (KeyError 'fname' otherwise)."""
    import open_clip_train.data as ocd

    original = ocd.group_by_keys_nothrow

    def group_by_keys_nothrow(data, *args, **kwargs):
        return original((s for s in data if "fname" in s), *args, **kwargs)

    ocd.group_by_keys_nothrow = group_by_keys_nothrow


def run_open_clip(model_config: str, argv: list[str]) -> int:
    import open_clip
    import open_clip_train.main

    open_clip.add_model_config(model_config)
    patch_open_clip_train_eof()
    return open_clip_train.main.main(argv) or 0


def run_clipkit(argv: list[str]) -> int:
    from clipkit.cli import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("framework", choices=["clipkit", "open_clip"])
    p.add_argument("--times", required=True, help="where to write the step timestamps (JSON)")
    p.add_argument("--model-config", help="open_clip side: model config JSON file (its stem is the model name)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # after "--": the framework's own arguments
    args, rest = p.parse_args(argv[:split]), argv[split + 1 :]
    clock = StepClock()
    rc = run_open_clip(args.model_config, rest) if args.framework == "open_clip" else run_clipkit(rest)
    clock.dump(args.times)
    return rc


if __name__ == "__main__":
    sys.exit(main())
