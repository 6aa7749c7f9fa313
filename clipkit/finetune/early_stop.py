"""Early stopping on a validation metric, keeping a copy of the best step's weights to restore at the end."""

from __future__ import annotations

import math

import torch

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "loss": False}


class EarlyStopping:
    """Tracks a monitored metric over evaluations; says when `patience` of them brought no improvement.

    An evaluation improves when it beats the best so far by more than `min_delta` (in the metric's direction); the
    module's state dict is then copied (cloned tensors: the memory of one more copy of the weights). `restore` loads
    that copy back, so the weights equal the best step's bitwise.

    Args:
        monitor: "accuracy", "macro_f1" (higher is better) or "loss" (lower is better).
        patience: evaluations without improvement before `update` returns True (0: never).
        min_delta: the smallest change that counts as an improvement.
        start: evaluations before this step still pick the best weights but never count against the patience (as
            Keras' `start_from_epoch`): fine-tuning at a high learning rate first loses accuracy, and a cosine schedule
            only recovers it later.
    """

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0, start: int = 0):
        self.monitor, self.patience, self.min_delta, self.start = monitor, patience, min_delta, start
        self.sign = 1.0 if HIGHER_IS_BETTER[monitor] else -1.0
        self.best, self.best_step, self.state = -math.inf, None, None
        self.bad_evals = 0

    def update(self, step: int, metrics: dict, module: torch.nn.Module) -> bool:
        """Records one evaluation at `step`; returns True when training should stop."""
        value = self.sign * metrics[self.monitor]
        if value > self.best + self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif step >= self.start:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience

    def status(self, step: int) -> str:
        """The log's account after the evaluation at `step`, e.g. "best accuracy 0.8817 at step 2000, 1/5 without
        improvement" or "..., patience counts from step 2000"."""
        note = f"best {self.monitor} {self.best_value:.4f} at step {self.best_step}"
        if self.bad_evals:
            return (
                note + f", {self.bad_evals}" + (f"/{self.patience}" if self.patience else "") + " without improvement"
            )
        if step < self.start and self.best_step != step:
            return note + f", patience counts from step {self.start}"
        return note

    @property
    def best_value(self) -> float:
        """The best metric value seen, in its own sign."""
        return self.sign * self.best

    def restore(self, module: torch.nn.Module) -> None:
        """Loads the best evaluation's weights into `module`."""
        if self.state is None:
            raise RuntimeError("EarlyStopping.restore: no evaluation recorded yet")
        module.load_state_dict(self.state)
