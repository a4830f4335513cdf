"""Language modelling with a causal LM: token-level NLL and perplexity.

Not a classification task: it serves the paper's WikiText-style experiment,
where a Bayesian-LoRA model is judged by the perplexity of held-out text.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_blora.tasks.causal_lm import _encode, _pad_id, _prefix_id

__all__ = ["LanguageModelingTask"]


class LanguageModelingTask:
    """Token-level negative log-likelihood and perplexity of a causal LM.

    Not a classification :class:`~pyro_blora.tasks.base.Task` (it has no class
    logits): use it to measure how fine-tuning moves a model's perplexity on
    held-out text (a WikiText-style check). ``collate`` gives transformers-style
    batches (``labels`` = ``input_ids`` with ``-100`` on padding), so
    ``model(**batch).loss`` also works.
    """

    def __init__(self, tokenizer: Any, max_length: int = 1024, text_key: str = "text"):
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_key = text_key
        self.pad_id = _pad_id(tokenizer)

    def _batch(self, rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        # right padding: positions are then plain 0..n-1 for every row
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        target = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            target[i, : len(label)] = torch.tensor(label, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": target}

    def collate(self, examples: Sequence[Mapping[str, Any] | str]) -> dict[str, Tensor]:
        """Tokenise texts (cut at ``max_length`` tokens) into a right-padded batch."""
        texts = [e if isinstance(e, str) else e[self.text_key] for e in examples]
        rows = [_encode(self.tokenizer, text)[: self.max_length] for text in texts]
        return self._batch(rows, rows)

    def token_nll(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """``(B, L - 1)`` NLL of token ``t + 1`` given tokens ``<= t``, in nats; ``0``
        where ``batch["labels"][:, 1:] == -100`` (padding, context-only tokens)."""
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = getattr(output, "logits", output)[:, :-1].float()
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")

    def windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Split one document into ``(input_ids, labels)`` windows of ``max_length``
        tokens that predict every token once: the document starts after the
        tokenizer's BOS (else EOS) token, as harness's ``loglikelihood_rolling``, and
        each later window is conditioned on the previous window's last token."""
        tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        sequence = [_prefix_id(self.tokenizer)] + tokens
        out = []
        for start in range(0, max(len(sequence) - 1, 0), self.max_length - 1):
            row = sequence[start : start + self.max_length]
            out.append((row, [-100] + row[1:]))
        return out

    @torch.no_grad()
    def perplexity(self, model: nn.Module, texts: Sequence[str], batch_size: int = 8) -> float:
        """Token-level perplexity ``exp(sum NLL / number of tokens)`` over ``texts``,
        each scored as its own document (so it depends on the tokenizer; harness's
        ``word_perplexity`` / ``bits_per_byte`` normalise by words / bytes instead)."""
        windows = [w for text in texts for w in self.windows(text)]
        if not windows:
            raise ValueError("no tokens to score")
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self._batch([r for r, _ in chunk], [l for _, l in chunk]).items()}
            total += float(self.token_nll(model, batch).sum())
            count += int((batch["labels"][:, 1:] != -100).sum())
        return math.exp(total / count)
