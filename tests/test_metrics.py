"""Zero-shot and retrieval metrics: hand-computed cases and exact agreement with naive loops."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from clipkit.evaluate.retrieval import retrieval_metrics
from clipkit.evaluate.zeroshot import class_embeddings, fill_templates, label_ranks, zeroshot_metrics


def _grid(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random values on a 1/8 grid: float32 dot products of 16 of them are exact in any summation order,
    so block and naive scores agree bit for bit, and some exact ties occur."""
    return (np.round(rng.normal(size=shape) * 8) / 8).astype(np.float32)


# ---------------------------------------------------------------- zero-shot: hand-computed


def test_zeroshot_three_classes_by_hand():
    class_emb = np.eye(3, dtype=np.float32)  # class c = axis c
    image_emb = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]], dtype=np.float32)
    labels = np.array([0, 1, 2])  # the third image is predicted as class 0: wrong
    m = zeroshot_metrics(image_emb, class_emb, labels)
    assert m["acc1"] == pytest.approx(2 / 3)
    assert "acc5" not in m  # fewer than 5 classes
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0) / 3)


def test_zeroshot_imbalanced_mean_per_class_recall_by_hand():
    # 2 classes; class 0 has 4 samples (3 right), class 1 has 1 sample (wrong).
    class_emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    image_emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1])
    m = zeroshot_metrics(image_emb, class_emb, labels)
    assert m["acc1"] == pytest.approx(3 / 5)
    assert m["mean_per_class_recall"] == pytest.approx((3 / 4 + 0 / 1) / 2)  # 0.375, not the 0.6 accuracy


def test_zeroshot_mean_per_class_recall_ignores_classes_absent_from_labels():
    # Class 2 is never a label (only predicted): averaged over classes 0 and 1 only, as sklearn does.
    class_emb = np.eye(3, dtype=np.float32)
    image_emb = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    m = zeroshot_metrics(image_emb, class_emb, labels)
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1) / 2)


def test_zeroshot_acc5_present_with_five_classes():
    class_emb = np.eye(6, dtype=np.float32)
    # Image 0: label 5 has the lowest logit (rank 5) -> top-5 miss; image 1: label 1 ranks 2nd.
    image_emb = np.array([[6, 5, 4, 3, 2, 1], [1, 5, 6, 0, 0, 0]], dtype=np.float32)
    m = zeroshot_metrics(image_emb, class_emb, np.array([5, 1]))
    assert m["acc1"] == 0.0
    assert m["acc5"] == 0.5


def test_zeroshot_ties_rank_lower_class_first():
    class_emb = np.eye(3, dtype=np.float32)
    image_emb = np.array([[1, 1, 0], [1, 1, 0]], dtype=np.float32)  # classes 0 and 1 tie
    m = zeroshot_metrics(image_emb, class_emb, np.array([0, 1]))
    assert m["acc1"] == 0.5  # argmax / stable sort picks class 0


def test_label_ranks_matches_stable_argsort():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties
    pos = rng.integers(0, 7, size=200)
    expected = [int(np.nonzero(np.argsort(-row, kind="stable") == p)[0][0]) for row, p in zip(scores, pos, strict=True)]
    assert label_ranks(scores, pos).tolist() == expected


def test_zeroshot_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        zeroshot_metrics(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="dim"):
        zeroshot_metrics(np.eye(3, dtype=np.float32), np.eye(4, dtype=np.float32), np.array([0, 1, 2]))


# ---------------------------------------------------------------- zero-shot: reference loops


@pytest.mark.parametrize("n_classes", [3, 10])
def test_zeroshot_matches_naive_loop(n_classes):
    rng = np.random.default_rng(n_classes)
    image_emb = _grid(rng, (300, 16))
    class_emb = _grid(rng, (n_classes, 16))
    labels = rng.integers(0, n_classes, size=300)
    m = zeroshot_metrics(image_emb, class_emb, labels, chunk_rows=37)  # several chunks, a ragged last one

    top1 = top5 = 0
    preds = []
    for x, y in zip(image_emb, labels, strict=True):
        logits = class_emb @ x  # [C]
        order = np.argsort(-logits, kind="stable")
        top1 += int(y in order[:1])
        top5 += int(y in order[:5])
        preds.append(int(np.argmax(logits)))
    assert m["acc1"] == top1 / 300
    if n_classes >= 5:
        assert m["acc5"] == top5 / 300
    else:
        assert "acc5" not in m
    assert m["mean_per_class_recall"] == balanced_accuracy_score(labels, preds)


def test_class_embeddings_matches_manual_loop():
    rng = np.random.default_rng(0)
    text_emb = rng.normal(size=(4, 5, 8)).astype(np.float32)
    got = class_embeddings(text_emb)
    assert got.shape == (4, 8) and got.dtype == np.float32
    for c in range(4):
        normed = [t / np.linalg.norm(t) for t in text_emb[c].astype(np.float64)]
        mean = sum(normed) / len(normed)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_class_embeddings_ignores_template_scale():
    rng = np.random.default_rng(0)
    text_emb = rng.normal(size=(2, 3, 4))
    scaled = text_emb * np.array([1.0, 10.0, 0.1])[None, :, None]  # templates normalized before averaging
    np.testing.assert_allclose(class_embeddings(text_emb), class_embeddings(scaled), rtol=1e-6)


def test_fill_templates_is_class_major():
    prompts = fill_templates(["cat", "dog"], ["a {c}.", "a photo of a {}.", lambda c: f"art of {c}"])
    assert prompts == [
        "a cat.",
        "a photo of a cat.",
        "art of cat",
        "a dog.",
        "a photo of a dog.",
        "art of dog",
    ]
    with pytest.raises(ValueError, match="placeholder"):
        fill_templates(["cat"], ["no placeholder"])


# ---------------------------------------------------------------- retrieval


def test_retrieval_by_hand():
    image_emb = np.eye(3, dtype=np.float32)
    # Captions 0, 1 -> image 0; caption 2 -> image 1; caption 3 -> image 2.
    text_emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0.9, 0.1], [0.5, 0, 0.4]], dtype=np.float32)
    t2i = np.array([0, 0, 1, 2])
    m = retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 2, 50))
    # text->image top-1: caption 0 -> image 0 (hit), 1 -> image 1 (miss), 2 -> image 1 (hit), 3 -> image 0 (miss).
    assert m["image_retrieval_recall@1"] == 2 / 4
    assert m["image_retrieval_recall@2"] == 4 / 4
    # image->text top-1: image 0 -> caption 0 (hit); image 1 -> caption 1 (0's caption: miss); image 2 ->
    # caption 3 (hit).
    assert m["text_retrieval_recall@1"] == 2 / 3
    assert m["text_retrieval_recall@2"] == 3 / 3
    assert m["image_retrieval_recall@50"] == 1.0 and m["text_retrieval_recall@50"] == 1.0  # k clamped
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 50)}


def _naive_retrieval(image_emb, text_emb, t2i, ks):
    scores = text_emb @ image_emb.T  # [M, N]
    out = {}
    for k in ks:
        hits = [t2i[t] in np.argsort(-scores[t], kind="stable")[:k] for t in range(len(text_emb))]
        out[f"image_retrieval_recall@{k}"] = sum(hits) / len(hits)
        hits = []
        for i in range(len(image_emb)):
            captions = set(np.nonzero(t2i == i)[0].tolist())
            if not captions:  # images without captions are left out
                continue
            top = np.argsort(-scores[:, i], kind="stable")[:k]
            hits.append(bool(captions & set(top.tolist())))
        out[f"text_retrieval_recall@{k}"] = sum(hits) / len(hits)
    return out


@pytest.mark.parametrize("dim", [16, 3])  # dim 3 on the 1/8 grid: many exact ties
def test_retrieval_matches_naive_loop(dim):
    rng = np.random.default_rng(dim)
    n = 300
    counts = rng.integers(0, 6, size=n)  # 0-5 captions per image; some images have none
    t2i = rng.permutation(np.repeat(np.arange(n), counts))  # captions in random order
    image_emb = _grid(rng, (n, dim))
    text_emb = _grid(rng, (len(t2i), dim))
    ks = (1, 5, 10)
    got = retrieval_metrics(image_emb, text_emb, t2i, ks=ks, block_rows=64)  # several blocks
    assert got == _naive_retrieval(image_emb, text_emb, t2i, ks)


def test_retrieval_rejects_bad_index():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), np.array([0, 2]))
