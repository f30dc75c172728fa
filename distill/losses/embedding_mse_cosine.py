"""Phase 1, projection mode: pull the student's projected embedding onto the teacher's."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distill.losses.matryoshka_similarity import cosine_matrix


def squared_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE as used throughout distill: ``mean_i sum_j (s_ij - t_ij)^2`` for s, t of shape [b, d].

    The squared error is summed over the embedding dimension and averaged over the batch. For unit vectors it
    equals ``2 (1 - cos)``; the per-element mean (``F.mse_loss``) would divide the term by d (3584 for the default
    teacher) and make its weight meaningless next to the cosine and InfoNCE terms.
    """
    return (student.float() - teacher.float()).pow(2).sum(dim=-1).mean()


class EmbeddingMSECosineLoss(nn.Module):
    r"""``loss = mse_weight * MSE(s, t) + cosine_weight * mean_i (1 - cos(s_i, t_i)) + similarity_weight * SIM``.

    Shapes: ``student`` [b, d] (the projected student embedding, *not* normalised: the MSE term also teaches the
    scale), ``teacher`` [b, d] (as the teacher emits it; L2-normalised for the default teacher). MSE is
    :func:`squared_l2` (sum over d, mean over b); the cosine term is averaged over b. Computed in float32.

    ``SIM = (1/b^2) ||cos(s, s) - cos(t, t)||_F^2`` matches the in-batch similarity matrices (as in Jasper/Stella):
    the pointwise terms align each text with the teacher (what drop-in search needs), SIM keeps which texts are
    close to which (what the student's own search needs) where the pointwise fit stays imperfect.
    """

    def __init__(self, mse_weight: float = 0.4, cosine_weight: float = 0.6, similarity_weight: float = 0.0):
        super().__init__()
        self.mse_weight = mse_weight
        self.cosine_weight = cosine_weight
        self.similarity_weight = similarity_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
        s, t = student.float(), teacher.float()
        mse = squared_l2(s, t)
        cos = 1.0 - F.cosine_similarity(s, t, dim=-1).mean()
        loss = self.mse_weight * mse + self.cosine_weight * cos
        terms = {"mse": mse.detach(), "cosine": cos.detach()}
        if self.similarity_weight:
            sim = (cosine_matrix(s, s) - cosine_matrix(t, t)).pow(2).mean()
            loss = loss + self.similarity_weight * sim
            terms["similarity"] = sim.detach()
        return loss, terms
