"""Fine-tuning a dual encoder for classification: zero-shot head, `ce` / `flyp` / `linear`, early stopping, WiSE-FT.

data.py (labelled sets in memory, input checks), head.py (zero-shot head), modes.py, early_stop.py, loop.py,
wise.py, plots.py, run.py (`clipkit finetune`). See docs/finetune.md.
"""

from clipkit.finetune.run import finetune

__all__ = ["finetune"]
