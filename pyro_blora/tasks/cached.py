"""Train only the top blocks of a decoder on cached activations of the frozen bottom.

When adapters sit only in the top ``k`` transformer blocks (and the LM head),
the bottom blocks compute the same activations in every epoch and for every
posterior sample. :func:`split_decoder` cuts a Llama-architecture causal LM into
a ``bottom`` (embeddings and the first blocks, no final norm) and a ``top``
(the remaining blocks, final norm and LM head) that share the original modules;
:class:`CachedPrefixTask` (answer tokens) and :class:`CachedChoiceTask` (choice
likelihood, one cached sequence per choice) run ``bottom`` once per example and
feed the cached hidden states to ``top`` through its public ``inputs_embeds``
argument. The
result is exactly the full model's output (tested), at the cost of the top
blocks per step.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .base import on_model_device
from .causal_lm import AnswerTokenTask, ChoiceLikelihoodTask
from .scoring import continuation_scores

__all__ = ["split_decoder", "CachedPrefixTask", "CachedChoiceTask", "cached_task"]


def split_decoder(model: nn.Module, trainable_layers: int) -> tuple[nn.Module, nn.Module]:
    """Split a ``*ForCausalLM`` with ``model.model.layers`` into ``(bottom, top)`` sharing modules.

    ``bottom(input_ids, attention_mask, position_ids).last_hidden_state`` is the
    input of block ``L - trainable_layers``; ``top(inputs_embeds=that, ...)``
    finishes the forward pass. Adapt ``top`` only.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise TypeError(
            f"split_decoder needs a Llama-style causal LM (model.model.layers, model.lm_head); got {type(model).__name__}"
        )
    total = len(layers)
    if not 1 <= trainable_layers <= total:
        raise ValueError(f"trainable_layers must be in [1, {total}], got {trainable_layers}")
    cut = total - trainable_layers

    bottom_config = copy.deepcopy(model.config)
    bottom_config.num_hidden_layers = max(cut, 1)
    top_config = copy.deepcopy(model.config)
    top_config.num_hidden_layers = trainable_layers
    with torch.device("meta"):
        bottom = type(inner)(bottom_config)
        top = type(model)(top_config)
    bottom.embed_tokens = inner.embed_tokens
    bottom.layers = nn.ModuleList(list(layers[:cut]))
    bottom.norm = nn.Identity()
    bottom.rotary_emb = inner.rotary_emb
    top.model.embed_tokens = inner.embed_tokens
    top.model.layers = nn.ModuleList(list(layers[cut:]))
    top.model.norm = inner.norm
    top.model.rotary_emb = inner.rotary_emb
    top.lm_head = model.lm_head
    for part in (bottom, top):
        part.config.use_cache = False
        part.eval()
    return bottom, top


class CachedPrefixTask:
    """An :class:`AnswerTokenTask` whose examples carry the bottom's hidden states.

    Args:
        inner: the answer-token task that renders and tokenises prompts.
        bottom: the frozen lower part from :func:`split_decoder`.
        batch_size: examples per forward when caching.
    """

    def __init__(self, inner: AnswerTokenTask, bottom: nn.Module, batch_size: int = 16):
        self.inner = inner
        self.bottom = bottom
        self.batch_size = batch_size
        self.num_classes = inner.num_classes

    @torch.no_grad()
    def cache(self, examples: Sequence[Mapping[str, Any]], desc: str = "caching") -> list[dict[str, Tensor]]:
        """Run the bottom once over ``examples``; return compact per-example tensors (no padding)."""
        out: list[dict[str, Tensor]] = []
        starts = range(0, len(examples), self.batch_size)
        for start in tqdm(starts, desc=desc, leave=False):
            batch = on_model_device(self.bottom, self.inner.collate(examples[start : start + self.batch_size]))
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            hidden = self.bottom(**inputs).last_hidden_state
            for row in range(hidden.shape[0]):
                keep = batch["attention_mask"][row].bool()
                item = {
                    "hidden": hidden[row, keep].clone(),
                    "labels": batch["labels"][row],
                    "class_mask": batch["class_mask"][row],
                }
                if "position_ids" in batch:
                    item["position_ids"] = batch["position_ids"][row, keep]
                out.append(item)
        return out

    def collate(self, examples: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if "hidden" not in examples[0]:
            raise ValueError("CachedPrefixTask collates cached examples: call task.cache(examples) first")
        length = max(e["hidden"].shape[0] for e in examples)
        width = examples[0]["hidden"].shape[-1]
        hidden = examples[0]["hidden"].new_zeros(len(examples), length, width)
        mask = torch.zeros(len(examples), length, dtype=torch.long)
        positions = torch.zeros(len(examples), length, dtype=torch.long)
        for row, example in enumerate(examples):
            n = example["hidden"].shape[0]
            hidden[row, length - n :] = example["hidden"]  # left padding: position -1 predicts
            mask[row, length - n :] = 1
            if "position_ids" in example:
                positions[row, length - n :] = example["position_ids"]
            else:
                positions[row, length - n :] = torch.arange(n)
        return {
            "inputs_embeds": hidden,
            "attention_mask": mask,
            "position_ids": positions,
            "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples]),
            "class_mask": torch.stack([e["class_mask"] for e in examples]),
        }

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        batch = on_model_device(model, batch)
        output = model(
            inputs_embeds=batch["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=1,
        )
        last = output.logits[:, -1]
        index = torch.tensor(self.inner.answer_ids, device=last.device)
        logits = last.index_select(-1, index).float()
        mask = batch.get("class_mask")
        if mask is not None and not bool(mask.all()):
            logits = logits.masked_fill(~mask.bool(), torch.finfo(logits.dtype).min / 2)
        return logits


class CachedChoiceTask:
    """A :class:`ChoiceLikelihoodTask` whose examples carry the bottom's hidden states, one sequence per choice.

    Scores are those of the inner task (same tokenisation, truncation and
    normalisation; tested equal to the uncached task on the full model), computed
    by the top blocks only.

    Args:
        inner: the choice-likelihood task that renders and tokenises the choices.
        bottom: the frozen lower part from :func:`split_decoder`.
        batch_size: examples per forward when caching (each has ``C`` rows).
    """

    def __init__(self, inner: ChoiceLikelihoodTask, bottom: nn.Module, batch_size: int = 8):
        if inner.num_classes is None:
            raise ValueError("CachedChoiceTask needs an inner ChoiceLikelihoodTask with a fixed num_classes")
        self.inner = inner
        self.bottom = bottom
        self.batch_size = batch_size
        self.num_classes = inner.num_classes

    @torch.no_grad()
    def cache(self, examples: Sequence[Mapping[str, Any]], desc: str = "caching") -> list[dict[str, Any]]:
        """Run the bottom once over every choice of ``examples``; compact per-example records (no padding)."""
        out: list[dict[str, Any]] = []
        for start in tqdm(range(0, len(examples), self.batch_size), desc=desc, leave=False):
            batch = on_model_device(self.bottom, self.inner.collate(examples[start : start + self.batch_size]))
            B, C, L = batch["input_ids"].shape
            flat = {k: batch[k].reshape(B * C, L) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            valid = batch["choice_mask"].reshape(-1).bool()
            hidden = self.bottom(**{k: v[valid] for k, v in flat.items()}).last_hidden_state
            span = batch["continuation_mask"].reshape(B * C, L)[valid].sum(-1)
            rows = valid.nonzero().squeeze(-1).tolist()
            for b in range(B):
                choices = []
                for i, row in enumerate(rows):
                    if row // C != b:
                        continue
                    keep = flat["attention_mask"][row].bool()
                    choice = {"hidden": hidden[i, keep].clone(), "input_ids": flat["input_ids"][row, keep], "span": span[i]}
                    if "position_ids" in flat:
                        choice["position_ids"] = flat["position_ids"][row, keep]
                    choices.append(choice)
                out.append({"choices": choices, "labels": batch["labels"][b], "choice_mask": batch["choice_mask"][b],
                            "norm_length": batch["norm_length"][b]})
        return out

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if "choices" not in examples[0] or not isinstance(examples[0]["choices"][0], Mapping):
            raise ValueError("CachedChoiceTask collates cached examples: call task.cache(examples) first")
        B, C = len(examples), self.num_classes
        L = max(c["hidden"].shape[0] for e in examples for c in e["choices"])
        first = examples[0]["choices"][0]["hidden"]
        hidden = first.new_zeros(B, C, L, first.shape[-1])
        ids = torch.full((B, C, L), self.inner.pad_id, dtype=torch.long)
        mask = torch.zeros(B, C, L, dtype=torch.long)
        positions = torch.zeros(B, C, L, dtype=torch.long)
        continuation = torch.zeros(B, C, L, dtype=torch.bool)
        for b, example in enumerate(examples):
            for c, choice in enumerate(example["choices"]):  # valid choices come first, as the inner task orders them
                n = choice["hidden"].shape[0]
                hidden[b, c, L - n :] = choice["hidden"]
                ids[b, c, L - n :] = choice["input_ids"].cpu()
                mask[b, c, L - n :] = 1
                positions[b, c, L - n :] = choice["position_ids"].cpu() if "position_ids" in choice else torch.arange(n)
                continuation[b, c, L - int(choice["span"]) :] = True
        return {
            "inputs_embeds": hidden, "input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "continuation_mask": continuation,
            "choice_mask": torch.stack([torch.as_tensor(e["choice_mask"]).cpu() for e in examples]),
            "norm_length": torch.stack([torch.as_tensor(e["norm_length"]).cpu() for e in examples]),
            "labels": torch.stack([torch.as_tensor(e["labels"]).cpu() for e in examples]),
        }

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        batch = on_model_device(model, batch)
        B, C, L = batch["input_ids"].shape
        valid = batch["choice_mask"].reshape(-1).bool()
        ids = batch["input_ids"].reshape(B * C, L)[valid]
        continuation = batch["continuation_mask"].reshape(B * C, L)[valid]
        hidden = model.model(
            inputs_embeds=batch["inputs_embeds"].reshape(B * C, L, -1)[valid],
            attention_mask=batch["attention_mask"].reshape(B * C, L)[valid],
            position_ids=batch["position_ids"].reshape(B * C, L)[valid],
        ).last_hidden_state
        norm = batch["norm_length"] if self.inner.normalize else None
        return continuation_scores(hidden, model.lm_head, ids, continuation, valid, (B, C), norm)


def cached_task(task: Any, bottom: nn.Module) -> Any:
    """The cached counterpart of an answer-token or choice-likelihood ``task``."""
    if isinstance(task, AnswerTokenTask):
        return CachedPrefixTask(task, bottom)
    if isinstance(task, ChoiceLikelihoodTask):
        return CachedChoiceTask(task, bottom)
    raise TypeError(f"no cached form of {type(task).__name__}; use AnswerTokenTask or ChoiceLikelihoodTask")
