"""Phase 1, MRL mode: the student keeps its own space, so the teacher signal must not depend on dimensions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of a [n, d] and b [m, d] -> [n, m], in float32."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def matryoshka_weights(dims: list[int], weights: list[float] | None) -> list[float]:
    """Normalised weights of the nested dims (all equal when ``weights`` is None); they sum to 1."""
    w = [1.0] * len(dims) if weights is None else [float(x) for x in weights]
    total = sum(w)
    return [x / total for x in w]


class MatryoshkaSimilarityLoss(nn.Module):
    r"""Match the student's in-batch similarity matrix to the teacher's at every nested (Matryoshka) dimension.

    Student ``s`` [b, D_s] and teacher ``t`` [b, D_t] live in spaces of different sizes, but their b x b cosine
    matrices are comparable. With ``S_m = cos(s[:, :m], s[:, :m])`` (first m dims, renormalised) and
    ``T = cos(t, t)``:

    .. math::
        \mathcal{L} = \sum_m w_m \Big( \alpha \, \tfrac{1}{b^2}\lVert S_m - T\rVert_F^2
                      + \beta \, \tfrac{1}{b}\sum_i \big(1 - \cos(S_m[i], T[i])\big) \Big)

    with ``alpha = mse_weight``, ``beta = cosine_weight`` and ``w_m`` normalised to sum to 1. The MSE term matches the
    absolute similarity values, the row-cosine term their relative pattern (which neighbours are close). Every
    prefix ``s[:, :m]`` is trained to reproduce the teacher's geometry, so truncating the deployed model to m dims
    keeps it. Needs b >= 2 (a 1x1 matrix carries no signal).
    """

    def __init__(self, dims: list[int], weights: list[float] | None = None, mse_weight: float = 0.4,
                 cosine_weight: float = 0.6):
        super().__init__()
        self.dims = list(dims)
        self.weights = matryoshka_weights(self.dims, weights)
        self.mse_weight = mse_weight
        self.cosine_weight = cosine_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = cosine_matrix(teacher, teacher)
        loss = student.new_zeros((), dtype=torch.float32)
        mse_total = torch.zeros((), device=student.device)
        cos_total = torch.zeros((), device=student.device)
        for m, w in zip(self.dims, self.weights):
            sim = cosine_matrix(student[:, :m], student[:, :m])
            mse = (sim - target).pow(2).mean()
            cos = 1.0 - F.cosine_similarity(sim, target, dim=-1).mean()
            loss = loss + w * (self.mse_weight * mse + self.cosine_weight * cos)
            mse_total += w * mse.detach()
            cos_total += w * cos.detach()
        return loss, {"sim_mse": mse_total, "sim_cosine": cos_total}
