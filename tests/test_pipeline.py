"""The training stream: determinism, weighted mixing, bad samples skipped and counted by reason."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from clipkit.data.pipeline import Source, TrainStream, decode_image, iter_eval_samples, shuffle_buffer
from clipkit.data.shards import write_shards


def png(color=(10, 20, 30), size=(4, 4), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def identity_tokenizer(texts):
    return torch.tensor([len(t) for t in texts])


def to_tensor(img):
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32)


def make_set(root, prefix, n, caption="cap {i}", extra=None):
    samples = [
        {"__key__": f"{prefix}_{i:04d}", "png": png(), "txt": caption.format(i=i), "json": {"i": i}} for i in range(n)
    ]
    samples += extra or []
    write_shards(samples, root, prefix, maxcount=25)
    return sorted(str(p) for p in root.glob(f"{prefix}-*.tar"))


def take(stream, n):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_resampled_stream_is_reproducible_and_seed_dependent(tmp_path):
    urls = make_set(tmp_path, "a", 60)

    def keys(seed):
        s = TrainStream([Source(tuple(urls))], 8, to_tensor, identity_tokenizer, seed=seed, shuffle_size=16)
        return [k for b in take(s, 5) for k in b["key"]]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)


def test_mixing_follows_weights(tmp_path):
    a = make_set(tmp_path, "a", 50)
    b = make_set(tmp_path, "b", 50)
    s = TrainStream([Source(tuple(a), 3.0), Source(tuple(b), 1.0)], 50, to_tensor, identity_tokenizer, seed=0)
    counts = Counter(k[0] for batch in take(s, 40) for k in batch["key"])
    share = counts["a"] / (counts["a"] + counts["b"])
    assert 0.72 < share < 0.78  # 2000 draws at p=0.75: the standard deviation is ~0.01


def test_batches_have_the_right_shapes(tmp_path):
    urls = make_set(tmp_path, "a", 30)
    (batch,) = take(TrainStream([Source(tuple(urls))], 7, to_tensor, identity_tokenizer), 1)
    assert batch["image"].shape == (7, 3) and batch["text"].shape == (7,) and len(batch["key"]) == 7


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    bad = [
        {"__key__": "bad_img", "png": b"\x89PNG not really", "txt": "x"},
        {"__key__": "trunc_img", "png": png(size=(64, 64))[:60], "txt": "x"},
        {"__key__": "no_txt", "png": png()},
        {"__key__": "empty_txt", "png": png(), "txt": "  \n "},
        {"__key__": "bad_utf8", "png": png(), "txt": b"\xff\xfe\xfa"},
        {"__key__": "no_img", "txt": "only text"},
    ]
    urls = make_set(tmp_path, "a", 10, extra=bad)
    s = TrainStream([Source(tuple(urls))], 4, to_tensor, identity_tokenizer, resampled=False, shuffle_size=0)
    seen, skipped = [], Counter()
    for batch in s:
        seen += batch["key"]
        skipped.update(batch["skipped"])
    assert all(k.startswith("a_") for k in seen)
    # Counts arrive with the batches; the last partial batch is never yielded, so count the leftovers directly.
    stats = Counter()
    good = list(iter_eval_samples(urls, stats))
    assert len(good) == 10
    assert stats == Counter(bad_image=2, no_caption=2, bad_text=1, no_image=1)
    assert sum(skipped.values()) >= 4  # what was skipped before the two full batches were complete


def test_truncated_tar_is_counted_not_fatal(tmp_path):
    urls = make_set(tmp_path, "a", 50)  # 2 shards of 25
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 3])
    stats = Counter()
    good = list(iter_eval_samples(urls, stats))
    assert 25 <= len(good) < 50 and stats["bad_shard"] == 1


def test_transparent_images_are_composited_on_white():
    img = decode_image({"png": png((0, 0, 0, 0), mode="RGBA")})
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_absurd_image_size_is_skipped(tmp_path):
    from clipkit.data import pipeline

    big = {"__key__": "big", "png": png(size=(300, 300)), "txt": "x"}
    old = pipeline.MAX_IMAGE_PIXELS
    pipeline.MAX_IMAGE_PIXELS = 200 * 200
    try:
        stats = Counter()
        urls = make_set(tmp_path, "a", 0, extra=[big])
        assert list(iter_eval_samples(urls, stats)) == [] and stats["image_too_large"] == 1
    finally:
        pipeline.MAX_IMAGE_PIXELS = old


def test_shuffle_buffer_is_a_permutation():
    import random

    out = list(shuffle_buffer(iter(range(100)), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


def test_epoch_mode_with_too_few_samples_is_a_clear_error(tmp_path):
    urls = make_set(tmp_path, "a", 5)
    s = TrainStream([Source(tuple(urls))], 8, to_tensor, identity_tokenizer, resampled=False)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(iter(s))


def test_eval_samples_keep_json_and_all_captions(tmp_path):
    urls = make_set(tmp_path, "a", 3, caption="first {i}\nsecond {i}")
    rows = list(iter_eval_samples(urls))
    assert rows[1]["captions"] == ["first 1", "second 1"] and rows[1]["json"] == {"i": 1}
    assert json.dumps(rows[0]["json"])


def test_epoch_mode_reshuffles_shards_each_epoch_and_covers_the_data(tmp_path):
    from clipkit.train import positioned_batches

    urls = []
    for p in "abcdef":
        urls += make_set(tmp_path, p, 10)
    s = TrainStream([Source(tuple(urls))], 5, to_tensor, identity_tokenizer, resampled=False, shuffle_size=0)
    batches = positioned_batches(s, iter_loader(s), epoch_len=12)
    first = [k for _ in range(12) for k in next(batches)[0]["key"]]
    second = [k for _ in range(12) for k in next(batches)[0]["key"]]
    everything = sorted(f"{p}_{i:04d}" for p in "abcdef" for i in range(10))
    assert sorted(first) == everything and sorted(second) == everything
    assert first != second and s.epoch.value == 1


def iter_loader(stream):
    from clipkit.data.pipeline import train_loader

    return train_loader(stream, workers=0)


def test_positioned_batches_resume_mid_epoch_equals_uninterrupted(tmp_path):
    """Re-entering at (epoch, consumed) yields exactly the batches an uninterrupted iteration yields from there."""
    from clipkit.train import positioned_batches

    urls = []
    for p in "abcd":
        urls += make_set(tmp_path, p, 10)
    s = TrainStream([Source(tuple(urls))], 4, to_tensor, identity_tokenizer, seed=5, shuffle_size=8)
    straight = positioned_batches(s, iter_loader(s), epoch_len=5)
    reference = [next(straight) for _ in range(12)]  # crosses two segment boundaries
    resumed = positioned_batches(s, iter_loader(s), epoch_len=5, epoch=1, consumed=2)
    again = [next(resumed) for _ in range(5)]
    assert [b["key"] for b, _ in again] == [b["key"] for b, _ in reference[7:12]]
    assert [pos for _, pos in again] == [pos for _, pos in reference[7:12]] == [(1, 3), (1, 4), (1, 5), (2, 1), (2, 2)]
