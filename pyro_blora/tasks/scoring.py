"""Choice scores from next-token logits, shared by the full-model and cached choice tasks.

Records with fewer choices than ``num_classes`` (ARC mixes 3, 4 and 5) get
:data:`MASKED_LOGIT` for the missing classes: ``exp(-1e4)`` underflows to exactly
zero probability in float16/32, yet the value stays finite under scaling or
subtraction, unlike ``-inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MASKED_LOGIT", "choice_scores", "continuation_scores"]

MASKED_LOGIT = -1e4


def choice_scores(
    logits: Tensor, input_ids: Tensor, continuation: Tensor, valid: Tensor, shape: tuple[int, int], norm: Tensor | None
) -> Tensor:
    """``(B, C)`` class logits from the next-token logits of the valid choice rows.

    ``logits`` ``(R, K, V)`` are the predictions for the last ``K`` tokens of the
    ``R`` valid rows (``input_ids`` ``(R, L)``, left padded); ``continuation``
    ``(R, L)`` marks each row's continuation tokens. A choice's score is the sum of
    its continuation's token log-probabilities, divided by ``norm`` when given;
    missing choices get :data:`MASKED_LOGIT`.
    """
    K = logits.shape[1]
    targets = input_ids[:, -K:]
    # log p = logit - logsumexp, without materialising a second (N, K, vocab) tensor
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    scores = torch.where(continuation[:, -K:], token_logp, torch.zeros_like(token_logp)).sum(-1)
    return _class_logits(scores, valid, shape, norm)


def continuation_scores(
    hidden: Tensor, head: nn.Module, input_ids: Tensor, continuation: Tensor, valid: Tensor, shape: tuple[int, int],
    norm: Tensor | None,
) -> Tensor:
    """:func:`choice_scores` from the final hidden states, with the head applied only where a score needs it.

    ``hidden`` ``(R, L, d)`` are the final (normed) hidden states of the ``R`` valid
    rows. Position ``t`` predicts token ``t + 1``, so the head runs on the
    ``sum(span)`` positions just before each continuation token instead of on
    ``R x max(span)``: with a 49k-token vocabulary the head is most of the cost of
    a short top part, and choices of uneven length pad ``max(span)`` a lot.
    Rows keep their order, so a batch of stacked posterior samples (sample-major
    rows) stays sample-major for a Bayesian head.
    """
    predicts = continuation[:, 1:]
    rows = predicts.nonzero()[:, 0]
    logits = head(hidden[:, :-1][predicts]).float()
    targets = input_ids[:, 1:][predicts]
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    scores = token_logp.new_zeros(hidden.shape[0]).index_add(0, rows, token_logp)
    return _class_logits(scores, valid, shape, norm)


def _class_logits(scores: Tensor, valid: Tensor, shape: tuple[int, int], norm: Tensor | None) -> Tensor:
    """Scatter the valid rows' scores (divided by ``norm``) into ``(B, C)``; missing choices get the mask value."""
    if norm is not None:
        scores = scores / norm.reshape(-1)[valid].to(scores)
    out = torch.full((shape[0] * shape[1],), MASKED_LOGIT, dtype=scores.dtype, device=scores.device)
    out = out.masked_scatter(valid.to(out.device), scores)
    return out.view(*shape)
