"""Training data: read, validate, deduplicate and cap the phase-1 / phase-2 sources; tokenize once.

Texts are stored once per role in Arrow tables (:class:`TextTable`) and examples refer to them by row. Rank 0
prepares ``work_dir/<phase>-<key>/`` atomically (``key`` hashes everything the tables depend on), every rank then
loads it memory-mapped, so ``work_dir`` must be visible to every rank. Caps and filled negatives are seeded; a capped
Hub source is streamed only as far as its cap needs (:func:`read_limit`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from distill.distributed import get_info, on_main
from distill.errors import ConfigError, DataError
from distill.manifest import ManifestError, verify_manifest, write_manifest

if TYPE_CHECKING:  # only for annotations; any object with the same attributes works
    from distill.config import Config, DataConfig

logger = logging.getLogger(__name__)

# Bump when the prepared-folder layout or the preparation logic changes, so stale folders are not reused.
_PREPARED_VERSION = 1

QUERY, DOCUMENT = 0, 1

_FORMATS = ("auto", "jsonl", "csv", "parquet", "hub")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}

# Phase-1 auto-detection: column name (lower-cased) -> role; negative_N columns are documents too.
_AUTO_ROLES = {
    **dict.fromkeys(("query", "anchor", "question"), QUERY),
    **dict.fromkeys(("positive", "pos", "answer", "passage", "document", "text", "negative", "neg"), DOCUMENT),
}
_NEGATIVE_N = re.compile(r"^negative_(\d+)$")

# Phase-2 auto-detection, in order of preference.
_P2_QUERY = ("query", "anchor", "question")
_P2_POSITIVE = ("pos", "positive", "answer", "passage", "document")
_P2_NEGATIVE_LIST = ("neg", "negatives")

_TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
_TOKEN_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int64")}
)


@dataclass
class TextTable:
    """Unique texts of one role, Arrow-backed; ``fingerprint`` identifies the content (it keys the token cache)."""

    role: str
    dataset: datasets.Dataset
    fingerprint: str

    @classmethod
    def from_texts(cls, role: str, texts: Sequence[str]) -> TextTable:
        """An in-memory table (e.g. a BEIR corpus); its fingerprint hashes the role and the texts."""
        digest = hashlib.blake2b(role.encode(), digest_size=16)
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
        dataset = datasets.Dataset.from_dict({"text": list(texts)}, features=_TEXT_FEATURES)
        return cls(role=role, dataset=dataset, fingerprint=digest.hexdigest())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int | slice) -> str | list[str]:
        """One text or a slice of texts."""
        return self.dataset[i]["text"]

    def take(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of ``rows`` in the given order (rows may repeat)."""
        return self.dataset[[int(r) for r in rows]]["text"]


@dataclass
class SourceReport:
    """What happened to one source's rows: read, kept, dropped (bad, duplicate), filled with random negatives,
    and ``sampled_out`` (unique valid rows removed by a cap)."""

    name: str
    rows_read: int = 0
    kept: int = 0
    dropped_bad: int = 0
    dropped_duplicate: int = 0
    filled_negatives: int = 0
    sampled_out: int = 0


@dataclass
class Phase1Data:
    queries: TextTable
    documents: TextTable
    examples: np.ndarray  # int64 [N, 2]: (role 0=query / 1=document, row in that role's table); unique pairs
    reports: list[SourceReport]


@dataclass
class Phase2Data:
    queries: TextTable
    documents: TextTable
    examples: np.ndarray  # int64 [N, 2 + k]: (query row, positive document row, k negative document rows)
    reports: list[SourceReport]


@dataclass
class TokenizedTable:
    """Token ids of every row of a :class:`TextTable`; ``lengths`` int64 ``[n]`` counts special tokens too."""

    dataset: datasets.Dataset
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.dataset)

    def input_ids(self, rows: Sequence[int] | np.ndarray) -> list[list[int]]:
        """Unpadded token ids of ``rows`` in the given order."""
        return self.dataset[[int(r) for r in rows]]["input_ids"]


class _BadRow(Exception):
    """A row-level problem; the caller prefixes the row's location and applies ``on_bad_row``."""


@dataclass
class _Part:
    """One readable unit of a source: a local file, or a Hub dataset split (``label`` names it in errors)."""

    label: str
    format: str  # jsonl | csv | parquet | hub
    path: Path | None = None
    source: Any = None  # the SourceConfig, for hub parts


# A row: (location for messages, the row as a dict, or a _BadRow describing why it cannot be read).
_Row = tuple[str, "dict[str, Any] | _BadRow"]


def _source_name(source: Any) -> str:
    return source.name or source.path


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _is_hub(source: Any) -> bool:
    """Format hub, or auto with a path that neither exists nor clearly names a local file."""
    path, fmt = Path(source.path).expanduser(), (source.format or "auto").lower()
    local = path.exists() or path.suffix.lower() in _EXTENSIONS or source.path.startswith((".", "/", "~"))
    return fmt == "hub" or (fmt == "auto" and not local)


def source_cap(phase: int, source: Any, phase_cap: int | None) -> int | None:
    """The most rows ``source`` can contribute: phase 1 its ``max_samples``, else ``phase_cap``
    (``max_samples_per_dataset``); phase 2 the smaller of its ``max_samples`` and ``phase_cap`` (``max_samples``)."""
    if phase == 1:
        return source.max_samples if source.max_samples is not None else phase_cap
    return min((c for c in (source.max_samples, phase_cap) if c is not None), default=None)


def read_limit(source: Any, cap: int | None) -> int | None:
    """A capped Hub source is streamed and keeps its first ``cap`` valid unique rows in stored order (the same for
    every seed); None: every row is read (local files, uncapped sources) and a cap keeps a seeded random subset."""
    return cap if cap is not None and _is_hub(source) else None


def _resolve_parts(source: Any) -> list[_Part]:
    """The files (sorted, for folders) or the Hub split that make up ``source``."""
    fmt = (source.format or "auto").lower()
    if fmt not in _FORMATS:
        raise DataError(f"source {_source_name(source)}: unknown format {source.format!r} "
                        f"(expected one of {', '.join(_FORMATS)})")
    path = Path(source.path).expanduser()
    if _is_hub(source):
        inner = f"{source.subset}, {source.split}" if source.subset else source.split
        return [_Part(label=f"dataset {source.path} ({inner})", format="hub", source=source)]
    if not path.exists():
        raise DataError(f"{source.path}: file not found (source {_source_name(source)})")
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _EXTENSIONS
            and (fmt == "auto" or _EXTENSIONS[p.suffix.lower()] == fmt)
        )
        if not files:
            wanted = ", ".join(sorted(e for e, f in _EXTENSIONS.items() if fmt in ("auto", f)))
            raise DataError(f"{source.path}: folder holds no data files ({wanted})")
        return [_Part(label=str(Path(source.path) / p.name), format=_EXTENSIONS[p.suffix.lower()], path=p)
                for p in files]
    if fmt == "auto":
        fmt = _EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{source.path}: unknown file format {path.suffix or '(no extension)'!r} "
                            f"(name it .jsonl, .csv or .parquet, or set format: jsonl | csv | parquet)")
    return [_Part(label=str(source.path), format=fmt, path=path)]


def _read_jsonl(part: _Part) -> Iterator[_Row]:
    """One JSON object per non-blank line; locations are ``file:line`` (1-based)."""
    with open(part.path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")
                if not line.strip():
                    continue
                obj = json.loads(line)
                if re.search(r"\\u[dD][89a-fA-F]", line) and not _valid_utf8([json.dumps(obj, ensure_ascii=False)]):
                    obj = _BadRow("not valid UTF-8 (lone surrogate escape \\ud800-\\udfff in a string)")
            except UnicodeDecodeError as err:
                obj = _BadRow(f"not valid UTF-8 (byte {err.start} of the line)")
            except json.JSONDecodeError as err:
                obj = _BadRow(f"malformed JSON ({err.msg} at column {err.colno})")
            if not isinstance(obj, (dict, _BadRow)):
                obj = _BadRow(f"expected a JSON object, got {type(obj).__name__}")
            yield f"{part.label}:{lineno}", obj


def _valid_utf8(fields: list[str]) -> bool:
    """False when a field holds a surrogate: an undecodable byte read with ``errors="surrogateescape"``, or a
    lone ``\\ud800``-``\\udfff`` JSON escape (neither can be encoded as UTF-8)."""
    return re.search("[\ud800-\udfff]", "".join(fields)) is None


def _read_csv(part: _Part) -> tuple[list[str], Iterator[_Row]]:
    """The header and the records; locations are ``file:line`` of the record's first line (1-based)."""
    handle = open(part.path, encoding="utf-8-sig", errors="surrogateescape", newline="")  # noqa: SIM115
    reader = csv.reader(handle)
    try:
        header = next(reader, [])
        problem = None if _valid_utf8(header) else "not valid UTF-8"
    except csv.Error as err:
        problem = f"malformed CSV header ({err})"
    if problem:
        handle.close()
        raise DataError(f"{part.label}:1: {problem}")

    def records() -> Iterator[_Row]:
        with handle:
            while True:
                loc = f"{part.label}:{reader.line_num + 1}"
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    yield loc, _BadRow(f"malformed CSV ({err})")
                    continue
                if not fields:
                    continue
                if not _valid_utf8(fields):
                    yield loc, _BadRow("not valid UTF-8")
                elif len(fields) != len(header):
                    yield loc, _BadRow(f"has {len(fields)} fields, the header has {len(header)}")
                else:
                    yield loc, dict(zip(header, fields))

    return header, records()


def _open_part(part: _Part, limit: int | None = None) -> tuple[list[str] | None, Iterator[_Row]]:
    """The part's column names when its schema is known up front (None for JSONL) and its rows; a Hub split is
    streamed (pulled in batches of at most ``limit`` rows) when ``limit`` is set and the split is not a slice."""
    if part.format == "jsonl":
        return None, _read_jsonl(part)
    if part.format == "csv":
        return _read_csv(part)
    if part.format == "parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(part.path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise DataError(f"{part.label}: not a readable Parquet file ({_one_line(err)})") from None
        columns, batches = handle.schema_arrow.names, handle.iter_batches(batch_size=1000)
    else:
        source, stream = part.source, {"streaming": True} if limit and "[" not in part.source.split else {}
        try:
            dataset = datasets.load_dataset(source.path, source.subset, split=source.split, **stream)
        except Exception as err:  # noqa: BLE001 - network, missing config/split, auth: all reported the same way
            raise DataError(f"{part.label}: cannot load ({type(err).__name__}: {_one_line(err)})") from None
        if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            raise DataError(f"{part.label}: expected one split, got {type(dataset).__name__}")
        columns = dataset.column_names
        batches = dataset.with_format("arrow").iter(batch_size=min(limit, 1000) if stream else 1000)
    rows = enumerate(row for batch in batches for row in batch.to_pylist())
    return columns and list(columns), ((f"{part.label} row {index}", row) for index, row in rows)


# Which columns a row is read from: ``(column, role)`` pairs. Phase 2 lists the query, then the positive, then the
# negative columns.
_Plan = list[tuple[str, int]]


def _text(value: Any, column: str) -> str:
    if value is None:
        raise _BadRow(f"column {column!r} is null")
    if not isinstance(value, str):
        raise _BadRow(f"column {column!r} is not text ({type(value).__name__})")
    if not value.strip():
        raise _BadRow(f"column {column!r} is empty")
    return value


def _texts(value: Any, column: str, limit: int | None = None) -> list[str]:
    """A string column gives one text, a list-valued column each of its (first ``limit``) elements."""
    if isinstance(value, (list, tuple)):
        return [_text(v, f"{column}[{i}]") for i, v in enumerate(value[:limit])]
    return [_text(value, column)]


def _phase1_plan(source: Any, columns: Sequence[str]) -> _Plan:
    """The configured query / document columns, or the auto-detected ones among ``columns``."""
    if source.query_columns or source.document_columns:
        return [(c, QUERY) for c in source.query_columns] + [(c, DOCUMENT) for c in source.document_columns]
    roles = ((c, DOCUMENT if _NEGATIVE_N.match(c.lower()) else _AUTO_ROLES.get(c.lower())) for c in columns)
    plan = [(c, role) for c, role in roles if role is not None]
    if not plan:
        raise _BadRow(f"no query or document column among {', '.join(columns) or '(none)'} "
                      f"(set query_columns / document_columns)")
    return plan


def _phase2_plan(source: Any, columns: Sequence[str], num_negatives: int, fill: bool) -> _Plan:
    """The configured query, positive and negative columns, or the auto-detected ones among ``columns``."""
    lower = {c.lower(): c for c in columns}
    listing = ", ".join(columns) or "(none)"

    def pick(configured: str | None, candidates: Sequence[str]) -> str | None:
        return configured or next((lower[name] for name in candidates if name in lower), None)

    query = pick(source.query_column, _P2_QUERY)
    if query is None:
        raise _BadRow(f"no query column among {listing} (set query_column)")
    positive = pick(source.positive_column, _P2_POSITIVE)
    if positive is None:
        raise _BadRow(f"no positive column among {listing} (set positive_column)")
    if source.negative_columns:
        negatives = list(source.negative_columns)
    elif listed := pick(None, _P2_NEGATIVE_LIST):
        negatives = [listed]
    else:
        numbered = sorted((int(m.group(1)), c) for c in columns if (m := _NEGATIVE_N.match(c.lower())))
        negatives = [c for _, c in numbered]
        if not negatives and "negative" in lower:
            negatives = [lower["negative"]]
    if not negatives and num_negatives > 0 and not fill:
        raise _BadRow(f"no negative column among {listing} (set negative_columns, or fill_negatives: random)")
    return [(query, QUERY), (positive, DOCUMENT), *((n, DOCUMENT) for n in negatives)]


def _phase2_texts(plan: _Plan, row: dict[str, Any], num_negatives: int) -> tuple[str, str, list[str]]:
    """``(query, positive, negatives)`` of one row; at most ``num_negatives`` negatives (the first ones)."""
    (query_column, _), (positive_column, _), *negative_columns = plan
    query = _text(row[query_column], query_column)
    positive = _texts(row[positive_column], positive_column, 1)
    if not positive:
        raise _BadRow(f"column {positive_column!r} is an empty list")
    negatives: list[str] = []
    for column, _ in negative_columns:
        if len(negatives) >= num_negatives:
            break
        negatives.extend(_texts(row[column], column, num_negatives - len(negatives)))
    return query, positive[0], negatives


def _intern(ids: dict[str, int], text: str) -> int:
    """The id of ``text`` in ``ids`` (text -> id in order of first appearance), adding it if new."""
    return ids.setdefault(text, len(ids))


def _sample(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a uniform random subset of ``cap`` out of ``n`` (all of them when ``cap`` is None or >= n)."""
    if cap is None or cap >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


def _keep(report: SourceReport, kept: int) -> None:
    """Record that ``kept`` of the source's unique valid rows survived the caps."""
    report.kept = kept
    report.sampled_out = report.rows_read - report.dropped_bad - report.dropped_duplicate - kept


def _check_columns(label: str, columns: list[str], plan_of: Callable[[Sequence[str]], _Plan]) -> None:
    """A file whose columns are known up front must hold every column its rows are read from."""
    try:
        plan = plan_of(columns)
    except _BadRow as err:
        raise DataError(f"{label}: {err}") from None
    missing = [c for c, _ in plan if c not in columns]
    if missing:
        raise DataError(f"{label}: missing column {missing[0]!r} (columns: {', '.join(columns)})")


def _read_source(
    data: Any,
    source: Any,
    plan_of: Callable[[Sequence[str]], _Plan],
    parse: Callable[[_Plan, dict[str, Any]], tuple[int, ...]],
    seen: set[tuple[int, ...]],
    limit: int | None = None,
) -> tuple[list[tuple[int, ...]], SourceReport]:
    """The keys ``parse(plan, row)`` of the source's valid rows that are not already in ``seen`` (which grows);
    ``plan_of(columns)`` names the columns a row is read from. Reading stops at ``limit`` keys (:func:`read_limit`)."""
    report = SourceReport(name=_source_name(source))
    rows: list[tuple[int, ...]] = []
    row_plan = functools.cache(plan_of)  # rows with the same keys share a plan
    for part in _resolve_parts(source):
        columns, row_iter = _open_part(part, limit)
        if columns is not None:
            _check_columns(part.label, columns, plan_of)
        for loc, row in row_iter:
            report.rows_read += 1
            try:
                if isinstance(row, _BadRow):
                    raise row
                plan = row_plan(tuple(row))
                for column, _ in plan:
                    if column not in row:
                        raise _BadRow(f"missing column {column!r}")
                key = parse(plan, row)
            except _BadRow as err:
                if data.on_bad_row == "error":
                    raise DataError(f"{loc}: {err}") from None
                report.dropped_bad += 1
                continue
            if key in seen:
                report.dropped_duplicate += 1
                continue
            seen.add(key)
            rows.append(key)
            if len(rows) == limit:
                break
    if not rows:
        raise DataError(f"source {report.name}: no usable rows (read {report.rows_read}, bad {report.dropped_bad}, "
                        f"duplicate {report.dropped_duplicate})")
    return rows, report


def _prepare_phase1(
    data: Any, cap_default: int | None, seed: int
) -> tuple[list[str], list[str], np.ndarray, list[SourceReport]]:
    """(query texts, document texts, examples, reports) of the phase-1 sources, each deduplicated and capped."""
    ids: dict[int, dict[str, int]] = {QUERY: {}, DOCUMENT: {}}

    def parse(plan: _Plan, row: dict[str, Any]) -> tuple[int, ...]:
        items = [(role, text) for column, role in plan for text in _texts(row[column], column)]
        if not items:
            raise _BadRow("no text (every text column is an empty list)")
        return tuple(dict.fromkeys((role, _intern(ids[role], text)) for role, text in items))

    pairs: dict[tuple[int, int], None] = {}  # ordered set of (role, text id) over every kept row
    reports = []
    for index, source in enumerate(data.phase1):
        cap = source_cap(1, source, cap_default)
        rows, report = _read_source(data, source, functools.partial(_phase1_plan, source), parse, set(),
                                    read_limit(source, cap))
        chosen = _sample(len(rows), cap, np.random.default_rng([seed, 1, index]))
        _keep(report, len(chosen))
        for i in chosen.tolist():
            pairs.update(dict.fromkeys(rows[i]))
        reports.append(report)
    # The tables hold only the kept texts, numbered in order of first use.
    texts = {role: list(table) for role, table in ids.items()}
    tables: dict[int, dict[str, int]] = {QUERY: {}, DOCUMENT: {}}
    examples = [(role, _intern(tables[role], texts[role][i])) for role, i in pairs]
    return list(tables[QUERY]), list(tables[DOCUMENT]), np.array(examples, dtype=np.int64).reshape(-1, 2), reports


def _prepare_phase2(
    data: Any, num_negatives: int, max_samples: int | None, seed: int
) -> tuple[list[str], list[str], np.ndarray, list[SourceReport]]:
    """(query texts, document texts, examples, reports) of the phase-2 sources: deduplicated over the phase,
    capped per source then in total, short negative lists filled with random documents."""
    fill = data.fill_negatives == "random"
    query_ids: dict[str, int] = {}
    doc_ids: dict[str, int] = {}

    def parse(plan: _Plan, row: dict[str, Any]) -> tuple[int, ...]:
        query, positive, negatives = _phase2_texts(plan, row, num_negatives)
        if len(negatives) < num_negatives and not fill:
            raise _BadRow(f"has {len(negatives)} negatives, {num_negatives} needed (or set fill_negatives: random)")
        return (_intern(query_ids, query), *(_intern(doc_ids, d) for d in (positive, *negatives)))

    candidates: list[tuple[int, ...]] = []
    origin: list[int] = []  # source index of each candidate
    seen: set[tuple[int, ...]] = set()
    reports = []
    for index, source in enumerate(data.phase2):
        plan_of = functools.partial(_phase2_plan, source, num_negatives=num_negatives, fill=fill)
        rows, report = _read_source(data, source, plan_of, parse, seen,
                                    read_limit(source, source_cap(2, source, max_samples)))
        chosen = _sample(len(rows), source.max_samples, np.random.default_rng([seed, 2, index]))
        candidates.extend(rows[i] for i in chosen.tolist())
        origin.extend([index] * len(chosen))
        reports.append(report)

    chosen = _sample(len(candidates), max_samples, np.random.default_rng([seed, 3]))
    origin_kept = np.asarray(origin, dtype=np.int64)[chosen]
    for report, kept in zip(reports, np.bincount(origin_kept, minlength=len(reports)).tolist()):
        _keep(report, kept)

    # The tables hold only the kept texts, numbered in order of first use.
    query_texts, doc_texts = list(query_ids), list(doc_ids)
    queries: dict[str, int] = {}
    documents: dict[str, int] = {}
    kept = [[_intern(queries, query_texts[e[0]]), *(_intern(documents, doc_texts[d]) for d in e[1:])]
            for e in (candidates[i] for i in chosen.tolist())]
    width = 2 + num_negatives
    if any(len(row) < width for row in kept) and len(documents) < num_negatives + 1:
        raise DataError(f"phase 2: cannot fill negatives: only {len(documents)} distinct documents, "
                        f"{num_negatives + 1} needed (positive + {num_negatives} negatives)")
    rng = np.random.default_rng([seed, 4])
    for i, row in enumerate(kept):
        if len(row) < width:
            reports[origin_kept[i]].filled_negatives += 1
            taken = set(row[1:])
            while len(row) < width:  # random documents other than the positive and the negatives already there
                candidate = int(rng.integers(len(documents)))
                if candidate not in taken:
                    taken.add(candidate)
                    row.append(candidate)
    examples = np.array(kept, dtype=np.int64).reshape(-1, width)
    return list(queries), list(documents), examples, reports


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _phase_key(phase: str, data: Any, sources: list[Any], params: dict[str, Any]) -> str:
    """Hash of everything the prepared tables depend on (including local files' size + mtime, and which sources are
    streamed: their first rows, not a random subset)."""
    cap = params.get("max_samples_per_dataset", params.get("max_samples"))
    streamed = [read_limit(s, source_cap(int(phase[-1]), s, cap)) for s in sources]
    files = []
    for source in sources:
        for part in _resolve_parts(source):
            if part.path is not None:
                stat = part.path.stat()
                files.append([str(part.path.resolve()), stat.st_size, stat.st_mtime_ns])
    return _digest({
        "version": _PREPARED_VERSION,
        "phase": phase,
        "sources": [vars(s) for s in sources],
        "on_bad_row": data.on_bad_row,
        "fill_negatives": data.fill_negatives,
        "params": params,
        "files": files,
        **({"streamed": streamed} if any(streamed) else {}),
    })


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh sibling folder, then rename it to ``final`` (a crash leaves no half folder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    progress_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # they would interleave across ranks
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # else: a concurrent job finished the same folder first; keep theirs
                raise
    finally:
        if progress_bars:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)


def _main_prepares(prepare: Callable[[], Path]) -> Path:
    """Rank 0 runs ``prepare`` (returning a folder); every rank then gets the folder or rank 0's error."""
    return on_main(prepare, "rank 0 failed while preparing data", keep=(DataError,))


def _load_phase(phase: str, data: Any, sources: list[Any], params: dict[str, Any], work_dir: str | Path,
                build: Callable[[], tuple[list[str], list[str], np.ndarray, list[SourceReport]]],
                ) -> tuple[TextTable, TextTable, np.ndarray, list[SourceReport]]:
    """Rank 0 builds (or finds) the phase's prepared folder; every rank loads it."""
    verb = "prepared"

    def prepare() -> Path:
        nonlocal verb
        if data.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row: expected 'error' or 'skip', got {data.on_bad_row!r}")
        if data.fill_negatives not in ("error", "random"):
            raise ConfigError(f"data.fill_negatives: expected 'error' or 'random', got {data.fill_negatives!r}")
        if not sources:
            raise DataError(f"{phase}: no data sources configured (data.{phase})")
        folder = Path(work_dir) / f"{phase}-{_phase_key(phase, data, sources, params)}"
        if (folder / "examples.npy").is_file():
            verb = "reused"
            return folder
        query_texts, doc_texts, examples, reports = build()

        def write(tmp: Path) -> None:
            for name, texts in (("queries", query_texts), ("documents", doc_texts)):
                datasets.Dataset.from_dict({"text": texts}, features=_TEXT_FEATURES).save_to_disk(str(tmp / name))
            np.save(tmp / "examples.npy", examples)
            (tmp / "reports.json").write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
            meta = {"phase": phase, "sources": [vars(s) for s in sources], "params": params}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

        _write_atomically(folder, write)
        return folder

    folder = _main_prepares(prepare)
    try:
        queries, documents = (TextTable(role, datasets.load_from_disk(str(folder / name)), f"{folder.name}/{name}")
                              for role, name in (("query", "queries"), ("document", "documents")))
        examples = np.load(folder / "examples.npy", mmap_mode="r")
        reports = [SourceReport(**r) for r in json.loads((folder / "reports.json").read_text())]
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{folder}: prepared data is unreadable ({_one_line(err)}); delete the folder") from None
    if get_info().rank == 0:  # the per-source summary table
        width = max([len("source"), *(len(r.name) for r in reports)])
        rows = [("source", "read", "kept", "bad", "duplicate", "filled", "capped"), *map(dataclasses.astuple, reports)]
        table = "\n".join("  {:<{w}} {:>9} {:>9} {:>7} {:>9} {:>7} {:>9}".format(*row, w=width) for row in rows)
        logger.info("%s: %d examples, %d queries, %d documents (%s %s)\n%s", phase, len(examples), len(queries),
                    len(documents), verb, folder, table)
    return queries, documents, examples, reports


def load_phase1(data: DataConfig, max_samples_per_dataset: int | None, seed: int, work_dir: str | Path) -> Phase1Data:
    """Unique ``(role, text)`` examples of every ``data.phase1`` source; each source is capped to
    ``source.max_samples`` (else ``max_samples_per_dataset``) rows chosen at random from its unique valid rows (a Hub
    source: its first ones, :func:`read_limit`)."""
    params = {"max_samples_per_dataset": max_samples_per_dataset, "seed": seed}
    build = lambda: _prepare_phase1(data, max_samples_per_dataset, seed)  # looked up at call time (tests patch it)
    return Phase1Data(*_load_phase("phase1", data, list(data.phase1), params, work_dir, build))


def load_phase2(
    data: DataConfig, num_negatives: int, max_samples: int | None, seed: int, work_dir: str | Path
) -> Phase2Data:
    """``(query, positive, num_negatives negatives)`` examples of every ``data.phase2`` source; each source is capped
    to ``source.max_samples`` (random subset; a Hub source: its first ``min(max_samples)`` rows, :func:`read_limit`),
    then the union to ``max_samples``."""
    params = {"num_negatives": num_negatives, "max_samples": max_samples, "seed": seed}
    build = lambda: _prepare_phase2(data, num_negatives, max_samples, seed)  # looked up at call time
    return Phase2Data(*_load_phase("phase2", data, list(data.phase2), params, work_dir, build))


def load_phase_data(cfg: Config, phase: int, work_dir: str | Path | None = None) -> Phase1Data | Phase2Data:
    """The prepared data of training ``phase`` (1 or 2) of ``cfg``, as the trainer, the cache fill and the plan see it;
    ``work_dir`` defaults to ``cfg.cache_root / "data"`` (the dry run passes a temporary folder: it writes nothing)."""
    work = cfg.cache_root / "data" if work_dir is None else work_dir
    if phase == 1:
        return load_phase1(cfg.data, cfg.phase1.max_samples_per_dataset, cfg.training.seed, work)
    if phase == 2:
        return load_phase2(cfg.data, cfg.phase2.num_negatives, cfg.phase2.max_samples, cfg.training.seed, work)
    raise ConfigError(f"phase must be 1 or 2, got {phase!r}")


def tokenize_table(table: TextTable, tokenizer: Any, max_length: int, work_dir: str | Path) -> TokenizedTable:
    """Tokenize every row of ``table`` once (truncated, unpadded) into ``work_dir/tokens-<key>``, written by rank 0
    and loaded memory-mapped by every rank; a folder whose ``MANIFEST.json`` does not verify is rebuilt (one warning).
    """
    if max_length < 1:
        raise ConfigError(f"max_length: must be >= 1, got {max_length}")
    key = _digest({
        "version": _PREPARED_VERSION,
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "max_length": max_length,
        "table": table.fingerprint,
    })
    folder = Path(work_dir) / f"tokens-{key}"

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length, padding=False)["input_ids"]
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    def write(tmp: Path) -> None:
        mapped = table.dataset.map(
            encode, batched=True, batch_size=1000, remove_columns=table.dataset.column_names,
            features=_TOKEN_FEATURES, cache_file_name=str(tmp / "map.arrow"), new_fingerprint=key,
            load_from_cache_file=False,
        )
        mapped.save_to_disk(str(tmp / "tokens"))
        np.save(tmp / "lengths.npy", np.asarray(mapped.data.column("length").to_numpy(), dtype=np.int64))
        del mapped
        (tmp / "map.arrow").unlink(missing_ok=True)
        write_manifest(tmp, {"table": table.fingerprint, "role": table.role, "rows": len(table)})

    def prepare() -> Path:
        if folder.is_dir():
            try:
                verify_manifest(folder, ("lengths.npy",))
                return folder
            except ManifestError as err:
                logger.warning("tokenized %s texts in %s are unusable (%s): rebuilding them", table.role, folder, err)
                aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.bad-", dir=folder.parent))
                os.replace(folder, aside / folder.name)  # renamed first: a crash never leaves a partial folder
                shutil.rmtree(aside, ignore_errors=True)
        _write_atomically(folder, write)
        logger.info("tokenized %d %s texts (max_length %d) into %s", len(table), table.role, max_length, folder)
        return folder

    ready = _main_prepares(prepare)
    try:
        dataset = datasets.load_from_disk(str(ready / "tokens"))
        lengths = np.load(ready / "lengths.npy")
    except (OSError, ValueError) as err:
        raise DataError(f"{ready}: tokenized data is unreadable ({_one_line(err)}); delete the folder") from None
    return TokenizedTable(dataset=dataset, lengths=lengths)


def preflight(data: Any, phases: Sequence[int], num_negatives: int) -> None:
    """Fail fast, before torch.distributed starts, with the error the full read would raise, when a local source of
    ``phases`` is missing, of unknown format, empty, or its first row does not parse or lacks a needed column."""
    fill = data.fill_negatives == "random"
    for phase in phases:
        for source in data.phase1 if phase == 1 else data.phase2:
            plan_of = (functools.partial(_phase1_plan, source) if phase == 1
                       else functools.partial(_phase2_plan, source, num_negatives=num_negatives, fill=fill))
            for part in _resolve_parts(source):
                if part.format == "hub":
                    continue
                if part.path.stat().st_size == 0:
                    raise DataError(f"{part.label}: empty file (source {_source_name(source)})")
                columns, rows = _open_part(part)
                loc, row = next(rows, ("", None))
                if row is None:
                    raise DataError(f"{part.label}: no rows (source {_source_name(source)})")
                if isinstance(row, _BadRow):
                    raise DataError(f"{loc}: {row}")
                _check_columns(part.label, columns if columns is not None else list(row), plan_of)
