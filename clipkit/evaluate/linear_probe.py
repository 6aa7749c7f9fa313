"""Linear probe: multinomial logistic regression on frozen image features, regularization chosen on validation.

CLIP's protocol (Radford et al. 2021, appendix A.3) with scikit-learn's L-BFGS LogisticRegression: a
validation split is carved from the training set with a fixed seed (stratified by class), the inverse
regularization strength C is swept over a log grid and the value with the best validation accuracy kept (the
smallest C among ties: the strongest regularization), then the classifier is refit on the whole training set
with that C and scored on the test set. Features are the L2-normalized image embeddings, unscaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clipkit.evaluate.zeroshot import label_ranks

# Unit-norm features need weak regularization (large C): the grid reaches 1e6, as CLIP's sweep did.
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
DEFAULT_VAL_FRACTION = 0.2
MAX_ITER = 1000


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_iter: int = MAX_ITER,
) -> dict:
    """Fits and scores a linear probe.

    Args:
        train_x: [N, D] training features.
        train_y: [N] integer labels.
        test_x: [T, D] test features.
        test_y: [T] integer labels.
        c_grid: inverse regularization strengths to try.
        val_fraction: share of the training rows held out to choose C.
        seed: seed of the validation split (and the solver).
        max_iter: L-BFGS iterations per fit.

    Returns:
        {"acc1", "acc5" (with >= 5 classes), "mean_per_class_recall", "C", "val_acc1" ([[C, accuracy], ...]),
        "n_train", "n_val", "n_test", "n_classes"}. Test labels unseen in training count as misses.

    Raises:
        ValueError: on shape mismatches, fewer than 2 classes, or an empty split.
    """
    train_x, train_y = _check(train_x, train_y, "train")
    test_x, test_y = _check(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have dim {train_x.shape[1]} but test features {test_x.shape[1]}")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"linear probe needs at least 2 classes in the training labels, got {classes.tolist()}")
    counts = np.bincount(np.searchsorted(classes, train_y))
    stratify = train_y if counts.min() >= 2 else None
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_y, test_size=val_fraction, random_state=seed, stratify=stratify
    )
    val_acc = {}
    for c in sorted(c_grid):
        clf = fit_logistic(fit_x, fit_y, c, seed, max_iter)
        val_acc[float(c)] = float(np.mean(clf.predict(val_x) == val_y))
    best_c = max(val_acc, key=lambda c: (val_acc[c], -c))  # best accuracy; the smallest C among ties
    clf = fit_logistic(train_x, train_y, best_c, seed, max_iter)
    scores = clf.decision_function(test_x)  # [T, C'] over the training classes (C' = 2 gives [T])
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)
    out = {**_metrics(scores.astype(np.float64), clf.classes_, test_y), "C": best_c}
    out["val_acc1"] = [[c, a] for c, a in val_acc.items()]  # pairs, not a dict: JSON keys would turn C into text
    out.update(n_train=len(train_y), n_val=len(val_y), n_test=len(test_y), n_classes=len(classes))
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0, max_iter: int = MAX_ITER) -> LogisticRegression:
    """scikit-learn's multinomial L-BFGS logistic regression with inverse regularization strength `c`."""
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    return clf.fit(x, y)


def _metrics(scores: np.ndarray, classes: np.ndarray, y: np.ndarray) -> dict:
    """acc1/acc5/mean per-class recall from [T, C'] scores over `classes` (ties: the lower class first)."""
    col = np.searchsorted(classes, y)  # [T] column of each true label
    seen = (col < len(classes)) & (classes[np.minimum(col, len(classes) - 1)] == y)
    ranks = np.full(len(y), np.iinfo(np.int64).max)
    ranks[seen] = label_ranks(scores[seen], col[seen])
    out = {"acc1": float(np.mean(ranks < 1))}
    if len(classes) >= 5:
        out["acc5"] = float(np.mean(ranks < 5))
    labels = np.unique(y)
    out["mean_per_class_recall"] = float(np.mean([np.mean(ranks[y == c] == 0) for c in labels]))
    return out


def _check(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} features: expected a non-empty [N, D] array, got shape {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} labels: expected {len(x)} integers, got shape {y.shape} dtype {y.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} features: non-finite values")
    return x, y.astype(np.int64)
