"""Cross-modal retrieval recall@k on embedding arrays, with several captions per image (CLIP_benchmark's).

Pure numpy. Scores are dot products; the caller L2-normalizes the embeddings.

- text->image ("image_retrieval_recall@k"): share of captions whose own image is among the k images
  that score highest against the caption.
- image->text ("text_retrieval_recall@k"): share of images with at least one of their captions among
  the k captions that score highest against the image.

Key names are CLIP_benchmark's: "image_retrieval" is retrieving images (from text queries).

Differences from CLIP_benchmark, all on edge cases:
- Images without any caption are left out of image->text (CLIP_benchmark counts them as misses via 0/0).
- k larger than the number of candidates is clamped (every candidate is then in the "top k": recall 1);
  torch.topk would raise.
- Ties are broken as a stable descending sort does: among equal scores the lower candidate index ranks
  first (torch.topk leaves tie order unspecified). See `clipkit.evaluate.zeroshot.label_ranks`.
- Recalls are hits / count in float64 (CLIP_benchmark averages in float32).

Rather than a top-k selection (argpartition), each query's positive gets its exact rank by counting
higher scores in its row: the same answer as sorting, one linear pass, and exact under ties. Scores are
computed in blocks of query rows ([rows, candidates] float32 at a time), so N, M ~ 1e5 fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipkit.evaluate.zeroshot import label_ranks

DEFAULT_KS = (1, 5, 10)
BLOCK_ROWS = 1024
# Upper bound on one score block (rows x candidates float32): 32M elements = 128 MiB.
MAX_BLOCK_ELEMENTS = 1 << 25


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    block_rows: int = BLOCK_ROWS,
) -> dict[str, float]:
    """Recall@k both ways between N images and M captions.

    Args:
        image_emb: [N, D] image embeddings (may be a read-only memory map).
        text_emb: [M, D] caption embeddings.
        text_to_image: [M] index of each caption's image, in [0, N).
        ks: the k values; each k >= 1.
        block_rows: query rows scored at once (fewer when the candidate count is large).

    Returns:
        {"image_retrieval_recall@{k}": text->image R@k, "text_retrieval_recall@{k}": image->text R@k}
        for each k, as Python floats.

    Raises:
        ValueError: on shape/dim mismatches, empty inputs, bad ks, out-of-range text_to_image or
            non-finite scores.
    """
    img, txt, t2i = _check_inputs(image_emb, text_emb, text_to_image)
    ks = _check_ks(ks)
    t2i_ranks = _text_to_image_ranks(img, txt, t2i, block_rows)  # [M]
    i2t_ranks = _image_to_text_ranks(img, txt, t2i, block_rows)  # [images with >= 1 caption]
    out = {}
    for k in ks:
        # A rank is always < the candidate count, so k beyond it is clamped for free.
        out[f"image_retrieval_recall@{k}"] = int(np.count_nonzero(t2i_ranks < k)) / t2i_ranks.size
        out[f"text_retrieval_recall@{k}"] = int(np.count_nonzero(i2t_ranks < k)) / i2t_ranks.size
    return out


def _text_to_image_ranks(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, block_rows: int) -> np.ndarray:
    """[M] rank of each caption's image among all N images."""
    n_img, n_txt = img.shape[0], txt.shape[0]
    rows = _rows_per_block(block_rows, n_img)
    img_t = np.asarray(img, dtype=np.float32).T  # [D, N]: a transposed view (BLAS reads it as is), no copy
    ranks = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, rows):
        stop = min(start + rows, n_txt)
        scores = np.asarray(txt[start:stop], dtype=np.float32) @ img_t  # [B, N]
        _check_finite(scores, "text_emb", start, stop)
        ranks[start:stop] = label_ranks(scores, t2i[start:stop])
    return ranks


def _image_to_text_ranks(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, block_rows: int) -> np.ndarray:
    """Rank of the best-placed caption of each captioned image among all M captions (images in order)."""
    n_img, n_txt = img.shape[0], txt.shape[0]
    rows = _rows_per_block(block_rows, n_txt)
    txt_t = np.asarray(txt, dtype=np.float32).T  # [D, M]: a transposed view, no copy for float32 input
    # Captions grouped by image, ascending caption index within an image: the captions of image i are
    # by_image[offsets[i]:offsets[i + 1]].
    by_image = np.argsort(t2i, kind="stable")  # [M]
    counts = np.bincount(t2i, minlength=n_img)  # [N]
    offsets = np.concatenate([[0], np.cumsum(counts)])  # [N + 1]
    ranks = []
    for start in range(0, n_img, rows):
        stop = min(start + rows, n_img)
        captioned = np.nonzero(counts[start:stop] > 0)[0]  # block rows that have captions
        if captioned.size == 0:
            continue
        scores = np.asarray(img[start:stop], dtype=np.float32) @ txt_t  # [B, M]
        _check_finite(scores, "image_emb", start, stop)
        caps = by_image[offsets[start] : offsets[stop]]  # [P] captions of this block's images
        cap_scores = scores[t2i[caps] - start, caps]  # [P] each caption's score against its own image
        seg = offsets[start:stop][captioned] - offsets[start]  # [R] start of each image's captions in caps
        # The caption ranked first among an image's captions: highest score, then lowest index. Its rank
        # is the minimum over the image's captions, i.e. "any caption in the top k" <=> rank < k.
        best = np.maximum.reduceat(cap_scores, seg)  # [R]
        is_best = cap_scores == np.repeat(best, counts[start:stop][captioned])
        best_caption = np.minimum.reduceat(np.where(is_best, caps, n_txt), seg)  # [R]
        ranks.append(label_ranks(scores, best_caption, rows=captioned))
    return np.concatenate(ranks)


def _rows_per_block(block_rows: int, n_candidates: int) -> int:
    return max(1, min(block_rows, MAX_BLOCK_ELEMENTS // max(n_candidates, 1)))


def _check_finite(scores: np.ndarray, name: str, start: int, stop: int) -> None:
    # NaN/inf anywhere in either embedding makes some score in the block non-finite.
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"non-finite scores for {name} rows {start}..{stop - 1} (NaN/inf in the embeddings?)")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected positive integers, got {ks}")
    return ks


def _check_inputs(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = np.asarray(image_emb)  # no copy: memory maps stay memory maps
    txt = np.asarray(text_emb)
    t2i = np.asarray(text_to_image)
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError(f"image_emb {img.shape} and text_emb {txt.shape} must both be 2-D [rows, dim]")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb dim {img.shape[1]} does not match text_emb dim {txt.shape[1]}")
    if img.shape[0] == 0 or txt.shape[0] == 0:
        raise ValueError(f"need at least one image and one caption, got {img.shape[0]} and {txt.shape[0]}")
    if t2i.shape != (txt.shape[0],):
        raise ValueError(f"text_to_image: expected shape ({txt.shape[0]},) to match text_emb, got {t2i.shape}")
    if not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"text_to_image: expected integer image indices, got dtype {t2i.dtype}")
    if t2i.min() < 0 or t2i.max() >= img.shape[0]:
        raise ValueError(f"text_to_image: values must lie in [0, {img.shape[0]}), got [{t2i.min()}, {t2i.max()}]")
    return img, txt, t2i.astype(np.int64, copy=False)
