"""On-disk cache of teacher embeddings: every unique text is embedded once, then looked up at train time.

The cache knows nothing about models. The caller passes a ``namespace`` (a fingerprint of everything that changes
the vectors: teacher, revision, pooling, normalisation, prompt, max length, dtype) and an ``encode`` callable.

Layout of ``root/<namespace>/`` -- a set of immutable shards, shard ``<stem>`` = three files::

    <stem>.emb.npy    [rows, dim] vectors in the storage dtype (bfloat16 is stored as its int16 bit pattern,
                      because numpy has no bfloat16); read with ``np.load(mmap_mode="r")``
    <stem>.keys.npy   [rows, 2] uint64: the 128-bit BLAKE2b digest of each row's UTF-8 text, as two
                      little-endian words (hi, lo)
    <stem>.json       manifest, written LAST, so its presence marks the shard complete: format, rows, dim,
                      dtype, and the name, byte size and sha256 of both data files

``<stem>`` is ``shard-r<rank>-<uuid4>``, so ranks and concurrent jobs never collide. Every file is written to a
temporary name in the same directory, flushed, fsynced and ``os.replace``-d into place.

Keys: a text is identified by its 128-bit hash only. With ``n`` distinct texts the probability that any two share
a key is at most ``n(n-1)/2 / 2**128 ~= n**2 / 2**129``: about 1.5e-23 for 1e8 texts and 1.5e-21 for 1e9, i.e.
negligible next to hardware bit-flip rates.

Index: the keys of all valid shards, sorted lexicographically by (hi, lo), with each key's global row
(``offsets[shard] + row``). A request is answered with two ``np.searchsorted`` calls on ``hi`` and one comparison
on ``lo`` (24 bytes per cached row in RAM; the vectors stay on disk).

Verification: a shard is used only if its manifest parses, both files have the recorded size, the keys file
matches its sha256, the ``.npy`` header matches (rows, dim, dtype) and -- for :meth:`TeacherCache.fill` and
:meth:`TeacherCache.lookup`, not for the cheap :meth:`TeacherCache.count_missing` -- the embeddings file matches
its sha256. A shard that fails is skipped with a warning, so its texts count as missing and are recomputed; during
``fill`` rank 0 moves it to ``<namespace>/_quarantine/``. Full checksums are computed once per shard and process.

Multi-rank use requires ``root`` to be on a filesystem every rank sees.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.atomic import fsync_dir
from distill.distributed import barrier, broadcast_object, get_info
from distill.errors import CacheError, ConfigError, DataError

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
_HASH_CHUNK = 65536
# A *.tmp file younger than this may belong to a job writing right now, so it is not deleted.
_TMP_GRACE_S = 3600.0
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------------------
# Text keys


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """128-bit BLAKE2b digests of the UTF-8 texts -> uint64 [len(texts), 2] (hi word, lo word; little-endian).

    ``texts`` may be a list or anything with ``len()`` and slicing (a ``datasets`` column, a pyarrow array).
    """
    parts = [np.empty((0, 2), dtype=_KEY_DTYPE)]
    for start, chunk in _iter_chunks(texts):
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


def _iter_chunks(texts: Sequence[str], size: int = _HASH_CHUNK) -> Iterator[tuple[int, list[str]]]:
    n = len(texts)
    for start in range(0, n, size):
        chunk = texts[start : min(start + size, n)]
        if hasattr(chunk, "to_pylist"):
            chunk = chunk.to_pylist()
        yield start, list(chunk)


def _gather(texts: Sequence[str], positions: np.ndarray, size: int = _HASH_CHUNK) -> list[str]:
    """``[texts[i] for i in positions]``, read as one slice per chunk that holds any of them (Arrow-backed tables
    answer one slice far faster than many single rows)."""
    out: list[str] = [""] * len(positions)
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    bounds = np.searchsorted(sorted_pos, np.arange(0, len(texts) + size, size))
    for c in np.nonzero(np.diff(bounds))[0]:
        start = int(c) * size
        chunk = texts[start : min(start + size, len(texts))]
        chunk = chunk.to_pylist() if hasattr(chunk, "to_pylist") else chunk
        for j in range(bounds[c], bounds[c + 1]):
            out[order[j]] = chunk[int(sorted_pos[j]) - start]
    return out


def _text_at(texts: Sequence[str], i: int) -> str:
    text = texts[int(i)]
    return text.as_py() if hasattr(text, "as_py") else text


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of every distinct key, ascending -> int64 [n_unique]."""
    if len(keys) == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal keys keep ascending positions
    ordered = keys[order]
    new = np.ones(len(keys), dtype=bool)
    new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    return np.sort(order[new]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Shard files


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


class _HashingWriter:
    """File wrapper that feeds every written byte to sha256 (so the file is hashed without a second read)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")


def _atomic_write(path: Path, write: Callable[[Any], None]) -> tuple[str, int]:
    """Write ``path`` via a fsynced temporary file + ``os.replace``; return (sha256 hex, size in bytes)."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer.sha.hexdigest(), writer.size


def _write_shard(directory: Path, rank: int, keys: np.ndarray, emb: np.ndarray, dtype: str) -> str:
    """Write one shard (data files first, manifest last) and return its stem."""
    stem = f"shard-r{rank:05d}-{uuid.uuid4().hex}"
    files = {}
    for kind, array in (("embeddings", emb), ("keys", keys)):
        name = f"{stem}.{'emb' if kind == 'embeddings' else 'keys'}.npy"
        sha, size = _atomic_write(
            directory / name, lambda w, a=array: np.lib.format.write_array(w, a, allow_pickle=False)
        )
        files[kind] = {"file": name, "bytes": size, "sha256": sha}
    manifest = {
        "format": FORMAT_VERSION,
        "rows": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "dtype": dtype,
        **files,
        "rank": rank,
        "created_unix": time.time(),
    }
    payload = json.dumps(manifest, indent=1).encode()
    _atomic_write(directory / f"{stem}.json", lambda w: w.write(payload))
    fsync_dir(directory)
    return stem


def _parse_manifest(directory: Path, stem: str) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / f"{stem}.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _InvalidShard(f"unreadable manifest: {exc}") from None
    try:
        ok = (
            manifest["format"] == FORMAT_VERSION
            and manifest["dtype"] in _DTYPES
            and all(type(manifest[k]) is int and manifest[k] > 0 for k in ("rows", "dim"))
            and manifest["embeddings"]["file"] == f"{stem}.emb.npy"
            and manifest["keys"]["file"] == f"{stem}.keys.npy"
            and all(type(manifest[k]["bytes"]) is int for k in ("embeddings", "keys"))
            and all(type(manifest[k]["sha256"]) is str for k in ("embeddings", "keys"))
        )
    except (KeyError, TypeError) as exc:
        raise _InvalidShard(f"manifest lacks field {exc}") from None
    if not ok:
        raise _InvalidShard("manifest has wrong or unsupported fields")
    return manifest


def _check_size(path: Path, expected: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _InvalidShard(f"{path.name}: {exc.strerror}") from None
    if size != expected:
        raise _InvalidShard(f"{path.name} has {size} bytes, manifest says {expected} (truncated or overwritten)")


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def _load_shard(
    directory: Path, stem: str, verified: set[tuple[str, int, int]], full: bool
) -> tuple[_Shard, np.ndarray]:
    """Verify shard ``stem`` and return it with its keys [rows, 2]; raise :class:`_InvalidShard` on any defect.

    ``full`` adds the sha256 of the embeddings file, skipped for files already in ``verified`` (and recorded there).
    """
    manifest = _parse_manifest(directory, stem)
    rows, dim, dtype = manifest["rows"], manifest["dim"], manifest["dtype"]
    keys_path = directory / manifest["keys"]["file"]
    _check_size(keys_path, manifest["keys"]["bytes"])
    data = keys_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["keys"]["sha256"]:
        raise _InvalidShard(f"{keys_path.name} does not match its sha256")
    try:
        keys = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise _InvalidShard(f"{keys_path.name}: {exc}") from None
    if keys.shape != (rows, 2) or keys.dtype != _KEY_DTYPE:
        raise _InvalidShard(f"{keys_path.name} holds {keys.dtype}{list(keys.shape)}, expected uint64[{rows}, 2]")
    shard = _Shard(directory, stem, rows, dim, dtype)
    _check_size(shard.emb_path, manifest["embeddings"]["bytes"])
    try:
        emb = np.load(shard.emb_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _InvalidShard(f"{shard.emb_path.name}: {exc}") from None
    expected = _DTYPES[dtype][1]
    if emb.shape != (rows, dim) or emb.dtype != expected:
        raise _InvalidShard(
            f"{shard.emb_path.name} holds {emb.dtype}{list(emb.shape)}, expected {expected}[{rows}, {dim}]"
        )
    del emb
    if full:
        stat_key = _stat_key(shard.emb_path)
        if stat_key not in verified:
            if _sha256_file(shard.emb_path) != manifest["embeddings"]["sha256"]:
                raise _InvalidShard(f"{shard.emb_path.name} does not match its sha256 (corrupted)")
            verified.add(stat_key)
    return shard, keys


@dataclass(frozen=True)
class _Listing:
    """What a namespace directory holds right now."""

    stems: list[str]  # shards with a manifest, sorted
    orphans: list[str]  # shards with data files but no manifest (a writer was killed)
    tmps: list[Path]  # temporary files (being written, or left by a killed writer)
    fingerprint: tuple[tuple[str, int, int], ...]  # (name, size, mtime_ns) of every shard file: changes on any edit


def _listing(directory: Path) -> _Listing:
    try:
        entries = [e for e in os.scandir(directory) if e.is_file()]
    except FileNotFoundError:
        return _Listing([], [], [], ())
    names = [e.name for e in entries]
    stems = sorted(n[: -len(".json")] for n in names if n.endswith(".json"))
    data = {n.rsplit(".", 2)[0] for n in names if n.endswith((".emb.npy", ".keys.npy"))}
    tmps = [directory / n for n in names if n.endswith(".tmp")]
    fingerprint = tuple(
        sorted(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns)
            for e in entries
            if e.name.endswith((".json", ".emb.npy", ".keys.npy"))
        )
    )
    return _Listing(stems, sorted(data - set(stems)), tmps, fingerprint)


def _delete_stale_tmps(directory: Path) -> None:
    """Delete temporary files old enough that no live writer can own them (leftovers of killed runs)."""
    now = time.time()
    for tmp in _listing(directory).tmps:
        try:
            if now - tmp.stat().st_mtime > _TMP_GRACE_S:
                tmp.unlink()
        except FileNotFoundError:
            pass


def _quarantine(directory: Path, stem: str) -> None:
    target = directory / QUARANTINE_DIR
    target.mkdir(exist_ok=True)
    for suffix in (".json", ".emb.npy", ".keys.npy"):
        src = directory / f"{stem}{suffix}"
        try:
            os.replace(src, target / src.name)
        except FileNotFoundError:
            pass
    logger.warning("teacher cache: moved shard %s to %s", stem, target)


# ----------------------------------------------------------------------------------------------------------------
# Index


class _Index:
    """Sorted keys of a namespace's valid shards -> global row (``offsets[shard] + row``)."""

    def __init__(self, fingerprint: tuple, full: bool, shards: list[_Shard], keys: list[np.ndarray]) -> None:
        self.fingerprint, self.full, self.shards = fingerprint, full, shards
        dims = {s.dim for s in shards}
        if len(dims) > 1:
            a = next(s for s in shards if s.dim == shards[0].dim)
            b = next(s for s in shards if s.dim != shards[0].dim)
            raise CacheError(
                f"teacher cache {a.directory} mixes dimensions: shard {a.stem} has dim {a.dim}, shard {b.stem} "
                f"has dim {b.dim}; one namespace must hold one teacher"
            )
        self.dim: int | None = dims.pop() if dims else None
        self.offsets = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.rows for s in shards], out=self.offsets[1:])
        all_keys = np.concatenate(keys) if keys else np.empty((0, 2), dtype=_KEY_DTYPE)
        order = np.lexsort((all_keys[:, 1], all_keys[:, 0]))
        hi, lo = all_keys[order, 0], all_keys[order, 1]
        # The same text may sit in two shards (two jobs filled it at once); either copy is fine.
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self.hi, self.lo, self.pos = hi[keep], lo[keep], order[keep].astype(np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Global row of each key in ``keys`` [n, 2] -> int64 [n], -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(self.hi) == 0 or len(keys) == 0:
            return out
        hi, lo = keys[:, 0], keys[:, 1]
        left = np.searchsorted(self.hi, hi, side="left")
        right = np.searchsorted(self.hi, hi, side="right")
        single = np.nonzero(right - left == 1)[0]
        hit = single[self.lo[left[single]] == lo[single]]
        out[hit] = self.pos[left[hit]]
        for i in np.nonzero(right - left > 1)[0]:  # keys sharing the 64-bit hi word: rare, sorted by lo within
            lo_run = self.lo[left[i] : right[i]]
            j = int(np.searchsorted(lo_run, lo[i]))
            if j < len(lo_run) and lo_run[j] == lo[i]:
                out[i] = self.pos[left[i] + j]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Lookup result


class CachedEmbeddings:
    """Teacher vectors of the texts given to :meth:`TeacherCache.lookup`, read lazily from memory-mapped shards.

    ``emb[rows]`` with ``rows`` an int sequence / array / tensor of positions in those texts -> float32
    ``[len(rows), dim]``; a plain int gives ``[dim]``. Only the requested rows are read from disk. Picklable
    (open memory maps are dropped and reopened), so it can be handed to DataLoader workers.
    """

    def __init__(
        self, shards: list[_Shard], offsets: np.ndarray, positions: np.ndarray, dim: int, max_open: int = 64
    ) -> None:
        self.dim = dim
        self._shards = shards
        self._offsets = offsets
        self._positions = positions
        self._max_open = max_open
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
        flat = idx.reshape(-1)
        glob = self._positions[flat]
        shard_ids = np.searchsorted(self._offsets, glob, side="right") - 1
        local = glob - self._offsets[shard_ids]
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        for s in np.unique(shard_ids):
            sel = np.nonzero(shard_ids == s)[0]
            order = np.argsort(local[sel], kind="stable")  # ascending rows: sequential reads on disk
            out[sel[order]] = self._decode(self._shards[s].dtype, self._array(int(s))[local[sel[order]]])
        result = torch.from_numpy(out)
        return result[0] if idx.ndim == 0 else result.reshape(*idx.shape, self.dim)

    def _array(self, s: int) -> np.ndarray:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        # Each memory map holds a file descriptor, so only the most recently used shards stay open.
        if len(self._open) >= self._max_open:
            self._open.popitem(last=False)
        array = np.load(self._shards[s].emb_path, mmap_mode="r", allow_pickle=False)
        self._open[s] = array
        return array

    @staticmethod
    def _decode(dtype: str, stored: np.ndarray) -> np.ndarray:
        if dtype == "bfloat16":
            return torch.from_numpy(np.array(stored)).view(torch.bfloat16).float().numpy()
        return np.asarray(stored, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Cache


class _ShardBuffer:
    """Accumulates encoded rows and writes a shard every ``shard_size`` rows."""

    def __init__(
        self, directory: Path, rank: int, dtype: str, shard_size: int, verified: set[tuple[str, int, int]]
    ) -> None:
        self.directory, self.rank, self.dtype, self.shard_size = directory, rank, dtype, shard_size
        self.verified = verified
        self.keys: list[np.ndarray] = []
        self.emb: list[np.ndarray] = []
        self.rows = 0

    def add(self, keys: np.ndarray, emb: np.ndarray) -> None:
        self.keys.append(keys)
        self.emb.append(emb)
        self.rows += len(keys)
        while self.rows >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        if self.rows:
            self._write(self.rows)

    def _write(self, n: int) -> None:
        keys, emb = np.concatenate(self.keys), np.concatenate(self.emb)
        stem = _write_shard(self.directory, self.rank, keys[:n], emb[:n], self.dtype)
        # Hashed while writing, so this process need not read it back to trust it.
        self.verified.add(_stat_key(self.directory / f"{stem}.emb.npy"))
        self.keys, self.emb = [keys[n:]], [emb[n:]]
        self.rows -= n


class TeacherCache:
    """Teacher embeddings on disk under ``root/<namespace>/``, stored in ``dtype`` and returned as float32.

    ``shard_size`` is the number of rows per shard file: the most work a killed fill can lose.
    """

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

    # -- public API --------------------------------------------------------------------------------------------

    def count_missing(self, namespace: str, texts: Sequence[str]) -> int:
        """Number of distinct texts not in the cache. Reads only manifests and key files (no embedding checksums)."""
        keys = text_keys(texts)
        first = _first_occurrences(keys)
        return int((self._index(namespace, full=False).find(keys[first]) < 0).sum())

    def fill(
        self,
        namespace: str,
        texts: Sequence[str],
        encode: Callable[[list[str]], torch.Tensor],
        batch_size: int,
        progress: bool = True,
    ) -> int:
        """Encode and store every distinct text of ``texts`` that is not cached yet; return how many THIS rank encoded.

        Collective: every rank calls it with the same ``texts``. The missing distinct texts, in order of first
        occurrence, are dealt round-robin to ranks (rank r takes positions r, r+W, ...); each rank sorts its share
        by length (longest first, so an out-of-memory batch shows up at once), calls ``encode(list[str]) ->
        [b, dim]`` per batch of ``batch_size`` and writes a shard every ``shard_size`` rows. If ``encode`` raises,
        the rows already encoded are written before the error propagates (the other ranks then wait at the
        barrier until the process-group timeout). Afterwards every rank re-reads the index.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"teacher cache batch_size must be a positive integer, got {batch_size!r}")
        info = get_info()
        directory = self._dir(namespace)
        keys = text_keys(texts)
        first = _first_occurrences(keys)
        index = self._synced_index(namespace)
        missing = first[index.find(keys[first]) < 0]
        mine = missing[info.rank :: info.world_size]
        if info.is_main:
            logger.info(
                "teacher cache %s: %d of %d distinct texts missing; %d rank(s) encode them",
                directory,
                len(missing),
                len(first),
                info.world_size,
            )
        if len(mine):
            directory.mkdir(parents=True, exist_ok=True)
            self._encode_share(directory, texts, keys, mine, encode, batch_size, index.dim, progress and info.is_main)
        barrier()
        index = self._synced_index(namespace)
        still = first[index.find(keys[first]) < 0]
        if len(still):
            raise CacheError(
                f"teacher cache {directory}: {len(still)} texts are still missing after fill "
                f"(first: position {still[0]}); were shards removed while filling?"
            )
        return len(mine)

    def lookup(self, namespace: str, texts: Sequence[str]) -> CachedEmbeddings:
        """Vectors of ``texts`` (duplicates allowed), verified against their checksums; CacheError if any is missing."""
        keys = text_keys(texts)
        index = self._index(namespace, full=True)
        positions = index.find(keys)
        absent = np.nonzero(positions < 0)[0]
        if len(absent):
            i = int(absent[0])
            preview = _text_at(texts, i)[:60]
            raise CacheError(
                f"teacher cache {self._dir(namespace)}: {len(absent)} of {len(texts)} texts are not cached "
                f"(first: position {i}, {preview!r}); call fill() with them first"
            )
        return CachedEmbeddings(index.shards, index.offsets, positions, index.dim or 0)

    # -- internals ---------------------------------------------------------------------------------------------

    def _dir(self, namespace: str) -> Path:
        if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace) or namespace == QUARANTINE_DIR:
            raise CacheError(f"teacher cache namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r}")
        return self.root / namespace

    def _index(self, namespace: str, full: bool, quarantine: bool = False) -> _Index:
        """The namespace's index; rebuilt when any shard file changed (or a checksum pass is newly needed).

        ``quarantine`` (rank 0 inside ``fill`` only) moves invalid and manifest-less shards aside.
        """
        directory = self._dir(namespace)
        listing = _listing(directory)
        cached = self._indexes.get(namespace)
        if cached is not None and cached.fingerprint == listing.fingerprint and (cached.full or not full):
            return cached
        for stem in listing.orphans:
            logger.warning("teacher cache: ignoring incomplete shard %s/%s (no manifest)", directory, stem)
            if quarantine:
                _quarantine(directory, stem)
        shards, keys = [], []
        for stem in listing.stems:
            try:
                shard, shard_keys = _load_shard(directory, stem, self._verified, full)
            except _InvalidShard as exc:
                logger.warning(
                    "teacher cache: ignoring shard %s/%s (%s); its texts count as missing", directory, stem, exc
                )
                if quarantine:
                    _quarantine(directory, stem)
                continue
            shards.append(shard)
            keys.append(shard_keys)
        if quarantine and len(shards) < len(listing.stems) + len(listing.orphans):
            listing = _listing(directory)
        index = _Index(listing.fingerprint, full, shards, keys)
        self._indexes[namespace] = index
        return index

    def _synced_index(self, namespace: str) -> _Index:
        """Collective: rank 0 verifies every shard (checksums included) and quarantines bad ones; the other
        ranks load exactly the shards rank 0 accepted, so all ranks agree on what is missing."""
        directory = self._dir(namespace)
        index: _Index | None = None
        accepted: list[str] | None = None
        if get_info().is_main:
            _delete_stale_tmps(directory)
            index = self._index(namespace, full=True, quarantine=True)
            accepted = [s.stem for s in index.shards]
        accepted = broadcast_object(accepted)
        if index is not None:
            return index
        fingerprint = _listing(directory).fingerprint
        shards, keys = [], []
        for stem in accepted:
            try:
                shard, shard_keys = _load_shard(directory, stem, self._verified, full=False)
            except _InvalidShard as exc:
                raise CacheError(
                    f"teacher cache shard {directory}/{stem} verified by rank 0 is unreadable on rank "
                    f"{get_info().rank} ({exc}); the cache root must be on a filesystem shared by all ranks"
                ) from None
            self._verified.add(_stat_key(shard.emb_path))  # rank 0 checked its sha256
            shards.append(shard)
            keys.append(shard_keys)
        index = _Index(fingerprint, True, shards, keys)
        self._indexes[namespace] = index
        return index

    def _encode_share(
        self,
        directory: Path,
        texts: Sequence[str],
        keys: np.ndarray,
        mine: np.ndarray,
        encode: Callable[[list[str]], torch.Tensor],
        batch_size: int,
        dim: int | None,
        show_progress: bool,
    ) -> None:
        share = _gather(texts, mine)
        order = np.argsort(-np.array([len(t) for t in share], dtype=np.int64), kind="stable")
        rank = get_info().rank
        buffer = _ShardBuffer(directory, rank, self.dtype, self.shard_size, self._verified)
        bar = tqdm(total=len(order), disable=not show_progress, unit="text", desc="teacher embeddings")
        try:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                out = encode([share[i] for i in batch])
                stored = self._to_storage(out, len(batch), dim, directory)
                dim = stored.shape[1]
                buffer.add(keys[mine[batch]], stored)
                bar.update(len(batch))
        except BaseException:
            try:
                buffer.flush()
            except Exception:  # the original error matters more than a failed rescue write
                logger.exception("teacher cache: could not save the rows encoded before the error")
            raise
        finally:
            bar.close()
        buffer.flush()

    def _to_storage(self, out: Any, rows: int, dim: int | None, directory: Path) -> np.ndarray:
        """encode() output [rows, dim] -> numpy array in the storage dtype, after checking shape and range."""
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        if out.ndim != 2 or out.shape[0] != rows or out.shape[1] == 0:
            raise CacheError(
                f"encode() returned shape {list(out.shape)} for a batch of {rows} texts; expected [{rows}, dim]"
            )
        if dim is not None and out.shape[1] != dim:
            raise CacheError(
                f"encode() returned dim {out.shape[1]} but teacher cache {directory} holds dim {dim}; "
                "the namespace must change when the teacher does"
            )
        torch_dtype = _DTYPES[self.dtype][0]
        values = out.detach().to("cpu", torch.float32).contiguous()
        # One float32 pass catches NaN (the comparison is False), inf, and values that round to inf in torch_dtype.
        if not float(np.abs(values.numpy()).max()) <= torch.finfo(torch_dtype).max:
            raise CacheError(
                f"encode() returned NaN/inf (or values beyond the {self.dtype} range); nothing stored for this batch"
            )
        stored = values.to(torch_dtype)
        if self.dtype == "bfloat16":
            return stored.view(torch.int16).numpy()
        return stored.numpy()
