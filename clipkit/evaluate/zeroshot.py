"""Zero-shot classification metrics on embedding arrays, matching CLIP_benchmark's conventions.

Pure numpy: the caller encodes images and prompts (clipkit.evaluate.embed) and passes float arrays here.

Conventions (CLIP / CLIP_benchmark `zeroshot_classification`):
- Prompt ensembling: per class, L2-normalize each template embedding, average them, renormalize.
- logits = image_emb @ class_emb.T (CLIP's x100 scale changes no ranking, so it is left out).
- acc@k = share of samples whose label is among the k highest logits; acc5 only with >= 5 classes.
- mean_per_class_recall = sklearn's `balanced_accuracy_score(labels, argmax(logits))`: the mean,
  over classes present in `labels`, of that class's recall.

Ties are broken deterministically as a stable descending sort does (`np.argsort(-logits, kind="stable")`):
among equal logits the lower class index ranks first. This agrees with `np.argmax`, so acc1 equals the
accuracy of the argmax prediction used for mean_per_class_recall. (torch.topk, used by CLIP_benchmark,
leaves tie order unspecified; with real float embeddings exact ties essentially never occur.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Rows of logits computed at once: chunk_rows x C float32 (16M elements = 64 MiB at most).
MAX_CHUNK_ELEMENTS = 1 << 24
PLACEHOLDERS = ("{c}", "{}")


def fill_templates(classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    """Fills every template with every class name, class-major.

    Args:
        classnames: C class names.
        templates: T prompt templates with `{c}` (or `{}`) where the class name goes, e.g.
            "a photo of a {c}.". Callables (open_clip's zero-shot metadata stores lambdas) are called
            with the class name.

    Returns:
        C * T prompts: all templates of class 0, then all templates of class 1, ... so that the
        encoded prompts reshape to [C, T, D] for `class_embeddings`.

    Raises:
        ValueError: if there are no templates, or a string template has no placeholder.
    """
    if len(templates) == 0:
        raise ValueError("templates: empty list; at least one prompt template is needed")
    for template in templates:
        if isinstance(template, str) and not any(p in template for p in PLACEHOLDERS):
            raise ValueError(f"template {template!r} has no class placeholder ('{{c}}' or '{{}}')")
    return [_fill(template, name) for name in classnames for template in templates]


def _fill(template: str | Callable[[str], str], name: str) -> str:
    if callable(template):
        return template(name)
    # str.replace, not str.format: templates may hold other braces and names may hold "{".
    return template.replace("{c}", name).replace("{}", name)


def class_embeddings(text_emb: np.ndarray) -> np.ndarray:
    """Builds one classifier weight per class by prompt ensembling.

    Args:
        text_emb: [C, T, D] embeddings of C classes x T templates (normalized or not).

    Returns:
        [C, D] float32: per class, the mean of the L2-normalized template embeddings, renormalized.

    Raises:
        ValueError: if the input is not 3-D or a template embedding or class mean has zero norm.
    """
    emb = np.asarray(text_emb, dtype=np.float64)  # [C, T, D]; float64 so rounding does not depend on T
    if emb.ndim != 3:
        raise ValueError(f"text_emb: expected [classes, templates, dim], got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=-1, keepdims=True)  # [C, T, 1]
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        bad = sorted({int(c) for c in np.nonzero(~(norms[..., 0] > 0) | ~np.isfinite(norms[..., 0]))[0]})
        raise ValueError(f"text_emb: zero or non-finite template embedding(s) for class index(es) {bad[:10]}")
    mean = (emb / norms).mean(axis=1)  # [C, D]
    mean_norms = np.linalg.norm(mean, axis=-1, keepdims=True)  # [C, 1]
    if np.any(mean_norms == 0):
        bad = np.nonzero(mean_norms[:, 0] == 0)[0].tolist()
        raise ValueError(f"text_emb: template embeddings cancel out (zero mean) for class index(es) {bad[:10]}")
    return (mean / mean_norms).astype(np.float32)


def zeroshot_metrics(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, chunk_rows: int | None = None
) -> dict[str, float]:
    """Zero-shot accuracy of image embeddings against class embeddings.

    Logits are computed chunk by chunk ([chunk_rows, C] float32 at a time), so N = 1e6 images need no
    [N, C] array; image_emb may be a read-only memory map.

    Args:
        image_emb: [N, D] image embeddings (L2-normalized by the caller).
        class_emb: [C, D] class embeddings, e.g. from `class_embeddings`.
        labels: [N] integer class indices in [0, C).
        chunk_rows: rows per chunk; default keeps a chunk at about 16M logits.

    Returns:
        {"acc1", "acc5", "mean_per_class_recall"} as Python floats; "acc5" is absent when C < 5
        (CLIP_benchmark reports NaN there). Ties: see the module docstring.

    Raises:
        ValueError: on shape mismatches, empty input, non-finite embeddings or labels outside [0, C).
    """
    img, cls, lab = _check_inputs(image_emb, class_emb, labels)
    n, c = img.shape[0], cls.shape[0]
    rows = chunk_rows or max(1, MAX_CHUNK_ELEMENTS // c)
    cls_t = np.ascontiguousarray(cls.T)  # [D, C]
    ks = (1, 5) if c >= 5 else (1,)
    hits = dict.fromkeys(ks, 0)
    correct = np.zeros(c, dtype=np.int64)  # [C] correct argmax predictions per true class
    for start in range(0, n, rows):
        logits = np.asarray(img[start : start + rows], dtype=np.float32) @ cls_t  # [B, C]
        # A NaN/inf in an image row always makes its logits non-finite: checking [B, C] here avoids an
        # [N, D] boolean pass over image_emb.
        if not np.all(np.isfinite(logits)):
            raise ValueError(f"image_emb rows {start}..{start + len(logits) - 1} give non-finite logits (NaN/inf?)")
        y = lab[start : start + rows]  # [B]
        ranks = label_ranks(logits, y)  # [B]; 0 = the label is the (first) argmax
        for k in ks:
            hits[k] += int(np.count_nonzero(ranks < k))
        correct += np.bincount(y[ranks == 0], minlength=c)
    out = {f"acc{k}": hits[k] / n for k in ks}
    total = np.bincount(lab, minlength=c)  # [C] samples per true class
    present = total > 0
    # Same arithmetic as sklearn's balanced_accuracy_score: per-class int/int recall, then np.mean.
    out["mean_per_class_recall"] = float(np.mean(correct[present] / total[present]))
    return out


def label_ranks(scores: np.ndarray, positive: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Rank of one positive column per row under a stable descending sort of that row.

    rank = #(scores > s) + #(scores == s at a lower column), s = the positive's score. "In the top k" is
    then `rank < k`, exactly as `positive in np.argsort(-row, kind="stable")[:k]`, without sorting.

    Args:
        scores: [B, K] scores of B queries against K candidates.
        positive: [R] column of the positive for each selected row.
        rows: [R] selected rows of `scores`; all B rows (R = B) when None.

    Returns:
        [R] int64 ranks, 0 for the best.
    """
    sub = scores if rows is None else scores[rows]  # [R, K]
    s = sub[np.arange(sub.shape[0]), positive][:, None]  # [R, 1]
    ranks = np.count_nonzero(sub > s, axis=1)
    equal = sub == s  # [R, K]
    tied = np.nonzero(np.count_nonzero(equal, axis=1) > 1)[0]  # rows where another candidate ties
    if tied.size:
        before = np.arange(sub.shape[1])[None, :] < positive[tied][:, None]  # [T, K]
        ranks[tied] += np.count_nonzero(equal[tied] & before, axis=1)
    return ranks.astype(np.int64, copy=False)


def _check_inputs(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = np.asarray(image_emb)  # no copy: a memory map stays one
    cls = np.asarray(class_emb, dtype=np.float32)
    lab = np.asarray(labels)
    if img.ndim != 2 or cls.ndim != 2:
        raise ValueError(f"image_emb {img.shape} and class_emb {cls.shape} must both be 2-D [rows, dim]")
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"image_emb dim {img.shape[1]} does not match class_emb dim {cls.shape[1]}")
    if lab.shape != (img.shape[0],):
        raise ValueError(f"labels: expected shape ({img.shape[0]},) to match image_emb, got {lab.shape}")
    if img.shape[0] == 0 or cls.shape[0] == 0:
        raise ValueError(f"need at least one image and one class, got {img.shape[0]} and {cls.shape[0]}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {lab.dtype}")
    if lab.min() < 0 or lab.max() >= cls.shape[0]:
        raise ValueError(f"labels: values must lie in [0, {cls.shape[0]}), got [{lab.min()}, {lab.max()}]")
    if not np.all(np.isfinite(cls)):
        raise ValueError("class_emb contains non-finite values")
    return img, cls, lab.astype(np.int64, copy=False)
