"""Fuzz: malformed data rows always give one clear DataError naming the file and line, and touch nothing."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import DataConfig, SourceConfig
from distill.data import load_phase1, load_phase2, preflight
from distill.errors import DataError
from distill.evaluate import read_beir
from tiny_data import tiny_config_yaml, write_training_files
from tiny_models import REPO_ROOT

GOOD = {"query": "what does shutil.copy do", "pos": ["copy a file and its permission bits"],
        "neg": ["remove a directory tree", "make a temporary file", "parse command line arguments"]}


def _mutations(rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, bytes of one bad JSONL line). Every one must be rejected."""
    good = json.dumps(GOOD)
    cut = rng.randrange(1, len(good) - 1)
    bad_bytes = bytearray(good.encode())
    bad_bytes[rng.randrange(2, len(bad_bytes) - 2)] = rng.choice([0x80, 0xC3, 0xFF, 0xFE])
    return [
        ("truncated json", good[:cut].encode()),
        ("non-utf8", bytes(bad_bytes)),
        ("not an object", json.dumps([GOOD]).encode()),
        ("missing query", json.dumps({k: v for k, v in GOOD.items() if k != "query"}).encode()),
        ("missing pos", json.dumps({k: v for k, v in GOOD.items() if k != "pos"}).encode()),
        ("empty query", json.dumps({**GOOD, "query": " " * rng.randrange(0, 4)}).encode()),
        ("empty positive list", json.dumps({**GOOD, "pos": []}).encode()),
        ("number as text", json.dumps({**GOOD, "query": rng.randrange(10**6)}).encode()),
        ("too few negatives", json.dumps({**GOOD, "neg": GOOD["neg"][: rng.randrange(0, 3)]}).encode()),
        ("null negative", json.dumps({**GOOD, "neg": [None, "a", "b"]}).encode()),
        ("nested object as text", json.dumps({**GOOD, "query": {"text": "x"}}).encode()),
        ("lone surrogate escape", json.dumps({**GOOD, "query": "a\ud800b"}).encode()),
    ]


@pytest.mark.parametrize("seed", range(6))
def test_malformed_phase2_rows_raise_data_error_with_file_and_line(tmp_path, seed):
    rng = random.Random(seed)
    for name, bad in _mutations(rng):
        n_good = rng.randrange(0, 5)
        lines = [json.dumps({**GOOD, "query": f"q{i} {GOOD['query']}"}).encode() for i in range(n_good)]
        path = tmp_path / f"{name.replace(' ', '_')}-{seed}.jsonl"
        path.write_bytes(b"\n".join([*lines, bad]) + b"\n")
        cfg = DataConfig(phase1=[], phase2=[SourceConfig(path=str(path))])
        with pytest.raises(DataError) as err:
            load_phase2(cfg, num_negatives=3, max_samples=None, seed=0, work_dir=tmp_path / f"work-{name}-{seed}")
        msg = str(err.value)
        assert "\n" not in msg, name
        assert f"{path}:{n_good + 1}" in msg, (name, msg)


@pytest.mark.parametrize("seed", range(4))
def test_malformed_phase1_rows_and_files(tmp_path, seed):
    rng = random.Random(100 + seed)
    cases = {
        "empty file": b"",
        "only blank lines": b"\n\n",
        "binary": bytes(rng.randrange(256) for _ in range(64)),
        "csv with bad header": b"nothing,here\n1,2\n",
    }
    for name, content in cases.items():
        suffix = ".csv" if "csv" in name else ".jsonl"
        path = tmp_path / f"{name.replace(' ', '_')}-{seed}{suffix}"
        path.write_bytes(content)
        cfg = DataConfig(phase1=[SourceConfig(path=str(path))], phase2=[])
        with pytest.raises(DataError) as err:
            load_phase1(cfg, max_samples_per_dataset=None, seed=0, work_dir=tmp_path / "work")
        assert str(path) in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_preflight_catches_file_level_problems_without_reading_everything(tmp_path):
    missing = DataConfig(phase1=[SourceConfig(path=str(tmp_path / "nope.jsonl"))], phase2=[])
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        preflight(missing, [1], 7)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        preflight(DataConfig(phase1=[SourceConfig(path=str(empty))], phase2=[]), [1], 7)
    no_cols = tmp_path / "cols.jsonl"
    no_cols.write_text(json.dumps({"title": "x", "body": "y"}) + "\n")
    with pytest.raises(DataError, match="cols.jsonl: no query column"):
        preflight(DataConfig(phase1=[], phase2=[SourceConfig(path=str(no_cols))]), [2], 7)
    # A row-level problem further down is left to the full read (preflight reads one row).
    later = tmp_path / "later.jsonl"
    later.write_text(json.dumps(GOOD) + "\n{broken\n")
    preflight(DataConfig(phase1=[], phase2=[SourceConfig(path=str(later))]), [2], 3)


def test_bad_data_through_the_cli_fails_fast_and_writes_nothing(tmp_path, tiny_teacher_dir, tiny_student_dir):
    files = write_training_files(tmp_path / "data")
    lines = files["phase2"].read_text().splitlines()
    lines[5] = lines[5][:-7]  # a truncated JSON line, line 6
    files["phase2"].write_text("\n".join(lines) + "\n")
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, "train_ddp.py", "--config", str(cfg)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"{files['phase2']}:6: malformed JSON" in errors[0], res.stderr[-2000:]
    assert "Loading SentenceTransformer" not in res.stderr  # no model was loaded
    out = Path(tmp_path / "out")
    assert not (out / "distilled-model-48d-tiny").exists()  # no run folder, checkpoint or artifact
    assert not (tmp_path / "artifacts").exists()


def test_lone_surrogate_escapes_are_bad_rows_in_training_and_beir_files(tmp_path):
    """Valid JSON whose decoded text cannot be encoded as UTF-8 (tokenizers, hashing and Arrow would crash later)."""
    p1, p2 = tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    p1.write_text('{"query": "ok", "document": "fine"}\n{"query": "a\\udc80b", "document": "d"}\n')
    p2.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "query": "x", "pos": ["a\ud800"]}) + "\n"
                  + json.dumps({**GOOD, "query": "\U0001f600 emoji (a valid surrogate pair)"}) + "\n")
    load = {1: lambda cfg, w: load_phase1(cfg, max_samples_per_dataset=None, seed=0, work_dir=w),
            2: lambda cfg, w: load_phase2(cfg, num_negatives=3, max_samples=None, seed=0, work_dir=w)}
    for phase, path in ((1, p1), (2, p2)):
        sources = {"phase1": [SourceConfig(path=str(path))] if phase == 1 else [],
                   "phase2": [SourceConfig(path=str(path))] if phase == 2 else []}
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8 \(lone surrogate"):
            load[phase](DataConfig(**sources), tmp_path / f"work{phase}")
        assert not any((tmp_path / f"work{phase}").rglob("*.arrow"))
        (report,) = load[phase](DataConfig(**sources, on_bad_row="skip"), tmp_path / f"skip{phase}").reports
        assert (report.rows_read, report.dropped_bad, report.kept) == {1: (2, 1, 1), 2: (3, 1, 2)}[phase]
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({**GOOD, "neg": ["\udfff", "b", "c"]}) + "\n")
    with pytest.raises(DataError, match="first.jsonl:1: not valid UTF-8"):
        preflight(DataConfig(phase1=[], phase2=[SourceConfig(path=str(first))]), [2], 3)

    beir = write_training_files(tmp_path / "data")["beir"]
    good = {name: (beir / name).read_bytes() for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")}
    cases = [("corpus.jsonl", b'{"_id": "d0", "text": "doc \\ud800 one"}'),
             ("corpus.jsonl", b'{"_id": "d\\udfff", "text": "doc"}'),
             ("queries.jsonl", b'{"_id": "q0", "title": "t", "text": "\\udc00"}'),
             ("corpus.jsonl", b'{"_id": "d0", "text": "bad byte \xff"}'),
             ("qrels/test.tsv", b"q0\td\xff0\t1")]
    for name, line in cases:
        (beir / name).write_bytes(line + b"\n" + good[name])
        with pytest.raises(DataError) as err:
            read_beir(beir)
        assert str(err.value).startswith(f"{beir / name}:1: not valid UTF-8"), (name, str(err.value))
        (beir / name).write_bytes(good[name])
    assert len(read_beir(beir).queries) > 0
