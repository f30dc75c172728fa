"""On-disk cache of teacher embeddings: every unique text is embedded once, then looked up at train time.

The caller passes a ``namespace`` (a fingerprint of everything that changes the vectors) and an ``encode`` callable.
``root/<namespace>/`` holds immutable shards ``shard-r<rank>-<uuid4>``, three files each, written atomically::

    <stem>.emb.npy    [rows, dim] vectors in the storage dtype (bfloat16 as its int16 bit pattern)
    <stem>.keys.npy   [rows, 2] uint64: 128-bit BLAKE2b digest (hi, lo) of each row's UTF-8 text
    <stem>.json       manifest, written LAST (marks the shard complete): format, rows, dim, dtype, and the name,
                      byte size and sha256 of both data files

A shard is used only if its manifest, key checksum, embeddings size and ``.npy`` headers check out and, except for
:meth:`TeacherCache.count_missing`, its embeddings sha256 (once per file and process); a failing shard is skipped
(its texts recomputed) and, during ``fill``, moved to ``<namespace>/_quarantine/``. All ranks must see ``root``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.atomic import fsync_dir
from distill.batches import token_budget_batches
from distill.distributed import barrier, broadcast_object, get_info
from distill.errors import CacheError, ConfigError, DataError
from distill.manifest import sha256_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUARANTINE_DIR = "_quarantine"
# Storage dtype name -> (torch dtype it is rounded to, numpy dtype of the .npy file).
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "float32": (torch.float32, np.dtype("<f4")),
}
_KEY_DTYPE = np.dtype("<u8")
_SHARD_SUFFIXES = (".json", ".emb.npy", ".keys.npy")
_HASH_CHUNK = 65536
# Token counts are measured chunk by chunk (texts longest first by characters): the first chunk is small (but at
# least 4 batches, more than the fill's look-ahead), so the teacher starts at once, and each next one (doubling up to
# the cap) is counted while the previous one encodes.
_MEASURE_CHUNKS = (1024, 16384)
# A *.tmp file younger than this may belong to a job writing right now, so it is not deleted.
_TMP_GRACE_S = 3600.0
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _slice(texts: Sequence[str], start: int, size: int) -> list[str]:
    """``texts[start : start + size]`` as a list (``texts`` may be a list, a ``datasets`` column or Arrow array)."""
    chunk = texts[start : min(start + size, len(texts))]
    return chunk.to_pylist() if hasattr(chunk, "to_pylist") else list(chunk)


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """128-bit BLAKE2b digests of the UTF-8 texts -> uint64 [len(texts), 2] (hi word, lo word; little-endian)."""
    parts = [np.empty((0, 2), dtype=_KEY_DTYPE)]
    for start in range(0, len(texts), _HASH_CHUNK):
        chunk = _slice(texts, start, _HASH_CHUNK)
        try:
            digest = b"".join(
                hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in chunk
            )
        except AttributeError:
            bad = next(j for j, t in enumerate(chunk) if not isinstance(t, str))
            raise DataError(
                f"text at position {start + bad} is {type(chunk[bad]).__name__}, not str; "
                "the teacher cache can only embed strings"
            ) from None
        parts.append(np.frombuffer(digest, dtype=_KEY_DTYPE).reshape(-1, 2))
    return np.concatenate(parts)


def _gather(texts: Sequence[str], positions: np.ndarray, size: int = _HASH_CHUNK) -> list[str]:
    """``[texts[i] for i in positions]``, read as one slice per chunk (fast on Arrow-backed tables)."""
    out: list[str] = [""] * len(positions)
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    bounds = np.searchsorted(sorted_pos, np.arange(0, len(texts) + size, size))
    for c in np.nonzero(np.diff(bounds))[0]:
        start = int(c) * size
        chunk = _slice(texts, start, size)
        for j in range(bounds[c], bounds[c + 1]):
            out[order[j]] = chunk[int(sorted_pos[j]) - start]
    return out


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Position of the first occurrence of every distinct key, in key order (hi, lo) -> int64 [n_distinct]."""
    order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal keys keep ascending positions
    ordered = keys[order]
    new = np.ones(len(keys), dtype=bool)
    new[1:] = (ordered[1:, 0] != ordered[:-1, 0]) | (ordered[1:, 1] != ordered[:-1, 1])
    return order[new].astype(np.int64)


class _InvalidShard(Exception):
    """A shard failed verification (message = the reason)."""


@dataclass(frozen=True)
class _Shard:
    directory: Path
    stem: str
    rows: int
    dim: int
    dtype: str

    @property
    def emb_path(self) -> Path:
        return self.directory / f"{self.stem}.emb.npy"


def _atomic_write(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` via a fsynced temporary file + ``os.replace``; return its manifest entry."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # left behind on failure: see _synced_index
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_shard(directory: Path, rank: int, keys: np.ndarray, emb: np.ndarray, dtype: str) -> str:
    """Write one shard (data files first, manifest last) and return its stem."""
    stem = f"shard-r{rank:05d}-{uuid.uuid4().hex}"
    manifest = {
        "format": FORMAT_VERSION,
        "rows": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "dtype": dtype,
        "embeddings": _atomic_write(directory / f"{stem}.emb.npy", _npy_bytes(emb)),
        "keys": _atomic_write(directory / f"{stem}.keys.npy", _npy_bytes(keys)),
        "rank": rank,
        "created_unix": time.time(),
    }
    _atomic_write(directory / f"{stem}.json", json.dumps(manifest, indent=1).encode())
    fsync_dir(directory)
    return stem


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def _load_shard(
    directory: Path, stem: str, verified: set[tuple[str, int, int]], full: bool
) -> tuple[_Shard, np.ndarray]:
    """Shard ``stem`` and its keys [rows, 2], verified (``full``: also the embeddings sha256 unless in ``verified``)."""
    try:
        manifest = json.loads((directory / f"{stem}.json").read_text(encoding="utf-8"))
        shard = _Shard(directory, stem, manifest["rows"], manifest["dim"], manifest["dtype"])
        if manifest["format"] != FORMAT_VERSION or shard.dtype not in _DTYPES:
            raise _InvalidShard("unsupported manifest format or dtype")
        data = (directory / f"{stem}.keys.npy").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["keys"]["sha256"]:
            raise _InvalidShard(f"{stem}.keys.npy does not match its sha256")
        keys = np.load(io.BytesIO(data), allow_pickle=False)
        emb_meta = manifest["embeddings"]
        if shard.emb_path.stat().st_size != emb_meta["bytes"]:
            raise _InvalidShard(f"{shard.emb_path.name} does not have the {emb_meta['bytes']} bytes of its manifest")
        emb = np.load(shard.emb_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable or malformed manifest or data file
        raise _InvalidShard(repr(exc)) from None
    want = ((shard.rows, 2), _KEY_DTYPE, (shard.rows, shard.dim), _DTYPES[shard.dtype][1])
    found = (keys.shape, keys.dtype, emb.shape, emb.dtype)
    if found != want:
        raise _InvalidShard(f"keys and embeddings files hold {found}, the manifest says {want}")
    if full:
        stat_key = _stat_key(shard.emb_path)
        if stat_key not in verified:
            if sha256_file(shard.emb_path) != emb_meta["sha256"]:
                raise _InvalidShard(f"{shard.emb_path.name} does not match its sha256 (corrupted)")
            verified.add(stat_key)
    return shard, keys


def _listing(directory: Path) -> tuple[list[str], list[str], tuple[tuple[str, int, int], ...]]:
    """(stems with a manifest, stems without one (a killed writer), (name, size, mtime_ns) of every shard file)."""
    if not directory.is_dir():
        return [], [], ()
    files = sorted((e.name, e.stat()) for e in os.scandir(directory) if e.name.endswith(_SHARD_SUFFIXES))
    stems = [name[: -len(".json")] for name, _ in files if name.endswith(".json")]
    orphans = sorted({name.rsplit(".", 2)[0] for name, _ in files} - set(stems))
    return stems, orphans, tuple((name, st.st_size, st.st_mtime_ns) for name, st in files)


def _quarantine(directory: Path, stem: str) -> None:
    target = directory / QUARANTINE_DIR
    target.mkdir(exist_ok=True)
    for suffix in _SHARD_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.replace(directory / f"{stem}{suffix}", target / f"{stem}{suffix}")
    logger.warning("teacher cache: moved shard %s to %s", stem, target)


class _Index:
    """Sorted keys of a namespace's valid shards -> global row (``offsets[shard] + row``)."""

    def __init__(self, fingerprint: tuple, full: bool, shards: list[_Shard], keys: list[np.ndarray]) -> None:
        self.fingerprint, self.full, self.shards = fingerprint, full, shards
        other = [s for s in shards if s.dim != shards[0].dim]
        if other:
            raise CacheError(
                f"teacher cache {shards[0].directory} mixes dimensions: shard {shards[0].stem} has dim "
                f"{shards[0].dim}, shard {other[0].stem} has dim {other[0].dim}; one namespace must hold one teacher"
            )
        self.dim: int | None = shards[0].dim if shards else None
        self.offsets = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.rows for s in shards], out=self.offsets[1:])
        all_keys = np.concatenate(keys) if keys else np.empty((0, 2), dtype=_KEY_DTYPE)
        # The same text may sit in two shards (two jobs filled it at once); either copy is fine.
        self.pos = _distinct(all_keys)
        self.hi, self.lo = all_keys[self.pos, 0], all_keys[self.pos, 1]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Global row of each key in ``keys`` [n, 2] -> int64 [n], -1 where absent."""
        if len(self.hi) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        hi, lo = keys[:, 0], keys[:, 1]
        left = np.searchsorted(self.hi, hi, side="left")
        right = np.searchsorted(self.hi, hi, side="right")
        for i in np.nonzero(right - left > 1)[0]:  # keys sharing the 64-bit hi word: rare, sorted by lo within
            left[i] += np.searchsorted(self.lo[left[i] : right[i]], lo[i])
        at = np.minimum(left, len(self.hi) - 1)
        hit = (left < right) & (self.lo[at] == lo)
        return np.where(hit, self.pos[at], -1)


def _open_maps_limit() -> int:
    """Shard memory maps kept open: each holds a file descriptor, so a quarter of the soft limit (64 to 8192)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    return 8192 if soft < 0 else max(64, min(8192, soft // 4))


class CachedEmbeddings:
    """Vectors of the texts given to :meth:`TeacherCache.lookup`, read lazily from memory-mapped shards: ``emb[rows]``
    (positions in those texts) -> float32 ``[len(rows), dim]``, an int -> ``[dim]``. Picklable (for DataLoaders).
    Each distinct row is read once, in ascending order, with one read per shard; maps stay open across calls (the most
    recently used ``_max_open`` of them). Not for concurrent use by two threads."""

    _max_open = _open_maps_limit()

    def __init__(self, shards: list[_Shard], offsets: np.ndarray, positions: np.ndarray, dim: int) -> None:
        self.dim = dim
        self._shards = shards
        self._offsets = offsets
        self._positions = positions
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._positions)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        elif isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        idx = np.asarray(rows)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"CachedEmbeddings rows must be integers, got {idx.dtype}")
        wanted, inverse = np.unique(self._positions[idx.reshape(-1)], return_inverse=True)  # sorted, distinct
        shard_ids = np.searchsorted(self._offsets, wanted, side="right") - 1
        local = wanted - self._offsets[shard_ids]
        values = torch.empty((len(wanted), self.dim), dtype=torch.float32)
        starts = np.flatnonzero(np.diff(shard_ids, prepend=-1)).tolist()
        for a, b in zip(starts, [*starts[1:], len(wanted)]):  # one shard's rows, ascending: one read
            s = int(shard_ids[a])
            values[a:b] = torch.from_numpy(self._array(s)[local[a:b]]).view(_DTYPES[self._shards[s].dtype][0])
        result = values[torch.from_numpy(inverse.reshape(-1))]
        return result[0] if idx.ndim == 0 else result.reshape(*idx.shape, self.dim)

    def _array(self, s: int) -> np.ndarray:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        if len(self._open) >= self._max_open:
            self._open.popitem(last=False)
        array = np.load(self._shards[s].emb_path, mmap_mode="r", allow_pickle=False)
        self._open[s] = array
        return array


def _measured_batches(texts: Sequence[str], measure: Callable[[list[str]], Any], batch_size: int,
                      max_tokens: int | None, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """:func:`token_budget_batches` (positions into ``texts``) of chunks of ``texts`` taken longest first by characters,
    each chunk re-sorted by ``measure``'s token counts, which run on ``pool`` one chunk ahead (sizes
    ``_MEASURE_CHUNKS``: the first small, then doubling), so the teacher waits only for the first chunk's count."""
    by_chars = np.argsort(-np.fromiter(map(len, texts), np.int64, len(texts)), kind="stable")
    size = max(_MEASURE_CHUNKS[0], 4 * batch_size)
    limit = max(_MEASURE_CHUNKS[1], size)
    chunks, start = [], 0
    while start < len(by_chars):
        chunks.append(by_chars[start : start + size])
        start, size = start + size, min(2 * size, limit)

    def plan(chunk: np.ndarray) -> list[np.ndarray]:
        lengths = np.asarray(measure([texts[i] for i in chunk]), dtype=np.int64)
        return [chunk[b] for b in token_budget_batches(lengths, batch_size, max_tokens)]

    for batches in _ahead(pool, plan, chunks, depth=1):
        yield from batches


def _ahead(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``fn(item)`` of each item in order, computed up to ``depth`` items ahead on ``pool``; its errors raise here."""
    queue: deque[Future] = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) > depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


class _ShardBuffer:
    """Collects encode() outputs and writes a shard every ``shard_size`` rows on a background thread (sha256, fsync).

    An output stays where encode() left it: on a GPU it is rounded to the storage dtype there, copied without
    blocking into pinned memory, and its NaN/inf flag computed there; one synchronisation per shard reads the flags.
    A bad batch is dropped (CacheError once the others are kept). :meth:`close` stores every good row and waits for
    the writes; a write's error is raised by the next shard or by close."""

    def __init__(self, cache: TeacherCache, directory: Path, dim: int | None) -> None:
        self.cache, self.directory, self.dim = cache, directory, dim
        self.parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]] = []  # keys, rows, flag (None: read)
        self.rows = 0
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="teacher-cache-writer")
        self.writes: list[Future] = []

    def add(self, keys: np.ndarray, out: Any) -> None:
        out = self.cache._check_output(out, len(keys), self.dim, self.directory)
        self.dim = out.shape[1]
        torch_dtype = _DTYPES[self.cache.dtype][0]
        # One float32 pass catches NaN (the comparison is False), inf, and values that round to inf in torch_dtype.
        ok = out.float().abs().amax() <= torch.finfo(torch_dtype).max
        stored = out.to(torch_dtype)
        host = torch.empty(stored.shape, dtype=torch_dtype, pin_memory=stored.is_cuda)
        host.copy_(stored, non_blocking=True)
        self.parts.append((keys, host, ok))
        self.rows += len(keys)
        if self.rows >= self.cache.shard_size:
            self._settle()
            while self.rows >= self.cache.shard_size:
                self._submit(self.cache.shard_size)
            self._reap(keep=2)

    def close(self) -> None:
        try:
            self._settle()
        finally:
            if self.rows:
                self._submit(self.rows)
            self.writer.shutdown(wait=True)
            self._reap(keep=0)

    def _settle(self) -> None:
        """Read the new flags (the one device synchronisation: the host copies before them are then complete)."""
        fresh = [i for i, part in enumerate(self.parts) if part[2] is not None]
        if not fresh:
            return
        flags = torch.stack([self.parts[i][2] for i in fresh]).cpu().tolist()
        bad = {i for i, good in zip(fresh, flags) if not good}
        self.parts = [(keys, host, None) for i, (keys, host, _) in enumerate(self.parts) if i not in bad]
        self.rows = sum(len(part[0]) for part in self.parts)
        if bad:
            raise CacheError(f"encode() returned NaN/inf (or values beyond the {self.cache.dtype} range) in "
                             f"{len(bad)} batch(es); nothing stored for them")

    def _reap(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are in flight; raise the first error of the finished ones (once)."""
        done, self.writes = [w for w in self.writes if w.done()], [w for w in self.writes if not w.done()]
        while len(self.writes) > keep:
            done.append(self.writes.pop(0))
        for write in done:
            write.result()

    def _submit(self, n: int) -> None:
        keys, emb = np.concatenate([p[0] for p in self.parts]), torch.cat([p[1] for p in self.parts])
        self.parts = [(keys[n:], emb[n:], None)] if len(keys) > n else []
        self.rows -= n
        self.writes.append(self.writer.submit(self._write, keys[:n], emb[:n]))

    def _write(self, keys: np.ndarray, emb: torch.Tensor) -> None:
        array = emb.view(torch.int16).numpy() if self.cache.dtype == "bfloat16" else emb.numpy()
        stem = _write_shard(self.directory, get_info().rank, keys, array, self.cache.dtype)
        # Hashed while writing, so this process need not read it back to trust it.
        self.cache._verified.add(_stat_key(self.directory / f"{stem}.emb.npy"))


class TeacherCache:
    """Teacher embeddings under ``root/<namespace>/``, stored in ``dtype``, returned as float32; ``shard_size`` rows
    per shard file (the most work a killed fill can lose)."""

    def __init__(self, root: str | Path, dtype: str = "float16", shard_size: int = 4096) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"teacher cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"teacher cache shard_size must be a positive integer, got {shard_size!r}")
        self.root = Path(root)
        self.dtype = dtype
        self.shard_size = shard_size
        self._verified: set[tuple[str, int, int]] = set()
        self._indexes: dict[str, _Index] = {}

    def count_missing(self, namespace: str, texts: Sequence[str]) -> int:
        """Number of distinct texts not in the cache. Reads only manifests and key files (no embedding checksums)."""
        keys = text_keys(texts)
        return int((self._index(namespace, full=False).find(keys[_distinct(keys)]) < 0).sum())

    def fill(
        self,
        namespace: str,
        texts: Sequence[str],
        encode: Callable[[Any], Any],
        batch_size: int,
        progress: bool = True,
        max_tokens: int | None = None,
    ) -> int:
        """Encode and store every distinct text not cached yet; returns how many THIS rank encoded. Collective (same
        ``texts`` on every rank): the missing texts are dealt round-robin, each rank encodes its share longest first
        (an out-of-memory batch shows at once) in :func:`token_budget_batches` of ``batch_size`` / ``max_tokens``,
        chunk by chunk (:func:`_measured_batches`: token counts of the next chunk run while this one encodes).
        ``encode(batch_texts)`` -> [n, dim] (any device); if it also has ``lengths(texts)`` (token counts; else
        characters count) and ``prepare(texts)``, encode receives ``prepare``'s result, computed on a background thread
        while the previous batch runs. If anything raises, the rows already encoded are stored first."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"teacher cache batch_size must be a positive integer, got {batch_size!r}")
        info = get_info()
        directory = self._dir(namespace)
        keys = text_keys(texts)
        first = np.sort(_distinct(keys))
        index = self._synced_index(namespace)
        missing = first[index.find(keys[first]) < 0]
        mine = missing[info.rank :: info.world_size]
        if info.is_main:
            msg = "teacher cache %s: %d of %d distinct texts missing; %d rank(s) encode them"
            logger.info(msg, directory, len(missing), len(first), info.world_size)
        if len(mine):
            directory.mkdir(parents=True, exist_ok=True)
            share = _gather(texts, mine)
            measure = getattr(encode, "lengths", None) or (lambda batch: [len(t) for t in batch])
            prepare = getattr(encode, "prepare", None) or (lambda batch: batch)
            buffer = _ShardBuffer(self, directory, index.dim)
            bar = tqdm(total=len(mine), disable=not (progress and info.is_main), unit="text", desc="teacher embeddings")
            try:
                with ThreadPoolExecutor(1, thread_name_prefix="teacher-prepare") as pool, \
                        ThreadPoolExecutor(1, thread_name_prefix="teacher-lengths") as counter:
                    batches = _measured_batches(share, measure, batch_size, max_tokens, counter)
                    inputs = _ahead(pool, lambda b: (b, prepare([share[i] for i in b])), batches)
                    for batch, features in inputs:
                        buffer.add(keys[mine[batch]], encode(features))
                        bar.update(len(batch))
            finally:
                bar.close()
                buffer.close()  # also when encode raised: keep the rows already encoded
        barrier()
        still = first[self._synced_index(namespace).find(keys[first]) < 0]
        if len(still):
            raise CacheError(
                f"teacher cache {directory}: {len(still)} texts are still missing after fill "
                f"(first: position {still[0]}); were shards removed while filling?"
            )
        return len(mine)

    def lookup(self, namespace: str, texts: Sequence[str]) -> CachedEmbeddings:
        """Vectors of ``texts`` (duplicates allowed), verified against their checksums; CacheError if any is missing."""
        index = self._index(namespace, full=True)
        positions = index.find(text_keys(texts))
        absent = np.nonzero(positions < 0)[0]
        if len(absent):
            preview = _gather(texts, absent[:1])[0][:60]
            raise CacheError(
                f"teacher cache {self._dir(namespace)}: {len(absent)} of {len(texts)} texts are not cached "
                f"(first: position {absent[0]}, {preview!r}); call fill() with them first"
            )
        return CachedEmbeddings(index.shards, index.offsets, positions, index.dim or 0)

    def _dir(self, namespace: str) -> Path:
        if not _NAMESPACE_RE.match(namespace):
            raise CacheError(f"teacher cache namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r}")
        return self.root / namespace

    def _index(self, namespace: str, full: bool, quarantine: bool = False, accepted: list[str] | None = None) -> _Index:
        """The namespace's index, rebuilt when a shard file changed (or checksums are newly needed). ``quarantine``:
        move bad shards aside (rank 0 in ``fill``); ``accepted``: load exactly these shards, verified by rank 0."""
        directory = self._dir(namespace)
        stems, orphans, fingerprint = _listing(directory)
        cached = self._indexes.get(namespace)
        if accepted is None and cached is not None and cached.fingerprint == fingerprint and (cached.full or not full):
            return cached
        for stem in orphans:
            logger.warning("teacher cache: ignoring incomplete shard %s/%s (no manifest)", directory, stem)
            if quarantine:
                _quarantine(directory, stem)
        shards, keys = [], []
        for stem in stems if accepted is None else accepted:
            try:
                shard, shard_keys = _load_shard(directory, stem, self._verified, full and accepted is None)
            except _InvalidShard as exc:
                if accepted is not None:
                    raise CacheError(
                        f"teacher cache shard {directory}/{stem} verified by rank 0 is unreadable on rank "
                        f"{get_info().rank} ({exc}); the cache root must be on a filesystem shared by all ranks"
                    ) from None
                logger.warning(
                    "teacher cache: ignoring shard %s/%s (%s); its texts count as missing", directory, stem, exc
                )
                if quarantine:
                    _quarantine(directory, stem)
                continue
            if accepted is not None:
                self._verified.add(_stat_key(shard.emb_path))  # rank 0 checked its sha256
            shards.append(shard)
            keys.append(shard_keys)
        if quarantine and len(shards) < len(stems) + len(orphans):
            fingerprint = _listing(directory)[2]
        index = _Index(fingerprint, full, shards, keys)
        self._indexes[namespace] = index
        return index

    def _synced_index(self, namespace: str) -> _Index:
        """Collective: rank 0 verifies every shard (checksums included) and quarantines bad ones; the other
        ranks load exactly the shards rank 0 accepted, so all ranks agree on what is missing."""
        if not get_info().is_main:
            return self._index(namespace, full=True, accepted=broadcast_object(None))
        for tmp in self._dir(namespace).glob("*.tmp"):  # leftovers of killed writers, too old to be live ones
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > _TMP_GRACE_S:
                    tmp.unlink()
        index = self._index(namespace, full=True, quarantine=True)
        broadcast_object([s.stem for s in index.shards])
        return index

    def _check_output(self, out: Any, rows: int, dim: int | None, directory: Path) -> torch.Tensor:
        """encode() output as a detached tensor [rows, dim], after checking its shape (no device synchronisation)."""
        out = torch.as_tensor(out).detach()
        if out.ndim != 2 or out.shape[0] != rows or out.shape[1] == 0:
            raise CacheError(
                f"encode() returned shape {list(out.shape)} for a batch of {rows} texts; expected [{rows}, dim]"
            )
        if dim is not None and out.shape[1] != dim:
            raise CacheError(
                f"encode() returned dim {out.shape[1]} but teacher cache {directory} holds dim {dim}; "
                "the namespace must change when the teacher does"
            )
        return out
