"""Small real-text training files for end-to-end tests, built from the docstrings of a few stdlib modules."""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

_MODULES = ("json/__init__.py", "textwrap.py", "shutil.py", "tempfile.py", "argparse.py", "functools.py",
            "string.py", "random.py", "csv.py", "fractions.py", "statistics.py", "calendar.py")


def docstring_pairs(limit: int = 200) -> list[tuple[str, str]]:
    """(query, passage) pairs: the query is a function's one-line summary, the passage the rest of its docstring."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for rel in _MODULES:
        path = stdlib / rel
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            lines = [x.strip() for x in doc.strip().splitlines()]
            summary, body = lines[0], " ".join(x for x in lines[1:] if x)
            if len(body.split()) < 8 or summary in seen:
                continue
            seen.add(summary)
            pairs.append((summary, f"{node.name}: {body}"))
    return pairs[:limit]


def write_training_files(out: Path, n: int = 96, num_negatives: int = 3, seed: int = 0) -> dict[str, Path]:
    """phase1.jsonl ({query, positive}), phase2.jsonl ({query, pos, neg}) and a BEIR folder test/."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = docstring_pairs()
    rng = random.Random(seed)
    train, test = pairs[:n], pairs[n : n + 24]
    p1 = out / "phase1.jsonl"
    p1.write_text("".join(json.dumps({"query": q, "positive": d}) + "\n" for q, d in train), encoding="utf-8")
    docs = [d for _, d in train]
    p2 = out / "phase2.jsonl"
    with p2.open("w", encoding="utf-8") as f:
        for q, d in train:
            negs = rng.sample([x for x in docs if x != d], num_negatives)
            f.write(json.dumps({"query": q, "pos": [d], "neg": negs}) + "\n")
    beir = out / "test"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n"
                                               for i, (_, d) in enumerate(test)), encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                for i, (q, _) in enumerate(test)), encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(test))), encoding="utf-8")
    return {"phase1": p1, "phase2": p2, "beir": beir}


def tiny_config_yaml(tmp: Path, teacher: Path, student: Path, files: dict[str, Path], *, use_projection: bool = True,
                     extra: str = "") -> Path:
    """A complete config for the tiny models (teacher 48-d, student 32-d) and the files above."""
    text = f"""
model:
  teacher: "{teacher}"
  student: "{student}"
  teacher_dim: 48
  student_dim: 32
  projection_hidden_dim: 64
  use_projection: {str(use_projection).lower()}
  matryoshka_dims: [32, 16, 8]
  teacher_batch_size: 16
phase1:
  batch_size: 8
  learning_rate: 1.0e-3
  warmup_steps: 2
  num_epochs: 2
  max_length: 64
  gradient_accumulation_steps: 2
  max_samples_per_dataset: null
phase2:
  batch_size: 8
  learning_rate: 5.0e-4
  warmup_steps: 2
  num_epochs: 2
  max_length: 64
  num_negatives: 3
  gradient_accumulation_steps: 1
  max_samples: null
training:
  precision: fp32
  save_steps: 4
  logging_steps: 1
  num_threads: 1
  dist_timeout_s: 120
paths:
  output_dir: "{tmp / 'out'}"
  artifacts_dir: "{tmp / 'artifacts'}"
data:
  phase1:
    - {{name: docs-p1, path: "{files['phase1']}", query_columns: [query], document_columns: [positive]}}
  phase2:
    - {{name: docs-p2, path: "{files['phase2']}"}}
eval:
  data: "{files['beir']}"
{extra}
"""
    path = tmp / "tiny.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def write_hub_beir(beir: Path, out: Path, layout: str = "mteb") -> Path:
    """The BEIR folder ``beir`` (as written above) in a Hub layout that ``datasets.load_dataset(str(out), config)``
    reads: ``mteb`` (README configs default = qrels/{split}.jsonl, corpus, queries as JSONL), ``nanobeir`` (Parquet
    configs corpus, queries, qrels without score, split train) or ``beir`` (configs corpus and queries, the qrels in
    the sibling folder ``{out}-qrels`` as {split}.tsv files without a README)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, queries = ([json.loads(x) for x in (beir / f"{f}.jsonl").read_text().splitlines()]
                       for f in ("corpus", "queries"))
    tsv = sorted((beir / "qrels").glob("*.tsv"))
    qrels = {p.stem: [dict(zip(("query-id", "corpus-id", "score"), line.split("\t")))
                      for line in p.read_text().splitlines()[1:]] for p in tsv}
    out.mkdir(parents=True)
    if layout == "nanobeir":
        rows = {"corpus": corpus, "queries": queries,
                "qrels": [{k: r[k] for k in ("query-id", "corpus-id")} for rs in qrels.values() for r in rs]}
        for config, table in rows.items():
            (out / config).mkdir()
            pq.write_table(pa.Table.from_pylist(table), out / config / "train-00000-of-00001.parquet")
        configs = {c: [("train", f"{c}/train-*")] for c in rows}
    else:
        for name, table in (("corpus", corpus), ("queries", queries)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
        configs = {c: [(c, f"{c}.jsonl")] for c in ("corpus", "queries")}
        if layout == "mteb":
            (out / "qrels").mkdir()
            for split, rs in qrels.items():
                (out / "qrels" / f"{split}.jsonl").write_text("".join(
                    json.dumps({**r, "score": float(r["score"])}) + "\n" for r in rs), encoding="utf-8")
            configs = {"default": [(s, f"qrels/{s}.jsonl") for s in qrels], **configs}
        else:
            (out.parent / f"{out.name}-qrels").mkdir()
            for p in tsv:
                (out.parent / f"{out.name}-qrels" / p.name).write_bytes(p.read_bytes())
    (out / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {f}\n" for s, f in files)
        for c, files in configs.items()) + "---\n", encoding="utf-8")
    return out
