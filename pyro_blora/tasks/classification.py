"""Task adapter for networks with a classification head (encoders such as MiniLM).

The network already outputs class logits (``AutoModelForSequenceClassification``),
so the adapter only tokenises: ``class_logits`` is ``model(**inputs).logits``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from pyro_blora.tasks.base import model_inputs, on_model_device
from pyro_blora.tasks.records import example_label

__all__ = ["SequenceClassificationTask"]


class SequenceClassificationTask:
    """Tokenise ``{"text": str, "label": int}`` examples for a sequence classifier.

    ``text_pair_key`` names a second text (a passage, a hypothesis) encoded as the
    tokenizer's sentence pair. Texts are cut at ``max_length`` tokens (for pairs,
    the longer text is cut first). ``num_classes=None`` takes the class count from
    the first logits seen; pass it when the training loop needs it up front.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 128,
        text_key: str = "text",
        text_pair_key: str | None = None,
        num_classes: int | None = None,
    ):
        if tokenizer.pad_token is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_key = text_key
        self.text_pair_key = text_pair_key
        self.num_classes = num_classes

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        missing = [k for k in (self.text_key, self.text_pair_key) if k is not None and k not in examples[0]]
        if missing:
            raise ValueError(f"examples lack {missing}; they have {sorted(examples[0])}")
        texts = [str(e[self.text_key]) for e in examples]
        pairs = [str(e[self.text_pair_key]) for e in examples] if self.text_pair_key else None
        encoded = self.tokenizer(
            texts,
            pairs,
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in encoded.items()}
        # "labels" (the transformers name) is accepted too; the check names an example that has neither
        batch["labels"] = torch.tensor([
            int(e["labels"]) if "label" not in e and "labels" in e else example_label(e, i)
            for i, e in enumerate(examples)
        ])
        if self.num_classes is not None and bool((batch["labels"] >= self.num_classes).any()):
            raise ValueError(f"labels {batch['labels'].tolist()} exceed num_classes={self.num_classes}")
        return batch

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        output = model(**model_inputs(on_model_device(model, batch)))
        logits = getattr(output, "logits", output)
        if self.num_classes is None:
            self.num_classes = int(logits.shape[-1])
        elif logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the model outputs {logits.shape[-1]} classes but the task has num_classes={self.num_classes}"
            )
        return logits
