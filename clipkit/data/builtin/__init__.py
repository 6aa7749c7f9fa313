"""Builders of the real datasets shipped by Debian packages and scikit-learn, written as WebDataset shards.

Each builder takes an output folder, writes ``train-*.tar``/``test-*.tar``, ``sizes.json`` and ``dataset.json`` (the
summary it returns), and raises ``FileNotFoundError`` naming the Debian package when a source is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clipkit.data.builtin.digits import build_digits
from clipkit.data.builtin.emoji import build_emoji
from clipkit.data.builtin.fashion_mnist import build_fashion_mnist
from clipkit.data.builtin.openclipart import build_openclipart

BUILDERS: dict[str, Callable[..., dict]] = {
    "emoji": build_emoji,
    "fashion-mnist": build_fashion_mnist,
    "digits": build_digits,
    "openclipart": build_openclipart,
}


def build(name: str, out: Path) -> dict:
    """Builds one of :data:`BUILDERS` into ``out``.

    Args:
        name: The dataset name.
        out: Output folder.

    Returns:
        The builder's summary (also in ``{out}/dataset.json``).

    Raises:
        ValueError: ``name`` is not a known dataset.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(BUILDERS)}")
    return BUILDERS[name](Path(out))
