"""The least-squares and Procrustes starts of the projection head: the maths (exact affine map in the GELU MLP, ridge
and orthogonal solutions from summed statistics) and their effect in a real run (a lower first phase-1 loss than a
random head)."""

from __future__ import annotations

import pytest
import torch
from test_train_e2e import train_records, train_single
from tiny_data import tiny_config_yaml, write_training_files

from distill.config import ConfigError, load_config
from distill.models import build_projection_head, procrustes_map, ridge_map, set_head_to_affine_map


def _stats(x: torch.Tensor, y: torch.Tensor):
    return x.T @ x, x.T @ y, x.sum(0), y.sum(0), len(x)


def test_head_computes_the_affine_map_exactly_and_extra_units_start_silent() -> None:
    gen = torch.Generator().manual_seed(0)
    a, c = torch.randn(8, 5, generator=gen), torch.randn(5, generator=gen)
    head = build_projection_head(8, 20, 5, seed=1)  # 4 hidden units beyond 2 * 8
    set_head_to_affine_map(head, a, c)
    x = 3 * torch.randn(64, 8, generator=gen)
    out = head({"sentence_embedding": x})["sentence_embedding"]
    torch.testing.assert_close(out, x @ a + c, atol=1e-5, rtol=1e-5)
    assert torch.all(head[1].linear.weight[:, 16:] == 0)
    assert head[0].linear.weight[16:].abs().sum() > 0  # still random: they can learn the non-linear part


def test_head_too_narrow_for_an_exact_map_is_an_error() -> None:
    head = build_projection_head(8, 15, 5, seed=1)
    with pytest.raises(ValueError, match=r"projection_hidden_dim >= 2 \* student_dim \(16\), got 15"):
        set_head_to_affine_map(head, torch.zeros(8, 5), torch.zeros(5))


def test_ridge_map_recovers_an_affine_map_and_sums_over_shards() -> None:
    gen = torch.Generator().manual_seed(0)
    a, c = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    y = x @ a + c
    got_a, got_c = ridge_map(*_stats(x, y), ridge=1e-9)
    torch.testing.assert_close(got_a.double(), a, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_c.double(), c, atol=1e-4, rtol=0)
    # Two "ranks" summing their statistics give the one-process answer.
    s1, s2 = _stats(x[:200], y[:200]), _stats(x[200:], y[200:])
    summed = [p + q for p, q in zip(s1, s2)]
    for got, want in zip(ridge_map(*summed), ridge_map(*_stats(x, y))):
        torch.testing.assert_close(got, want)
    # The ridge term shrinks the map (never the bias) and matches the closed form with lambda = r * trace / d.
    lam = 0.5 * float(torch.trace(x.T @ x)) / 6
    xt = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1)
    pen = torch.diag(torch.tensor([1.0] * 6 + [0.0], dtype=torch.float64))
    w = torch.linalg.solve(xt.T @ xt + lam * pen, xt.T @ y)
    got_a, got_c = ridge_map(*_stats(x, y), ridge=0.5)
    torch.testing.assert_close(got_a.double(), w[:6], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_c.double(), w[6], atol=1e-5, rtol=0)


def test_procrustes_map_recovers_an_orthogonal_map_and_keeps_every_inner_product() -> None:
    gen = torch.Generator().manual_seed(0)
    q0 = torch.linalg.qr(torch.randn(12, 6, generator=gen, dtype=torch.float64))[0].T  # [6, 12], orthonormal rows
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    y = x @ q0 + 0.01 * torch.randn(400, 12, generator=gen, dtype=torch.float64)
    q, c = procrustes_map(x.T @ y)
    torch.testing.assert_close(q.double(), q0, atol=3e-3, rtol=0)
    assert torch.all(c == 0) and c.shape == (12,)
    # summed statistics of two "ranks" give the same map
    torch.testing.assert_close(procrustes_map(x[:150].T @ y[:150] + x[150:].T @ y[150:])[0], q)
    # any data: orthonormal rows, so the head keeps the student's cosines exactly, unlike the least-squares map
    mix = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(400, 12, generator=gen, dtype=torch.float64) + x @ mix
    q, c = procrustes_map(x.T @ y)
    torch.testing.assert_close(q @ q.T, torch.eye(6), atol=1e-5, rtol=0)
    head = build_projection_head(6, 12, 12, seed=1)
    set_head_to_affine_map(head, q, c)
    u = torch.nn.functional.normalize(torch.randn(50, 6, generator=gen), dim=-1)
    out = head({"sentence_embedding": u})["sentence_embedding"]
    torch.testing.assert_close(out @ out.T, u @ u.T, atol=1e-5, rtol=0)
    a, b = ridge_map(*_stats(x, y))
    ls = torch.nn.functional.normalize(u @ a + b, dim=-1)
    assert (ls @ ls.T - u @ u.T).abs().max() > 0.05


def test_config_rejects_an_exact_start_with_a_narrow_head_and_a_fixed_head_with_head_only_steps(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {student_dim: 384, projection_hidden_dim: 512}\n")
    with pytest.raises(ConfigError, match="model.head_init: procrustes needs projection_hidden_dim >= 2 \\* "
                                          "student_dim \\(768\\), got 512"):
        load_config(path)  # procrustes: the default
    with pytest.raises(ConfigError, match="model.head_init: least_squares needs projection_hidden_dim >= 2"):
        load_config(path, ["model.head_init=least_squares"])
    assert load_config(path, ["model.head_init=random"]).model.head_init == "random"
    fixed = load_config(None, ["model.head_lr_multiplier=0", "phase1.head_only_fraction=0"])
    assert fixed.model.head_lr_multiplier == 0
    with pytest.raises(ConfigError, match=r"^phase1.head_only_fraction: 0.1 trains the head alone, but "
                                          r"model.head_lr_multiplier: 0 keeps it fixed; set it to 0$"):
        load_config(None, ["model.head_lr_multiplier=0"])
    with pytest.raises(ConfigError, match=r"model.head_lr_multiplier must be >= 0, got -1"):
        load_config(None, ["model.head_lr_multiplier=-1"])


def test_least_squares_start_gives_a_lower_first_loss_than_a_random_head(tmp_path, tiny_teacher_dir,
                                                                           tiny_student_dir) -> None:
    files = write_training_files(tmp_path / "data")
    first = {}
    for init in ("least_squares", "procrustes", "random"):
        (tmp_path / init).mkdir()
        cfg = tiny_config_yaml(tmp_path / init, tiny_teacher_dir, tiny_student_dir, files)
        res = train_single(cfg, "--set", f"model.head_init={init}", "--set", "training.skip_phase2=true",
                           "--set", "phase1.max_steps=2", "--set", "phase1.head_only_fraction=0",
                           "--set", "training.logging_steps=1")
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("initialised by " + init.replace("_", " ") in res.stderr) == (init != "random")
        first[init] = train_records(tmp_path / init / "out" / "distilled-model-48d-tiny", "phase1")[0]["loss"]
    assert first["least_squares"] < 0.9 * first["random"], first
    assert first["procrustes"] < 0.9 * first["random"], first


def test_a_fixed_procrustes_head_stays_an_isometry_through_both_phases(tmp_path, tiny_teacher_dir,
                                                                        tiny_student_dir) -> None:
    """``head_lr_multiplier: 0``: the exported head is still the Procrustes start after both phases, so the
    student's cosines pass through it unchanged while the backbone trained."""
    from sentence_transformers import SentenceTransformer

    files = write_training_files(tmp_path / "data")
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    res = train_single(cfg, "--set", "model.head_init=procrustes", "--set", "model.head_lr_multiplier=0",
                       "--set", "phase1.head_only_fraction=0", "--set", "phase1.max_steps=3",
                       "--set", "phase2.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "initialised by procrustes" in res.stderr
    final = SentenceTransformer(str(tmp_path / "out" / "distilled-model-48d-tiny" / "final"), device="cpu")
    first, second = final[3].linear.weight.detach(), final[4].linear.weight.detach()  # after Pooling, Normalize
    d = first.shape[1]
    torch.testing.assert_close(first, torch.cat([torch.eye(d), -torch.eye(d)]))
    q_t = second[:, :d]
    torch.testing.assert_close(second[:, d:], -q_t)
    torch.testing.assert_close(q_t.T @ q_t, torch.eye(d), atol=1e-5, rtol=0)
    texts = ["the cat sat", "a dog ran far away", "red fish blue fish"]
    backbone = SentenceTransformer(modules=[final[0], final[1], final[2]], device="cpu")
    full, own = final.encode(texts, convert_to_tensor=True), backbone.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(full @ full.T, own @ own.T, atol=1e-5, rtol=0)
    trained = SentenceTransformer(str(tiny_student_dir), device="cpu").encode(texts, convert_to_tensor=True)
    assert not torch.allclose(own, trained, atol=1e-4)  # the backbone did train
