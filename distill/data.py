"""Training data: read, validate, deduplicate and cap the phase-1 / phase-2 sources; tokenize once.

BEIR evaluation folders are read by :func:`distill.evaluate.read_beir`.

Sources are Hub datasets (``datasets.load_dataset(path, subset, split=split)``) or local JSONL, CSV or Parquet
files, or a folder of them. Texts are stored once per role in Arrow tables (:class:`TextTable`) and examples
refer to them by row:

* phase 1 (``examples`` int64 ``[N, 2]``): ``(role, row)`` with role 0 = query table, 1 = document table; every
  pair is unique, so each distinct text of a role is distilled once per epoch.
* phase 2 (``examples`` int64 ``[N, 2 + k]``): ``(query row, positive document row, k negative document rows)``.

Everything is deterministic from the seed: a cap takes a random (not leading) subset with a seeded generator,
and random negatives are drawn from a seeded generator in a fixed order.

Under ``torchrun`` rank 0 reads and validates the sources and writes the prepared tables atomically to
``work_dir/<phase>-<key>/`` (``key`` hashes the source configs, caps, seed and the local files' size + mtime);
then every rank loads them memory-mapped. ``work_dir`` must therefore be visible to every rank (a shared
filesystem on multi-node jobs). A later call with the same inputs reuses the folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from distill.distributed import barrier, broadcast_object, get_info
from distill.errors import ConfigError, DataError, DistillError

if TYPE_CHECKING:  # only for annotations; any object with the same attributes works
    from distill.config import Config, DataConfig

logger = logging.getLogger(__name__)

# Bump when the prepared-folder layout or the preparation logic changes, so stale folders are not reused.
_PREPARED_VERSION = 1

QUERY, DOCUMENT = 0, 1

_FORMATS = ("auto", "jsonl", "csv", "parquet", "hub")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}

# Phase-1 auto-detection: column name (lower-cased) -> role.
_QUERY_NAMES = frozenset({"query", "anchor", "question"})
_DOCUMENT_NAMES = frozenset({"positive", "pos", "answer", "passage", "document", "text", "negative", "neg"})
_NEGATIVE_N = re.compile(r"^negative_(\d+)$")

# Phase-2 auto-detection, in order of preference.
_P2_QUERY = ("query", "anchor", "question")
_P2_POSITIVE = ("pos", "positive", "answer", "passage", "document")
_P2_NEGATIVE_LIST = ("neg", "negatives")

_TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
_TOKEN_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int64")}
)


# ----------------------------------------------------------------------------------------------------------------
# Public containers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TextTable:
    """Unique texts of one role, Arrow-backed (memory-mapped when loaded from disk).

    ``fingerprint`` identifies the content (it keys the tokenization cache).
    """

    role: str
    dataset: datasets.Dataset
    fingerprint: str

    @classmethod
    def from_texts(cls, role: str, texts: Sequence[str]) -> TextTable:
        """An in-memory table (e.g. a BEIR corpus); its fingerprint hashes the role and the texts."""
        digest = hashlib.blake2b(role.encode(), digest_size=16)
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00")
        dataset = datasets.Dataset.from_dict({"text": list(texts)}, features=_TEXT_FEATURES)
        return cls(role=role, dataset=dataset, fingerprint=digest.hexdigest())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return self.dataset[i]["text"]
        n = len(self.dataset)
        index = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= index < n:
            raise IndexError(f"{self.role} table index {i} out of range for {n} rows")
        return self.dataset[index]["text"]

    def take(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of ``rows`` in the given order (rows may repeat)."""
        keys = [int(r) for r in rows]
        if not keys:
            return []
        return self.dataset[keys]["text"]


@dataclass
class SourceReport:
    """What happened to one source's rows.

    ``rows_read`` counts every row (or JSONL line with content); ``kept`` the rows that made it into the phase
    (phase 1: rows whose texts were added; phase 2: examples); ``dropped_bad`` rows dropped by
    ``on_bad_row: skip``; ``dropped_duplicate`` exact duplicate rows (phase 1: within the source; phase 2:
    identical (query, positive, negatives) anywhere in the phase); ``filled_negatives`` phase-2 examples that got
    random negatives; ``sampled_out`` unique valid rows removed by a cap.
    """

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
    """Token ids of every row of a :class:`TextTable`, tokenized once and Arrow-backed.

    ``lengths`` int64 ``[n]``: token counts including special tokens, after truncation to ``max_length``.
    """

    dataset: datasets.Dataset
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.dataset)

    def input_ids(self, rows: Sequence[int] | np.ndarray) -> list[list[int]]:
        """Unpadded token ids of ``rows`` in the given order."""
        keys = [int(r) for r in rows]
        if not keys:
            return []
        return self.dataset[keys]["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------------------


class _BadRow(Exception):
    """A row-level problem; the caller prefixes the row's location and applies ``on_bad_row``."""


@dataclass
class _Part:
    """One readable unit of a source: a local file, or a Hub dataset split."""

    label: str  # how errors name it: the file path, or "dataset <id> (<subset>, <split>)"
    format: str  # jsonl | csv | parquet | hub
    path: Path | None = None
    source: Any = None  # the SourceConfig, for hub parts


# A row: (location for messages, the row as a dict, or a _BadRow describing why it cannot be read).
_Row = tuple[str, "dict[str, Any] | _BadRow"]


def _source_name(source: Any) -> str:
    return source.name or source.path


def _hub_label(source: Any) -> str:
    inner = f"{source.subset}, {source.split}" if source.subset else source.split
    return f"dataset {source.path} ({inner})"


def _is_local(source: Any) -> bool:
    """``format: auto`` reads a local file when the path exists or clearly names one; anything else is a Hub id."""
    path = source.path
    if Path(path).expanduser().exists():
        return True
    return Path(path).suffix.lower() in _EXTENSIONS or path.startswith((".", "/", "~"))


def _resolve_parts(source: Any) -> list[_Part]:
    """The files (sorted, for folders) or the Hub split that make up ``source``."""
    fmt = (source.format or "auto").lower()
    if fmt not in _FORMATS:
        raise DataError(
            f"source {_source_name(source)}: unknown format {source.format!r} (expected one of {', '.join(_FORMATS)})"
        )
    if fmt == "hub" or (fmt == "auto" and not _is_local(source)):
        return [_Part(label=_hub_label(source), format="hub", source=source)]
    path = Path(source.path).expanduser()
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
        display = [Path(source.path) / p.name for p in files]
        return [_Part(label=str(d), format=_EXTENSIONS[p.suffix.lower()], path=p) for d, p in zip(display, files)]
    if fmt == "auto":
        fmt = _EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{source.path}: unknown file format {path.suffix or '(no extension)'!r} "
                            f"(name it .jsonl, .csv or .parquet, or set format: jsonl | csv | parquet)")
    return [_Part(label=str(source.path), format=fmt, path=path)]


def _local_files_state(parts: list[_Part]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of every local file, so an edited file invalidates the prepared folder."""
    out = []
    for part in parts:
        if part.path is not None:
            stat = part.path.stat()
            out.append([str(part.path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def _read_jsonl(part: _Part) -> Iterator[_Row]:
    """One JSON object per non-blank line; locations are ``file:line`` (1-based)."""
    with open(part.path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            loc = f"{part.label}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield loc, _BadRow(f"not valid UTF-8 (byte {err.start} of the line)")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield loc, _BadRow(f"malformed JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(obj, dict):
                yield loc, _BadRow(f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield loc, obj


def _read_csv(part: _Part) -> Iterator[_Row]:
    """Header row + records; locations are ``file:line`` of the record's first line (1-based).

    Lines are decoded one by one so a non-UTF-8 byte can be pinned to its line; such a line is decoded with
    replacement characters and the record containing it is reported as bad.
    """
    bad_lines: set[int] = set()

    def lines() -> Iterator[str]:
        with open(part.path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad_lines.add(lineno)
                    text = raw.decode("utf-8", errors="replace")
                yield text.removeprefix("\ufeff") if lineno == 1 else text

    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise DataError(f"{part.label}:1: malformed CSV header ({err})") from None
    if 1 in bad_lines:
        raise DataError(f"{part.label}:1: not valid UTF-8")
    last = reader.line_num
    while True:
        start = last + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            last = reader.line_num
            yield f"{part.label}:{start}", _BadRow(f"malformed CSV ({err})")
            continue
        last = reader.line_num
        loc = f"{part.label}:{start}"
        if not fields:
            continue
        if any(n in bad_lines for n in range(start, last + 1)):
            yield loc, _BadRow("not valid UTF-8")
        elif len(fields) != len(header):
            yield loc, _BadRow(f"has {len(fields)} fields, the header has {len(header)}")
        else:
            yield loc, dict(zip(header, fields))


def _read_parquet(part: _Part) -> Iterator[_Row]:
    """Rows of a Parquet file; locations are ``file row i`` (0-based row index)."""
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(part.path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{part.label}: not a readable Parquet file ({_one_line(err)})") from None
    index = 0
    for batch in handle.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{part.label} row {index}", row
            index += 1


def _load_hub(part: _Part) -> datasets.Dataset:
    source = part.source
    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as err:  # network, missing config/split, auth: all reported the same way
        raise DataError(f"{part.label}: cannot load ({type(err).__name__}: {_one_line(err)})") from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{part.label}: expected one split, got {type(dataset).__name__}")
    return dataset


def _read_hub(part: _Part, dataset: datasets.Dataset) -> Iterator[_Row]:
    """Rows of a Hub split; locations are ``dataset <id> (<subset>, <split>) row i`` (0-based row index)."""
    index = 0
    for batch in dataset.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield f"{part.label} row {index}", dict(zip(columns, values))
            index += 1


def _open_part(part: _Part) -> tuple[list[str] | None, Iterator[_Row]]:
    """The part's column names when its schema is known up front (None for JSONL) and its rows."""
    if part.format == "jsonl":
        return None, _read_jsonl(part)
    if part.format == "csv":
        with open(part.path, "rb") as handle:
            first = handle.readline().decode("utf-8", errors="replace").removeprefix("\ufeff")
        columns = next(csv.reader([first]), [])
        return columns, _read_csv(part)
    if part.format == "parquet":
        import pyarrow.parquet as pq

        try:
            columns = list(pq.read_schema(part.path).names)
        except Exception as err:
            raise DataError(f"{part.label}: not a readable Parquet file ({_one_line(err)})") from None
        return columns, _read_parquet(part)
    dataset = _load_hub(part)
    return list(dataset.column_names), _read_hub(part, dataset)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ----------------------------------------------------------------------------------------------------------------
# Row -> texts
# ----------------------------------------------------------------------------------------------------------------


def _text(value: Any, column: str) -> str:
    if value is None:
        raise _BadRow(f"column {column!r} is null")
    if not isinstance(value, str):
        raise _BadRow(f"column {column!r} is not text ({type(value).__name__})")
    if not value.strip():
        raise _BadRow(f"column {column!r} is empty")
    return value


def _texts(value: Any, column: str) -> list[str]:
    """A string column gives one text, a list-valued column each of its elements."""
    if isinstance(value, (list, tuple)):
        return [_text(v, f"{column}[{i}]") for i, v in enumerate(value)]
    return [_text(value, column)]


def _auto_role(column: str) -> int | None:
    name = column.lower()
    if name in _QUERY_NAMES:
        return QUERY
    if name in _DOCUMENT_NAMES or _NEGATIVE_N.match(name):
        return DOCUMENT
    return None


def _phase1_columns(source: Any, columns: Iterable[str]) -> list[tuple[str, int]]:
    """``(column, role)`` pairs to read: the configured lists, or the auto-detected ones among ``columns``."""
    if source.query_columns or source.document_columns:
        return [(c, QUERY) for c in source.query_columns] + [(c, DOCUMENT) for c in source.document_columns]
    return [(c, role) for c in columns if (role := _auto_role(c)) is not None]


def _phase1_items(
    source: Any, row: dict[str, Any], cache: dict[tuple[str, ...], list[tuple[str, int]]]
) -> list[tuple[int, str]]:
    """The ``(role, text)`` items of one phase-1 row."""
    keys = tuple(row)
    if keys not in cache:
        cache[keys] = _phase1_columns(source, keys)
    plan = cache[keys]
    if not plan:
        raise _BadRow(f"no query or document column among {', '.join(keys) or '(none)'} "
                      f"(set query_columns / document_columns)")
    items = []
    for column, role in plan:
        if column not in row:
            raise _BadRow(f"missing column {column!r}")
        items.extend((role, t) for t in _texts(row[column], column))
    if not items:
        raise _BadRow("no text (every text column is an empty list)")
    return items


@dataclass(frozen=True)
class _Phase2Plan:
    query: str
    positive: str
    negatives: tuple[str, ...]  # several string columns, or one column that may hold a list


def _negative_n_columns(columns: Iterable[str]) -> list[str]:
    numbered = [(int(m.group(1)), c) for c in columns if (m := _NEGATIVE_N.match(c.lower()))]
    return [c for _, c in sorted(numbered)]


def _phase2_plan(source: Any, columns: Sequence[str], num_negatives: int, fill: bool) -> _Phase2Plan | str:
    """Which columns hold the query, the positive and the negatives, or a message saying what is missing.

    Auto-detection (case-insensitive): query = query | anchor | question; positive = pos | positive | answer |
    passage | document (a list-valued column gives its first element); negatives = neg | negatives (a list),
    else negative_1..negative_N (in numeric order), else negative.
    """
    lower = {c.lower(): c for c in columns}
    listing = ", ".join(columns) or "(none)"

    def pick(configured: str | None, candidates: Sequence[str]) -> str | None:
        if configured:
            return configured
        return next((lower[name] for name in candidates if name in lower), None)

    query = pick(source.query_column, _P2_QUERY)
    if query is None:
        return f"no query column among {listing} (set query_column)"
    positive = pick(source.positive_column, _P2_POSITIVE)
    if positive is None:
        return f"no positive column among {listing} (set positive_column)"
    if source.negative_columns:
        negatives = tuple(source.negative_columns)
    else:
        listed = pick(None, _P2_NEGATIVE_LIST)
        negatives = (listed,) if listed else tuple(_negative_n_columns(columns))
        if not negatives and "negative" in lower:
            negatives = (lower["negative"],)
    if not negatives and num_negatives > 0 and not fill:
        return f"no negative column among {listing} (set negative_columns, or fill_negatives: random)"
    return _Phase2Plan(query=query, positive=positive, negatives=negatives)


def _phase2_texts(plan: _Phase2Plan, row: dict[str, Any], num_negatives: int) -> tuple[str, str, list[str]]:
    """``(query, positive, negatives)`` of one row; at most ``num_negatives`` negatives (the first ones)."""
    for column in (plan.query, plan.positive, *plan.negatives):
        if column not in row:
            raise _BadRow(f"missing column {column!r}")
    query = _text(row[plan.query], plan.query)
    positive = row[plan.positive]
    if isinstance(positive, (list, tuple)):
        if not positive:
            raise _BadRow(f"column {plan.positive!r} is an empty list")
        positive = _text(positive[0], f"{plan.positive}[0]")
    else:
        positive = _text(positive, plan.positive)
    negatives: list[str] = []
    for column in plan.negatives:
        if len(negatives) >= num_negatives:
            break
        value = row[column]
        if isinstance(value, (list, tuple)):
            value = value[: num_negatives - len(negatives)]
        negatives.extend(_texts(value, column))
    return query, positive, negatives[:num_negatives]


# ----------------------------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------------------------


class _Interner:
    """Text -> id in order of first appearance."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.texts: list[str] = []

    def add(self, text: str) -> int:
        index = self.ids.get(text)
        if index is None:
            index = self.ids[text] = len(self.texts)
            self.texts.append(text)
        return index


def _compact(interner: _Interner, used: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Keep only the ``used`` ids (in first-appearance order); return their texts and an old -> new id map."""
    keep = np.unique(used.astype(np.int64, copy=False))
    remap = np.full(len(interner.texts), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep), dtype=np.int64)
    return [interner.texts[i] for i in keep.tolist()], remap


def _check_policies(data: Any) -> None:
    if data.on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row: expected 'error' or 'skip', got {data.on_bad_row!r}")
    if data.fill_negatives not in ("error", "random"):
        raise ConfigError(f"data.fill_negatives: expected 'error' or 'random', got {data.fill_negatives!r}")


def _bad(data: Any, report: SourceReport, loc: str, err: _BadRow) -> None:
    if data.on_bad_row == "error":
        raise DataError(f"{loc}: {err}")
    report.dropped_bad += 1


def _sample(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a uniform random subset of ``cap`` out of ``n`` (all of them when ``cap`` is None or >= n)."""
    if cap is None or cap >= n:
        return np.arange(n, dtype=np.int64)
    if cap < 0:
        raise ConfigError(f"max_samples: must be >= 0, got {cap}")
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


def _empty_source_error(name: str, report: SourceReport) -> DataError:
    return DataError(
        f"source {name}: no usable rows (read {report.rows_read}, bad {report.dropped_bad}, "
        f"duplicate {report.dropped_duplicate})"
    )


def _check_schema(label: str, columns: list[str], wanted: Iterable[str]) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(f"{label}: missing column {missing[0]!r} (columns: {', '.join(columns)})")


def _read_phase1_source(
    data: Any, source: Any, interners: dict[int, _Interner]
) -> tuple[list[tuple[tuple[int, int], ...]], SourceReport]:
    """Unique valid rows of one phase-1 source, each a tuple of distinct ``(role, text id)`` items."""
    report = SourceReport(name=_source_name(source))
    rows: list[tuple[tuple[int, int], ...]] = []
    seen: set[tuple[tuple[int, int], ...]] = set()
    cache: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    for part in _resolve_parts(source):
        columns, row_iter = _open_part(part)
        if columns is not None:
            plan = _phase1_columns(source, columns)
            if not plan:
                raise DataError(f"{part.label}: no query or document column among {', '.join(columns)} "
                                f"(set query_columns / document_columns)")
            _check_schema(part.label, columns, (c for c, _ in plan))
        for loc, row in row_iter:
            report.rows_read += 1
            try:
                if isinstance(row, _BadRow):
                    raise row
                items = _phase1_items(source, row, cache)
            except _BadRow as err:
                _bad(data, report, loc, err)
                continue
            key = tuple(dict.fromkeys((role, interners[role].add(text)) for role, text in items))
            if key in seen:
                report.dropped_duplicate += 1
                continue
            seen.add(key)
            rows.append(key)
    return rows, report


def _prepare_phase1(
    data: Any, cap_default: int | None, seed: int
) -> tuple[list[str], list[str], np.ndarray, list[SourceReport]]:
    """Read every phase-1 source, cap each one (rows), and return (query texts, document texts, examples, reports)."""
    interners = {QUERY: _Interner(), DOCUMENT: _Interner()}
    pairs: dict[tuple[int, int], None] = {}  # ordered set of (role, text id) over every kept row
    reports = []
    for index, source in enumerate(data.phase1):
        rows, report = _read_phase1_source(data, source, interners)
        if not rows:
            raise _empty_source_error(report.name, report)
        cap = source.max_samples if source.max_samples is not None else cap_default
        chosen = _sample(len(rows), cap, np.random.default_rng([seed, 1, index]))
        report.kept, report.sampled_out = len(chosen), len(rows) - len(chosen)
        for i in chosen.tolist():
            pairs.update(dict.fromkeys(rows[i]))
        reports.append(report)
    pair_array = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
    is_query = pair_array[:, 0] == QUERY
    query_texts, query_map = _compact(interners[QUERY], pair_array[is_query, 1])
    doc_texts, doc_map = _compact(interners[DOCUMENT], pair_array[~is_query, 1])
    examples = pair_array.copy()
    examples[is_query, 1] = query_map[pair_array[is_query, 1]]
    examples[~is_query, 1] = doc_map[pair_array[~is_query, 1]]
    return query_texts, doc_texts, examples, reports


def _read_phase2_source(
    data: Any, source: Any, num_negatives: int, queries: _Interner, documents: _Interner, seen: set[tuple[int, ...]]
) -> tuple[list[tuple[int, ...]], SourceReport]:
    """Valid rows of one phase-2 source not already in ``seen``: ``(query id, positive id, negative ids...)``.

    With ``fill_negatives: random`` a row may carry fewer than ``num_negatives`` negatives (filled later).
    """
    fill = data.fill_negatives == "random"
    report = SourceReport(name=_source_name(source))
    rows: list[tuple[int, ...]] = []
    plans: dict[tuple[str, ...], _Phase2Plan | str] = {}
    for part in _resolve_parts(source):
        columns, row_iter = _open_part(part)
        if columns is not None:
            plan = _phase2_plan(source, columns, num_negatives, fill)
            if isinstance(plan, str):
                raise DataError(f"{part.label}: {plan}")
            _check_schema(part.label, columns, (plan.query, plan.positive, *plan.negatives))
        for loc, row in row_iter:
            report.rows_read += 1
            try:
                if isinstance(row, _BadRow):
                    raise row
                keys = tuple(row)
                if keys not in plans:
                    plans[keys] = _phase2_plan(source, keys, num_negatives, fill)
                plan = plans[keys]
                if isinstance(plan, str):
                    raise _BadRow(plan)
                query, positive, negatives = _phase2_texts(plan, row, num_negatives)
                if len(negatives) < num_negatives and not fill:
                    raise _BadRow(f"has {len(negatives)} negatives, {num_negatives} needed "
                                  f"(or set fill_negatives: random)")
            except _BadRow as err:
                _bad(data, report, loc, err)
                continue
            key = (queries.add(query), documents.add(positive), *(documents.add(n) for n in negatives))
            if key in seen:
                report.dropped_duplicate += 1
                continue
            seen.add(key)
            rows.append(key)
    return rows, report


def _prepare_phase2(
    data: Any, num_negatives: int, max_samples: int | None, seed: int
) -> tuple[list[str], list[str], np.ndarray, list[SourceReport]]:
    """Read every phase-2 source, apply the per-source caps then the total cap, fill short negative lists.

    Returns (query texts, document texts, examples int64 [N, 2 + num_negatives], reports).
    """
    if num_negatives < 0:
        raise ConfigError(f"phase2.num_negatives: must be >= 0, got {num_negatives}")
    queries, documents = _Interner(), _Interner()
    candidates: list[tuple[int, ...]] = []
    origin: list[int] = []  # source index of each candidate
    seen: set[tuple[int, ...]] = set()
    reports = []
    for index, source in enumerate(data.phase2):
        rows, report = _read_phase2_source(data, source, num_negatives, queries, documents, seen)
        if not rows:
            raise _empty_source_error(report.name, report)
        chosen = _sample(len(rows), source.max_samples, np.random.default_rng([seed, 2, index]))
        report.sampled_out = len(rows) - len(chosen)
        candidates.extend(rows[i] for i in chosen.tolist())
        origin.extend([index] * len(chosen))
        reports.append(report)

    chosen = _sample(len(candidates), max_samples, np.random.default_rng([seed, 3]))
    origin_all = np.asarray(origin, dtype=np.int64)
    origin_kept = origin_all[chosen]
    before = np.bincount(origin_all, minlength=len(reports))
    after = np.bincount(origin_kept, minlength=len(reports))
    for report, n_before, n_after in zip(reports, before.tolist(), after.tolist()):
        report.kept = n_after
        report.sampled_out += n_before - n_after
    kept = [candidates[i] for i in chosen.tolist()]

    query_texts, query_map = _compact(queries, np.fromiter((e[0] for e in kept), dtype=np.int64, count=len(kept)))
    doc_texts, doc_map = _compact(documents, np.fromiter((d for e in kept for d in e[1:]), dtype=np.int64))
    width = 2 + num_negatives
    if any(len(e) < width for e in kept) and len(doc_texts) < num_negatives + 1:
        raise DataError(f"phase 2: cannot fill negatives: only {len(doc_texts)} distinct documents, "
                        f"{num_negatives + 1} needed (positive + {num_negatives} negatives)")
    examples = np.empty((len(kept), width), dtype=np.int64)
    filled = np.zeros(len(reports), dtype=np.int64)
    rng = np.random.default_rng([seed, 4])
    for i, example in enumerate(kept):
        row = [int(query_map[example[0]]), *(int(doc_map[d]) for d in example[1:])]
        if len(row) < width:
            row = _fill(row, num_negatives, len(doc_texts), rng)
            filled[origin_kept[i]] += 1
        examples[i] = row
    for report, count in zip(reports, filled.tolist()):
        report.filled_negatives = count
    return query_texts, doc_texts, examples, reports


def _fill(row: list[int], num_negatives: int, num_docs: int, rng: np.random.Generator) -> list[int]:
    """Append random document rows (never the positive ``row[1]`` nor an existing negative) up to k negatives."""
    taken = set(row[1:])
    while len(row) < 2 + num_negatives:
        candidate = int(rng.integers(num_docs))
        if candidate not in taken:
            taken.add(candidate)
            row.append(candidate)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Prepared folders: rank 0 writes, every rank reads
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars while we save/map (they would interleave across ranks)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _config_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _phase_key(phase: str, data: Any, sources: list[Any], params: dict[str, Any]) -> str:
    """Hash of everything the prepared tables depend on (including local files' size + mtime)."""
    files = [state for source in sources for state in _local_files_state(_resolve_parts(source))]
    payload = {
        "version": _PREPARED_VERSION,
        "phase": phase,
        "sources": [_config_dict(s) for s in sources],
        "on_bad_row": data.on_bad_row,
        "fill_negatives": data.fill_negatives,
        "params": params,
        "files": files,
    }
    return _digest(payload)


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh sibling folder, then rename it to ``final`` (a crash leaves no half folder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with _quiet_datasets():
            write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # else: a concurrent job finished the same folder first; keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_text_table(texts: list[str], folder: Path) -> None:
    datasets.Dataset.from_dict({"text": texts}, features=_TEXT_FEATURES).save_to_disk(str(folder))


def _save_prepared(folder: Path, queries: list[str], documents: list[str], examples: np.ndarray,
                   reports: list[SourceReport], meta: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        _save_text_table(queries, tmp / "queries")
        _save_text_table(documents, tmp / "documents")
        np.save(tmp / "examples.npy", examples)
        (tmp / "reports.json").write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    _write_atomically(folder, write)


def _load_prepared(folder: Path) -> tuple[TextTable, TextTable, np.ndarray, list[SourceReport]]:
    try:
        queries = datasets.load_from_disk(str(folder / "queries"))
        documents = datasets.load_from_disk(str(folder / "documents"))
        examples = np.load(folder / "examples.npy", mmap_mode="r")
        reports = [SourceReport(**r) for r in json.loads((folder / "reports.json").read_text())]
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{folder}: prepared data is unreadable ({_one_line(err)}); delete the folder") from None
    return (
        TextTable(role="query", dataset=queries, fingerprint=f"{folder.name}/queries"),
        TextTable(role="document", dataset=documents, fingerprint=f"{folder.name}/documents"),
        examples,
        reports,
    )


def _main_prepares(prepare: Callable[[], Path]) -> Path:
    """Rank 0 runs ``prepare`` (returning a folder); every rank then gets the folder or rank 0's error.

    Rank 0's outcome is broadcast before the barrier, so a failure there raises the same message on every rank
    instead of leaving the others waiting.
    """
    outcome: tuple[str, str] | None = None
    error: BaseException | None = None
    if get_info().rank == 0:
        try:
            outcome = ("ok", str(prepare()))
        except DataError as err:
            outcome, error = ("data", str(err)), err
        except Exception as err:  # noqa: BLE001 - any rank-0 failure must reach the other ranks
            outcome, error = ("other", f"{type(err).__name__}: {_one_line(err)}"), err
    outcome = broadcast_object(outcome)
    barrier()
    status, payload = outcome
    if status == "ok":
        return Path(payload)
    if error is not None:
        raise error
    if status == "data":
        raise DataError(payload)
    raise DistillError(f"rank 0 failed while preparing data: {payload}")


def _log_reports(phase: str, folder: Path, reports: list[SourceReport], n_queries: int, n_documents: int,
                 n_examples: int, reused: bool) -> None:
    name_width = max([len("source"), *(len(r.name) for r in reports)])
    lines = [
        f"{phase}: {n_examples} examples, {n_queries} queries, {n_documents} documents "
        f"({'reused' if reused else 'prepared'} {folder})",
        f"  {'source':<{name_width}} {'read':>9} {'kept':>9} {'bad':>7} {'duplicate':>9} {'filled':>7} {'capped':>9}",
    ]
    for r in reports:
        lines.append(f"  {r.name:<{name_width}} {r.rows_read:>9} {r.kept:>9} {r.dropped_bad:>7} "
                     f"{r.dropped_duplicate:>9} {r.filled_negatives:>7} {r.sampled_out:>9}")
    logger.info("\n".join(lines))


def _load_phase(phase: str, data: Any, sources: list[Any], params: dict[str, Any], work_dir: str | Path,
                build: Callable[[], tuple[list[str], list[str], np.ndarray, list[SourceReport]]],
                ) -> tuple[TextTable, TextTable, np.ndarray, list[SourceReport]]:
    """Rank 0 builds (or finds) the phase's prepared folder; every rank loads it."""
    def prepare() -> Path:
        _check_policies(data)
        if not sources:
            raise DataError(f"{phase}: no data sources configured (data.{phase})")
        folder = Path(work_dir) / f"{phase}-{_phase_key(phase, data, sources, params)}"
        if (folder / "examples.npy").is_file():
            queries, documents, examples, reports = _load_prepared(folder)
            _log_reports(phase, folder, reports, len(queries), len(documents), len(examples), reused=True)
            return folder
        query_texts, doc_texts, examples, reports = build()
        meta = {"phase": phase, "sources": [_config_dict(s) for s in sources], "params": params}
        _save_prepared(folder, query_texts, doc_texts, examples, reports, meta)
        _log_reports(phase, folder, reports, len(query_texts), len(doc_texts), len(examples), reused=False)
        return folder

    return _load_prepared(_main_prepares(prepare))


def load_phase1(data: DataConfig, max_samples_per_dataset: int | None, seed: int, work_dir: str | Path) -> Phase1Data:
    """Unique ``(role, text)`` examples of every ``data.phase1`` source.

    Each source contributes its query / document columns (configured, or auto-detected: query | anchor | question
    -> query; positive | pos | answer | passage | document | text | negative | negative_N | neg -> document;
    list-valued columns contribute each element). A source is capped to ``source.max_samples`` rows, else
    ``max_samples_per_dataset`` rows, chosen at random from its unique valid rows.
    """
    params = {"max_samples_per_dataset": max_samples_per_dataset, "seed": seed}
    queries, documents, examples, reports = _load_phase(
        "phase1", data, list(data.phase1), params, work_dir,
        lambda: _prepare_phase1(data, max_samples_per_dataset, seed),
    )
    return Phase1Data(queries=queries, documents=documents, examples=examples, reports=reports)


def load_phase2(
    data: DataConfig, num_negatives: int, max_samples: int | None, seed: int, work_dir: str | Path
) -> Phase2Data:
    """``(query, positive, num_negatives negatives)`` examples of every ``data.phase2`` source.

    Formats: ``{query, pos: [str], neg: [str]}`` (FlagEmbedding; the first pos is the positive),
    ``{anchor|query, positive, negative_1..negative_N}`` and ``{anchor|query, positive, negative}``, or the columns
    named by ``query_column`` / ``positive_column`` / ``negative_columns``. The first ``num_negatives`` negatives
    are used. Each source is capped to ``source.max_samples`` (random subset), then the union to ``max_samples``.
    """
    params = {"num_negatives": num_negatives, "max_samples": max_samples, "seed": seed}
    queries, documents, examples, reports = _load_phase(
        "phase2", data, list(data.phase2), params, work_dir,
        lambda: _prepare_phase2(data, num_negatives, max_samples, seed),
    )
    return Phase2Data(queries=queries, documents=documents, examples=examples, reports=reports)


def load_phase_data(cfg: Config, phase: int, work_dir: str | Path | None = None) -> Phase1Data | Phase2Data:
    """The prepared data of training ``phase`` (1 or 2) of ``cfg``, as the trainer, the cache fill and the plan see it.

    ``work_dir`` holds the prepared folders; default ``cfg.cache_root / "data"``, where training reuses them
    (``--dry-run`` passes a temporary folder so that planning writes nothing).
    """
    work = cfg.cache_root / "data" if work_dir is None else work_dir
    if phase == 1:
        return load_phase1(cfg.data, cfg.phase1.max_samples_per_dataset, cfg.training.seed, work)
    if phase == 2:
        return load_phase2(cfg.data, cfg.phase2.num_negatives, cfg.phase2.max_samples, cfg.training.seed, work)
    raise ConfigError(f"phase must be 1 or 2, got {phase!r}")


# ----------------------------------------------------------------------------------------------------------------
# Tokenization (once, cached)
# ----------------------------------------------------------------------------------------------------------------


def tokenize_table(table: TextTable, tokenizer: Any, max_length: int, work_dir: str | Path) -> TokenizedTable:
    """Tokenize every row of ``table`` once (truncation to ``max_length``, no padding) and cache it on disk.

    The cache folder ``work_dir/tokens-<key>`` is keyed by the tokenizer's ``name_or_path`` and vocabulary size,
    ``max_length`` and the table's fingerprint. Rank 0 computes it; every rank loads it memory-mapped.
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
        np.save(tmp / "lengths.npy", _column_numpy(mapped, "length"))
        del mapped
        (tmp / "map.arrow").unlink(missing_ok=True)

    def prepare() -> Path:
        if not (folder / "lengths.npy").is_file():
            _write_atomically(folder, write)
            logger.info("tokenized %d %s texts (max_length %d) into %s", len(table), table.role, max_length, folder)
        return folder

    ready = _main_prepares(prepare)
    try:
        dataset = datasets.load_from_disk(str(ready / "tokens"))
        lengths = np.load(ready / "lengths.npy")
    except (OSError, ValueError) as err:
        raise DataError(f"{ready}: tokenized data is unreadable ({_one_line(err)}); delete the folder") from None
    return TokenizedTable(dataset=dataset, lengths=lengths.astype(np.int64, copy=False))


def _column_numpy(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """A column of a freshly mapped (hence index-free) dataset as int64."""
    return np.asarray(dataset.data.column(column).to_numpy(), dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Preflight: cheap checks every rank runs before any process group exists


def preflight(data: Any, phases: Sequence[int], num_negatives: int) -> None:
    """Fail fast, before torch.distributed starts, on what a glance at the local files shows is wrong.

    For every local source of the given phases: the path exists, the format is known, no file is empty, and the
    first row parses (UTF-8, JSON, CSV) and has the needed columns. Each check raises the same one-line
    :class:`DataError` the full read would. Row-level problems further down a file are found by the full read
    (rank 0, before any model loads); Hub sources are only reachable through that read.
    """
    for phase in phases:
        for source in data.phase1 if phase == 1 else data.phase2:
            for part in _resolve_parts(source):
                if part.format == "hub":
                    continue
                if part.path.stat().st_size == 0:
                    raise DataError(f"{part.label}: empty file (source {_source_name(source)})")
                columns, rows = _open_part(part)
                first = next(iter(rows), None)
                if first is None:
                    raise DataError(f"{part.label}: no rows (source {_source_name(source)})")
                loc, row = first
                if isinstance(row, _BadRow):
                    raise DataError(f"{loc}: {row}")
                names = columns if columns is not None else list(row)
                if phase == 1:
                    plan = _phase1_columns(source, names)
                    if not plan:
                        raise DataError(f"{part.label}: no query or document column among {', '.join(names)} "
                                        f"(set query_columns / document_columns)")
                    _check_schema(part.label, names, (c for c, _ in plan))
                else:
                    plan2 = _phase2_plan(source, names, num_negatives, data.fill_negatives == "random")
                    if isinstance(plan2, str):
                        raise DataError(f"{part.label}: {plan2}")
                    _check_schema(part.label, names, (plan2.query, plan2.positive, *plan2.negatives))
