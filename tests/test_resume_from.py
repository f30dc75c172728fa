"""``--resume-from PATH`` (named checkpoints, bad paths, later checkpoints set aside) and ``eval.select_best`` (the
metric syntax, choosing and exporting the best evaluated state), in process and cheap. The 2-rank runs: the resume in
tests/test_reliability.py, the selection in tests/test_train_e2e.py (projection_run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from distill.checkpoint import CheckpointManager, TrainState, check_resume_path, load_latest
from distill.config import load_config
from distill.errors import CheckpointError, ConfigError
from distill.evaluate import BestMetric

TINY = ["model.teacher_dim=48", "model.student_dim=32", "model.projection_hidden_dim=64",
        "model.matryoshka_dims=[32,16]", "eval.data=beir"]


def _manager(run: Path, *names: str) -> CheckpointManager:
    """A run folder with checkpoints ``names`` (phase{p}-step{s:08d}) of a tiny Linear model."""
    manager = CheckpointManager(run, keep_last=10)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for name in names:
        phase, step = int(name[5]), int(name.rsplit("step", 1)[1])
        manager.save(name, model=model, optimizer=optimizer, scaler=None, config={"model": {}},
                     scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                     state=TrainState(phase=phase, step=step))
    return manager


def _write_best(manager: CheckpointManager, phase: str, step: int) -> None:
    manager.best_dir.mkdir(parents=True)
    (manager.best_dir / "best.json").write_text(json.dumps({"metric": "ndcg@10", "score": 0.5, "phase": phase,
                                                            "step": step, "results": _results(0.5)}))


@pytest.mark.parametrize("case", ["missing", "empty folder", "run folder", "flipped byte", "no manifest"])
def test_bad_resume_path_is_one_line_naming_it_without_falling_back(tmp_path, case):
    manager = _manager(tmp_path / "run", "phase1-step00000002", "phase1-step00000004")
    older = manager.ckpt_dir / "phase1-step00000002"
    path = {"missing": tmp_path / "nope", "empty folder": tmp_path, "run folder": tmp_path / "run"}.get(case, older)
    if case == "flipped byte":
        data = bytearray((older / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 1
        (older / "model.safetensors").write_bytes(bytes(data))
    elif case == "no manifest":
        (older / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError) as err:
        manager.resume_point({"model": {}}, named=str(path))
    message = str(err.value)
    assert message.startswith(f"--resume-from {path}: ") and "\n" not in message, message
    assert {"missing": "no such checkpoint folder", "empty folder": "not a complete checkpoint folder",
            "run folder": "its checkpoints: phase1-step00000002, phase1-step00000004",
            "flipped byte": "model.safetensors does not match its sha256", "no manifest": "no MANIFEST.json"}[case] \
        in message
    if case in ("missing", "empty folder", "run folder", "no manifest"):  # the cheap check before any model loads
        with pytest.raises(CheckpointError, match="^--resume-from "):
            check_resume_path(str(path))
    assert sorted(p.name for p in manager.ckpt_dir.iterdir()) == ["phase1-step00000002", "phase1-step00000004"]


def test_resume_from_an_earlier_checkpoint_sets_later_ones_and_a_later_best_aside(tmp_path, caplog):
    manager = _manager(tmp_path / "run", "phase1-step00000002", "phase1-step00000004", "phase2-step00000002")
    _write_best(manager, "phase2", 2)
    (manager.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"event": "train", "phase": "phase1", "step": 2}, {"event": "train", "phase": "phase1", "step": 4},
        {"event": "train", "phase": "phase2", "step": 2})))
    named = manager.ckpt_dir / "phase1-step00000002"
    with caplog.at_level(logging.WARNING, logger="distill.checkpoint"):
        ckpt = manager.resume_point({"model": {}}, named=str(named))
    assert ckpt.path == named and (ckpt.state.phase, ckpt.state.step) == (1, 2)
    aside = manager.run_dir / "superseded"
    assert sorted(p.name for p in aside.iterdir()) == ["best", "phase1-step00000004", "phase2-step00000002"]
    assert not manager.best_dir.exists() and load_latest(manager.ckpt_dir).path == named  # automatic resume: here
    assert [json.loads(x)["step"] for x in (manager.run_dir / "metrics.jsonl").read_text().splitlines()] == [2]
    assert any("phase1-step00000002" in r.getMessage() and str(aside) in r.getMessage() for r in caplog.records)


def test_resume_from_another_runs_checkpoint_keeps_an_earlier_best(tmp_path):
    other = _manager(tmp_path / "other", "phase2-step00000004")
    manager = _manager(tmp_path / "run", "phase2-step00000002", "phase2-step00000006")
    _write_best(manager, "phase1", 8)
    ckpt = manager.resume_point({"model": {}}, named=str(other.ckpt_dir / "phase2-step00000004"))
    assert ckpt.path == other.ckpt_dir / "phase2-step00000004"
    assert [p.name for p in (manager.run_dir / "superseded").iterdir()] == ["phase2-step00000006"]
    assert manager.read_best()["step"] == 8  # evaluated before the resume point: still the best so far


def test_a_fresh_start_sets_a_stale_best_aside(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    _write_best(manager, "phase1", 4)
    assert manager.resume_point({"model": {}}) is None
    assert manager.read_best() is None and (manager.run_dir / "superseded" / "best" / "best.json").is_file()


def test_a_checkpoint_of_another_model_shape_is_one_line(tmp_path):
    from distill.checkpoint import load_model_state

    ckpt = _manager(tmp_path / "run", "phase1-step00000002").resume_point({"model": {}})
    with pytest.raises(CheckpointError, match=r"phase1-step00000002: a checkpoint of another model shape \(2 tensors "
                                              r"differ, e.g. bias\); resume from a checkpoint of this model$"):
        load_model_state(torch.nn.Linear(4, 3), ckpt)


# ---- eval.select_best ----
def _results(ndcg: float, mrr: float = 0.5) -> dict:
    """An evaluate_settings-like dict (MRL mode, dims 32 and 16) with these student->student@32 scores."""
    def row(setting: str, dim: int, n: float, m: float) -> dict:
        return {"setting": setting, "dim": dim, "retention": None,
                "metrics": {"ndcg@10": n, "mrr@10": m, "recall@10": n, "recall@100": n}}
    return {"rows": [row("teacher->teacher", 48, 0.9, 0.9), row("student->student", 32, ndcg, mrr),
                     row("student->student", 16, 1.0 - ndcg, 1.0 - mrr)]}


@pytest.mark.parametrize(("mode", "text", "parsed"), [
    ("true", "ndcg@10", ("student->student", None, "ndcg@10")),
    ("true", "student->teacher/mrr@10", ("student->teacher", None, "mrr@10")),
    ("false", "student->student@16/recall@100", ("student->student", 16, "recall@100")),
])
def test_select_best_syntax(mode, text, parsed):
    cfg = load_config(None, [*TINY, f"model.use_projection={mode}", f"eval.select_best={text}"])
    best = BestMetric.from_config(cfg)
    assert (best.setting, best.dim, best.metric) == parsed
    if mode == "false":
        assert best.score(_results(0.7)) == pytest.approx(0.3)  # the @16 row, not the largest dim's
    else:
        assert BestMetric.from_config(load_config(None, TINY)) is None


@pytest.mark.parametrize(("overrides", "error"), [
    (["eval.select_best=ndcg@100"], (r"'ndcg@100' is not an evaluated metric; did you mean 'ndcg@10'\? valid: METRIC, "
                                     r"student->student\[@DIM\]/METRIC with METRIC one of ndcg@10, mrr@10, recall@10, "
                                     r"recall@100 and DIM one of 32, 16$")),
    (["eval.select_best=student->teacher/ndcg@10"], (r"'student->teacher/ndcg@10' is not an evaluated metric; did you "
                                                     r"mean 'student->student/ndcg@10'\?")),
    (["eval.select_best=student->student@8/ndcg@10"], r"is not an evaluated metric.*DIM one of 32, 16$"),
    (["eval.select_best=ndcg@10", "eval.data=null"], r"eval.select_best needs eval.data"),
])
def test_select_best_errors_name_the_key_and_suggest(overrides, error):
    with pytest.raises(ConfigError, match=error) as err:
        load_config(None, [*TINY, "model.use_projection=false", *overrides])
    assert str(err.value).startswith("eval.select_best") and "\n" not in str(err.value)


def test_select_best_exports_the_best_scoring_state(tmp_path, tiny_student_dir, caplog):
    """Evaluations offered in order: the best (highest student->student@32 nDCG@10) is saved to best/ with best.json;
    the final model is that state (its weights, its results, its record), and a resumed manager keeps it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_student_dir), device="cpu")
    bias = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    cfg = load_config(None, [*TINY, "model.use_projection=false", "eval.select_best=ndcg@10"])
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    for phase, step, ndcg in (("phase1", 4, 0.3), ("phase1", 8, 0.6), ("phase2", 2, 0.6), ("phase2", 4, 0.5)):
        with torch.no_grad():
            bias.fill_(step * 10 + int(phase[-1]))  # marks the state
        manager.offer_best(cfg, _results(ndcg), phase, step, lambda: model)
    best = manager.read_best()
    assert (best["phase"], best["step"], best["score"], best["metric"]) == ("phase1", 8, 0.6, "ndcg@10")  # ties: first
    with caplog.at_level(logging.INFO, logger="distill.checkpoint"):
        final, results, record = CheckpointManager(tmp_path / "run", 2).final_model(cfg, lambda: model, {"last": 1})
    assert record == {"metric": "ndcg@10", "score": 0.6, "phase": "phase1", "step": 8}
    assert results == _results(0.6)
    loaded = next(p for n, p in final.named_parameters() if n.endswith("bias"))
    assert torch.all(loaded == 81)
    assert "the best evaluated state by ndcg@10 (0.6000), phase1 step 8" in caplog.text
    # Another metric: the stored best is rescored, so like is compared with like.
    cfg_mrr = load_config(None, [*TINY, "model.use_projection=false", "eval.select_best=mrr@10"])
    manager.offer_best(cfg_mrr, _results(0.1, mrr=0.4), "phase2", 6, lambda: model)
    assert manager.read_best()["step"] == 8  # 0.4 is not above the stored best's mrr@10 0.5
    manager.offer_best(cfg_mrr, _results(0.1, mrr=0.7), "phase2", 8, lambda: model)
    assert (manager.read_best()["phase"], manager.read_best()["step"]) == ("phase2", 8)


def test_without_select_best_the_final_model_is_the_last_step(tmp_path):
    last = object()
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    cfg = load_config(None, TINY)
    assert manager.final_model(cfg, lambda: last, {"r": 1}) == (last, {"r": 1}, None)
    selecting = load_config(None, [*TINY, "eval.select_best=ndcg@10"])
    assert manager.final_model(selecting, lambda: last, None) == (last, None, None)  # nothing evaluated: warns


@pytest.mark.parametrize("entry", ["python -m distill train", "train_ddp.py"])
def test_both_entry_points_take_resume_from_and_fail_fast_on_a_bad_path(tmp_path, capsys, entry):
    from tiny_models import REPO_ROOT

    from distill import cli

    args = ["--config", str(REPO_ROOT / "configs" / "quick_test.yaml"), "--resume-from", str(tmp_path / "gone"), "--log-level", "WARNING"]
    status = cli.main(["train", *args]) if entry.startswith("python") else cli.train_main(args)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == f"error: --resume-from {tmp_path / 'gone'}: no such checkpoint folder"
