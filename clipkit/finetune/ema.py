"""An exponential moving average of a module's trained weights, swapped in for evaluation (timm's `ModelEmaV2`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * weight after every optimizer step, for the parameters that train.

    The average starts at the starting weights (for fine-tuning, the zero-shot model), so early on it stays close to
    them: after n steps they still weigh decay^n (0.999^1000 = 0.37).

    Args:
        params: the trained parameters (those with `requires_grad`).
        decay: in (0, 1); the average spans about 1 / (1 - decay) steps.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.average = [p.detach().clone() for p in self.params]  # one more copy of the trained weights

    @torch.no_grad()
    def update(self) -> None:
        """Moves the average towards the current weights (call after `optimizer.step()`)."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the average; on leaving, the trained weights are back bitwise."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)
