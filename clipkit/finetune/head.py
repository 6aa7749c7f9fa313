"""The zero-shot classification head (class names x templates) and the image classifier built on it.

The head is WiSE-FT's zero-shot initialization: per class, the normalized mean of the normalized template embeddings
(`clipkit.evaluate.zeroshot.class_embeddings`, the same prompt ensembling as zero-shot evaluation), times the model's
logit scale, as a linear layer over normalized image features with a zero bias. Its logits rank classes exactly as
`clipkit eval zeroshot` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipkit.evaluate.embed import encode_texts
from clipkit.evaluate.zeroshot import class_embeddings, fill_templates
from clipkit.files import atomic_path

HEAD_NAME = "classifier.safetensors"  # beside open_clip's files in a model folder; open_clip ignores it


def class_text_embeddings(
    model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], device
) -> torch.Tensor:
    """[C, D] float32 prompt-ensembled class embeddings of the model's current text tower (no gradient)."""
    was_training = model.training
    model.eval()
    text = encode_texts(model, tokenizer, fill_templates(classnames, templates), 256, device)  # [C*T, D]
    model.train(was_training)
    return torch.from_numpy(class_embeddings(text.reshape(len(classnames), len(templates), -1))).to(device)


def zeroshot_head(
    model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], device
) -> torch.nn.Linear:
    """A Linear(D, C) with weight = logit_scale * class embeddings and zero bias."""
    emb = class_text_embeddings(model, tokenizer, classnames, templates, device)  # [C, D]
    head = torch.nn.Linear(emb.shape[1], emb.shape[0]).to(device)
    with torch.no_grad():
        head.weight.copy_(model.logit_scale.detach().exp() * emb)
        head.bias.zero_()
    return head


class ImageClassifier(torch.nn.Module):
    """logits [B, C] = head(normalize(encode_image(images))): the dual encoder's image tower plus a linear head."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.model.encode_image(images), dim=-1))


def save_head(folder, head: torch.nn.Linear) -> None:
    """Writes the head as `<folder>/classifier.safetensors` ({"weight": [C, D], "bias": [C]})."""
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    with atomic_path(folder / HEAD_NAME) as tmp:
        save_file(state, str(tmp))


def load_head(folder) -> torch.nn.Linear:
    """The head saved by `save_head`."""
    state = load_file(str(folder / HEAD_NAME))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head
