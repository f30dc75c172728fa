"""Evaluation sets in the Hub's BEIR layouts (read with ``datasets`` from local copies, no network) and MTEB tasks
(through the stand-in tests/fake_mteb/mteb.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from tiny_data import write_hub_beir, write_training_files

from distill import cli
from distill import evaluate as ev
from distill.config import load_config
from distill.errors import ConfigError, DataError, DistillError

FAKE_MTEB = Path(__file__).resolve().parent / "fake_mteb" / "mteb.py"


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    """A BEIR folder of 24 docstring queries and documents (q{i} -> d{i}) with qrels test.tsv and train.tsv."""
    folder = write_training_files(tmp_path_factory.mktemp("data"), n=8)["beir"]
    shutil.copy(folder / "qrels" / "test.tsv", folder / "qrels" / "train.tsv")
    return folder


@pytest.fixture()
def fake_mteb(monkeypatch):
    spec = importlib.util.spec_from_file_location("mteb", FAKE_MTEB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "mteb", module)
    return module


@pytest.mark.parametrize(("layout", "where"), [
    ("mteb", {"corpus": ("corpus", "corpus"), "queries": ("queries", "queries"), "qrels": ("default", "test")}),
    ("nanobeir", {"corpus": ("corpus", "train"), "queries": ("queries", "train"), "qrels": ("qrels", "train")}),
    ("beir", {"corpus": ("corpus", "corpus"), "queries": ("queries", "queries"), "qrels": (None, "test")}),
])
def test_hub_layouts_read_like_the_beir_folder(beir, tmp_path, layout, where):
    """MTEB (qrels in config default), NanoBEIR (config qrels, one train split, no score) and BeIR ({id}-qrels)."""
    hub = write_hub_beir(beir, tmp_path / "scifact", layout)
    parts = ev.hub_parts(str(hub), "test")
    qrels_repo = f"{hub}-qrels" if layout == "beir" else str(hub)
    assert parts == {role: (qrels_repo if role == "qrels" else str(hub), *where[role]) for role in where}
    want, got = ev.read_beir(beir, "test"), ev.load_eval_set(str(hub), "test")
    assert got.corpus == want.corpus and got.queries == want.queries and got.qrels == want.qrels
    assert len(got.queries) == 24 and got.qrels["q3"] == {"d3": 1}
    ev.check_eval_set(str(hub), "test")  # the dry run's check passes


def test_hub_set_titles_lists_and_missing_scores(tmp_path):
    """A title is prefixed to the text (as corpus.jsonl's), a list of corpus-ids is one qrel each, score 1 if absent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = {"corpus": [{"_id": 1, "title": "Cats", "text": "purr"}, {"_id": 2, "title": None, "text": "bark"}],
              "queries": [{"_id": 7, "text": "pets"}, {"_id": 8, "text": "unjudged"}],
              "qrels": [{"query-id": 7, "corpus-id": [1, 2]}]}
    readme = ["---", "configs:"]
    for name, rows in tables.items():
        (tmp_path / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name / "train-0.parquet")
        readme += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {name}/*"]
    (tmp_path / "README.md").write_text("\n".join([*readme, "---", ""]))
    got = ev.load_eval_set(str(tmp_path))
    assert got.corpus == {"1": "Cats purr", "2": "bark"}
    assert got.queries == {"7": "pets"} and got.qrels == {"7": {"1": 1, "2": 1}}


def test_hub_set_errors_are_one_line(beir, tmp_path):
    with pytest.raises(DataError) as err:  # offline (the test suite's HF_HUB_OFFLINE=1) and not cached
        ev.load_eval_set("nobody/no-such-beir-set")
    assert str(err.value).startswith("eval.data nobody/no-such-beir-set: cannot load (ConnectionError")
    assert "\n" not in str(err.value)
    hub = write_hub_beir(beir, tmp_path / "mteb", "mteb")
    with pytest.raises(DataError, match=r"eval.split: .*mteb \(default\) has no split 'dev' \(it has test, train\)"):
        ev.check_eval_set(str(hub), "dev")
    (hub / "README.md").write_text((hub / "README.md").read_text().replace("config_name: queries", "config_name: q"))
    with pytest.raises(DataError, match="neither a BEIR folder .* nor a dataset with configs corpus and queries "
                                        r"\(it has default, corpus, q\)"):
        ev.check_eval_set(str(hub), "test")
    with pytest.raises(DataError, match="nope: BEIR folder not found"):  # a path that must be local stays local
        ev.check_eval_set(str(tmp_path / "nope"), "test")


def test_cli_evaluates_a_hub_set_like_the_folder(beir, tmp_path, tiny_student_dir):
    hub = write_hub_beir(beir, tmp_path / "nano", "nanobeir")
    results = {}
    for name, data in (("folder", beir), ("hub", hub)):
        assert cli.main(["evaluate", "--model", str(tiny_student_dir), "--data", str(data), "--out",
                         str(tmp_path / name)]) == 0
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert results["hub"]["data"] == str(hub) and results["hub"]["num_queries"] == 24
    assert results["hub"]["rows"] == results["folder"]["rows"]


def test_mteb_tasks_need_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mteb", None)  # not importable, whatever is installed
    with pytest.raises(ConfigError, match=r"^eval.mteb_tasks: MTEB tasks need the mteb package; pip install "):
        load_config(None, ["eval.mteb_tasks=[NFCorpus]"])
    assert load_config(None, ["eval.mteb_tasks=[]"]).eval.mteb_tasks == []
    assert cli.main(["evaluate", "--model", str(tmp_path), "--mteb-tasks", "NFCorpus"]) == 2


def test_cli_mteb_tasks_score_the_model_and_are_recorded(fake_mteb, beir, tiny_student_dir, tmp_path, capsys):
    assert load_config(None, ["eval.mteb_tasks=[FakeRetrieval]"]).eval.mteb_tasks == ["FakeRetrieval"]
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--model", str(tiny_student_dir), "--mteb-tasks", "FakeRetrieval, FakeSTS",
                     "--batch-size", "5", "--out", str(out)]) == 0
    assert fake_mteb.CALLS == [{"tasks": ["FakeRetrieval", "FakeSTS"], "model": "SentenceTransformer", "dim": 32,
                                "encode_kwargs": {"batch_size": 5}, "cache": None, "rank": "0"}]
    results = json.loads((out / "eval.json").read_text())
    assert [(r["task"], r["main_score"]) for r in results["mteb"]] == [("FakeRetrieval", 32.0), ("FakeSTS", 32.1)]
    assert results["mteb"][1]["scores"]["test"][0]["main_score"] == 32.1 and "rows" not in results
    assert json.loads((out / "report.json").read_text())["eval"]["mteb"] == results["mteb"]
    assert "## MTEB" in (out / "report.md").read_text() and "| FakeSTS | 32.1000 |" in capsys.readouterr().out
    # with a BEIR set: the retrieval rows and the MTEB results in one eval.json
    assert cli.main(["evaluate", "--model", str(tiny_student_dir), "--data", str(beir), "--mteb-tasks",
                     "FakeRetrieval", "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["rows"][0]["setting"] == "student->student" and results["mteb"][0]["main_score"] == 32.0
    assert cli.main(["evaluate", "--model", str(tiny_student_dir), "--mteb-tasks", "UnknownTask,FakeSTS"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: eval.mteb_tasks: unknown MTEB task(s) UnknownTask"
    assert cli.main(["evaluate", "--model", str(tiny_student_dir)]) == 2
    assert "evaluate needs --data" in capsys.readouterr().err


def test_run_mteb_failure_raises_or_is_recorded(fake_mteb, monkeypatch):
    from distill.report import format_mteb_table

    monkeypatch.setenv("FAKE_MTEB_FAIL", "no network")
    with pytest.raises(DistillError, match=r"^MTEB evaluation failed \(RuntimeError: no network\)$"):
        ev.run_mteb(object(), ["FakeRetrieval"], 8)
    rows = ev.run_mteb(object(), ["FakeRetrieval"], 8, keep_going=True)  # training: the run still finishes
    assert rows == [{"error": "MTEB evaluation failed (RuntimeError: no network)"}]
    assert "| - | MTEB evaluation failed (RuntimeError: no network) |" in format_mteb_table(rows)
