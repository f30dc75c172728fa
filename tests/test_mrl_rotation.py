"""MRL mode's PCA start (``model.matryoshka_init: pca``): the rotation's maths (orthogonal, axes by decreasing
variance, summable statistics), the Dense it lives in (inside the student, saved and loaded by sentence-transformers)
and a real run (fitted at phase-1 start, exported in the final folder, the first dims carrying the most variance)."""

from __future__ import annotations

import torch
from test_train_e2e import train_single
from tiny_data import tiny_config_yaml, write_training_files

from distill.models import add_rotation, pca_rotation, set_rotation

TEXTS = ["the cat sat on the mat", "a dog ran far away", "red fish blue fish", "one two three four five",
         "stocks fell on monday", "rain is expected later today", "the court ruled against the law",
         "a recipe for bread", "how to train a model", "the river flooded the town"]


def _anisotropic(n: int = 4000, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points with per-axis scales 6..1 along a random orthonormal basis (returned as its columns), off the origin."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.arange(d, 0, -1, dtype=torch.float64)
    x = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scales) @ basis.T + 3.0
    return x, basis


def test_pca_rotation_is_orthogonal_orders_axes_by_variance_and_sums_over_shards() -> None:
    x, basis = _anisotropic()
    q = pca_rotation(x.T @ x, x.sum(0), len(x)).double()
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    var = (x @ q).var(0)
    assert torch.all(var[:-1] > var[1:]), var  # the first coordinates keep the most variance
    for k in range(6):  # each axis is the generating one (up to sign: the largest entry is made positive)
        assert abs(float(q[:, k] @ basis[:, k])) > 0.99
        assert q[:, k][q[:, k].abs().argmax()] > 0
    half = len(x) // 2  # two "ranks" summing their statistics
    a, b = x[:half], x[half:]
    summed = a.T @ a + b.T @ b, a.sum(0) + b.sum(0)
    torch.testing.assert_close(pca_rotation(*summed, len(x)), pca_rotation(x.T @ x, x.sum(0), len(x)))


def test_rotation_sits_before_normalize_keeps_cosines_and_round_trips(tmp_path, tiny_student_dir) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    st = SentenceTransformer(str(tiny_student_dir), device="cpu")
    before = st.encode(TEXTS, convert_to_tensor=True)
    dense = add_rotation(st)
    assert [type(m) for m in st][2:] == [Dense, Normalize] and st[2] is dense
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), before)  # starts as the identity
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    set_rotation(dense, q)
    after = st.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(after, before @ q, atol=1e-5, rtol=0)
    torch.testing.assert_close(after @ after.T, before @ before.T, atol=1e-5, rtol=0)  # full-dim ranking unchanged
    st.save(str(tmp_path / "rotated"))
    loaded = SentenceTransformer(str(tmp_path / "rotated"), device="cpu")
    assert isinstance(loaded[2], Dense)
    torch.testing.assert_close(loaded.encode(TEXTS, convert_to_tensor=True), after, atol=1e-6, rtol=0)


def _leading_share(folder, dims: int = 8) -> float:
    """Share of the texts' embedding variance in the first ``dims`` coordinates of the model in ``folder``."""
    from sentence_transformers import SentenceTransformer

    var = SentenceTransformer(str(folder), device="cpu").encode(TEXTS * 3, convert_to_tensor=True).var(0)
    return float(var[:dims].sum() / var.sum())


def test_pca_start_in_a_run_puts_the_most_variance_first(tmp_path, tiny_teacher_dir, tiny_student_dir) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    files = write_training_files(tmp_path / "data")
    share = {}
    for init in ("pca", "none"):
        (tmp_path / init).mkdir()
        cfg = tiny_config_yaml(tmp_path / init, tiny_teacher_dir, tiny_student_dir, files, use_projection=False)
        res = train_single(cfg, "--set", f"model.matryoshka_init={init}", "--set", "phase1.max_steps=1",
                           "--set", "phase2.max_steps=1", "--set", "phase1.learning_rate=1e-5",
                           "--set", "phase2.learning_rate=1e-5")
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("MRL rotation initialised by PCA on" in res.stderr) == (init == "pca")
        final = tmp_path / init / "out" / "distilled-model-32d-tiny" / "final"
        modules = list(SentenceTransformer(str(final), device="cpu"))
        assert any(isinstance(m, Dense) for m in modules) == (init == "pca")
        assert ("`model.matryoshka_init: pca`" in (final / "README.md").read_text()) == (init == "pca")  # the card
        share[init] = _leading_share(final)
    # 8 of 32 dims: a quarter of the variance if spread evenly; the principal axes hold clearly more
    assert share["pca"] > share["none"] + 0.1, share
