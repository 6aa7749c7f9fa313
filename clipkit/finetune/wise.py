"""WiSE-FT (Wortsman et al. 2022): weight-space mixes of the zero-shot and the fine-tuned weights.

theta(a) = (1 - a) * theta_zeroshot + a * theta_finetuned, for every floating-point tensor of the mode's module
(image tower and head in `ce`, both towers in `flyp`, the head in `linear`); a = 0 is the zero-shot model, a = 1 the
fine-tuned one. Each mix is evaluated on validation and on every extra set; the best a on validation is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

State = dict[str, torch.Tensor]


def interpolate(zeroshot: State, finetuned: State, alpha: float) -> State:
    """(1 - alpha) * zeroshot + alpha * finetuned for floating tensors; others (integer buffers) from `finetuned`.

    a = 0 and a = 1 return the two inputs' values exactly (no rounding through the mix).
    """
    if zeroshot.keys() != finetuned.keys():
        raise ValueError(
            f"WiSE-FT: the two state dicts differ in keys: {sorted(zeroshot.keys() ^ finetuned.keys())[:5]}"
        )
    out = {}
    for k, ft in finetuned.items():
        zs = zeroshot[k]
        if not ft.is_floating_point() or alpha == 1.0:
            out[k] = ft.clone()
        elif alpha == 0.0:
            out[k] = zs.clone()
        else:
            out[k] = torch.lerp(zs, ft, alpha)
    return out


def sweep(
    module: torch.nn.Module,
    zeroshot: State,
    finetuned: State,
    alphas: Sequence[float],
    evaluate: Callable[[float], dict],
) -> list[dict]:
    """Loads each mix into `module` and calls evaluate(alpha) -> {set: metrics}; leaves the fine-tuned weights in.

    Returns:
        [{"alpha", set: metrics, ...}] in the order of `alphas`.
    """
    rows = []
    for a in alphas:
        module.load_state_dict(interpolate(zeroshot, finetuned, a))
        rows.append({"alpha": a, **evaluate(a)})
    module.load_state_dict(finetuned)
    return rows


def best_alpha(rows: list[dict], on: str = "val", metric: str = "accuracy") -> float:
    """The alpha with the best `metric` on set `on` (the largest alpha among ties: closest to the fine-tuned)."""
    return max(rows, key=lambda r: (r[on][metric], r["alpha"]))["alpha"]
