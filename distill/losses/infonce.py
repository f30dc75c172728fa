"""Phase 2: InfoNCE over hard negatives, in-batch negatives and (optionally) every rank's documents."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distill.distributed import gather_with_grad, get_info, is_distributed


class InfoNCELoss(nn.Module):
    r"""Contrastive loss of each query against every candidate document.

    Inputs: ``queries`` [b, d]; ``docs`` [b * g, d] laid out query by query, ``g = 1 + k`` rows per query with the
    positive first and its k hard negatives after it; ``doc_ids`` [b * g] int64 text ids of those documents (used to
    mask false negatives); all on the local rank.

    With ``gather=True`` under DDP the candidates are the documents of *all* ranks, concatenated in rank order
    (:func:`~distill.distributed.gather_with_grad`, so every rank's document embeddings receive the gradient of every
    rank's queries). For query i of rank r the positive sits at column ``(r * b + i) * g``.

    .. math::
        \mathcal{L} = \frac{1}{b}\sum_i -\log
            \frac{\exp(\cos(q_i, d_{p(i)})/\tau)}{\sum_{j \in C_i} \exp(\cos(q_i, d_j)/\tau)}

    where ``C_i`` is every candidate except copies of q_i's positive text at other columns (a positive that is also
    another query's document is not a negative). Scores and log-sum-exp are in float32, so temperature 0.01 under
    bf16 autocast stays finite. Averaged over the local queries: with DDP's gradient averaging, W ranks of b queries
    give the same loss and gradients as one process on the W*b concatenated queries.
    """

    def __init__(self, temperature: float = 0.02, gather: bool = True):
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def scores(self, queries: torch.Tensor, docs: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits [b, C] and the label column of each query [b]."""
        b = queries.shape[0]
        g = docs.shape[0] // b
        if g * b != docs.shape[0] or doc_ids.shape[0] != docs.shape[0]:
            raise ValueError(f"docs {tuple(docs.shape)} / doc_ids {tuple(doc_ids.shape)} do not hold g rows per query (b={b})")
        offset = 0
        if self.gather and is_distributed():
            docs = gather_with_grad(docs)
            doc_ids = gather_with_grad(doc_ids)
            offset = get_info().rank * b
        q = F.normalize(queries.float(), dim=-1)
        d = F.normalize(docs.float(), dim=-1)
        logits = q @ d.T / self.temperature
        labels = (torch.arange(b, device=q.device) + offset) * g
        pos_ids = doc_ids[labels]
        false_neg = doc_ids.unsqueeze(0) == pos_ids.unsqueeze(1)
        false_neg[torch.arange(b, device=q.device), labels] = False
        logits = logits.masked_fill(false_neg, float("-inf"))
        return logits, labels

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        logits, labels = self.scores(queries, docs, doc_ids)
        return F.cross_entropy(logits, labels)
