"""The least-squares start of the projection head: the maths (exact affine map in the GELU MLP, ridge solution from
summed statistics) and its effect in a real run (a lower first phase-1 loss than a random head)."""

from __future__ import annotations

import pytest
import torch
from test_train_e2e import train_records, train_single
from tiny_data import tiny_config_yaml, write_training_files

from distill.config import ConfigError, load_config
from distill.models import build_projection_head, ridge_map, set_head_to_affine_map


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


def test_config_rejects_least_squares_with_a_narrow_head(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {student_dim: 384, projection_hidden_dim: 512}\n")
    with pytest.raises(ConfigError, match="model.head_init: least_squares needs projection_hidden_dim >= 2 \\* "
                                          "student_dim \\(768\\), got 512"):
        load_config(path)
    assert load_config(path, ["model.head_init=random"]).model.head_init == "random"


def test_least_squares_start_gives_a_lower_first_loss_than_a_random_head(tmp_path, tiny_teacher_dir,
                                                                           tiny_student_dir) -> None:
    files = write_training_files(tmp_path / "data")
    first = {}
    for init in ("least_squares", "random"):
        (tmp_path / init).mkdir()
        cfg = tiny_config_yaml(tmp_path / init, tiny_teacher_dir, tiny_student_dir, files)
        res = train_single(cfg, "--set", f"model.head_init={init}", "--set", "training.skip_phase2=true",
                           "--set", "phase1.max_steps=2", "--set", "phase1.head_only_fraction=0",
                           "--set", "training.logging_steps=1")
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("initialised by least squares" in res.stderr) == (init == "least_squares")
        first[init] = train_records(tmp_path / init / "out" / "distilled-model-48d-tiny", "phase1")[0]["loss"]
    assert first["least_squares"] < 0.9 * first["random"], first
