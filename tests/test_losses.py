"""The losses against hand computations (single process; the 2-rank InfoNCE is in test_infonce_ddp.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from distill.losses import (
    EmbeddingMSECosineLoss,
    InfoNCELoss,
    MatryoshkaSimilarityLoss,
    RetrievalDistillLoss,
    squared_l2,
)
from distill.losses.matryoshka_similarity import matryoshka_weights


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def cos_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference pairwise cosines in float64."""
    return unit_rows(a) @ unit_rows(b).T


def manual_infonce(q: torch.Tensor, docs: torch.Tensor, ids: list[int], tau: float) -> float:
    """Plain-Python InfoNCE: for each query i (positive at column i*g), ``-log softmax`` over every column except
    other copies of its positive's id; the mean over queries."""
    b, g = q.shape[0], docs.shape[0] // q.shape[0]
    sims = cos_matrix(q, docs).tolist()
    total = 0.0
    for i in range(b):
        pos = i * g
        cols = [j for j in range(len(ids)) if j == pos or ids[j] != ids[pos]]
        denom = sum(math.exp(sims[i][j] / tau) for j in cols)
        total += -math.log(math.exp(sims[i][pos] / tau) / denom)
    return total / b


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(n, n, seed=seed, dtype=torch.float64))
    return q


# --------------------------------------------------------------------------------------------------------------------
# EmbeddingMSECosineLoss / squared_l2
# --------------------------------------------------------------------------------------------------------------------


def test_mse_cosine_hand_computation() -> None:
    student = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    # squared L2 per row: 0+4+4 = 8 and 0+9+1 = 10 -> mean 9.
    # cos per row: 1/(3*1) and 20/(5*5) -> 1 - cos = 2/3 and 0.2 -> mean 13/30.
    loss, terms = EmbeddingMSECosineLoss(mse_weight=0.4, cosine_weight=0.6)(student, teacher)
    assert terms["mse"].item() == pytest.approx(9.0)
    assert terms["cosine"].item() == pytest.approx(13 / 30)
    assert loss.item() == pytest.approx(0.4 * 9.0 + 0.6 * 13 / 30)
    assert squared_l2(student, teacher).item() == pytest.approx(9.0)


def test_mse_cosine_random_against_formula() -> None:
    s, t = randn(5, 7, seed=1), randn(5, 7, seed=2)
    loss, terms = EmbeddingMSECosineLoss(mse_weight=0.3, cosine_weight=1.7)(s, t)
    mse = ((s.double() - t.double()) ** 2).sum(dim=1).mean().item()
    cos = (1 - (unit_rows(s) * unit_rows(t)).sum(dim=1)).mean().item()
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert terms["cosine"].item() == pytest.approx(cos, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * mse + 1.7 * cos, rel=1e-5)


def test_mse_cosine_zero_when_equal() -> None:
    t = randn(4, 16, seed=3)
    loss, terms = EmbeddingMSECosineLoss()(t.clone(), t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert terms["mse"].item() == 0.0


def test_squared_l2_is_twice_one_minus_cos_for_unit_vectors() -> None:
    s, t = unit_rows(randn(6, 10, seed=4)).float(), unit_rows(randn(6, 10, seed=5)).float()
    _, terms = EmbeddingMSECosineLoss()(s, t)
    assert terms["mse"].item() == pytest.approx(2 * terms["cosine"].item(), rel=1e-5)


def test_mse_cosine_bf16_inputs_computed_in_fp32() -> None:
    s, t = randn(3, 8, seed=6, dtype=torch.bfloat16), randn(3, 8, seed=7, dtype=torch.bfloat16)
    loss, _ = EmbeddingMSECosineLoss()(s, t)
    ref, _ = EmbeddingMSECosineLoss()(s.float(), t.float())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_mse_cosine_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"student \(2, 4\) and teacher \(2, 5\) shapes differ"):
        EmbeddingMSECosineLoss()(torch.zeros(2, 4), torch.zeros(2, 5))


def test_mse_cosine_gradient_flows() -> None:
    s = randn(4, 8, seed=8).requires_grad_(True)
    t = randn(4, 8, seed=9)
    loss, _ = EmbeddingMSECosineLoss()(s, t)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    # d/ds of mean_i sum_j (s-t)^2 is 2(s-t)/b; with only the MSE term that is the whole gradient.
    s2 = s.detach().clone().requires_grad_(True)
    EmbeddingMSECosineLoss(mse_weight=1.0, cosine_weight=0.0)(s2, t)[0].backward()
    torch.testing.assert_close(s2.grad, 2 * (s2.detach() - t) / 4)


# --------------------------------------------------------------------------------------------------------------------
# MatryoshkaSimilarityLoss
# --------------------------------------------------------------------------------------------------------------------


def test_matryoshka_zero_for_rotated_teacher() -> None:
    """student = teacher @ Q (Q orthogonal) has exactly the teacher's cosine geometry at the full dim."""
    teacher = randn(6, 12, seed=10, dtype=torch.float64)
    student = (teacher @ random_orthogonal(12, seed=11)).float()
    loss, terms = MatryoshkaSimilarityLoss(dims=[12])(student, teacher.float())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert terms["sim_mse"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["sim_cosine"].item() == pytest.approx(0.0, abs=1e-6)


def test_matryoshka_zero_across_different_widths_and_nested_dims() -> None:
    """Teacher 20-d and student 16-d with the same geometry at both prefixes 16 and 8 -> zero.

    teacher = A @ P with P [8, 20] having orthonormal rows, so cos(teacher) = cos(A); student = [A Q, A Q] whose
    first 8 dims (A Q) and all 16 dims have the cosines of A as well.
    """
    a = randn(5, 8, seed=12, dtype=torch.float64)
    p = random_orthogonal(20, seed=13)[:8]
    teacher = (a @ p).float()
    aq = a @ random_orthogonal(8, seed=14)
    student = torch.cat([aq, aq], dim=1).float()
    loss, _ = MatryoshkaSimilarityLoss(dims=[16, 8])(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_matryoshka_positive_otherwise() -> None:
    teacher = randn(6, 12, seed=15)
    random_student = randn(6, 12, seed=16)
    assert MatryoshkaSimilarityLoss(dims=[12])(random_student, teacher)[0].item() > 0.01
    # A rotation keeps the full-dim geometry but not that of its 6-d prefix.
    rotated = (teacher.double() @ random_orthogonal(12, seed=17)).float()
    assert MatryoshkaSimilarityLoss(dims=[12])(rotated, teacher)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert MatryoshkaSimilarityLoss(dims=[12, 6])(rotated, teacher)[0].item() > 1e-3


def test_matryoshka_against_formula() -> None:
    student, teacher = randn(5, 10, seed=18), randn(5, 24, seed=19)
    dims, weights, alpha, beta = [10, 4], [3.0, 1.0], 0.4, 0.6
    loss, terms = MatryoshkaSimilarityLoss(dims, weights, mse_weight=alpha, cosine_weight=beta)(student, teacher)
    target = cos_matrix(teacher, teacher)
    expected = mse_sum = cos_sum = 0.0
    for m, w in zip(dims, [0.75, 0.25]):
        sim = cos_matrix(student[:, :m], student[:, :m])
        mse = ((sim - target) ** 2).sum().item() / 25
        row_cos = (unit_rows(sim) * unit_rows(target)).sum(dim=1)
        cos = (1 - row_cos).mean().item()
        expected += w * (alpha * mse + beta * cos)
        mse_sum += w * mse
        cos_sum += w * cos
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["sim_mse"].item() == pytest.approx(mse_sum, rel=1e-5)
    assert terms["sim_cosine"].item() == pytest.approx(cos_sum, rel=1e-5)


def test_matryoshka_weights_normalised() -> None:
    assert matryoshka_weights([768, 512], [1, 3]) == [0.25, 0.75]
    assert matryoshka_weights([768, 512, 256, 128], None) == [0.25] * 4
    assert sum(matryoshka_weights([8, 4, 2], [5, 0, 2])) == pytest.approx(1.0)
    student, teacher = randn(4, 8, seed=20), randn(4, 8, seed=21)
    a = MatryoshkaSimilarityLoss([8, 4], [1, 3])(student, teacher)[0]
    b = MatryoshkaSimilarityLoss([8, 4], [2, 6])(student, teacher)[0]
    only8 = MatryoshkaSimilarityLoss([8])(student, teacher)[0]
    only4 = MatryoshkaSimilarityLoss([4])(student, teacher)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() == pytest.approx(0.25 * only8.item() + 0.75 * only4.item(), rel=1e-5)
    equal = MatryoshkaSimilarityLoss([8, 4])(student, teacher)[0]
    assert equal.item() == pytest.approx(0.5 * only8.item() + 0.5 * only4.item(), rel=1e-5)


def test_matryoshka_gradient_flows() -> None:
    student = randn(4, 8, seed=22).requires_grad_(True)
    loss, _ = MatryoshkaSimilarityLoss([8, 4])(student, randn(4, 16, seed=23))
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad[:, :4].abs().sum() > 0 and student.grad[:, 4:].abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# InfoNCELoss
# --------------------------------------------------------------------------------------------------------------------


def test_infonce_against_manual_log_softmax() -> None:
    """b=3 queries, g=1+2 documents each (positive first), all distinct texts."""
    q, docs = randn(3, 5, seed=30), randn(9, 5, seed=31)
    ids = list(range(9))
    loss = InfoNCELoss(temperature=0.5)(q, docs, torch.tensor(ids))
    assert loss.item() == pytest.approx(manual_infonce(q, docs, ids, 0.5), rel=1e-5)
    # Same value via torch's log_softmax on float64 logits with labels 0, 3, 6.
    logits = cos_matrix(q, docs) / 0.5
    ref = -torch.log_softmax(logits, dim=1)[torch.arange(3), torch.tensor([0, 3, 6])].mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_infonce_scores_layout() -> None:
    q, docs = randn(3, 5, seed=32), randn(9, 5, seed=33)
    logits, labels = InfoNCELoss(temperature=0.1).scores(q, docs, torch.arange(9))
    assert labels.tolist() == [0, 3, 6]
    torch.testing.assert_close(logits.double(), cos_matrix(q, docs) / 0.1, rtol=1e-5, atol=1e-5)


def test_infonce_false_negative_mask() -> None:
    """Query 0's positive (id 10, column 0) also appears as query 1's hard negative (column 4): for query 0 that
    copy is not a negative and is excluded; for query 1 it stays a candidate (it is *its* hard negative).
    Queries 1 and 2 share no ids, so they see all 9 columns."""
    q, docs = randn(3, 5, seed=34), randn(9, 5, seed=35)
    docs[4] = docs[0]  # same text, same embedding
    ids = [10, 11, 12, 20, 10, 21, 30, 31, 32]
    loss_fn = InfoNCELoss(temperature=0.5)
    logits, labels = loss_fn.scores(q, docs, torch.tensor(ids))
    masked = torch.isinf(logits)
    assert masked.nonzero().tolist() == [[0, 4]]
    assert (logits[masked] < 0).all()
    loss = loss_fn(q, docs, torch.tensor(ids))

    sims = cos_matrix(q, docs).tolist()
    tau = 0.5
    per_query = []
    for i, cols in ((0, [0, 1, 2, 3, 5, 6, 7, 8]), (1, range(9)), (2, range(9))):
        denom = sum(math.exp(sims[i][j] / tau) for j in cols)
        per_query.append(-(sims[i][3 * i] / tau) + math.log(denom))
    assert loss.item() == pytest.approx(sum(per_query) / 3, rel=1e-5)
    assert loss.item() == pytest.approx(manual_infonce(q, docs, ids, tau), rel=1e-5)
    unmasked = loss_fn(q, docs, torch.arange(9))
    assert abs(unmasked.item() - loss.item()) > 1e-3  # the mask changes the value


def test_infonce_shared_positive_is_not_a_negative() -> None:
    """Two queries with the same positive text: neither query's copy is a negative for the other."""
    q, docs = randn(2, 4, seed=36), randn(6, 4, seed=37)
    docs[3] = docs[0]
    ids = [7, 1, 2, 7, 3, 4]
    logits, _ = InfoNCELoss(temperature=0.2).scores(q, docs, torch.tensor(ids))
    assert torch.isinf(logits).nonzero().tolist() == [[0, 3], [1, 0]]
    loss = InfoNCELoss(temperature=0.2)(q, docs, torch.tensor(ids))
    assert loss.item() == pytest.approx(manual_infonce(q, docs, ids, 0.2), rel=1e-5)


def test_infonce_low_temperature_bf16_is_finite() -> None:
    q, docs = randn(4, 32, seed=38, dtype=torch.bfloat16), randn(16, 32, seed=39, dtype=torch.bfloat16)
    q.requires_grad_(True)
    docs.requires_grad_(True)
    ids = torch.arange(16)
    loss = InfoNCELoss(temperature=0.01)(q, docs, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Equal to the float64 computation on the bf16-rounded inputs: the scores are not computed in bf16.
    assert loss.item() == pytest.approx(manual_infonce(q.detach(), docs.detach(), ids.tolist(), 0.01), rel=1e-4)
    loss.backward()
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(docs.grad.float()).all()
    assert q.grad.abs().sum() > 0


def test_infonce_perfect_retrieval_is_near_zero() -> None:
    base = torch.eye(8)
    q = base[:2]
    docs = base[[0, 2, 3, 1, 4, 5]]  # positives equal their queries; negatives orthogonal
    assert InfoNCELoss(temperature=0.02)(q, docs, torch.arange(6)).item() < 1e-6


def test_infonce_gradient_flows_to_queries_and_all_docs() -> None:
    q, docs = randn(3, 5, seed=40).requires_grad_(True), randn(9, 5, seed=41).requires_grad_(True)
    InfoNCELoss(temperature=0.1)(q, docs, torch.arange(9)).backward()
    assert (q.grad.abs().sum(dim=1) > 0).all()
    assert (docs.grad.abs().sum(dim=1) > 0).all()  # in-batch negatives get a gradient too


def test_infonce_bad_shapes() -> None:
    with pytest.raises(ValueError, match="g rows per query"):
        InfoNCELoss()(torch.zeros(3, 4), torch.zeros(8, 4), torch.arange(8))
    with pytest.raises(ValueError, match="g rows per query"):
        InfoNCELoss()(torch.zeros(3, 4), torch.zeros(9, 4), torch.arange(8))


# --------------------------------------------------------------------------------------------------------------------
# RetrievalDistillLoss
# --------------------------------------------------------------------------------------------------------------------


def _phase2_batch(d: int, td: int, seed: int) -> tuple[torch.Tensor, ...]:
    q, docs = randn(3, d, seed=seed), randn(9, d, seed=seed + 1)
    tq, tdocs = randn(3, td, seed=seed + 2), randn(9, td, seed=seed + 3)
    ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7, 8])  # one false negative for query 0
    return q, docs, ids, tq, tdocs


def test_retrieval_projection_mode() -> None:
    q, docs, ids, tq, tdocs = _phase2_batch(6, 6, seed=50)
    loss, terms = RetrievalDistillLoss(temperature=0.05, infonce_weight=0.8, mse_weight=0.2)(q, docs, ids, tq, tdocs)
    nce = manual_infonce(q, docs, ids.tolist(), 0.05)
    s, t = torch.cat([q, docs]).double(), torch.cat([tq, tdocs]).double()
    mse = ((s - t) ** 2).sum(dim=1).mean().item()  # over the 3 + 9 rows together
    assert terms["infonce"].item() == pytest.approx(nce, rel=1e-5)
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert loss.item() == pytest.approx(0.8 * nce + 0.2 * mse, rel=1e-5)


def test_retrieval_mrl_mode_averages_over_dims() -> None:
    q, docs, ids, tq, tdocs = _phase2_batch(16, 24, seed=60)
    dims, raw_w = [16, 8, 4], [1.0, 2.0, 1.0]
    loss, terms = RetrievalDistillLoss(0.05, 0.8, 0.2, dims=dims, dim_weights=raw_w)(q, docs, ids, tq, tdocs)
    target = cos_matrix(tq, tdocs)
    nce = mse = 0.0
    for m, w in zip(dims, [0.25, 0.5, 0.25]):
        nce += w * manual_infonce(q[:, :m], docs[:, :m], ids.tolist(), 0.05)
        mse += w * ((cos_matrix(q[:, :m], docs[:, :m]) - target) ** 2).sum().item() / (3 * 9)
    assert terms["infonce"].item() == pytest.approx(nce, rel=1e-5)
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert loss.item() == pytest.approx(0.8 * nce + 0.2 * mse, rel=1e-5)


def test_retrieval_mrl_equal_weights_and_teacher_geometry() -> None:
    q, docs, ids, tq, tdocs = _phase2_batch(8, 8, seed=70)
    per_dim = [RetrievalDistillLoss(0.05, 1.0, 1.0, dims=[m])(q, docs, ids, tq, tdocs)[0].item() for m in (8, 4)]
    both = RetrievalDistillLoss(0.05, 1.0, 1.0, dims=[8, 4])(q, docs, ids, tq, tdocs)[0].item()
    assert both == pytest.approx(sum(per_dim) / 2, rel=1e-5)
    # The MRL teacher term is dimension-free: a student that is the teacher rotated has zero teacher term.
    rot = random_orthogonal(8, seed=71)
    _, terms = RetrievalDistillLoss(0.05, 1.0, 1.0, dims=[8])(
        (tq.double() @ rot).float(), (tdocs.double() @ rot).float(), ids, tq, tdocs)
    assert terms["mse"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dims", [None, [8, 4]])
def test_retrieval_gradient_flows(dims: list[int] | None) -> None:
    q, docs, ids, tq, tdocs = _phase2_batch(8, 8, seed=80)
    q.requires_grad_(True)
    docs.requires_grad_(True)
    loss, _ = RetrievalDistillLoss(0.05, 0.8, 0.2, dims=dims)(q, docs, ids, tq, tdocs)
    loss.backward()
    for grad in (q.grad, docs.grad):
        assert grad is not None and torch.isfinite(grad).all() and (grad.abs().sum(dim=1) > 0).all()


def test_retrieval_loss_documents_teacher_and_both():
    """Projection mode can contrast student queries with teacher-embedded documents (the drop-in use)."""
    torch.manual_seed(3)
    b, g, d = 3, 3, 8
    q, docs = torch.randn(b, d), torch.randn(b * g, d)
    tq, tdocs = torch.randn(b, d), torch.randn(b * g, d)
    ids = torch.arange(b * g)
    nce = InfoNCELoss(0.05, gather=False)
    mse = squared_l2(torch.cat([q, docs]), torch.cat([tq, tdocs]))
    for documents, expected_nce in (
        ("student", nce(q, docs, ids)),
        ("teacher", nce(q, tdocs, ids)),
        ("both", 0.5 * (nce(q, docs, ids) + nce(q, tdocs, ids))),
    ):
        loss_fn = RetrievalDistillLoss(0.05, 0.8, 0.2, gather=False, documents=documents)
        loss, terms = loss_fn(q, docs, ids, tq, tdocs)
        assert torch.allclose(terms["infonce"], expected_nce, atol=1e-6), documents
        assert torch.allclose(loss, 0.8 * expected_nce + 0.2 * mse, atol=1e-5), documents
    with pytest.raises(ValueError, match="documents must be"):
        RetrievalDistillLoss(0.05, 0.8, 0.2, documents="index")


def test_similarity_term_matches_in_batch_similarity_matrices() -> None:
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    loss_fn = EmbeddingMSECosineLoss(0.0, 0.0, similarity_weight=2.0)
    loss, terms = loss_fn(3.0 * t, t)  # same directions: same similarity matrix, whatever the scale
    assert torch.allclose(loss, torch.tensor(0.0), atol=1e-6) and set(terms) == {"mse", "cosine", "similarity"}
    s = torch.randn(6, 16, requires_grad=True)
    loss, terms = loss_fn(s, t)
    expected = ((F.normalize(s, dim=-1) @ F.normalize(s, dim=-1).T - t @ t.T) ** 2).mean()
    assert torch.allclose(terms["similarity"], expected) and torch.allclose(loss, 2.0 * expected)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert "similarity" not in EmbeddingMSECosineLoss()(s, t)[1]  # off by default: the spec's 0.4 / 0.6 loss
