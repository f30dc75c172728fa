"""Tests for distill.data: reading, validation, dedup, caps, negatives, prepared folders, tokenization, BEIR."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import distill.data as data_mod  # noqa: E402
from distill.data import (  # noqa: E402
    Phase1Data,
    TextTable,
    load_phase1,
    load_phase2,
    tokenize_table,
)
from distill.errors import ConfigError, DataError  # noqa: E402

try:  # the lead's real config classes, once they exist
    from distill.config import DataConfig, SourceConfig  # type: ignore[attr-defined]
except ImportError:  # identical stand-ins until then

    @dataclass
    class SourceConfig:  # type: ignore[no-redef]
        path: str
        name: str | None = None
        subset: str | None = None
        split: str = "train"
        format: str = "auto"
        query_columns: list[str] = field(default_factory=list)
        document_columns: list[str] = field(default_factory=list)
        query_column: str | None = None
        positive_column: str | None = None
        negative_columns: list[str] | None = None
        max_samples: int | None = None

    @dataclass
    class DataConfig:  # type: ignore[no-redef]
        phase1: list[SourceConfig]
        phase2: list[SourceConfig]
        on_bad_row: str = "error"
        fill_negatives: str = "error"
        length_pool_batches: int = 64


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def phase1_pairs(p1: Phase1Data) -> set[tuple[str, str]]:
    tables = {0: p1.queries, 1: p1.documents}
    return {("query" if role == 0 else "document", tables[role][row]) for role, row in p1.examples.tolist()}


def phase2_rows(p2) -> list[tuple[str, ...]]:
    out = []
    for row in np.asarray(p2.examples).tolist():
        out.append((p2.queries[row[0]], *p2.documents.take(row[1:])))
    return out


def flag_rows(n: int, negs: int = 3, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"query": f"query {i}", "pos": [f"positive {i}", f"other positive {i}"],
         "neg": [f"negative {i}.{j}" for j in range(negs)], "pos_scores": [0.9], "prompt": "ignored"}
        for i in range(start, start + n)
    ]


def p1(*sources: SourceConfig, **kw: Any) -> DataConfig:
    return DataConfig(phase1=list(sources), phase2=[], **kw)


def p2(*sources: SourceConfig, **kw: Any) -> DataConfig:
    return DataConfig(phase1=[], phase2=list(sources), **kw)


# ---------------------------------------------------------------------------------------------------------------
# reading each format
# ---------------------------------------------------------------------------------------------------------------


def test_phase1_jsonl_auto_detects_roles_and_list_columns(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "flag.jsonl", flag_rows(2, negs=2))
    out = load_phase1(p1(SourceConfig(str(src))), None, 0, tmp_path / "work")
    assert phase1_pairs(out) == {
        ("query", "query 0"), ("query", "query 1"),
        ("document", "positive 0"), ("document", "other positive 0"),
        ("document", "negative 0.0"), ("document", "negative 0.1"),
        ("document", "positive 1"), ("document", "other positive 1"),
        ("document", "negative 1.0"), ("document", "negative 1.1"),
    }
    assert out.examples.dtype == np.int64 and out.examples.shape == (10, 2)
    assert len(out.queries) == 2 and len(out.documents) == 8
    assert out.queries.role == "query" and out.documents.role == "document"
    (report,) = out.reports
    assert (report.name, report.rows_read, report.kept, report.dropped_bad) == (str(src), 2, 2, 0)


def test_phase1_csv_parquet_folder_and_explicit_columns(tmp_path: Path) -> None:
    nq = write_csv(tmp_path / "nq.csv", ["query", "answer"], [["who wrote it", "an author"], ["when", "today"]])
    pq_path = write_parquet(tmp_path / "hotpot.parquet",
                            {"anchor": ["a0"], "positive": ["p0"], "negative": ["n0"], "id": ["7"]})
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "plain doc one"}])
    write_csv(folder / "b.csv", ["text"], [["plain doc two"]])
    (folder / "notes.txt").write_text("ignored")
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"title": "T1", "body": "B1", "query": "not used"}])
    data = p1(
        SourceConfig(str(nq), name="nq"),
        SourceConfig(str(pq_path)),
        SourceConfig(str(folder), name="folder"),
        SourceConfig(str(custom), query_columns=["title"], document_columns=["body"]),
    )
    out = load_phase1(data, None, 0, tmp_path / "work")
    assert phase1_pairs(out) == {
        ("query", "who wrote it"), ("document", "an author"), ("query", "when"), ("document", "today"),
        ("query", "a0"), ("document", "p0"), ("document", "n0"),
        ("document", "plain doc one"), ("document", "plain doc two"),
        ("query", "T1"), ("document", "B1"),
    }
    assert [r.name for r in out.reports] == ["nq", str(pq_path), "folder", str(custom)]
    assert [r.kept for r in out.reports] == [2, 1, 2, 1]


def test_phase2_all_three_formats(tmp_path: Path) -> None:
    flag = write_jsonl(tmp_path / "flag.jsonl", flag_rows(2, negs=3))
    st = write_csv(tmp_path / "st.csv", ["anchor", "positive", "negative_2", "negative_1", "negative_10"],
                   [["a", "p", "n2", "n1", "n10"]])
    triplet = write_parquet(tmp_path / "triplet.parquet", {"query": ["q"], "positive": ["pp"], "negative": ["nn"]})
    out = load_phase2(p2(SourceConfig(str(flag)), SourceConfig(str(st))), 2, None, 0, tmp_path / "w1")
    assert out.examples.shape == (3, 4)
    assert phase2_rows(out) == [
        ("query 0", "positive 0", "negative 0.0", "negative 0.1"),
        ("query 1", "positive 1", "negative 1.0", "negative 1.1"),
        ("a", "p", "n1", "n2"),  # negative_N columns in numeric order, first num_negatives of them
    ]
    one = load_phase2(p2(SourceConfig(str(triplet))), 1, None, 0, tmp_path / "w2")
    assert phase2_rows(one) == [("q", "pp", "nn")]
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [{"q": "Q", "d": "D", "x": "X", "y": "Y"}])
    src = SourceConfig(str(explicit), query_column="q", positive_column="d", negative_columns=["y", "x"])
    assert phase2_rows(load_phase2(p2(src), 2, None, 0, tmp_path / "w3")) == [("Q", "D", "Y", "X")]


def test_text_table_access(tmp_path: Path) -> None:
    table = TextTable.from_texts("document", ["a", "bb", "ccc"])
    assert len(table) == 3 and table[0] == "a" and table[-1] == "ccc" and table[1:3] == ["bb", "ccc"]
    assert table.take(np.array([2, 0, 2])) == ["ccc", "a", "ccc"] and table.take([]) == []
    with pytest.raises(IndexError):
        table[3]
    assert TextTable.from_texts("document", ["a", "bb", "ccc"]).fingerprint == table.fingerprint
    assert TextTable.from_texts("query", ["a", "bb", "ccc"]).fingerprint != table.fingerprint


# ---------------------------------------------------------------------------------------------------------------
# validation errors name the file and line / row
# ---------------------------------------------------------------------------------------------------------------


def _phase2_error(tmp_path: Path, source: SourceConfig, num_negatives: int = 1, **kw: Any) -> str:
    with pytest.raises(DataError) as info:
        load_phase2(p2(source, **kw), num_negatives, None, 0, tmp_path / "work")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_and_unknown_formats(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    assert _phase2_error(tmp_path, SourceConfig(missing)) == f"{missing}: file not found (source {missing})"
    bad_ext = tmp_path / "data.txt"
    bad_ext.write_text("x")
    assert _phase2_error(tmp_path, SourceConfig(str(bad_ext))).startswith(f"{bad_ext}: unknown file format '.txt'")
    src = write_jsonl(tmp_path / "ok.jsonl", flag_rows(1))
    message = _phase2_error(tmp_path, SourceConfig(str(src), name="mine", format="xml"))
    assert message.startswith("source mine: unknown format 'xml'")


def test_jsonl_row_errors_name_file_and_line(tmp_path: Path) -> None:
    good = flag_rows(3, negs=2)
    cases = {
        "malformed": (['{"query": "x", "pos": ["y"]', *map(json.dumps, good)], 1, "malformed JSON"),
        "empty": ([good[0], {**good[1], "query": "   "}], 2, "column 'query' is empty"),
        "missing": ([good[0], good[1], {"query": "q", "neg": ["n"]}], 3, "no positive column among query, neg"),
        "not_text": ([good[0], {**good[1], "pos": [5]}], 2, "column 'pos[0]' is not text (int)"),
        "short": ([good[0], {**good[1], "neg": ["only one"]}], 2, "has 1 negatives, 2 needed"),
        "array": ([good[0], "[1, 2]"], 2, "expected a JSON object, got list"),
    }
    for name, (rows, line, text) in cases.items():
        src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        message = _phase2_error(tmp_path, SourceConfig(str(src)), num_negatives=2)
        assert message.startswith(f"{src}:{line}: {text}"), (name, message)


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "latin.jsonl"
    lines = [json.dumps(r).encode() for r in flag_rows(2)]
    jsonl.write_bytes(lines[0] + b"\n" + b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}\n' + lines[1] + b"\n")
    assert _phase2_error(tmp_path, SourceConfig(str(jsonl))).startswith(f"{jsonl}:2: not valid UTF-8")
    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes(b"query,positive,negative\nq1,p1,n1\nq2,caf\xe9,n2\n")
    assert _phase2_error(tmp_path, SourceConfig(str(csv_path))) == f"{csv_path}:3: not valid UTF-8"


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    # A quoted field spanning two lines: the record after it starts on line 4.
    path = tmp_path / "multi.csv"
    path.write_text('query,positive,negative\nq1,"p1\nstill p1",n1\nq2,,n2\n', encoding="utf-8")
    assert _phase2_error(tmp_path, SourceConfig(str(path))) == f"{path}:4: column 'positive' is empty"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("query,positive,negative\nq1,p1\n", encoding="utf-8")
    assert _phase2_error(tmp_path, SourceConfig(str(ragged))) == f"{ragged}:2: has 2 fields, the header has 3"
    cols = write_csv(tmp_path / "cols.csv", ["query", "answer"], [["q", "a"]])
    message = _phase2_error(tmp_path, SourceConfig(str(cols), negative_columns=["hard"]))
    assert message == f"{cols}: missing column 'hard' (columns: query, answer)"
    with pytest.raises(DataError, match=r"cols\.csv: missing column 'question' \(columns: query, answer\)"):
        load_phase1(p1(SourceConfig(str(cols), query_columns=["question"])), None, 0, tmp_path / "w")


def test_parquet_errors_name_the_row_index(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {"query": ["q0", "q1", "q2"], "positive": ["p0", "p1", None],
                                                  "negative": ["n0", "n1", "n2"]})
    assert _phase2_error(tmp_path, SourceConfig(str(path))) == f"{path} row 2: column 'positive' is null"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert _phase2_error(tmp_path, SourceConfig(str(broken))).startswith(f"{broken}: not a readable Parquet file")


def test_phase1_row_errors(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "p1.jsonl", [{"text": "fine"}, {"id": 3, "score": 1}])
    with pytest.raises(DataError, match=r"p1\.jsonl:2: no query or document column among id, score"):
        load_phase1(p1(SourceConfig(str(src))), None, 0, tmp_path / "w")
    src = write_jsonl(tmp_path / "p1b.jsonl", [{"title": "t", "body": "b"}, {"title": "t2"}])
    with pytest.raises(DataError, match=r"p1b\.jsonl:2: missing column 'body'"):
        load_phase1(p1(SourceConfig(str(src), query_columns=["title"], document_columns=["body"])), None, 0,
                    tmp_path / "w")


def test_bad_policy_values_are_config_errors(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "f.jsonl", flag_rows(1))
    with pytest.raises(ConfigError, match="data.on_bad_row: expected 'error' or 'skip', got 'ignore'"):
        load_phase2(p2(SourceConfig(str(src)), on_bad_row="ignore"), 1, None, 0, tmp_path / "w")
    with pytest.raises(ConfigError, match="data.fill_negatives"):
        load_phase2(p2(SourceConfig(str(src)), fill_negatives="bm25"), 1, None, 0, tmp_path / "w")


# ---------------------------------------------------------------------------------------------------------------
# skip policy, fill, dedup, caps
# ---------------------------------------------------------------------------------------------------------------


def test_skip_policy_counts_and_zero_rows_is_an_error(tmp_path: Path) -> None:
    good = flag_rows(4, negs=2)
    rows = [good[0], "{broken", {**good[1], "query": ""}, good[2], {**good[3], "neg": ["one"]}, good[0]]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = load_phase2(p2(SourceConfig(str(src), name="mixed"), on_bad_row="skip"), 2, None, 0, tmp_path / "w")
    (report,) = out.reports
    assert (report.rows_read, report.kept, report.dropped_bad, report.dropped_duplicate) == (6, 2, 3, 1)
    assert [r[0] for r in phase2_rows(out)] == ["query 0", "query 2"]
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{x", {"query": " ", "pos": ["p"], "neg": ["n"]}])
    with pytest.raises(DataError, match=r"^source allbad: no usable rows \(read 2, bad 2, duplicate 0\)$"):
        load_phase2(p2(SourceConfig(str(all_bad), name="allbad"), on_bad_row="skip"), 1, None, 0, tmp_path / "w")


def test_fill_negatives_random(tmp_path: Path) -> None:
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"] if i % 2 else []} for i in range(10)]
    src = write_jsonl(tmp_path / "short.jsonl", rows)
    pair = write_csv(tmp_path / "pair.csv", ["query", "answer"], [["nq q", "nq a"]])  # no negative column at all
    data = p2(SourceConfig(str(src)), SourceConfig(str(pair)), fill_negatives="random")
    out = load_phase2(data, 3, None, 5, tmp_path / "w1")
    assert out.examples.shape == (11, 5)
    assert [r.filled_negatives for r in out.reports] == [10, 1]
    for row, texts in zip(out.examples.tolist(), phase2_rows(out)):
        assert len(set(row[1:])) == 4  # positive + 3 distinct negatives, none equal to the positive
        i = texts[0][1:]
        if texts[0].startswith("q") and int(i) % 2:
            assert texts[2] == f"n{i}"  # the given negative stays first
    again = load_phase2(data, 3, None, 5, tmp_path / "w2")
    assert np.array_equal(out.examples, again.examples)
    other_seed = load_phase2(data, 3, None, 6, tmp_path / "w3")
    assert not np.array_equal(out.examples[:, 2:], other_seed.examples[:, 2:])
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"query": "q", "pos": ["p"], "neg": []}])
    with pytest.raises(DataError, match="cannot fill negatives: only 1 distinct documents, 4 needed"):
        load_phase2(p2(SourceConfig(str(tiny)), fill_negatives="random"), 3, None, 0, tmp_path / "w4")


def test_duplicates_are_removed(tmp_path: Path) -> None:
    rows = flag_rows(3, negs=1)
    src = write_jsonl(tmp_path / "dup.jsonl", [rows[0], rows[1], rows[0], rows[2], rows[1]])
    copy = write_jsonl(tmp_path / "copy.jsonl", [rows[2], *flag_rows(1, negs=1, start=9)])
    out = load_phase2(p2(SourceConfig(str(src)), SourceConfig(str(copy))), 1, None, 0, tmp_path / "w")
    assert [r.dropped_duplicate for r in out.reports] == [2, 1]
    assert [r.kept for r in out.reports] == [3, 1]
    assert len({tuple(r) for r in out.examples.tolist()}) == len(out.examples) == 4
    out1 = load_phase1(p1(SourceConfig(str(src)), SourceConfig(str(copy))), None, 0, tmp_path / "w")
    assert len({tuple(r) for r in out1.examples.tolist()}) == len(out1.examples)
    assert len(out1.documents) == len(set(out1.documents[:]))
    assert ("document", "positive 2") in phase1_pairs(out1)


def test_cap_is_a_reproducible_random_subset(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "many.jsonl", flag_rows(200, negs=1))
    data = p2(SourceConfig(str(src)))
    queries = lambda out: sorted(int(q.split()[1]) for q in out.queries[:])  # noqa: E731
    a = load_phase2(data, 1, 20, 0, tmp_path / "a")
    b = load_phase2(data, 1, 20, 0, tmp_path / "b")
    c = load_phase2(data, 1, 20, 1, tmp_path / "c")
    assert len(a.examples) == 20 and a.reports[0].kept == 20 and a.reports[0].sampled_out == 180
    assert queries(a) == queries(b) and queries(a) != queries(c)
    assert queries(a) != list(range(20)) and max(queries(a)) > 100
    # per-source cap (phase 1: max_samples_per_dataset rows, or the source's own max_samples)
    d = load_phase1(p1(SourceConfig(str(src))), 15, 0, tmp_path / "d")
    assert (d.reports[0].kept, d.reports[0].sampled_out, len(d.queries)) == (15, 185, 15)
    assert len(d.documents) == 45 and queries(d) != list(range(15))  # 2 positives + 1 negative per row
    e = load_phase1(p1(SourceConfig(str(src), max_samples=5)), 15, 0, tmp_path / "e")
    assert e.reports[0].kept == 5 and len(e.examples) == 20
    # phase 2: per-source cap first, then the total cap over the union
    other = write_jsonl(tmp_path / "other.jsonl", flag_rows(50, negs=1, start=1000))
    f = load_phase2(p2(SourceConfig(str(src), max_samples=30), SourceConfig(str(other))), 1, 40, 3, tmp_path / "f")
    assert len(f.examples) == 40 and sum(r.kept for r in f.reports) == 40
    assert f.reports[0].kept <= 30 and f.reports[0].sampled_out == 200 - f.reports[0].kept
    assert f.reports[1].sampled_out == 50 - f.reports[1].kept


def test_determinism_across_runs(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", flag_rows(60, negs=4))
    data = p2(SourceConfig(str(src)), fill_negatives="random")
    a = load_phase2(data, 6, 25, 11, tmp_path / "a")
    b = load_phase2(data, 6, 25, 11, tmp_path / "b")
    assert phase2_rows(a) == phase2_rows(b)
    assert a.queries[:] == b.queries[:] and a.documents[:] == b.documents[:]
    assert np.array_equal(a.examples, b.examples)
    one = load_phase1(p1(SourceConfig(str(src))), 10, 11, tmp_path / "c")
    two = load_phase1(p1(SourceConfig(str(src))), 10, 11, tmp_path / "d")
    assert np.array_equal(one.examples, two.examples) and one.documents[:] == two.documents[:]


# ---------------------------------------------------------------------------------------------------------------
# Hub path (load_dataset monkeypatched)
# ---------------------------------------------------------------------------------------------------------------


def test_hub_source_via_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    table = {"query": ["hq0", "hq1", "hq2"], "positive": ["hp0", "hp1", "  "],
             "negative_1": ["hn0", "hn1", "hn2"], "negative_2": ["hm0", "hm1", "hm2"]}

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None, **kw: Any):
        calls.append((path, name, split))
        if path == "org/offline":
            raise ConnectionError("Couldn't reach\nthe Hub")
        return datasets.Dataset.from_dict(table)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = SourceConfig("org/msmarco", subset="triplet-2", split="train")
    with pytest.raises(DataError) as info:
        load_phase2(p2(src), 2, None, 0, tmp_path / "w")
    assert str(info.value) == "dataset org/msmarco (triplet-2, train) row 2: column 'positive' is empty"
    out = load_phase2(p2(src, on_bad_row="skip"), 2, None, 0, tmp_path / "w")
    assert phase2_rows(out) == [("hq0", "hp0", "hn0", "hm0"), ("hq1", "hp1", "hn1", "hm1")]
    assert out.reports[0].dropped_bad == 1
    assert calls[-1] == ("org/msmarco", "triplet-2", "train")
    with pytest.raises(DataError, match=r"^dataset org/offline \(validation\): cannot load "
                                        r"\(ConnectionError: Couldn't reach the Hub\)$"):
        load_phase1(p1(SourceConfig("org/offline", split="validation")), None, 0, tmp_path / "w")


def serve_as_hub(monkeypatch: pytest.MonkeyPatch, path: Path, cache: Path) -> dict[str, Any]:
    """Every Hub id loads ``path`` through datasets' own json loader (streamed or not, as asked); ``stats`` counts
    the rows datasets yielded and records each call's ``streaming``."""
    real, stats = datasets.load_dataset, {"pulled": 0, "streaming": []}

    def pull(row: dict[str, Any]) -> dict[str, Any]:
        stats["pulled"] += 1
        return row

    def fake(name: str, subset: str | None = None, split: str | None = None, **kw: Any) -> Any:
        stats["streaming"].append(kw.get("streaming", False))
        ds = real("json", data_files=str(path), split="train", cache_dir=str(cache), **kw)
        return ds.map(pull) if kw.get("streaming") else ds.map(pull, load_from_cache_file=False)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return stats


def test_capped_hub_source_streams_only_its_first_valid_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = flag_rows(2000, negs=1)
    rows[2]["query"], rows[5] = " ", rows[0]  # a bad row and a duplicate among the first ones
    stats = serve_as_hub(monkeypatch, write_jsonl(tmp_path / "hub.jsonl", rows), tmp_path / "hf")
    src = SourceConfig("org/flag", subset="pairs")
    first10 = [f"query {i}" for i in (0, 1, 3, 4, 6, 7, 8, 9, 10, 11)]
    runs = [load_phase2(p2(src, on_bad_row="skip"), 1, 10, seed, tmp_path / f"w{seed}") for seed in (0, 7)]
    assert stats["streaming"] == [True, True] and stats["pulled"] <= 2 * 20  # batches of 10, not 2000 rows
    for out in runs:  # the first 10 valid unique rows, whatever the seed
        assert sorted(out.queries[:], key=lambda q: int(q.split()[1])) == first10
        r = out.reports[0]
        assert (r.rows_read, r.kept, r.dropped_bad, r.dropped_duplicate, r.sampled_out) == (12, 10, 1, 1, 0)
    assert phase2_rows(runs[0]) == phase2_rows(runs[1])
    stats["pulled"] = 0
    one = load_phase1(p1(SourceConfig("org/flag", max_samples=4), on_bad_row="skip"), 100, 0, tmp_path / "p1")
    assert stats["streaming"][-1] and stats["pulled"] <= 8 and one.queries[:] == first10[:4]
    # uncapped: the whole split is read, as before, the same rows as the file read locally
    stats["pulled"] = 0
    full = load_phase2(p2(src, on_bad_row="skip"), 1, None, 0, tmp_path / "full")
    local = load_phase2(p2(SourceConfig(str(tmp_path / "hub.jsonl")), on_bad_row="skip"), 1, None, 0, tmp_path / "l")
    assert stats["streaming"][-1] is False and stats["pulled"] == 2000 and full.reports[0].rows_read == 2000
    assert phase2_rows(full) == phase2_rows(local) and len(full.examples) == 1998


# ---------------------------------------------------------------------------------------------------------------
# prepared folders
# ---------------------------------------------------------------------------------------------------------------


def test_prepared_folder_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    src = write_jsonl(tmp_path / "r.jsonl", flag_rows(5, negs=2))
    data = p2(SourceConfig(str(src)))
    work = tmp_path / "work"
    with caplog.at_level(logging.INFO, logger="distill.data"):
        first = load_phase2(data, 2, None, 0, work)
    folders = [p for p in work.iterdir()]
    assert len(folders) == 1 and folders[0].name.startswith("phase2-")
    assert sorted(p.name for p in folders[0].iterdir()) == ["documents", "examples.npy", "meta.json", "queries",
                                                            "reports.json"]
    assert "prepared" in caplog.text and "r.jsonl" in caplog.text  # the per-source summary table

    def boom(*args: Any, **kw: Any) -> Any:
        raise AssertionError("should reuse the prepared folder")

    monkeypatch.setattr(data_mod, "_prepare_phase2", boom)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distill.data"):
        again = load_phase2(data, 2, None, 0, work)
    assert "reused" in caplog.text
    assert phase2_rows(again) == phase2_rows(first) and again.reports == first.reports
    with pytest.raises(AssertionError, match="should reuse"):  # another num_negatives is another folder
        load_phase2(data, 1, None, 0, work)
    write_jsonl(src, flag_rows(6, negs=2))  # the file changed: size + mtime differ
    with pytest.raises(AssertionError, match="should reuse"):
        load_phase2(data, 2, None, 0, work)
    monkeypatch.undo()
    assert len(load_phase2(data, 2, None, 0, work).examples) == 6
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


# ---------------------------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="module")
def student_tokenizer(student_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(student_dir))


def test_tokenize_table_once_and_cached(
    tmp_path: Path, student_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["short one", "a somewhat longer text about the module and its functions " * 5, "x"]
    table = TextTable.from_texts("document", texts)
    tokens = tokenize_table(table, student_tokenizer, 16, tmp_path / "work")
    expected = student_tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    assert tokens.input_ids([0, 1, 2]) == expected and tokens.input_ids([2, 0]) == [expected[2], expected[0]]
    assert tokens.lengths.dtype == np.int64 and tokens.lengths.tolist() == [len(x) for x in expected]
    assert tokens.lengths[1] == 16 and tokens.input_ids([]) == []
    assert expected[0][0] == student_tokenizer.cls_token_id and expected[0][-1] == student_tokenizer.sep_token_id
    folders = [p.name for p in (tmp_path / "work").iterdir()]
    assert len(folders) == 1 and folders[0].startswith("tokens-")

    def boom(*args: Any, **kw: Any) -> Any:
        raise AssertionError("should reuse the tokenized folder")

    monkeypatch.setattr(datasets.Dataset, "map", boom)
    cached = tokenize_table(table, student_tokenizer, 16, tmp_path / "work")
    assert cached.input_ids([1]) == [expected[1]] and np.array_equal(cached.lengths, tokens.lengths)
    with pytest.raises(AssertionError, match="should reuse"):
        tokenize_table(table, student_tokenizer, 32, tmp_path / "work")  # another max_length is another cache


def test_tokenize_prepared_table(tmp_path: Path, student_tokenizer: Any) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", flag_rows(4, negs=1))
    out = load_phase2(p2(SourceConfig(str(src))), 1, None, 0, tmp_path / "work")
    queries = tokenize_table(out.queries, student_tokenizer, 32, tmp_path / "work")
    documents = tokenize_table(out.documents, student_tokenizer, 32, tmp_path / "work")
    assert len(queries) == 4 and len(documents) == 8
    assert queries.input_ids([0]) == [student_tokenizer(out.queries[0])["input_ids"]]
    assert len(list((tmp_path / "work").glob("tokens-*"))) == 2


# ---------------------------------------------------------------------------------------------------------------
# BEIR
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# torchrun: rank 0 prepares, every rank reads; a rank-0 error reaches every rank
# ---------------------------------------------------------------------------------------------------------------

_DDP_SCRIPT = '''
import json, sys
from pathlib import Path
from distill.distributed import init_distributed, shutdown
from transformers import AutoTokenizer
from distill.data import load_phase2, tokenize_table
from distill.errors import DataError
from test_data import DataConfig, SourceConfig

info = init_distributed(timeout_s=60)
good, bad, work, out, student = sys.argv[1:6]
result = {}
for label, path in (("good", good), ("bad", bad)):
    try:
        p2 = load_phase2(DataConfig(phase1=[], phase2=[SourceConfig(path)]), 2, 5, 3, work)
        result[label] = {"queries": p2.queries[:], "documents": p2.documents[:], "examples": p2.examples.tolist()}
    except DataError as err:
        result[label] = {"error": str(err)}
    if label == "good":
        tokens = tokenize_table(p2.documents, AutoTokenizer.from_pretrained(student), 12, work)
        result["tokens"] = tokens.input_ids(range(len(tokens)))
        result["lengths"] = tokens.lengths.tolist()
Path(out, f"rank{info.rank}.json").write_text(json.dumps(result))
shutdown()
'''


def test_load_phase2_under_torchrun(tmp_path: Path, student_dir: Path, student_tokenizer: Any) -> None:
    from tiny_models import run_torchrun

    good = write_jsonl(tmp_path / "good.jsonl", flag_rows(12, negs=3))
    bad = write_jsonl(tmp_path / "bad.jsonl", [*flag_rows(2), "{oops"])
    script = tmp_path / "ddp_data.py"
    script.write_text(_DDP_SCRIPT)
    proc = run_torchrun(script, 2, [good, bad, tmp_path / "work", tmp_path, student_dir], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["good"] == rank1["good"]
    assert len(rank0["good"]["examples"]) == 5 and len(rank0["good"]["queries"]) == 5
    assert rank0["bad"] == rank1["bad"] == {"error": f"{bad}:3: malformed JSON (Expecting property name enclosed "
                                                     f"in double quotes at column 2)"}
    assert rank0["tokens"] == rank1["tokens"]
    assert rank0["tokens"] == student_tokenizer(rank0["good"]["documents"], truncation=True, max_length=12)["input_ids"]
    assert rank0["lengths"] == [len(ids) for ids in rank0["tokens"]]
    # one prepared folder and one token cache, each written once (no leftover temporary folders)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "work").iterdir()) == ["phase2", "tokens"]
