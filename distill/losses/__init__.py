"""Losses: pure functions of embeddings (one loss, one file). They know nothing of the training loop.

Every loss returns ``(loss, terms)``: the scalar to backpropagate and a dict of its weighted-free parts
(detached floats' tensors) for logging.
"""

from distill.losses.embedding_mse_cosine import EmbeddingMSECosineLoss, squared_l2
from distill.losses.infonce import InfoNCELoss
from distill.losses.matryoshka_similarity import MatryoshkaSimilarityLoss
from distill.losses.retrieval_distill import RetrievalDistillLoss

__all__ = [
    "EmbeddingMSECosineLoss",
    "InfoNCELoss",
    "MatryoshkaSimilarityLoss",
    "RetrievalDistillLoss",
    "squared_l2",
]
