"""open_clip's CoCa with a training forward that leaves the vocabulary projection to the caption loss.

open_clip's `CoCa.forward` projects every decoder position onto the vocabulary: logits [n, L-1, 49,408] for the
CLIP BPE, most of them at padding positions that the caption loss ignores (the quickstart's captions have 5.5
targets of 31 positions on average). That projection, its gradient and the cross-entropy over it cost about 3x
the rest of a quickstart CoCa step on a CPU (docs/learning.md#coca). In training mode this subclass returns the
decoder's output before the projection (`caption_states` [n, L-1, width]) and the projection itself
(`caption_projection` [width, vocab]); `clipkit.objectives.caption` projects only the target positions. Every
other forward (eval mode, `output_labels=False`, generation) is open_clip's. The modules, parameter names and
config are open_clip's, so a saved folder loads as `open_clip.CoCa` (`local-dir:`).
"""

from __future__ import annotations

import open_clip
import torch
from torch.utils.checkpoint import checkpoint


class CoCa(open_clip.CoCa):
    """open_clip.CoCa; in training mode with labels, the output dict holds decoder states instead of logits."""

    def forward(self, image, text=None, image_latent=None, image_embs=None, output_labels: bool = True):
        if not (self.training and output_labels and text is not None and image_latent is None):
            return super().forward(image, text, image_latent, image_embs, output_labels)
        image_latent, image_embs = self._encode_image(image)
        text_latent, token_embs = self._encode_text(text)
        out = {
            "image_features": image_latent,
            "text_features": text_latent,
            "logit_scale": self.logit_scale.exp(),
            "labels": text[:, 1:],  # the next token of each position (teacher forcing), as open_clip's
            "caption_states": decoder_states(self.text_decoder, image_embs, token_embs[:, :-1]),
            "caption_projection": self.text_decoder.text_projection,
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def decoder_states(decoder: torch.nn.Module, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
    """open_clip's `MultimodalTransformer.forward` up to its final norm (no vocabulary projection).

    Args:
        image_embs: [n, T, width] image tokens (keys and values of the cross-attention).
        text_embs: [n, L, width] text tokens; position i attends to positions <= i.

    Returns:
        [n, L, width].
    """
    seq_len = text_embs.shape[1]
    mask = decoder.attn_mask[:seq_len, :seq_len]
    for resblock, cross_attn in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        if decoder.grad_checkpointing and torch.is_grad_enabled():
            text_embs = checkpoint(resblock, text_embs, None, None, mask, use_reentrant=False)
            text_embs = checkpoint(cross_attn, text_embs, image_embs, image_embs, None, use_reentrant=False)
        else:
            text_embs = resblock(text_embs, attn_mask=mask)
            text_embs = cross_attn(text_embs, k_x=image_embs, v_x=image_embs)
    return decoder.ln_final(text_embs)
