"""Task adapters that read class logits off a causal language model.

Examples are plain dicts (see :mod:`pyro_blora.tasks.datasets`): multiple choice
``{"question", "choices", "choice_labels", "label"[, "context"]}`` or
classification ``{"text", "label"}``.

* :class:`AnswerTokenTask` puts question and lettered choices in one prompt and
  scores each class by the next-token logit of its answer word (" A", " True",
  " positive"): one forward per example, as in Laplace-LoRA / Bayesian-LoRA.
* :class:`ChoiceLikelihoodTask` scores each choice by the log-likelihood of its
  text after the prompt, as lm-evaluation-harness's ``acc`` / ``acc_norm``.

Token NLL and perplexity live in :mod:`pyro_blora.tasks.language_modeling`.

Records with fewer choices than ``num_classes`` (ARC mixes 3, 4 and 5) get
:data:`~pyro_blora.tasks.scoring.MASKED_LOGIT` for the missing classes.
"""

from __future__ import annotations

import inspect
import logging
import string
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from pyro_blora.tasks.base import model_inputs, on_model_device
from pyro_blora.tasks.records import example_label, example_name
from pyro_blora.tasks.scoring import MASKED_LOGIT, choice_scores

__all__ = [
    "MC_TEMPLATE",
    "MC_CONTEXT_TEMPLATE",
    "CLASSIFICATION_TEMPLATE",
    "MASKED_LOGIT",
    "AnswerTokenTask",
    "ChoiceLikelihoodTask",
]

logger = logging.getLogger(__name__)

# Laplace-LoRA's (Yang et al., 2024) multiple-choice prompt; {choices} is "A. x B. y ..."
MC_TEMPLATE = "Select one of the choices that answers the following question: {question} Choices: {choices} Answer:"
MC_CONTEXT_TEMPLATE = (
    "Select one of the choices that answers the following question: {question} Context: {context} "
    "Choices: {choices} Answer:"
)
CLASSIFICATION_TEMPLATE = "Text: {text}\nAnswer:"
_TRUNCATE_FIRST = ("context", "text", "question")  # longest free text first
_NOT_MODEL_INPUTS = ("labels", "class_mask", "continuation_mask", "choice_mask", "norm_length")


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        logger.info("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad to one length; positions count real tokens only, so a padded row
    sees the same positions as alone (matters for absolute position embeddings)."""
    length = max(max(len(r) for r in rows), 1)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _render(template: str, fields: Mapping[str, Any]) -> str:
    try:
        return template.format_map(fields)
    except KeyError as error:
        raise ValueError(
            f"template field {{{error.args[0]}}} is not in the example (fields: {sorted(fields)}); "
            "change the template or add the field"
        ) from None


def _example_fields(example: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar fields of ``example`` a template can name, with ``context`` defaulting to ''."""
    return {"context": "", **{k: v for k, v in example.items() if isinstance(v, (str, int, float))}}


def _prefix_id(tokenizer: Any) -> int:
    """The token a text with no context is conditioned on: BOS, else EOS (harness's prefix token)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model(...)`` takes ``logits_to_keep`` (transformers >= 4.50), directly
    or through a ``**kwargs`` wrapper around a module that does."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    return any("logits_to_keep" in inspect.signature(m.forward).parameters for m in model.modules() if m is not model)


def _lm_logits(model: nn.Module, inputs: Mapping[str, Tensor], keep: int) -> Tensor:
    """Next-token logits of the last ``keep`` positions, ``(N, keep, V)``; asks the
    model to skip the LM head elsewhere (``logits_to_keep``) when it can, which
    saves an ``(N, L, vocab)`` tensor."""
    kwargs = dict(inputs)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    output = model(**kwargs)
    return getattr(output, "logits", output)[:, -keep:]


def _mask_missing(logits: Tensor, class_mask: Tensor | None) -> Tensor:
    if class_mask is None or bool(class_mask.all()):
        return logits
    return logits.masked_fill(~class_mask.bool(), MASKED_LOGIT)


class AnswerTokenTask:
    """Class logits = next-token logits of the answer words after the prompt.

    ``answer_words[i]`` is class ``i``; for multiple choice the ``i``-th choice is
    shown under ``answer_words[i].strip()`` (so the letters always match the scored
    tokens, whatever the record's own ``choice_labels``). The template is
    ``str.format``-ed with the example's fields plus ``{choices}`` (the rendered
    choice list) and ``{context}`` (empty when absent); ``None`` picks
    :data:`MC_TEMPLATE` / :data:`MC_CONTEXT_TEMPLATE` / :data:`CLASSIFICATION_TEMPLATE`
    by the example's fields. Prompts are left padded, so position ``-1`` is the
    prediction position of every row. Prompts over ``max_length`` tokens lose the
    start of their free text (context, then text, then question), never the
    template's tail, so "Answer:" survives.
    """

    def __init__(
        self,
        tokenizer: Any,
        answer_words: Sequence[str] = (" A", " B", " C", " D"),
        template: str | None = None,
        max_length: int = 512,
        choice_format: str = "{label}. {choice}",
        choice_separator: str = " ",
        position_ids: bool = True,
    ):
        self.tokenizer = tokenizer
        self.answer_words = list(answer_words)
        self.answer_ids = [self._single_token(word) for word in self.answer_words]
        if len(set(self.answer_ids)) != len(self.answer_ids):
            raise ValueError(f"answer words {self.answer_words} map to repeated token ids {self.answer_ids}")
        self.num_classes = len(self.answer_words)
        self.template = template
        self.max_length = max_length
        self.choice_format = choice_format
        self.choice_separator = choice_separator
        self.position_ids = position_ids
        self.pad_id = _pad_id(tokenizer)
        self._warned_truncation = False

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            hint = "add a leading space (' word'), " if not word.startswith(" ") else ""
            raise ValueError(
                f"answer word {word!r} is not a single token: the tokenizer splits it into {pieces} (ids {ids}); "
                f"{hint}or pick another word that is one token"
            )
        return int(ids[0])

    def prompt_fields(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a template can use for ``example``."""
        fields = _example_fields(example)
        if "choices" in example:
            choices = list(example["choices"])
            if len(choices) > self.num_classes:
                raise ValueError(f"an example has {len(choices)} choices but there are {self.num_classes} answer words")
            fields["choices"] = self.choice_separator.join(
                self.choice_format.format(label=word.strip(), choice=text, text=text)
                for word, text in zip(self.answer_words, choices)
            )
        return fields

    def prompt(self, example: Mapping[str, Any]) -> list[int]:
        """Token ids of ``example``'s prompt, at most ``max_length`` long."""
        fields = self.prompt_fields(example)
        template = self.template
        if template is None:
            if "choices" in example:
                template = MC_CONTEXT_TEMPLATE if fields["context"] else MC_TEMPLATE
            else:
                template = CLASSIFICATION_TEMPLATE
        ids = _encode(self.tokenizer, _render(template, fields))
        if len(ids) <= self.max_length:
            return ids
        if not self._warned_truncation:
            logger.info("prompts over max_length=%d tokens are cut from the left of their free text", self.max_length)
            self._warned_truncation = True
        used = _template_fields(template)
        for key in (k for k in _TRUNCATE_FIRST if k in used and isinstance(fields.get(k), str)):
            # re-tokenising the joined prompt can merge tokens at the cut, so retry a few times
            for _ in range(4):
                excess = len(ids) - self.max_length
                fields[key] = fields[key][self._chars_covering(fields[key], excess):]
                ids = _encode(self.tokenizer, _render(template, fields))
                if len(ids) <= self.max_length:
                    return ids
                if not fields[key]:
                    break
        return ids[-self.max_length:]  # the fixed template alone is too long: keep its tail

    def _chars_covering(self, text: str, n_tokens: int) -> int:
        """Number of leading characters of ``text`` that hold its first ``n_tokens`` tokens."""
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except NotImplementedError:  # slow tokenizers have no offsets: measure the decoded tail
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return len(text) - len(self.tokenizer.decode(ids[n_tokens:]))
        return len(text) if n_tokens >= len(offsets) else int(offsets[n_tokens][0])

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows, labels = [], []
        class_mask = torch.zeros((len(examples), self.num_classes), dtype=torch.bool)
        for i, example in enumerate(examples):
            n = len(example["choices"]) if "choices" in example else self.num_classes
            label = example_label(example, i)
            if not 0 <= label < n:
                raise ValueError(f"label {label} of {example_name(example, i)} is out of range for its {n} classes")
            class_mask[i, :n] = True
            rows.append(self.prompt(example))
            labels.append(label)
        ids, mask, positions = _left_pad(rows, self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels), "class_mask": class_mask}
        if self.position_ids:
            batch["position_ids"] = positions
        return batch

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        batch = on_model_device(model, batch)
        last = _lm_logits(model, model_inputs(batch, _NOT_MODEL_INPUTS), keep=1)[:, -1]
        index = torch.tensor(self.answer_ids, device=last.device)
        return _mask_missing(last.index_select(-1, index).float(), batch.get("class_mask"))


class ChoiceLikelihoodTask:
    """Class logit of choice ``c`` = ``log p(continuation_c | prompt)``, summed over
    the continuation's tokens: lm-evaluation-harness's ``acc`` scoring
    (``MultipleChoiceTask``; continuation ``" " + choice``).

    ``normalize=True`` (or ``"chars"``) divides by the choice's length in
    characters, as harness's ``acc_norm`` (``completion_len = len(choice)``, the
    choice text without the leading space; its byte length for ASCII text);
    ``normalize="tokens"`` divides by the continuation's token count instead.

    Context and continuation are split as harness's ``_encode_pair``: trailing
    spaces of the prompt move to the continuation, the pair is tokenised together
    and the continuation is what follows the prompt's tokens. All choices of a
    batch go through one forward (``B * C`` rows, left padded so every row ends at
    its last continuation token and only the last ``K`` positions need logits).

    Examples with ``"prefixes"`` and ``"continuation"`` (WinoGrande, harness's
    "partial evaluation") score ``log p(continuation_format(continuation) | prefix_c)``
    with the prefixes verbatim instead of template + choice.

    ``num_classes=None`` makes the class count of a batch its widest record (and
    ``self.num_classes`` the widest seen); pass it for training so shapes are fixed.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str = "Question: {question}\nAnswer:",
        choice_format: str = " {choice}",
        normalize: bool | Literal["chars", "tokens"] = False,
        max_length: int = 1024,
        num_classes: int | None = None,
        continuation_format: str = " {continuation}",
        position_ids: bool = True,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.choice_format = choice_format
        if normalize not in (False, True, "chars", "tokens"):
            raise ValueError(f"normalize must be False, True, 'chars' or 'tokens', got {normalize!r}")
        self.normalize = "chars" if normalize is True else normalize
        self.max_length = max_length
        self.num_classes = num_classes
        self._fixed_classes = num_classes is not None
        self.continuation_format = continuation_format
        self.position_ids = position_ids
        self.pad_id = _pad_id(tokenizer)
        self._warned_truncation = False

    def pairs(self, example: Mapping[str, Any]) -> list[tuple[str, str, int]]:
        """``(context, continuation, normalising length)`` for each choice of ``example``."""
        if "prefixes" in example and "continuation" in example:
            continuation = self.continuation_format.format(continuation=example["continuation"])
            return [(prefix, continuation, len(example["continuation"])) for prefix in example["prefixes"]]
        context = _render(self.template, _example_fields(example))
        labels = example.get("choice_labels") or [str(i) for i in range(len(example["choices"]))]
        return [
            (context, self.choice_format.format(choice=text, text=text, label=label), len(text))
            for text, label in zip(example["choices"], labels)
        ]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split as harness's ``_encode_pair``."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = _encode(self.tokenizer, context + continuation)
        context_ids = _encode(self.tokenizer, context)
        if not context_ids:  # nothing to condition the first continuation token on
            return [_prefix_id(self.tokenizer)], whole
        return context_ids, whole[len(context_ids):]

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        per_example = [self.pairs(example) for example in examples]
        n_classes = widest = max(len(p) for p in per_example)
        if self._fixed_classes:
            if widest > self.num_classes:
                raise ValueError(f"an example has {widest} choices but num_classes={self.num_classes}")
            n_classes = self.num_classes
        else:
            self.num_classes = max(self.num_classes or 0, widest)

        rows: list[list[int]] = []
        spans: list[int] = []
        choice_mask = torch.zeros((len(examples), n_classes), dtype=torch.bool)
        norm = torch.ones((len(examples), n_classes))
        for b, pairs in enumerate(per_example):
            label = example_label(examples[b], b)
            if not 0 <= label < len(pairs):
                name = example_name(examples[b], b)
                raise ValueError(f"label {label} of {name} is out of range for its {len(pairs)} choices")
            for c, (context, continuation, length) in enumerate(pairs):
                context_ids, continuation_ids = self.encode_pair(context, continuation)
                if not continuation_ids or len(continuation_ids) >= self.max_length:
                    raise ValueError(
                        f"choice {continuation[:40]!r} is {len(continuation_ids)} tokens after its context; "
                        f"it must be 1 to max_length - 1 = {self.max_length - 1}"
                    )
                row = context_ids + continuation_ids
                if len(row) > self.max_length and not self._warned_truncation:
                    logger.info("contexts over max_length=%d tokens are cut from the left", self.max_length)
                    self._warned_truncation = True
                rows.append(row[-self.max_length:])  # cut the context's start, as harness does
                spans.append(len(continuation_ids))
                choice_mask[b, c] = True
                norm[b, c] = float(max(len(continuation_ids) if self.normalize == "tokens" else length, 1))
            rows.extend([] for _ in range(n_classes - len(pairs)))  # missing choices: no tokens
            spans.extend(0 for _ in range(n_classes - len(pairs)))

        ids, mask, positions = _left_pad(rows, self.pad_id)
        length = ids.shape[1]
        span = torch.tensor(spans)
        continuation_mask = torch.arange(length).unsqueeze(0) >= (length - span).unsqueeze(1)
        shape = (len(examples), n_classes, length)
        batch = {
            "input_ids": ids.view(shape),
            "attention_mask": mask.view(shape),
            "continuation_mask": continuation_mask.view(shape),
            "choice_mask": choice_mask,
            "norm_length": norm,
            "labels": torch.tensor([example_label(e, i) for i, e in enumerate(examples)]),
        }
        if self.position_ids:
            batch["position_ids"] = positions.view(shape)
        return batch

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        batch = on_model_device(model, batch)
        B, C, L = batch["input_ids"].shape
        valid = batch["choice_mask"].reshape(-1).bool()
        inputs = {k: v.reshape(B * C, L)[valid] for k, v in model_inputs(batch, _NOT_MODEL_INPUTS).items()}
        continuation = batch["continuation_mask"].reshape(B * C, L)[valid]
        K = int(continuation.sum(-1).max())
        # logits at positions L-K-1 .. L-2 predict the last K tokens
        logits = _lm_logits(model, inputs, keep=K + 1)[:, :-1].float()
        norm = batch["norm_length"] if self.normalize else None
        return choice_scores(logits, inputs["input_ids"], continuation, valid, (B, C), norm)
