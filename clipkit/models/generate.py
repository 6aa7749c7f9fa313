"""Captions from a CoCa's text decoder: greedy, beam search, top-k and top-p sampling.

open_clip's `CoCa.generate` is built on transformers' `BeamSearchScorer` and logits warpers. transformers 5 removed
`BeamSearchScorer`, so open_clip 3.3 imports none of them and its `generate` refuses to run. This module decodes
with the model's own forward (`CoCa.forward(image, text, image_latent=, image_embs=, output_labels=False)`, as
`CoCa.generate` calls it), the image encoded once.

Conventions: a sequence starts with the start token; the end token stops it; the pad token (0 in the CLIP BPE, the
"!" token too) is never generated, since training ignores it as a target. `max_length` counts every token, the
start and end tokens included (at most the text tower's context length); `min_length` counts the tokens
generated before the end token may come. Beam search keeps `num_beams` hypotheses, scores a finished one by its
summed log-probability / (generated tokens, end included) ** length_penalty, and stops an image when it has
`num_beams` finished ones that no running beam beats at its current length (transformers' default stopping rule).

Cost: each new token re-runs the text tower and the decoder over the whole prefix (no key/value cache):
O(max_length^2) token positions per caption, small at captioning lengths (<= 77 tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Method = Literal["greedy", "beam", "top_k", "top_p"]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids that frame a caption: start, end and padding."""

    sot: int
    eot: int
    pad: int


def special_tokens(tokenizer) -> SpecialTokens:
    """The start, end and pad ids of open_clip's CLIP BPE (49406, 49407, 0) or of an HF tokenizer."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None:
        return SpecialTokens(tokenizer.sot_token_id, tokenizer.eot_token_id, 0)
    sot = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
    eot = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    return SpecialTokens(sot, eot, hf.pad_token_id if hf.pad_token_id is not None else 0)


def decode(tokenizer, ids: list[int], special: SpecialTokens) -> str:
    """Caption text of generated token ids (start, end and pad ids dropped)."""
    ids = [i for i in ids if i not in (special.sot, special.eot, special.pad)]
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:
        return " ".join(hf.decode(ids, skip_special_tokens=True).split())
    # The CLIP BPE ends every word with a space, punctuation included: "ankle boot ." -> "ankle boot."
    return re.sub(r" ([.,:;!?])", r"\1", " ".join(tokenizer.decode(ids).split()))


def max_caption_length(model: torch.nn.Module) -> int:
    """The longest sequence the decoder and the text tower take (start and end tokens included)."""
    return min(model.context_length, model.text.context_length)


def is_captioner(model: torch.nn.Module) -> bool:
    return hasattr(model, "text_decoder")


def _next_logits(model, images, tokens, latent, embs) -> torch.Tensor:
    """[b, vocab] logits (float32 at least) of the token after `tokens` [b, t]."""
    logits = model(images, tokens, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _constrain(logits: torch.Tensor, special: SpecialTokens, generated: int, min_length: int, last: bool) -> None:
    """In place: never the pad token; no end token before `min_length` tokens; only the end token at the last slot."""
    logits[:, special.pad] = float("-inf")
    if generated < min_length:
        logits[:, special.eot] = float("-inf")
    if last:
        eot = logits[:, special.eot].clone()
        logits.fill_(float("-inf"))
        logits[:, special.eot] = torch.where(torch.isinf(eot), torch.zeros_like(eot), eot)


def _filter(logits: torch.Tensor, method: Method, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top k, or outside the smallest set with probability >= top_p, set to -inf."""
    if method == "top_k":
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p  # keep a token while the mass before it is < top_p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    images: torch.Tensor,
    special: SpecialTokens,
    method: Method = "greedy",
    max_length: int | None = None,
    min_length: int = 1,
    top_k: int = 50,
    top_p: float = 0.9,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy decoding or top-k / top-p sampling, the batch decoded together.

    Args:
        images: [B, 3, H, W] (the model's eval transform).
        method: "greedy" (argmax), "top_k" or "top_p" (sampling from the filtered softmax(logits / temperature)).
        generator: the sampling RNG (a seeded one gives the same captions again).

    Returns:
        B lists of generated token ids, the start token excluded, the end token included when it came.
    """
    max_length = min(max_length or max_caption_length(model), max_caption_length(model))
    b = images.shape[0]
    latent, embs = model._encode_image(images)
    out = torch.full((b, 1), special.sot, dtype=torch.long, device=images.device)
    done = torch.zeros(b, dtype=torch.bool, device=images.device)
    for length in range(1, max_length):
        logits = _next_logits(model, images, out, latent, embs)
        _constrain(logits, special, length - 1, min_length, last=length == max_length - 1)
        if method == "greedy":
            nxt = logits.argmax(dim=-1)
        else:
            probs = _filter(logits / temperature, method, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, special.pad), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == special.eot
        if done.all():
            break
    return [[t for t in row[1:].tolist() if t != special.pad] for row in out]


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    images: torch.Tensor,
    special: SpecialTokens,
    num_beams: int = 4,
    max_length: int | None = None,
    min_length: int = 1,
    length_penalty: float = 1.0,
) -> list[tuple[list[int], float]]:
    """Beam search per image (B*num_beams rows decoded together).

    Returns:
        Per image (generated ids with the end token, summed log-probability of those ids).
    """
    max_length = min(max_length or max_caption_length(model), max_caption_length(model))
    b, k = images.shape[0], num_beams
    images = images.repeat_interleave(k, dim=0)  # [B*K, 3, H, W], row b*K + j is beam j of image b
    latent, embs = model._encode_image(images)
    seqs = torch.full((b * k, 1), special.sot, dtype=torch.long, device=images.device)
    scores = torch.full((b, k), float("-inf"), dtype=torch.float64, device=images.device)
    scores[:, 0] = 0.0  # all beams start equal: only the first may expand, or the K beams would be copies
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(b)]  # (normalized, sum, ids)
    done = [False] * b
    for length in range(1, max_length):
        logp = F.log_softmax(_next_logits(model, images, seqs, latent, embs), dim=-1)
        _constrain(logp, special, length - 1, min_length, last=length == max_length - 1)
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp.double()).view(b, k * vocab)
        top, idx = cand.topk(2 * k, dim=1)  # [B, 2K]: enough to keep K beams that did not end
        rows, toks, new_scores = [], [], []
        for i in range(b):
            kept = []
            if not done[i]:
                for rank, (s, j) in enumerate(zip(top[i].tolist(), idx[i].tolist(), strict=True)):
                    if s == float("-inf") or len(kept) == k:
                        break
                    beam, tok = divmod(j, vocab)
                    if tok == special.eot:
                        if rank < k:  # an ending outside the top K would not have been a beam
                            ids = seqs[i * k + beam, 1:].tolist() + [tok]
                            finished[i].append((s / length**length_penalty, s, ids))
                        continue
                    kept.append((i * k + beam, tok, s))
                finished[i] = sorted(finished[i], key=lambda h: -h[0])[:k]
                best_running = kept[0][2] / length**length_penalty if kept else float("-inf")
                done[i] = not kept or (len(finished[i]) == k and finished[i][-1][0] >= best_running)
            kept += [(i * k, special.pad, float("-inf"))] * (k - len(kept))  # a done image keeps dead rows
            rows += [r for r, _, _ in kept]
            toks += [t for _, t, _ in kept]
            new_scores += [s for _, _, s in kept]
        seqs = torch.cat([seqs[rows], torch.tensor(toks, device=seqs.device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, dtype=torch.float64, device=seqs.device).view(b, k)
        if all(done):
            break
    return [(best[2], best[1]) for best in (max(f, key=lambda h: h[0]) for f in finished)]


def generate(
    model: torch.nn.Module,
    images: torch.Tensor,
    special: SpecialTokens,
    method: Method = "beam",
    max_length: int | None = None,
    num_beams: int = 4,
    generator: torch.Generator | None = None,
    **kwargs,
) -> list[list[int]]:
    """Generated token ids per image by `method` (beam: `beam_search`; greedy, top_k, top_p: `sample`).

    Raises:
        ValueError: the model has no text decoder (not a CoCa).
    """
    if not is_captioner(model):
        raise ValueError("this model has no text decoder: captions need a CoCa model (a config with multimodal_cfg)")
    was_training = model.training
    model.eval()
    try:
        if method == "beam":
            return [ids for ids, _ in beam_search(model, images, special, num_beams, max_length, **kwargs)]
        return sample(model, images, special, method, max_length, generator=generator, **kwargs)
    finally:
        model.train(was_training)
