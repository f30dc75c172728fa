"""Phase 2: InfoNCE with hard negatives plus a teacher term that keeps the student near the teacher."""

from __future__ import annotations

import torch
from torch import nn

from distill.losses.embedding_mse_cosine import squared_l2
from distill.losses.infonce import InfoNCELoss
from distill.losses.matryoshka_similarity import cosine_matrix, matryoshka_weights


class RetrievalDistillLoss(nn.Module):
    r"""``loss = infonce_weight * InfoNCE + mse_weight * teacher term``, in one of two modes.

    Inputs: student ``q`` [b, d], ``docs`` [b*g, d] (positive then k negatives per query, see
    :class:`~distill.losses.InfoNCELoss`), ``doc_ids`` [b*g]; teacher ``tq`` [b, D_t], ``tdocs`` [b*g, D_t].

    * **projection** (``dims=None``; d = D_t): InfoNCE of the student queries against the candidate documents
      embedded by the student (``documents="student"``), by the teacher (``"teacher"``: the drop-in use, student
      queries searching an index built by the teacher), or the mean of both (``"both"``); the teacher term is the
      embedding MSE (:func:`~distill.losses.squared_l2`) over the b queries and b*g documents together:
      ``MSE([q; docs], [tq; tdocs])``.
    * **MRL** (``dims`` given): for each nested dim m, InfoNCE on the first m dims, and the teacher term is the MSE
      between the student's and the teacher's query-document cosine matrices over the local candidates
      ``(1/(b*b*g)) * ||cos(q_m, docs_m) - cos(tq, tdocs)||_F^2`` (a dimension-free ranking signal, as in MarginMSE);
      both are averaged over the dims with normalised weights.
    """

    def __init__(self, temperature: float, infonce_weight: float, mse_weight: float, gather: bool = True,
                 dims: list[int] | None = None, dim_weights: list[float] | None = None, documents: str = "student"):
        super().__init__()
        if documents not in ("student", "teacher", "both"):
            raise ValueError(f"documents must be student, teacher or both, got {documents!r}")
        self.documents = documents
        self.infonce = InfoNCELoss(temperature, gather=gather)
        self.infonce_weight = infonce_weight
        self.mse_weight = mse_weight
        self.dims = dims
        self.dim_weights = matryoshka_weights(dims, dim_weights) if dims else None

    def forward(self, q: torch.Tensor, docs: torch.Tensor, doc_ids: torch.Tensor, tq: torch.Tensor,
                tdocs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.dims is None:
            parts = []
            if self.documents in ("student", "both"):
                parts.append(self.infonce(q, docs, doc_ids))
            if self.documents in ("teacher", "both"):
                parts.append(self.infonce(q, tdocs, doc_ids))
            nce = sum(parts) / len(parts)
            mse = squared_l2(torch.cat([q, docs]), torch.cat([tq, tdocs]))
        else:
            nce = q.new_zeros((), dtype=torch.float32)
            mse = q.new_zeros((), dtype=torch.float32)
            target = cosine_matrix(tq, tdocs)
            for m, w in zip(self.dims, self.dim_weights):
                nce = nce + w * self.infonce(q[:, :m], docs[:, :m], doc_ids)
                mse = mse + w * (cosine_matrix(q[:, :m], docs[:, :m]) - target).pow(2).mean()
        loss = self.infonce_weight * nce + self.mse_weight * mse
        return loss, {"infonce": nce.detach(), "mse": mse.detach()}
