"""Build a small, real-text retrieval data set offline from the docstrings of Python's standard library.

Source: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` is parsed with :mod:`ast` (never imported, so
no side effects), skipping tests, demos and vendored/legacy trees (see ``SKIP_DIRS``). Each module, class and
function docstring is one candidate *unit* with a qualified name such as ``json.JSONEncoder.encode``.

Pair formulation (why it is a real retrieval task): the **query** is the docstring's one-line summary (its first
sentence, 3-40 words, e.g. "Return true if the object is a frame object."); the **passage** is the *rest* of the
docstring (at least ``MIN_BODY_WORDS`` = 10 words, cut to 256 words) titled with the qualified name. The summary is
not repeated in the passage, so the query has to be matched by meaning, and the qualified name (``inspect.isframe``)
only helps a model that can relate names to descriptions. Units whose summary or body occurs more than once in
the stdlib (e.g. "Emit a record.") are dropped entirely, so every query has exactly one relevant passage and
copies cannot leak across the split; so are docstrings whose body repeats the summary verbatim. Passages used for
training are ``f"{title} {text}"``, the same join that BEIR-style evaluators apply to ``corpus.jsonl``
(``title`` + " " + ``text``).

Split: units are grouped by top-level package (``email.mime.text`` -> ``email``; the pure-Python twins
``_pydecimal``/``_pyio`` join ``decimal``/``io``), groups are ordered by a seeded hash and whole groups go to the
test side until it holds ~1.5x ``n_test`` passages; ``n_test`` of them become test queries and all test-side
passages form the test corpus (the rest are distractors). Training rows come only from the other groups, so
neither test queries nor test documents (nor near-copies inside a package) appear in training.

Files written to ``--out`` (each atomically: temporary file + rename; ``manifest.json`` last):

* ``phase1.jsonl``: ``{"query": str, "positive": str}`` per training unit.
* ``phase2.jsonl``: ``{"query": str, "pos": [str], "neg": [7 x str]}`` (FlagEmbedding format); negatives are the
  top BM25 (``bm25s``) hits of the query among all training-side passages, excluding the positive; if BM25 finds
  fewer than 7 lexical matches the rest are drawn at random (seeded) from the training side.
* ``test/corpus.jsonl`` ``{"_id", "title", "text"}``, ``test/queries.jsonl`` ``{"_id", "text"}``,
  ``test/qrels/test.tsv`` (header ``query-id\\tcorpus-id\\tscore``): a BEIR folder.
* with ``--wiki P1 P2``: ``phase1_wiki.jsonl`` / ``phase2_wiki.jsonl`` in the same two layouts, from the Wikipedia
  articles of the gensim wheel (:func:`wiki_files`): query = a paragraph's first sentence, positive = the rest.
* ``manifest.json``: seed, sizes, Python version and the sha256 of every file above.

Out-of-domain split (``--ood-out DIR``, :func:`build_ood`): a second BEIR folder from news articles (the Lee corpus
in the ``gensim==4.4.0`` wheel, its two text files sha256-pinned), a domain no training source uses: query = the
article's lead sentence, relevant document = the rest of the article.

Output is byte-identical for the same seed, options and Python version (stdlib files differ between versions).
With the default options on CPython 3.11.7 this gives ~2,000 training rows (the stdlib only holds ~2,700 usable,
unique docstrings), 400 test queries and ~670 test documents, in about 6 s on 2 cores.

CLI: ``python -m distill demo-data --out DIR [--seed 0] [--max-train N] [--n-test 400] [--general N]``
(:mod:`distill.cli`; ``python -m distill.demo_data ...`` still works).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import platform
import random
import re
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bm25s

from distill.errors import DataError

logger = logging.getLogger(__name__)

SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "lib2to3",
    "ensurepip", "__pycache__", "pydoc_data", "encodings", "lib-dynload", "__phello__",
})
MIN_BODY_WORDS = 10
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 3, 40
MAX_PASSAGE_WORDS = 256
N_NEGATIVES = 7
TEST_POOL_FACTOR = 1.5  # test corpus ~= 1.5 x test queries, the extra third being distractors
# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, quote, backtick or parenthesis.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Unit:
    """One docstring split into a query (summary sentence) and a passage (the rest), with its package group."""

    qualname: str
    group: str
    query: str
    body: str

    @property
    def passage(self) -> str:
        """The training-side passage: title and text joined the way BEIR evaluators join them."""
        return f"{self.qualname} {self.body}"


# --------------------------------------------------------------------------------------------------------------
# Harvesting docstrings


def stdlib_files(root: Path) -> list[Path]:
    """Sorted ``.py`` files under ``root``, without tests, demos, vendored trees and ``site-packages``."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or rel.name == "__main__.py":
            continue
        files.append(path)
    return files


def module_name(rel: Path) -> str:
    """``json/__init__.py`` -> ``json``; ``email/mime/text.py`` -> ``email.mime.text``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_group(module: str, top_level: set[str]) -> str:
    """Top-level package, mapping private pure-Python twins (``_pydecimal``) to the public name (``decimal``)."""
    top = module.split(".")[0]
    bare = top.lstrip("_")
    if bare.startswith("py") and bare[2:].lstrip("_") in top_level:  # _pydecimal -> decimal, _py_abc -> abc
        return bare[2:].lstrip("_")
    return bare if bare in top_level else top


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the module and of every class/function nested in it."""
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, prefix = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                stack.append((child, name))
            elif isinstance(child, (ast.If, ast.Try, ast.With)):  # defs under `if sys.platform...:` etc.
                stack.append((child, prefix))


def split_docstring(doc: str) -> tuple[str, str] | None:
    """(summary sentence, rest) with whitespace collapsed, or None if either part is outside the size limits."""
    paragraphs = _PARAGRAPH.split(doc.strip(), maxsplit=1)
    first = " ".join(paragraphs[0].split())
    pieces = _SENTENCE_END.split(first, maxsplit=1)
    query = pieces[0]
    rest = ([pieces[1]] if len(pieces) > 1 else []) + ([" ".join(paragraphs[1].split())] if len(paragraphs) > 1 else [])
    body_words = " ".join(rest).split()
    if not MIN_QUERY_WORDS <= len(query.split()) <= MAX_QUERY_WORDS or len(body_words) < MIN_BODY_WORDS:
        return None
    return query, " ".join(body_words[:MAX_PASSAGE_WORDS])


def harvest(root: Path | None = None) -> list[Unit]:
    """All usable units of the stdlib at ``root`` (default: this interpreter's), in a deterministic order.

    Units whose summary (case-insensitive) or body occurs more than once are dropped, every copy of them, and so
    are units whose body repeats the summary verbatim (the query would be a substring of its passage).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise DataError(f"no Python source files found under the standard library folder {root}")
    top_level = {module_name(p.relative_to(root)).split(".")[0] for p in files}
    units: list[Unit] = []
    for path in files:
        module = module_name(path.relative_to(root))
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as exc:  # a few stdlib files are templates or use other encodings
            logger.debug("skipping %s: %s", path, exc)
            continue
        group = package_group(module, top_level)
        for qualname, doc in _docstrings(tree, module):
            split = split_docstring(doc)
            if split:
                units.append(Unit(qualname, group, *split))
    query_counts = Counter(u.query.casefold() for u in units)
    body_counts = Counter(u.body for u in units)
    return [u for u in units if query_counts[u.query.casefold()] == 1 and body_counts[u.body] == 1
            and u.query.casefold() not in u.body.casefold()]


# --------------------------------------------------------------------------------------------------------------
# Split and hard negatives


def _group_rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def split_units(units: list[Unit], n_test: int, seed: int) -> tuple[list[Unit], list[Unit]]:
    """(train side, test side) by whole package groups, in seeded-hash group order.

    Groups are added to the test side while it holds fewer than ``TEST_POOL_FACTOR * n_test`` units; a group that
    would push it past twice that is skipped (left for training) so one huge package cannot swallow the test set.
    """
    by_group: dict[str, list[Unit]] = {}
    for unit in units:
        by_group.setdefault(unit.group, []).append(unit)
    target = int(TEST_POOL_FACTOR * n_test)
    test_groups: set[str] = set()
    size = 0
    for group in sorted(by_group, key=lambda g: _group_rank(seed, g)):
        if size >= target:
            break
        if size + len(by_group[group]) <= 2 * target:
            test_groups.add(group)
            size += len(by_group[group])
    if size < n_test:
        raise DataError(f"only {size} held-out docstrings available for {n_test} test queries; lower --n-test")
    train = [u for u in units if u.group not in test_groups]
    test = [u for u in units if u.group in test_groups]
    return train, test


def mine_negatives(queries: list[str], positives: list[int], corpus: list[str], k: int, seed: int) -> list[list[int]]:
    """For each query, ``k`` corpus indices: BM25 top hits (score > 0) other than the positive and its copies.

    Shortfalls are filled with seeded random corpus indices, also excluding the positive and the chosen ones.
    """
    if len(corpus) <= k:
        raise DataError(f"the training corpus has {len(corpus)} passages; at least {k + 1} are needed for {k} negatives")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    depth = min(len(corpus), k + 10)
    # One Tokenizer-vocabulary per call: pass plain token lists so the retriever maps them with its own vocabulary.
    query_tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    query_tokens = [tokens or ["_"] for tokens in query_tokens]  # an all-stopword query still needs one token
    docs, scores = retriever.retrieve(query_tokens, k=depth, show_progress=False, backend_selection="numpy", n_threads=0)
    rng = random.Random(seed)
    result = []
    for row, pos in enumerate(positives):
        banned = {pos}
        chosen: list[int] = []
        for idx, score in zip(docs[row].tolist(), scores[row].tolist()):
            if score > 0 and idx not in banned and corpus[idx] != corpus[pos] and len(chosen) < k:
                chosen.append(idx)
                banned.add(idx)
        while len(chosen) < k:
            idx = rng.randrange(len(corpus))
            if idx not in banned and corpus[idx] != corpus[pos]:
                chosen.append(idx)
                banned.add(idx)
        result.append(chosen)
    return result


# --------------------------------------------------------------------------------------------------------------
# Writing


def _jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` newlines) to ``path`` via a temporary sibling and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


GENERAL_PACKAGES = ("numpy", "matplotlib", "datasets", "huggingface_hub", "transformers", "torch", "tqdm", "yaml")
_GENERAL_FILES_PER_PACKAGE = 400


def general_pairs(n: int, seed: int, packages: Iterable[str] = GENERAL_PACKAGES,
                  passage_words: int = MAX_PASSAGE_WORDS) -> list[dict[str, str]]:
    """``n`` extra phase-1 rows ``{query: summary, positive: body}`` from the docstrings of installed third-party
    packages, parsed with ``ast`` like the stdlib ones (never imported).

    General distillation needs breadth more than labels: more distinct texts let the student (and its projection
    head) learn the teacher's space beyond the few thousand stdlib passages. None of these modules is in the
    held-out split, which comes from the standard library only.
    """
    import importlib.util

    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for name in packages:
        spec = importlib.util.find_spec(name)  # a top-level lookup: locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in root.rglob("*.py") if not any("test" in part for part in p.relative_to(root).parts))
        for path in sorted(rng.sample(files, min(len(files), _GENERAL_FILES_PER_PACKAGE))):
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):
                continue
            module = ".".join((name, *path.relative_to(root).with_suffix("").parts))
            for qualname, doc in _docstrings(tree, module):
                split = split_docstring(doc)
                if split and split[1] not in seen and split[0].casefold() not in split[1].casefold():
                    seen.add(split[1])
                    rows.append({"query": split[0], "positive": f"{qualname} {' '.join(split[1].split()[:passage_words])}"})
    rng.shuffle(rows)
    return rows[:n]


def build(out: Path, *, seed: int = 0, max_train: int | None = None, n_test: int = 400,
          stdlib_root: Path | None = None, general: int = 0, extra_files: dict[str, str] | None = None,
          passage_words: int = MAX_PASSAGE_WORDS) -> dict:
    """Write the data set to ``out`` (see the module docstring) and return the manifest."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if n_test < 1 or (max_train is not None and max_train < 1):
        raise DataError(f"--n-test ({n_test}) and --max-train ({max_train}) must be positive")
    units = harvest(stdlib_root)
    train_side, test_side = split_units(units, n_test, seed)
    rng = random.Random(seed)

    test_query_units = sorted(rng.sample(test_side, n_test), key=test_side.index)
    doc_ids = {u.qualname + "\0" + u.body: f"d{i:05d}" for i, u in enumerate(test_side)}
    corpus_rows = [{"_id": doc_ids[u.qualname + "\0" + u.body], "title": u.qualname, "text": u.body} for u in test_side]
    query_rows = [{"_id": f"q{i:05d}", "text": u.query} for i, u in enumerate(test_query_units)]
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\t{doc_ids[u.qualname + chr(0) + u.body]}\t1\n" for q, u in zip(query_rows, test_query_units)
    )

    order = list(range(len(train_side)))
    rng.shuffle(order)
    if max_train is not None:
        order = order[:max_train]
    corpus = [f"{u.qualname} {' '.join(u.body.split()[:passage_words])}" for u in train_side]
    queries = [train_side[i].query for i in order]
    negatives = mine_negatives(queries, order, corpus, N_NEGATIVES, seed)
    phase1 = [{"query": q, "positive": corpus[i]} for q, i in zip(queries, order)]
    phase2 = [{"query": q, "pos": [corpus[i]], "neg": [corpus[j] for j in negs]}
              for q, i, negs in zip(queries, order, negatives)]

    files = {
        "phase1.jsonl": _jsonl(phase1),
        **({"phase1_general.jsonl": _jsonl(general_pairs(general, seed, passage_words=passage_words))} if general else {}),
        "phase2.jsonl": _jsonl(phase2),
        "test/corpus.jsonl": _jsonl(corpus_rows),
        "test/queries.jsonl": _jsonl(query_rows),
        "test/qrels/test.tsv": qrels,
        **(extra_files or {}),
    }
    for rel, text in files.items():
        atomic_write_text(out / rel, text)
    manifest = {
        "source": "docstrings of the Python standard library (parsed with ast)",
        "python_version": platform.python_version(),
        "seed": seed,
        "max_train": max_train,
        "passage_words": passage_words,
        "n_test": n_test,
        "min_body_words": MIN_BODY_WORDS,
        "counts": {
            "units": len(units),
            "train_side_passages": len(train_side),
            "train_examples": len(phase1),
            "general_phase1_rows": general,
            **{name: text.count("\n") for name, text in (extra_files or {}).items()},
            "negatives_per_example": N_NEGATIVES,
            "test_queries": len(query_rows),
            "test_corpus": len(corpus_rows),
            "train_groups": len({u.group for u in train_side}),
            "test_groups": len({u.group for u in test_side}),
        },
        "sha256": {rel: hashlib.sha256(text.encode("utf-8")).hexdigest() for rel, text in files.items()},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %d training rows and %d test queries (%d test docs) to %s in %.1f s", len(phase1),
                len(query_rows), len(corpus_rows), out, time.perf_counter() - started)
    return manifest


# --------------------------------------------------------------------------------------------------------------
# Out-of-domain split: news articles, a domain no training source of the demo uses

OOD_PACKAGE = ("gensim", "4.4.0")
OOD_WHEEL_SHA256 = {  # checked when this exact wheel is used; other platforms' wheels rely on the text pins
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl":
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
}
OOD_TEXTS = {  # the Lee news corpus (Australian news, one article a line) in gensim's test data, pinned
    "gensim/test/test_data/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "gensim/test/test_data/lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
}
OOD_MIN_QUERY_WORDS, OOD_MAX_QUERY_WORDS = 6, 40
OOD_MIN_BODY_WORDS = 40
# Tokens ending in "." that do not end a sentence: titles, months, and single initials ("John F. Kennedy").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "gen", "lt", "sen", "rep", "gov", "prof", "col", "capt",
                            "sgt", "jr", "sr", "no", "jan", "feb", "aug", "sept", "sep", "oct", "nov", "dec", "mt"})


def split_lead(article: str) -> tuple[str, str] | None:
    """(lead sentence, rest cut to ``MAX_PASSAGE_WORDS``) of a news article, or None outside the size limits."""
    text = " ".join(article.split())
    for match in _SENTENCE_END.finditer(text):
        last = text[:match.start()].rsplit(" ", 1)[-1].rstrip(".!?").lower()
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        lead, body = text[:match.start()], text[match.end():].split()
        if OOD_MIN_QUERY_WORDS <= len(lead.split()) <= OOD_MAX_QUERY_WORDS and len(body) >= OOD_MIN_BODY_WORDS:
            return lead, " ".join(body[:MAX_PASSAGE_WORDS])
        return None
    return None


def read_ood_articles(wheel: Path, expected_sha256: dict[str, str] | None = OOD_TEXTS) -> list[str]:
    """The articles (one per line) of the pinned ``.cor`` files in ``wheel``, in ``OOD_TEXTS`` order.

    With ``expected_sha256=None`` (tests) the pins are not checked and missing members are skipped.
    """
    import zipfile

    articles: list[str] = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for member in OOD_TEXTS:
                if member not in names:
                    if expected_sha256 is None:
                        continue
                    raise DataError(f"{wheel.name} has no {member}")
                raw = zf.read(member)
                digest = hashlib.sha256(raw).hexdigest()
                if expected_sha256 is not None and digest != expected_sha256[member]:
                    raise DataError(f"{wheel.name}: {member} has sha256 {digest}, expected the pinned "
                                    f"{expected_sha256[member]}")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # lee.cor has one cp1252 pound sign
                    text = raw.decode("cp1252")
                articles += [line for line in text.splitlines() if line.strip()]
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read the out-of-domain wheel {wheel}: {exc}") from exc
    if not articles:
        raise DataError(f"{wheel.name} holds none of {', '.join(OOD_TEXTS)}")
    return articles


def _ood_wheel(wheel_dir: Path | None, download_dir: Path) -> Path:
    try:
        from scripts.fetch_demo_models import find_wheel, pip_download
    except ImportError:  # run as ``python scripts/demo_data.py``: scripts/ itself is on sys.path
        from fetch_demo_models import find_wheel, pip_download
    if wheel_dir is None:
        return pip_download(*OOD_PACKAGE, download_dir)
    wheel = find_wheel(Path(wheel_dir), *OOD_PACKAGE)
    if wheel is None:
        raise DataError(f"no {'-'.join(OOD_PACKAGE)} wheel in {wheel_dir}")
    return wheel


# --------------------------------------------------------------------------------------------------------------
# General text: Wikipedia articles (encyclopedic prose), a domain neither split uses

WIKI_TEXT = ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
             "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")
WIKI_MIN_WORDS = 30


def read_wiki_paragraphs(wheel: Path, expected_sha256: str | None = WIKI_TEXT[1]) -> list[tuple[str, str]]:
    """(article title, paragraph) of every paragraph of >= ``WIKI_MIN_WORDS`` words in the 106 English Wikipedia
    articles (Anarchism ... Art: biology, history, geography, people, science) that the pinned, shortened dump in
    ``wheel`` holds; wiki markup is stripped with ``mwparserfromhell``, redirects and non-article pages skipped."""
    import bz2
    import xml.etree.ElementTree as ET
    import zipfile

    import mwparserfromhell

    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(WIKI_TEXT[0])
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {WIKI_TEXT[0]} from {wheel}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise DataError(f"{wheel.name}: {WIKI_TEXT[0]} has sha256 {digest}, expected the pinned {expected_sha256}")
    root = ET.fromstring(bz2.decompress(raw))
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        text = page.findtext(f".//{ns}text") or ""
        if page.findtext(f"{ns}ns") != "0" or text.lstrip().lower().startswith("#redirect"):
            continue
        plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
        title = page.findtext(f"{ns}title") or ""
        out += [(title, para) for para in (" ".join(line.split()) for line in plain.splitlines())
                if len(para.split()) >= WIKI_MIN_WORDS]
    return out


def wiki_pairs(paragraphs: list[tuple[str, str]], seed: int,
               max_words: int = MAX_PASSAGE_WORDS) -> list[tuple[str, str]]:
    """(a sentence, ``title`` + the sentences after it) pairs, the docstring splits' formulation, in a seeded order:
    each paragraph is cut into windows of whole sentences, a window's first sentence the query and the next ones (at
    most ``max_words`` words, a longer single sentence cut) its passage; too short or repeated queries are dropped."""
    pairs = []
    for title, para in paragraphs:
        sentences = _SENTENCE_END.split(para)
        i = 0
        while i + 1 < len(sentences):
            body, j = sentences[i + 1].split()[:max_words], i + 2
            while j < len(sentences) and len(body) + len(sentences[j].split()) <= max_words:
                body += sentences[j].split()
                j += 1
            if MIN_QUERY_WORDS <= len(sentences[i].split()) <= MAX_QUERY_WORDS and len(body) >= MIN_BODY_WORDS:
                pairs.append((sentences[i], f"{title} {' '.join(body)}"))
            i = j
    counts = Counter(q.casefold() for q, _ in pairs)
    pairs = sorted({(q, p) for q, p in pairs if counts[q.casefold()] == 1})
    random.Random(seed).shuffle(pairs)
    return pairs


def wiki_files(wheel: Path, n_phase1: int, n_phase2: int, seed: int = 0,
               expected_sha256: str | None = WIKI_TEXT[1], passage_words: int = MAX_PASSAGE_WORDS) -> dict[str, str]:
    """The texts of ``phase1_wiki.jsonl`` (``n_phase1`` pairs) and ``phase2_wiki.jsonl`` (the next ``n_phase2``, each
    with ``N_NEGATIVES`` BM25 negatives among the passages of these pairs: phase 2 adds no other teacher texts)."""
    pairs = wiki_pairs(read_wiki_paragraphs(wheel, expected_sha256), seed, passage_words)
    if len(pairs) < n_phase1 + n_phase2:
        raise DataError(f"the Wikipedia dump gives {len(pairs)} pairs; --wiki asks for {n_phase1} + {n_phase2}")
    corpus = [p for _, p in pairs[: n_phase1 + n_phase2]]
    p1 = pairs[:n_phase1]
    rows2 = list(range(n_phase1, n_phase1 + n_phase2))
    negatives = mine_negatives([pairs[i][0] for i in rows2], rows2, corpus, N_NEGATIVES, seed) if rows2 else []
    return {"phase1_wiki.jsonl": _jsonl({"query": q, "positive": p} for q, p in p1),
            "phase2_wiki.jsonl": _jsonl({"query": pairs[i][0], "pos": [corpus[i]], "neg": [corpus[j] for j in negs]}
                                        for i, negs in zip(rows2, negatives))}


def build_ood(out: Path, wheel_dir: Path | None = None, *, wheel: Path | None = None,
              expected_sha256: dict[str, str] | None = OOD_TEXTS) -> dict:
    """Write the out-of-domain BEIR folder to ``out`` and return its manifest.

    Source: the Lee news corpus (350 Australian news articles, 2001-2002) shipped as test data in the
    ``gensim==4.4.0`` wheel, fetched with ``pip download --no-deps`` (or taken from ``wheel_dir``/``wheel``) and
    read from the zip; gensim is never installed. Same formulation as the in-domain split: the query is the
    article's lead sentence (6-40 words), its one relevant document the rest of the article (at least 40 words,
    cut to 256, no title). Duplicate articles are kept once; articles whose lead or body still repeats are dropped.
    """
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--ood-out {out} exists and is not a directory")
    with tempfile.TemporaryDirectory(prefix="ood-wheel-") as tmp:
        wheel = Path(wheel) if wheel is not None else _ood_wheel(wheel_dir, Path(tmp))
        if expected_sha256 is not None and wheel.name in OOD_WHEEL_SHA256:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != OOD_WHEEL_SHA256[wheel.name]:
                raise DataError(f"{wheel.name} has sha256 {digest}, expected the pinned {OOD_WHEEL_SHA256[wheel.name]}")
        articles = list(dict.fromkeys(" ".join(a.split()) for a in read_ood_articles(wheel, expected_sha256)))
    pairs = [pair for pair in map(split_lead, articles) if pair]
    lead_counts = Counter(q.casefold() for q, _ in pairs)
    body_counts = Counter(b for _, b in pairs)
    pairs = [(q, b) for q, b in pairs if lead_counts[q.casefold()] == 1 and body_counts[b] == 1]
    if not pairs:
        raise DataError(f"no usable article (lead of {OOD_MIN_QUERY_WORDS}-{OOD_MAX_QUERY_WORDS} words and a body of "
                        f">= {OOD_MIN_BODY_WORDS} words) in {wheel.name}")
    files = {
        "corpus.jsonl": _jsonl({"_id": f"d{i:05d}", "title": "", "text": b} for i, (_, b) in enumerate(pairs)),
        "queries.jsonl": _jsonl({"_id": f"q{i:05d}", "text": q} for i, (q, _) in enumerate(pairs)),
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n" + "".join(f"q{i:05d}\td{i:05d}\t1\n" for i in range(len(pairs))),
    }
    for rel, text in files.items():
        atomic_write_text(out / rel, text)
    manifest = {
        "source": f"Lee news corpus from the {wheel.name} wheel: {', '.join(OOD_TEXTS)}",
        "articles": len(articles),
        "counts": {"test_queries": len(pairs), "test_corpus": len(pairs)},
        "sha256": {rel: hashlib.sha256(text.encode("utf-8")).hexdigest() for rel, text in files.items()},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %d out-of-domain queries (news leads -> article bodies) to %s", len(pairs), out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python scripts/demo_data.py [--out DIR] [--max-train N] [--n-test N] [--general N] [--seed S]
    [--ood-out DIR [--ood-wheel-dir DIR]]``."""
    import argparse

    from distill.cli import run_guarded, setup_logging

    p = argparse.ArgumentParser(prog="scripts/demo_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder of the in-domain data set")
    p.add_argument("--ood-out", type=Path, default=None,
                   help="also write the out-of-domain BEIR folder (news leads -> bodies, from the gensim wheel)")
    p.add_argument("--ood-wheel-dir", type=Path, default=None,
                   help="folder holding the gensim-4.4.0 wheel (default: pip download it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="cap on training rows (default: all)")
    p.add_argument("--n-test", type=int, default=400, help="number of held-out test queries")
    p.add_argument("--general", type=int, default=0,
                   help="extra phase-1 rows from installed packages' docstrings (phase1_general.jsonl)")
    p.add_argument("--wiki", type=int, nargs=2, default=(0, 0), metavar=("PHASE1", "PHASE2"),
                   help="extra phase-1 / phase-2 rows from the gensim wheel's Wikipedia articles "
                        "(phase1_wiki.jsonl, phase2_wiki.jsonl)")
    p.add_argument("--passage-words", type=int, default=MAX_PASSAGE_WORDS,
                   help="training passages (all sources) cut to this many words; the test splits keep theirs")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    setup_logging(args.log_level)

    if args.out is None and args.ood_out is None:
        p.error("give --out, --ood-out or both")

    def command() -> int:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gensim-wheel-") as tmp:
            wheel = _ood_wheel(args.ood_wheel_dir, Path(tmp)) if args.ood_out or any(args.wiki) else None
            if args.out is not None:
                extra = wiki_files(wheel, *args.wiki, seed=args.seed, passage_words=args.passage_words) \
                    if any(args.wiki) else None
                build(args.out, seed=args.seed, max_train=args.max_train, n_test=args.n_test, general=args.general,
                      extra_files=extra, passage_words=args.passage_words)
            if args.ood_out is not None:
                build_ood(args.ood_out, wheel=wheel)
        return 0

    return run_guarded(command)


if __name__ == "__main__":
    sys.exit(main())
