"""Tests for distill.evaluate: BEIR reading, exact search, metrics, the settings table, ``python -m distill evaluate``
and 2-rank eval."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill import cli
from distill import evaluate as ev
from distill.errors import ConfigError, DataError, DistillError

REPO = Path(__file__).resolve().parents[1]
HEADER = "query-id\tcorpus-id\tscore"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def retrieval(queries, corpus, qrels, encode_query, encode_doc, dims=None) -> dict[str, dict[str, float]]:
    """Reference scores: encode once, then ``{str(dim): metrics}`` of each (MRL-truncated) dim (default: full)."""
    emb = ev.encode_eval_set(queries, corpus, qrels, encode_query, encode_doc)
    return {str(dim): ev.retrieval_metrics(emb, qrels, dim) for dim in dims or [emb.dim]}


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple], split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def table_encoder(table: dict[str, torch.Tensor], calls: list | None = None):
    """An EncodeFn that looks every text up in ``table`` (and records (role, n) calls)."""

    def encode(texts: list[str], role: str) -> torch.Tensor:
        if calls is not None:
            calls.append((role, len(texts)))
        return torch.stack([table[t] for t in texts]).float()

    return encode


def toy_set(n_docs=40, n_queries=12, dim=12, seed=0):
    """Random docs; each query sits near its relevant doc(s); returns (queries, corpus, qrels, teacher table)."""
    g = torch.Generator().manual_seed(seed)
    corpus = {f"d{i}": f"document {i}" for i in range(n_docs)}
    queries = {f"q{j}": f"query {j}" for j in range(n_queries)}
    queries["q_unjudged"] = "a query without qrels"
    table = {text: torch.randn(dim, generator=g) for text in corpus.values()}
    qrels: dict[str, dict[str, int]] = {}
    for j in range(n_queries):
        a, b = torch.randint(0, n_docs, (2,), generator=g).tolist()
        qrels[f"q{j}"] = {f"d{a}": 2, f"d{b}": 1}
        table[f"query {j}"] = table[f"document {a}"] + 0.9 * torch.randn(dim, generator=g)
    table["a query without qrels"] = torch.randn(dim, generator=g)
    return queries, corpus, qrels, table


def reference_metrics(qrels, run):
    """Independent textbook implementation (trec_eval conventions: linear gains, log2(rank+1) discount,
    relevant = score > 0, recall denominator = all relevant judged docs)."""
    out = {m: [] for m in ev.METRICS}
    for qid, judged in qrels.items():
        ranked = [d for d, _ in sorted(run.get(qid, {}).items(), key=lambda x: -x[1])]
        rel = {d: s for d, s in judged.items() if s > 0}
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out["ndcg@10"].append(dcg / idcg if idcg else 0.0)
        first = next((i for i, d in enumerate(ranked[:10]) if d in rel), None)
        out["mrr@10"].append(0.0 if first is None else 1.0 / (first + 1))
        for k in (10, 100):
            hit = sum(1 for d in ranked[:k] if d in rel)
            out[f"recall@{k}"].append(hit / len(rel) if rel else 0.0)
    return {m: float(np.mean(v)) for m, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------


def test_metrics_match_reference_on_random_run():
    rng = np.random.default_rng(7)
    docs = [f"doc{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(60):
        judged = rng.choice(docs, size=rng.integers(1, 8), replace=False)
        qrels[f"q{q}"] = {d: int(rng.integers(0, 4)) for d in judged}
        retrieved = rng.choice(docs, size=150, replace=False)
        # put some relevant docs near the top so every metric takes non-trivial values
        run[f"q{q}"] = {d: float(rng.random()) for d in retrieved}
        for d in judged[: len(judged) // 2]:
            run[f"q{q}"][d] = float(rng.random() + rng.choice([0.0, 0.9]))
    got = ev.compute_metrics(qrels, run)
    want = reference_metrics(qrels, run)
    for m in ev.METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-6), m
    assert 0.05 < got["ndcg@10"] < 0.95 and got["recall@100"] > got["recall@10"]
    # per-query values agree too, not only the means
    per_query = ev.per_query_metrics(qrels, run)
    for qid in list(qrels)[:10]:
        one = reference_metrics({qid: qrels[qid]}, run)
        for m in ev.METRICS:
            assert per_query[qid][m] == pytest.approx(one[m], abs=1e-6)


def test_toy_case_by_hand_through_the_full_pipeline():
    # unit vectors in the plane at the given angles: cosine ranking is by angular distance
    def at(deg):
        r = math.radians(deg)
        return torch.tensor([math.cos(r), math.sin(r)])

    corpus = {"d1": "one", "d2": "two", "d3": "three", "d4": "four"}
    table = {"one": at(0), "two": at(30), "three": at(60), "four": at(90)}
    table.update({"first": 3 * at(25), "second": 0.5 * at(85)})
    queries = {"q1": "first", "q2": "second"}
    # q1 ranking: d2 d1 d3 d4 ; q2 ranking: d4 d3 d2 d1 ; d9 is judged but not in the corpus
    qrels = {"q1": {"d1": 1, "d4": 1}, "q2": {"d2": 2, "d1": 0, "d9": 1}}
    res = retrieval(queries, corpus, qrels, table_encoder(table), table_encoder(table))
    assert list(res) == ["2"]
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    ndcg_q2 = (2 / math.log2(4)) / (2 + 1 / math.log2(3))
    want = {
        "ndcg@10": (ndcg_q1 + ndcg_q2) / 2,
        "mrr@10": (1 / 2 + 1 / 3) / 2,
        "recall@10": (1.0 + 0.5) / 2,
        "recall@100": (1.0 + 0.5) / 2,
    }
    for m, v in want.items():
        assert res["2"][m] == pytest.approx(v, abs=1e-9), m


def test_mrr_and_recall_are_cut_at_their_depth():
    # the only relevant doc is ranked 11th: invisible to @10 metrics, found by recall@100
    run = {"q": {f"d{i}": 1.0 - i / 100 for i in range(1, 21)}}
    qrels = {"q": {"d11": 1}}
    got = ev.compute_metrics(qrels, run)
    assert got == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0, "recall@100": 1.0}
    # a query with qrels but no retrieved documents counts as zero in the mean
    got = ev.compute_metrics({"q": {"d1": 1}, "q_empty": {"d2": 1}}, {"q": {"d1": 0.3}})
    assert got["mrr@10"] == pytest.approx(0.5) and got["recall@10"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# exact search
# ----------------------------------------------------------------------------------------------------------------


def brute_force(q, d, k):
    sims = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
    order = torch.argsort(sims, dim=1, descending=True)[:, :k]
    return torch.gather(sims, 1, order), order


@pytest.mark.parametrize(
    "n_q, n_d, k, chunk, q_chunk",
    [(37, 203, 10, 7, 5), (37, 203, 100, 64, 100), (3, 9, 20, 4, 2), (50, 120, 1, 1000, 1000), (8, 30, 30, 3, 3)],
)
def test_exact_search_equals_brute_force(n_q, n_d, k, chunk, q_chunk):
    g = torch.Generator().manual_seed(n_q * 1000 + n_d)
    # unnormalised rows with very different norms: the result must be cosine, not dot product
    f64 = torch.float64
    q = torch.randn(n_q, 16, generator=g, dtype=f64) * torch.rand(n_q, 1, generator=g, dtype=f64) * 50
    d = torch.randn(n_d, 16, generator=g, dtype=f64) * torch.rand(n_d, 1, generator=g, dtype=f64) * 50
    scores, idx = ev.exact_search(q, d, k, chunk_size=chunk, query_chunk_size=q_chunk)
    want_scores, want_idx = brute_force(q, d, k)
    assert idx.shape == (n_q, min(k, n_d))
    assert torch.equal(idx, want_idx)
    assert torch.allclose(scores, want_scores, atol=1e-12)
    assert scores.dtype == torch.float64


def test_exact_search_float32_and_bad_shapes():
    g = torch.Generator().manual_seed(3)
    q, d = torch.randn(20, 8, generator=g), torch.randn(500, 8, generator=g)
    scores, idx = ev.exact_search(q, d, 100, chunk_size=33, query_chunk_size=6)
    want_scores, want_idx = brute_force(q, d, 100)
    assert torch.allclose(scores, want_scores, atol=1e-5)
    assert (idx == want_idx).float().mean() > 0.99  # float32 near-ties may swap neighbours
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    with pytest.raises(ValueError, match="exact_search needs"):
        ev.exact_search(q, torch.randn(5, 7), 3)


# ----------------------------------------------------------------------------------------------------------------
# settings table
# ----------------------------------------------------------------------------------------------------------------


def test_settings_projection_mode_rows_retention_and_cosine():
    queries, corpus, qrels, teacher_table = toy_set(dim=12)
    g = torch.Generator().manual_seed(1)
    student_table = {t: v + 0.8 * torch.randn(12, generator=g) for t, v in teacher_table.items()}
    teacher_calls: list = []
    res = ev.evaluate_settings(
        queries, corpus, qrels, table_encoder(student_table), table_encoder(teacher_table, teacher_calls)
    )
    json.dumps(res)  # JSON-serialisable
    assert res["mode"] == "projection" and res["student_dim"] == res["teacher_dim"] == 12
    assert res["num_queries"] == 12 and res["num_documents"] == 40  # the unjudged query is not evaluated
    assert [(r["setting"], r["dim"]) for r in res["rows"]] == [
        ("teacher->teacher", 12),
        ("student->student", 12),
        ("student->teacher", 12),
    ]
    # the teacher encoded each role exactly once although three rows and the cosine use it
    assert sorted(teacher_calls) == [("document", 40), ("query", 12)]
    rows = {r["setting"]: r for r in res["rows"]}
    teach, stud = table_encoder(teacher_table), table_encoder(student_table)
    tt = retrieval(queries, corpus, qrels, teach, teach)["12"]
    ss = retrieval(queries, corpus, qrels, stud, stud)["12"]
    st = retrieval(queries, corpus, qrels, stud, teach)["12"]
    assert rows["teacher->teacher"]["metrics"] == tt
    assert rows["student->student"]["metrics"] == ss
    assert rows["student->teacher"]["metrics"] == st
    assert tt["ndcg@10"] > 0.3 and ss != tt  # non-trivial data
    for m in ev.METRICS:
        assert rows["teacher->teacher"]["retention"][m] == pytest.approx(1.0)
        assert rows["student->teacher"]["retention"][m] == pytest.approx(st[m] / tt[m])
    qids = [q for q in queries if q in qrels]
    s = torch.stack([student_table[queries[q]] for q in qids] + [student_table[t] for t in corpus.values()])
    t = torch.stack([teacher_table[queries[q]] for q in qids] + [teacher_table[t] for t in corpus.values()])
    cos = F.cosine_similarity(s, t, dim=-1)
    assert res["mean_cosine"]["all"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert res["mean_cosine"]["queries"] == pytest.approx(float(cos[:12].mean()), abs=1e-6)
    assert res["mean_cosine"]["documents"] == pytest.approx(float(cos[12:].mean()), abs=1e-6)


def test_settings_perfect_student_retains_everything():
    queries, corpus, qrels, table = toy_set(dim=6, seed=4)
    res = ev.evaluate_settings(queries, corpus, qrels, table_encoder(table), table_encoder(table))
    for row in res["rows"]:
        assert row["metrics"] == res["rows"][0]["metrics"]
        assert all(v == pytest.approx(1.0) for v in row["retention"].values())
    assert res["mean_cosine"]["all"] == pytest.approx(1.0, abs=1e-6)


def test_settings_mrl_mode_one_row_per_dim():
    queries, corpus, qrels, teacher_table = toy_set(dim=12, seed=2)
    proj = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    student_table = {t: v @ proj for t, v in teacher_table.items()}
    res = ev.evaluate_settings(
        queries, corpus, qrels, table_encoder(student_table), table_encoder(teacher_table), dims=[2, 8, 4]
    )
    assert res["mode"] == "mrl" and res["mean_cosine"] is None and res["teacher_dim"] == 12
    assert [(r["setting"], r["dim"]) for r in res["rows"]] == [
        ("teacher->teacher", 12),
        ("student->student", 8),
        ("student->student", 4),
        ("student->student", 2),
    ]
    teacher_ndcg = res["rows"][0]["metrics"]["ndcg@10"]
    for row in res["rows"][1:]:
        dim = row["dim"]
        truncated = {t: v[:dim] for t, v in student_table.items()}  # truncation done independently here
        want = retrieval(queries, corpus, qrels, table_encoder(truncated), table_encoder(truncated))
        assert row["metrics"] == want[str(dim)]
        assert row["retention"]["ndcg@10"] == pytest.approx(row["metrics"]["ndcg@10"] / teacher_ndcg)
    assert res["rows"][1]["metrics"] != res["rows"][3]["metrics"]
    with pytest.raises(ConfigError, match=r"eval dims \[16\] are outside 1..8"):
        ev.evaluate_settings(queries, corpus, qrels, table_encoder(student_table), dims=[8, 16])


def test_settings_reuse_precomputed_teacher_and_student_only():
    queries, corpus, qrels, table = toy_set(dim=8, seed=3)
    teacher = ev.encode_eval_set(queries, corpus, qrels, table_encoder(table))
    res = ev.evaluate_settings(queries, corpus, qrels, table_encoder(table), teacher)
    assert res["mode"] == "projection" and len(res["rows"]) == 3
    alone = ev.evaluate_settings(queries, corpus, qrels, table_encoder(table))
    assert alone["mode"] == "student_only" and alone["teacher_dim"] is None and alone["mean_cosine"] is None
    assert [r["setting"] for r in alone["rows"]] == ["student->student"] and alone["rows"][0]["retention"] is None
    smaller = {k: v for k, v in list(corpus.items())[:-1]}
    with pytest.raises(DistillError, match="different eval set"):
        ev.evaluate_settings(queries, smaller, qrels, table_encoder(table), teacher)
    with pytest.raises(DistillError, match=r"query encoder returned \(3, 8\), expected a \[12, dim\] tensor"):
        ev.evaluate_settings(queries, corpus, qrels, lambda texts, role: torch.zeros(3, 8))


def test_settings_accept_half_precision_cached_teacher():
    queries, corpus, qrels, table = toy_set(dim=8, seed=6)
    full = ev.encode_eval_set(queries, corpus, qrels, table_encoder(table))
    half = ev.Embeddings(full.query_ids, full.doc_ids, full.queries.half(), full.documents.half())
    res = ev.evaluate_settings(queries, corpus, qrels, table_encoder(table), half)
    want = ev.evaluate_settings(queries, corpus, qrels, table_encoder(table), full)
    for got_row, want_row in zip(res["rows"], want["rows"]):
        for m in ev.METRICS:
            assert got_row["metrics"][m] == pytest.approx(want_row["metrics"][m], abs=0.02)
    assert res["mean_cosine"]["all"] == pytest.approx(1.0, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# BEIR reader
# ----------------------------------------------------------------------------------------------------------------


def test_read_beir_valid(tmp_path):
    folder = write_beir(
        tmp_path / "beir",
        corpus=[{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": 2, "title": "", "text": "dogs bark"}],
        queries=[{"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "unjudged"}, {"_id": "q3", "text": "x"}],
        qrels=[("q1", "d1", 1), ("q3", "2", 2), ("q3", "d1", 0)],
    )
    data = ev.read_beir(folder)
    assert data.corpus == {"d1": "Cats cats purr", "2": "dogs bark"}
    assert data.queries == {"q1": "what purrs", "q3": "x"}
    assert data.qrels == {"q1": {"d1": 1}, "q3": {"2": 2, "d1": 0}}


@pytest.mark.parametrize(
    "target, content, message",
    [
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n', r"corpus\.jsonl:2: invalid JSON"),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n\n{"text": "b"}\n', r"corpus\.jsonl:3: missing or invalid '_id'"),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1"}\n', r"corpus\.jsonl:2: duplicate _id 'd1'"),
        ("queries.jsonl", '{"_id": "q1", "text": 5}\n', r"queries\.jsonl:1: 'text' must be a string, got int"),
        ("queries.jsonl", '["q1", "text"]\n', r"queries\.jsonl:1: expected a JSON object, got list"),
        ("qrels/test.tsv", f"{HEADER}\nq1\td1\t1\nq1\td1\tx\n", r"test\.tsv:3: score 'x' is not an integer"),
        ("qrels/test.tsv", f"{HEADER}\nq1 d1 1\n", r"test\.tsv:2: expected 3 tab-separated fields"),
        ("qrels/test.tsv", f"{HEADER}\nq1\td1\t1\nq7\td1\t1\n", r"test\.tsv:3: query-id 'q7' is not in"),
        ("qrels/test.tsv", f"{HEADER}\n", r"test\.tsv: no qrels"),
    ],
)
def test_read_beir_errors_name_file_and_line(tmp_path, target, content, message):
    folder = write_beir(
        tmp_path / "beir", [{"_id": "d1", "text": "a"}], [{"_id": "q1", "text": "b"}], [("q1", "d1", 1)]
    )
    (folder / target).write_text(content)
    with pytest.raises(DataError, match=message):
        ev.read_beir(folder)


def test_read_beir_missing_files(tmp_path):
    with pytest.raises(DataError, match="BEIR folder not found"):
        ev.read_beir(tmp_path / "nope")
    folder = write_beir(
        tmp_path / "beir", [{"_id": "d1", "text": "a"}], [{"_id": "q1", "text": "b"}], [("q1", "d1", 1)]
    )
    with pytest.raises(DataError, match=r"qrels[/\\]dev\.tsv: file not found"):
        ev.read_beir(folder, split="dev")
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match=r"corpus\.jsonl: file not found"):
        ev.read_beir(folder)


# ----------------------------------------------------------------------------------------------------------------
# 2-rank evaluation under torchrun
# ----------------------------------------------------------------------------------------------------------------


def test_run_eval_distributed_two_ranks(tmp_path):
    script = tmp_path / "dist_eval.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys, torch
            from distill import distributed
            from distill import evaluate as ev
            from distill.errors import DistillError

            info = distributed.init_distributed(backend="gloo", timeout_s=60)
            g = torch.Generator().manual_seed(0)
            corpus = {{f"d{{i}}": f"doc {{i}}" for i in range(30)}}
            table = {{t: torch.randn(6, generator=g) for t in corpus.values()}}
            queries = {{f"q{{j}}": f"query {{j}}" for j in range(5)}}
            for j in range(5):
                table[f"query {{j}}"] = table[f"doc {{j}}"] + 0.1 * torch.randn(6, generator=g)
            qrels = {{f"q{{j}}": {{f"d{{j}}": 1}} for j in range(5)}}
            calls = []

            def encode(texts, role):
                calls.append(role)
                return torch.stack([table[t] for t in texts])

            result = ev.run_eval_distributed(ev.evaluate_settings, queries, corpus, qrels, encode, encode, dims=[6, 3])

            def boom():
                raise RuntimeError("disk full")

            try:
                ev.run_eval_distributed(boom)
                failure = None
            except Exception as exc:
                failure = f"{{type(exc).__name__}}: {{exc}}"
            distributed.barrier()
            out = {{"rank": info.rank, "world": info.world_size, "calls": calls, "result": result, "failure": failure}}
            with open(rf"{tmp_path}/rank{{info.rank}}.json", "w") as fh:
                json.dump(out, fh)
            distributed.shutdown()
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["result"] == r1["result"]
    assert r0["result"]["mode"] == "projection" and len(r0["result"]["rows"]) == 4
    assert r0["result"]["rows"][0]["metrics"]["ndcg@10"] == pytest.approx(1.0)
    assert sorted(r0["calls"]) == ["document", "document", "query", "query"] and r1["calls"] == []
    assert r0["failure"] == "RuntimeError: disk full"
    assert r1["failure"] == "DistillError: evaluation failed on rank 0: RuntimeError: disk full"


def test_run_eval_distributed_single_process():
    assert ev.run_eval_distributed(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError):
        ev.run_eval_distributed(lambda: {}["x"])


# ----------------------------------------------------------------------------------------------------------------
# CLI with a tiny sentence-transformers student built offline
# ----------------------------------------------------------------------------------------------------------------

WORDS = "the a cat dog fish bird red blue green runs eats sleeps big small query doc".split()


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("student")
    backbone = root / "backbone"
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizerFast(vocab=vocab)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    transformer = Transformer(str(backbone))
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()],
        prompts={"query": "query: "},
    )
    model.save(str(root / "st"))
    return root / "st"


@pytest.fixture()
def beir_words(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS[:-2], size=5)) for _ in range(25)]
    corpus = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(docs)]
    queries = [{"_id": f"q{j}", "text": " ".join(docs[j].split()[:3])} for j in range(8)]
    qrels = [(f"q{j}", f"d{j}", 1) for j in range(8)]
    return write_beir(tmp_path / "beir", corpus, queries, qrels)


def test_student_encoder_uses_saved_prompts(tiny_student):
    from sentence_transformers import SentenceTransformer

    encode = ev.student_encoder(str(tiny_student), batch_size=4, trust_remote_code=False, device="cpu")
    model = SentenceTransformer(str(tiny_student), device="cpu")
    texts = ["the cat runs", "a big dog"]
    q, d = encode(texts, "query"), encode(texts, "document")
    assert q.dtype == torch.float32 and q.shape == (2, 16)
    assert torch.allclose(q, model.encode(texts, prompt="query: ", convert_to_tensor=True), atol=1e-6)
    assert torch.allclose(d, model.encode(texts, convert_to_tensor=True), atol=1e-6)
    assert not torch.allclose(q, d, atol=1e-3)


def test_student_encoder_token_budget_same_vectors_bounded_batches(tiny_student):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_student), device="cpu")
    texts = [" ".join(WORDS[: 1 + (7 * i) % 12]) for i in range(20)]  # 1..12 words, in mixed order
    lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    plain = ev.student_encoder(model, batch_size=8)
    batches = []
    original = model.encode_document

    def recording(batch, **kwargs):
        batches.append([lengths[texts.index(t)] for t in batch])
        return original(batch, **kwargs)

    model.encode_document = recording
    budgeted = ev.student_encoder(model, batch_size=8, max_tokens=30)
    for role in ("query", "document"):
        torch.testing.assert_close(budgeted(texts, role), plain(texts, role), atol=1e-5, rtol=0)
    budget_batches = batches[:-1]  # the last call is the plain encoder's single call
    assert sum(map(len, budget_batches)) == len(texts) and len(budget_batches) > len(texts) // 8
    assert all(len(b) <= 8 and len(b) * max(b) <= 30 for b in budget_batches)
    assert [max(b) for b in budget_batches] == sorted((max(b) for b in budget_batches), reverse=True)


def test_cli_student_only_and_with_fake_teacher(tiny_student, beir_words, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--model", str(tiny_student), "--data", str(beir_words), "--dims", "16,8",
                     "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["mode"] == "student_only"
    assert [(r["setting"], r["dim"]) for r in results["rows"]] == [("student->student", 16), ("student->student", 8)]
    data = ev.read_beir(beir_words)
    student = ev.student_encoder(str(tiny_student), 4, False, "cpu")
    want = retrieval(data.queries, data.corpus, data.qrels, student, student, dims=[16, 8])
    assert results["rows"][0]["metrics"] == pytest.approx(want["16"], abs=1e-9)
    assert results["rows"][1]["metrics"] == pytest.approx(want["8"], abs=1e-9)
    assert (out / "report.md").is_file() and (out / "report.json").is_file() and (out / "mrl_quality.png").is_file()
    printed = capsys.readouterr().out
    assert "| student->student | 16 |" in printed and "eval.json" in printed

    # teacher through the lead's API (replaced here by a fake module with the same surface)
    seen = {}

    class FakeTeacher:
        dim = 16

        def __init__(self, spec, device):
            seen["spec"], seen["device"] = spec, device

        def encode(self, texts, role, batch_size, max_tokens=None):
            seen.setdefault("roles", []).append((role, batch_size, max_tokens))
            return torch.stack([student([t], "document")[0] for t in texts])  # the student's doc view as "teacher"

    fake = types.ModuleType("distill.models")
    fake.resolve_teacher_spec = lambda name, trust_remote_code=False: {"name": name, "trc": trust_remote_code}
    fake.TeacherEncoder = FakeTeacher
    monkeypatch.setitem(sys.modules, "distill.models", fake)
    out2 = tmp_path / "out2"
    code = cli.main(["evaluate", "--model", str(tiny_student), "--data", str(beir_words), "--teacher",
                     "fake/teacher", "--batch-size", "3", "--max-tokens-per-batch", "20", "--out", str(out2)])
    assert code == 0
    results = json.loads((out2 / "eval.json").read_text())
    assert seen["spec"] == {"name": "fake/teacher", "trc": False}
    assert sorted(seen["roles"]) == [("document", 3, 20), ("query", 3, 20)]
    assert results["mode"] == "projection" and results["teacher"] == "fake/teacher"
    rows = {r["setting"]: r for r in results["rows"]}
    assert set(rows) == {"teacher->teacher", "student->student", "student->teacher"}
    # documents are identical for teacher and student, so drop-in == student->student
    assert rows["student->teacher"]["metrics"] == rows["student->student"]["metrics"]
    assert 0.5 < results["mean_cosine"]["queries"] < 1.0 and results["mean_cosine"]["documents"] == pytest.approx(1.0)


def test_cli_errors_are_one_line(tmp_path, tiny_student, beir_words, capsys):
    assert cli.main(["evaluate", "--model", str(tiny_student), "--data", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: BEIR folder not found"
    assert cli.main(["evaluate", "--model", str(tiny_student), "--data", str(beir_words), "--dims", "16,x"]) == 2
    assert "--dims '16,x': expected comma-separated integers" in capsys.readouterr().err
    args = ["--model", str(tiny_student), "--data", str(beir_words), "--dims", "32", "--out", str(tmp_path)]
    assert cli.main(["evaluate", *args]) == 2
    assert "eval dims [32] are outside 1..16" in capsys.readouterr().err
    assert cli.main(["evaluate", *args[:4], "--max-tokens-per-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-tokens-per-batch must be positive, got 0"


def test_python_m_distill_evaluate_still_runs_the_evaluate_command(tmp_path, tiny_student):
    proc = subprocess.run([sys.executable, "-m", "distill.evaluate", "--model", str(tiny_student), "--data",
                           str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: BEIR folder not found"
