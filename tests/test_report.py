"""Tests for distill.report: the metrics logger, plots and the markdown/JSON report."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill import report
from distill.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def eval_results(mode: str = "mrl") -> dict:
    """A results dict shaped like distill.evaluate.evaluate_settings output."""

    def row(setting, dim, ndcg, ref=0.5):
        metrics = {"ndcg@10": ndcg, "mrr@10": ndcg - 0.05, "recall@10": ndcg + 0.1, "recall@100": 0.95}
        retention = {m: v / {"ndcg@10": ref, "mrr@10": ref - 0.05, "recall@10": ref + 0.1, "recall@100": 0.95}[m]
                     for m, v in metrics.items()}
        return {"setting": setting, "dim": dim, "metrics": metrics, "retention": retention}

    if mode == "mrl":
        rows = [row("teacher->teacher", 3584, 0.5), row("student->student", 768, 0.45),
                row("student->student", 256, 0.4), row("student->student", 64, 0.3)]
        return {"mode": "mrl", "num_queries": 100, "num_documents": 5000, "student_dim": 768, "teacher_dim": 3584,
                "metrics": ["ndcg@10", "mrr@10", "recall@10", "recall@100"], "rows": rows, "mean_cosine": None}
    rows = [row("teacher->teacher", 3584, 0.5), row("student->student", 3584, 0.44),
            row("student->teacher", 3584, 0.42)]
    return {"mode": "projection", "num_queries": 100, "num_documents": 5000, "student_dim": 3584, "teacher_dim": 3584,
            "metrics": ["ndcg@10", "mrr@10", "recall@10", "recall@100"], "rows": rows,
            "mean_cosine": {"queries": 0.91, "documents": 0.89, "all": 0.9}}


def train_records() -> list[dict]:
    recs = []
    for step in range(1, 21):
        recs.append({"event": "train", "phase": "phase1", "step": step, "epoch": 0, "loss": 1.0 / step,
                     "terms": {"mse": 0.4 / step, "cosine": 0.6 / step}, "lr": 2e-5 * min(1, step / 5),
                     "samples_per_s": 100.0 + step, "elapsed_s": 2.0 * step})
    for step in range(1, 11):
        recs.append({"event": "train", "phase": "phase2", "step": step, "epoch": step // 6, "loss": 2.0 / step,
                     "terms": {"infonce": 1.8 / step, "mse": 0.2 / step}, "lr": 5e-6,
                     "samples_per_s": 50.0, "elapsed_s": 3.0 * step})
    return recs


def write_log(path: Path, records: list[dict]) -> Path:
    with report.MetricsLogger(path) as log:
        for r in records:
            log.log(r)
    return path


def test_logger_appends_flushed_json_lines_with_tensor_values(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    log = report.MetricsLogger(path)
    log.log({"event": "train", "phase": "phase1", "step": 1, "loss": torch.tensor(0.5), "lr": np.float32(1e-5),
             "terms": {"mse": torch.tensor(0.25)}})
    # flushed before close: another reader sees the complete line
    assert json.loads(path.read_text()) == {"event": "train", "phase": "phase1", "step": 1, "loss": 0.5,
                                            "lr": pytest.approx(1e-5), "terms": {"mse": 0.25}}
    log.log({"event": "eval", "phase": "phase1", "step": 1, "results": eval_results()})
    log.close()
    log.close()  # idempotent
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["results"]["rows"][0]["dim"] == 3584
    # a later run appends; the partial last line of a crashed run is dropped, not glued to the next record
    with path.open("a") as fh:
        fh.write('{"event": "train", "ste')
    with report.MetricsLogger(path) as log:
        log.log({"event": "train", "phase": "phase2", "step": 9, "loss": 1.0})
    records = report.read_metrics(path)
    assert [r.get("step") for r in records] == [1, 1, 9] and records[-1]["phase"] == "phase2"


def test_read_metrics_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"event": "train", "step": 1}\nnot json\n{"event": "train", "step": 2}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: invalid metrics record"):
        report.read_metrics(path)
    path.write_text('{"event": "train", "step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: invalid metrics record \(not a JSON object\)"):
        report.read_metrics(path)
    path.write_text('{"event": "train", "step": 1}\n\n{"event": "tr')
    assert report.read_metrics(path) == [{"event": "train", "step": 1}]
    with pytest.raises(DataError, match="metrics file not found"):
        report.read_metrics(tmp_path / "none.jsonl")


def test_training_summary_per_phase_and_resumed_steps():
    recs = train_records()
    # a resumed run re-logs phase1 steps 19-20 with different values: the last record wins
    recs += [dict(recs[18], loss=0.7), dict(recs[19], loss=0.6, samples_per_s=150.0)]
    summary = report.training_summary(recs)
    assert list(summary) == ["phase1", "phase2"]
    p1 = summary["phase1"]
    assert p1["steps"] == 20 and p1["final_loss"] == 0.6 and p1["elapsed_s"] == 40.0
    assert p1["samples_per_s"] == pytest.approx((sum(100.0 + s for s in range(1, 20)) + 150.0) / 20)
    assert p1["final_terms"] == {"mse": 0.4 / 20, "cosine": 0.6 / 20}
    assert summary["phase2"]["steps"] == 10 and summary["phase2"]["final_loss"] == pytest.approx(0.2)
    assert summary["phase2"]["final_lr"] == 5e-6


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_plot_metrics_writes_all_plots(tmp_path):
    recs = train_records()
    recs.insert(10, {"event": "eval", "phase": "phase1", "step": 10, "results": eval_results()})
    recs.append({"event": "eval", "phase": "phase2", "step": 10, "results": eval_results()})
    log = write_log(tmp_path / "metrics.jsonl", recs)
    paths = report.plot_metrics(log, tmp_path / "plots")
    names = [p.name for p in paths]
    assert names == ["loss_phase1.png", "loss_phase2.png", "lr.png", "eval_ndcg.png", "mrl_quality.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert_png(p)


def test_plot_metrics_without_mrl_rows_or_records(tmp_path):
    recs = train_records()[:5]
    recs.append({"event": "eval", "phase": "phase1", "step": 5, "results": eval_results("projection")})
    paths = report.plot_metrics(write_log(tmp_path / "a.jsonl", recs), tmp_path / "a")
    assert [p.name for p in paths] == ["loss_phase1.png", "lr.png", "eval_ndcg.png"]
    assert not (tmp_path / "a" / "mrl_quality.png").exists()
    (tmp_path / "empty.jsonl").write_text("")
    assert report.plot_metrics(tmp_path / "empty.jsonl", tmp_path / "b") == []
    assert report.mrl_points(eval_results()) == [(64, 0.3), (256, 0.4), (768, 0.45)]
    assert report.mrl_points(eval_results("projection")) == []


def test_format_eval_table():
    table = report.format_eval_table(eval_results("projection"))
    lines = table.splitlines()
    assert lines[0] == "| Setting | Dim | nDCG@10 | MRR@10 | R@10 | R@100 | Retention (nDCG@10) |"
    assert lines[2] == "| teacher->teacher (reference) | 3584 | 0.5000 | 0.4500 | 0.6000 | 0.9500 | 100.0% |"
    assert lines[3] == "| student->student | 3584 | 0.4400 | 0.3900 | 0.5400 | 0.9500 | 88.0% |"
    assert lines[4] == "| student->teacher (drop-in) | 3584 | 0.4200 | 0.3700 | 0.5200 | 0.9500 | 84.0% |"
    assert lines[-1] == "Mean cosine(student, teacher) on held-out texts: queries 0.9100, documents 0.8900, all 0.9000"
    no_teacher = {"rows": [{"setting": "student->student", "dim": 768, "retention": None,
                            "metrics": {"ndcg@10": 0.3, "mrr@10": 0.2, "recall@10": 0.4, "recall@100": 0.5}}]}
    assert report.format_eval_table(no_teacher).splitlines()[-1] == (
        "| student->student | 768 | 0.3000 | 0.2000 | 0.4000 | 0.5000 | - |"
    )


def test_write_report_markdown_and_json(tmp_path):
    recs = train_records() + [{"event": "eval", "phase": "phase2", "step": 10, "results": eval_results("projection")}]
    log = write_log(tmp_path / "metrics.jsonl", recs)
    config = {"model": {"teacher": "infly/inf-retriever-v1-pro", "use_projection": False},
              "phase1": {"learning_rate": 2e-5}, "paths": {"output_dir": tmp_path / "ckpt"}}
    final = eval_results("mrl")
    md_path, json_path = report.write_report(tmp_path / "rep", final, log, config, {"model": "student-x"})
    md = md_path.read_text()
    assert "- **model**: student-x" in md
    assert "100 queries, 5000 documents; mode: mrl." in md
    assert "| student->student | 256 | 0.4000 | 0.3500 | 0.5000 | 0.9500 | 80.0% |" in md
    assert "| phase1 | 20 | 0.0500 | mse 0.0200, cosine 0.0300 | 110.5 | 40.0 |" in md
    assert "| phase2 | 10 | 0.2000 | infonce 0.1800, mse 0.0200 | 50.0 | 30.0 |" in md
    for name in ["loss_phase1.png", "loss_phase2.png", "lr.png", "eval_ndcg.png", "mrl_quality.png"]:
        assert f"({name})" in md
        assert_png(tmp_path / "rep" / name)
    config_block = md.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block)["paths"]["output_dir"] == str(tmp_path / "ckpt")
    data = json.loads(json_path.read_text())
    assert data["eval"] == final  # the explicit final results, not the log's last eval
    assert data["training"]["phase1"]["steps"] == 20
    assert data["training"]["phase2"]["final_loss"] == pytest.approx(0.2)
    assert data["plots"] == ["loss_phase1.png", "loss_phase2.png", "lr.png", "eval_ndcg.png", "mrl_quality.png"]
    assert data["config"]["model"]["use_projection"] is False and data["extra"] == {"model": "student-x"}


def test_write_report_from_log_only_and_eval_only(tmp_path):
    recs = train_records()[:3]
    recs.append({"event": "eval", "phase": "phase1", "step": 3, "results": eval_results("projection")})
    log = write_log(tmp_path / "metrics.jsonl", recs)
    md_path, json_path = report.write_report(tmp_path / "a", metrics_jsonl=log)
    md = md_path.read_text()
    assert "| student->teacher (drop-in) | 3584 |" in md and "Mean cosine(student, teacher)" in md
    assert json.loads(json_path.read_text())["eval"]["mode"] == "projection"
    assert "## Config" not in md

    md_path, json_path = report.write_report(tmp_path / "b", eval_results=eval_results("mrl"))
    md = md_path.read_text()
    assert "## Training" not in md and "![mrl_quality](mrl_quality.png)" in md
    data = json.loads(json_path.read_text())
    assert data["training"] == {} and data["plots"] == ["mrl_quality.png"] and data["config"] is None

    md_path, _ = report.write_report(tmp_path / "c")
    assert "No evaluation results." in md_path.read_text()


def test_write_report_without_matplotlib_writes_tables_and_no_plots(tmp_path, monkeypatch, caplog):
    """matplotlib is the optional ``plots`` extra: without it the report (MRL results included) is still written."""
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.axes"):
        monkeypatch.setitem(sys.modules, name, None)  # find_spec -> None, import -> ImportError
    report._have_matplotlib.cache_clear()
    try:
        log = write_log(tmp_path / "metrics.jsonl", train_records())
        with caplog.at_level(logging.WARNING, logger="distill.report"):
            md_path, json_path = report.write_report(tmp_path / "rep", eval_results("mrl"), log)
    finally:
        report._have_matplotlib.cache_clear()
    assert "| student->student | 256 | 0.4000 | 0.3500 | 0.5000 | 0.9500 | 80.0% |" in md_path.read_text()
    assert json.loads(json_path.read_text())["plots"] == []
    assert not list((tmp_path / "rep").glob("*.png"))
    assert [r.getMessage() for r in caplog.records].count(
        "matplotlib is not installed: no plots (pip install 'distill[plots]')") == 1
