"""Tests of the teacher embedding cache: encode-once, values, corruption recovery, kills and two-rank filling."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.errors import CacheError, ConfigError, DataError
from distill.teacher_cache import (
    QUARANTINE_DIR,
    CachedEmbeddings,
    TeacherCache,
    _gather,
    _Index,
    _Shard,
    text_keys,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
NS = "0123abcd"
DIM = 16


def vector(text: str, dim: int = DIM) -> torch.Tensor:
    """Deterministic unit vector for ``text`` (seeded by its sha256) -> float32 [dim]."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return torch.from_numpy(v / np.linalg.norm(v))


class FakeEncoder:
    """Counts calls and texts; ``fail_after`` = number of successful calls before it raises."""

    def __init__(self, dim: int = DIM, fail_after: int | None = None) -> None:
        self.dim, self.fail_after = dim, fail_after
        self.calls = 0
        self.texts: list[str] = []
        self.batches: list[list[str]] = []

    def __call__(self, batch: list[str]) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.texts.extend(batch)
        self.batches.append(list(batch))
        return torch.stack([vector(t, self.dim) for t in batch])


def make_texts(n: int, prefix: str = "text") -> list[str]:
    # Varying lengths so the length sort is visible.
    return [f"{prefix} {i} " + "x" * (i * 7 % 23) for i in range(n)]


def ns_dir(root: Path) -> Path:
    return root / NS


def stems(root: Path) -> list[str]:
    return sorted(p.name[: -len(".json")] for p in ns_dir(root).glob("*.json"))


def shard_texts(root: Path, stem: str, candidates: list[str]) -> list[str]:
    """The texts of ``candidates`` stored in shard ``stem`` (via its key file)."""
    keys = np.load(ns_dir(root) / f"{stem}.keys.npy")
    wanted = {tuple(k) for k in keys.tolist()}
    return [t for t, k in zip(candidates, text_keys(candidates).tolist()) if tuple(k) in wanted]


def expected(texts: list[str]) -> torch.Tensor:
    return torch.stack([vector(t) for t in texts])


# ----------------------------------------------------------------------------------------------------------------


def test_fill_encodes_each_distinct_text_once(tmp_path: Path) -> None:
    base = make_texts(30)
    texts = base + base[:10] + base[5:8]  # duplicates inside one request
    cache = TeacherCache(tmp_path, shard_size=8)
    assert cache.count_missing(NS, texts) == 30
    assert not ns_dir(tmp_path).exists()  # count_missing only reads

    enc = FakeEncoder()
    assert cache.fill(NS, texts, enc, batch_size=4, progress=False) == 30
    assert sorted(enc.texts) == sorted(base) and len(enc.texts) == 30
    assert [len(b) for b in enc.batches] == [4] * 7 + [2]
    lengths = [len(t) for t in enc.texts]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    assert [json.loads((ns_dir(tmp_path) / f"{s}.json").read_text())["rows"] for s in stems(tmp_path)] != []
    assert sum(json.loads((ns_dir(tmp_path) / f"{s}.json").read_text())["rows"] for s in stems(tmp_path)) == 30
    assert len(stems(tmp_path)) == 4  # 8 + 8 + 8 + 6
    assert cache.count_missing(NS, texts) == 0

    assert cache.fill(NS, texts, enc, batch_size=4, progress=False) == 0
    assert enc.calls == 8

    # Phase 2 / another experiment with the same namespace, in a new process state: only new texts are encoded.
    later = base[10:20] + make_texts(5, prefix="new")
    fresh, enc2 = TeacherCache(tmp_path, shard_size=8), FakeEncoder()
    assert fresh.count_missing(NS, later) == 5
    assert fresh.fill(NS, later, enc2, batch_size=4, progress=False) == 5
    assert sorted(enc2.texts) == sorted(make_texts(5, prefix="new"))


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0.0)])
def test_lookup_returns_encoder_values(tmp_path: Path, dtype: str, atol: float) -> None:
    texts = make_texts(23)
    cache = TeacherCache(tmp_path, dtype=dtype, shard_size=5)
    cache.fill(NS, texts, FakeEncoder(), batch_size=3, progress=False)
    request = [texts[i] for i in [22, 0, 5, 5, 17, 0, 9, 3]]  # duplicates, across shards, any order
    emb = cache.lookup(NS, request)
    assert len(emb) == 8 and emb.dim == DIM
    want = expected(request)
    got = emb[list(range(8))]
    assert got.dtype == torch.float32 and got.shape == (8, DIM)
    if atol == 0.0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
        assert not torch.equal(got, want)  # really stored in reduced precision
    stored = np.load(ns_dir(tmp_path) / f"{stems(tmp_path)[0]}.emb.npy", mmap_mode="r")
    assert stored.dtype == {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}[dtype]
    # Every index form gives the same rows.
    torch.testing.assert_close(emb[np.array([3, 1])], got[[3, 1]], atol=0, rtol=0)
    torch.testing.assert_close(emb[torch.tensor([7, 2])], got[[7, 2]], atol=0, rtol=0)
    torch.testing.assert_close(emb[4], got[4], atol=0, rtol=0)
    torch.testing.assert_close(emb[2:5], got[2:5], atol=0, rtol=0)
    assert emb[[]].shape == (0, DIM)
    assert emb[torch.tensor([[0, 1], [2, 3]])].shape == (2, 2, DIM)


def test_lookup_reads_rows_across_many_shards_with_few_open_maps(tmp_path: Path) -> None:
    texts = make_texts(40)
    cache = TeacherCache(tmp_path, dtype="float32", shard_size=3)
    cache.fill(NS, texts, FakeEncoder(), batch_size=5, progress=False)
    emb = cache.lookup(NS, texts)
    emb._max_open = 2
    order = list(reversed(range(40)))
    assert torch.equal(emb[order], expected([texts[i] for i in order]))
    assert len(emb._open) <= 2


def test_cached_embeddings_pickle(tmp_path: Path) -> None:
    texts = make_texts(12)
    cache = TeacherCache(tmp_path, dtype="float32", shard_size=4)
    cache.fill(NS, texts, FakeEncoder(), batch_size=4, progress=False)
    emb = cache.lookup(NS, texts)
    first = emb[list(range(12))]
    blob = pickle.dumps(emb)
    assert len(blob) < 12 * DIM * 4 + 4000  # memory maps are not serialised
    clone = pickle.loads(blob)
    assert isinstance(clone, CachedEmbeddings) and torch.equal(clone[list(range(12))], first)


def test_lookup_of_missing_text_raises(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path)
    with pytest.raises(CacheError, match=r"1 of 1 texts are not cached \(first: position 0, 'nothing here'\)"):
        cache.lookup(NS, ["nothing here"])
    cache.fill(NS, make_texts(5), FakeEncoder(), batch_size=2, progress=False)
    with pytest.raises(CacheError, match=r"2 of 4 texts are not cached \(first: position 1, 'absent'\)"):
        cache.lookup(NS, [make_texts(5)[0], "absent", make_texts(5)[1], "absent too"])
    assert len(cache.lookup(NS, [])) == 0


def test_arrow_backed_texts(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    texts = make_texts(9) + make_texts(3)
    column = datasets.Dataset.from_dict({"t": texts})["t"]
    chunked = pa.chunked_array([texts[:4], texts[4:]])
    cache = TeacherCache(tmp_path, dtype="float32", shard_size=4)
    enc = FakeEncoder()
    assert cache.count_missing(NS, chunked) == 9
    assert cache.fill(NS, column, enc, batch_size=4, progress=False) == 9
    assert sorted(enc.texts) == sorted(make_texts(9))
    assert cache.fill(NS, chunked, enc, batch_size=4, progress=False) == 0
    assert torch.equal(cache.lookup(NS, chunked)[list(range(12))], expected(texts))


def test_gather_reads_positions_chunk_by_chunk() -> None:
    pa = pytest.importorskip("pyarrow")
    texts = [f"t{i}" for i in range(23)]
    positions = np.array([22, 0, 7, 7, 6, 14, 13], dtype=np.int64)  # unordered, repeated, across chunk borders
    want = [texts[i] for i in positions]
    assert _gather(texts, positions, size=7) == want
    assert _gather(pa.chunked_array([texts[:10], texts[10:]]), positions, size=7) == want
    assert _gather(texts, np.array([], dtype=np.int64), size=7) == []


def test_shard_files_and_manifest(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path, shard_size=4)
    cache.fill(NS, make_texts(6), FakeEncoder(), batch_size=4, progress=False)
    directory = ns_dir(tmp_path)
    names = sorted(p.name for p in directory.iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    assert len(names) == 6  # two shards x (manifest, embeddings, keys)
    for stem in stems(tmp_path):
        assert stem.startswith("shard-r00000-")
        manifest = json.loads((directory / f"{stem}.json").read_text())
        assert manifest["dim"] == DIM and manifest["dtype"] == "float16" and manifest["rows"] in (4, 2)
        for kind in ("embeddings", "keys"):
            data = (directory / manifest[kind]["file"]).read_bytes()
            assert len(data) == manifest[kind]["bytes"]
            assert hashlib.sha256(data).hexdigest() == manifest[kind]["sha256"]
        assert np.load(directory / f"{stem}.keys.npy").shape == (manifest["rows"], 2)


def _flip(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt(directory: Path, stem: str, kind: str) -> None:
    emb, keys, manifest = (directory / f"{stem}{s}" for s in (".emb.npy", ".keys.npy", ".json"))
    if kind == "truncate":
        emb.write_bytes(emb.read_bytes()[:-10])
    elif kind == "flip_embeddings":
        _flip(emb)
    elif kind == "flip_keys":
        _flip(keys)
    elif kind == "delete_manifest":
        manifest.unlink()
    elif kind == "garbage_manifest":
        manifest.write_text("{not json")
    elif kind == "wrong_shape":
        # Same byte size, different shape: only the header check can catch it.
        array = np.load(emb)
        np.save(emb, array.reshape(array.shape[0] * 2, array.shape[1] // 2))
        assert emb.stat().st_size == json.loads(manifest.read_text())["embeddings"]["bytes"]
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncate", "flip_embeddings", "flip_keys", "delete_manifest", "garbage_manifest", "wrong_shape"]
)
def test_corrupt_shard_is_detected_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    texts = make_texts(20)
    cache = TeacherCache(tmp_path, shard_size=8)
    cache.fill(NS, texts, FakeEncoder(), batch_size=4, progress=False)
    victim = stems(tmp_path)[1]
    lost = shard_texts(tmp_path, victim, texts)
    assert len(lost) in (8, 4)
    _corrupt(ns_dir(tmp_path), victim, kind)
    if kind != "flip_embeddings":  # the cheap count sees every defect except flipped vector bytes
        assert TeacherCache(tmp_path).count_missing(NS, texts) == len(lost)

    enc = FakeEncoder()
    with caplog.at_level(logging.WARNING, logger="distill.teacher_cache"):
        # The same instance: a changed file must invalidate what it verified before.
        assert cache.fill(NS, texts, enc, batch_size=4, progress=False) == len(lost)
    assert sorted(enc.texts) == sorted(lost)
    assert any(victim in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not list(ns_dir(tmp_path).glob(f"{victim}*"))  # moved aside by rank 0
    assert list((ns_dir(tmp_path) / QUARANTINE_DIR).glob(f"{victim}*"))
    torch.testing.assert_close(cache.lookup(NS, texts)[list(range(20))], expected(texts), atol=1e-3, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.teacher_cache"):
        assert TeacherCache(tmp_path).fill(NS, texts, enc, batch_size=4, progress=False) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_lookup_never_uses_a_corrupt_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    texts = make_texts(10)
    cache = TeacherCache(tmp_path, shard_size=5)
    cache.fill(NS, texts, FakeEncoder(), batch_size=5, progress=False)
    cache.lookup(NS, texts)
    victim = stems(tmp_path)[0]
    lost = shard_texts(tmp_path, victim, texts)
    _flip(ns_dir(tmp_path) / f"{victim}.emb.npy")
    with (
        caplog.at_level(logging.WARNING, logger="distill.teacher_cache"),
        pytest.raises(CacheError, match=f"{len(lost)} of 10 texts are not cached"),
    ):
        cache.lookup(NS, texts)
    assert any("does not match its sha256" in r.getMessage() for r in caplog.records)
    # count_missing is the cheap check: it sees a truncated file, not flipped bytes.
    _corrupt(ns_dir(tmp_path), stems(tmp_path)[1], "truncate")
    assert TeacherCache(tmp_path).count_missing(NS, texts) == 10 - len(lost)


def test_dimension_mismatch(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path)
    cache.fill(NS, make_texts(4), FakeEncoder(dim=16), batch_size=4, progress=False)
    with pytest.raises(CacheError, match="encode\\(\\) returned dim 8 but teacher cache .* holds dim 16"):
        cache.fill(NS, make_texts(2, prefix="new"), FakeEncoder(dim=8), batch_size=4, progress=False)
    # Shards of two dims in one namespace (e.g. copied by hand) are refused outright.
    cache.fill("other", ["a", "b"], FakeEncoder(dim=8), batch_size=4, progress=False)
    for path in (tmp_path / "other").iterdir():
        path.rename(ns_dir(tmp_path) / path.name)
    with pytest.raises(CacheError, match="mixes dimensions: shard .* has dim (16|8), shard .* has dim (8|16)"):
        TeacherCache(tmp_path).lookup(NS, ["a"])


def test_bad_encoder_output_and_inputs(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path)
    with pytest.raises(CacheError, match=r"encode\(\) returned shape \[1, 16\] for a batch of 2 texts"):
        cache.fill(NS, ["a", "b"], lambda b: torch.zeros(1, DIM), batch_size=2, progress=False)
    with pytest.raises(CacheError, match=r"returned shape \[2, 0\]"):
        cache.fill(NS, ["a", "b"], lambda b: torch.zeros(2, 0), batch_size=2, progress=False)
    with pytest.raises(CacheError, match="NaN/inf"):
        cache.fill(NS, ["a"], lambda b: torch.full((1, DIM), float("nan")), batch_size=2, progress=False)
    with pytest.raises(CacheError, match="beyond the float16 range"):
        cache.fill(NS, ["a"], lambda b: torch.full((1, DIM), 1e6), batch_size=2, progress=False)
    assert not list(ns_dir(tmp_path).glob("*.json"))
    with pytest.raises(DataError, match="text at position 1 is NoneType, not str"):
        cache.count_missing(NS, ["a", None])
    with pytest.raises(ConfigError, match="dtype must be one of"):
        TeacherCache(tmp_path, dtype="int8")
    with pytest.raises(ConfigError, match="shard_size"):
        TeacherCache(tmp_path, shard_size=0)
    with pytest.raises(CacheError, match="namespace must match"):
        cache.count_missing("../escape", ["a"])


def test_encoder_error_keeps_finished_rows(tmp_path: Path) -> None:
    texts = make_texts(50)
    cache = TeacherCache(tmp_path, shard_size=8)
    crashing = FakeEncoder(fail_after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.fill(NS, texts, crashing, batch_size=4, progress=False)
    assert len(crashing.texts) == 20
    assert [json.loads((ns_dir(tmp_path) / f"{s}.json").read_text())["rows"] for s in stems(tmp_path)] in (
        [8, 8, 4],
        [8, 4, 8],
        [4, 8, 8],
    )
    fresh = TeacherCache(tmp_path, shard_size=8)
    torch.testing.assert_close(
        fresh.lookup(NS, crashing.texts)[list(range(20))], expected(crashing.texts), atol=1e-3, rtol=0
    )
    enc = FakeEncoder()
    assert fresh.fill(NS, texts, enc, batch_size=4, progress=False) == 30
    assert sorted(enc.texts + crashing.texts) == sorted(texts)


def test_hard_kill_mid_fill_keeps_complete_shards(tmp_path: Path) -> None:
    """A process killed inside encode (no cleanup at all) loses only the rows not yet in a shard. Shards are written
    on a background thread, so the kill waits (at most 60 s) until the two full shards' manifests are there."""
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            from pathlib import Path
            sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]
            from test_teacher_cache import FakeEncoder, make_texts
            from distill.teacher_cache import TeacherCache

            enc = FakeEncoder()
            def encode(batch):
                if enc.calls == 5:
                    deadline = time.time() + 60
                    while len(list(Path({str(tmp_path / "cache" / NS)!r}).glob("*.json"))) < 2 and time.time() < deadline:
                        time.sleep(0.01)
                    os._exit(9)
                return enc(batch)
            TeacherCache({str(tmp_path / "cache")!r}, shard_size=8).fill({NS!r}, make_texts(50), encode, 4, False)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    root = tmp_path / "cache"
    assert [json.loads((ns_dir(root) / f"{s}.json").read_text())["rows"] for s in stems(root)] == [8, 8]
    cache, enc = TeacherCache(root, shard_size=8), FakeEncoder()
    assert cache.count_missing(NS, make_texts(50)) == 34
    assert cache.fill(NS, make_texts(50), enc, batch_size=4, progress=False) == 34
    torch.testing.assert_close(
        cache.lookup(NS, make_texts(50))[list(range(50))], expected(make_texts(50)), atol=1e-3, rtol=0
    )


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path)
    cache.fill(NS, ["a"], FakeEncoder(), batch_size=2, progress=False)
    old, new = ns_dir(tmp_path) / "x.emb.npy.1.tmp", ns_dir(tmp_path) / "y.emb.npy.2.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"partial")
    past = time.time() - 2 * 3600
    os.utime(old, (past, past))
    assert cache.fill(NS, ["a", "b"], FakeEncoder(), batch_size=2, progress=False) == 1
    assert not old.exists() and new.exists()  # a young one may belong to a live writer


def test_index_resolves_keys_sharing_their_high_word(tmp_path: Path) -> None:
    shard = _Shard(tmp_path, "s", 4, DIM, "float32")
    keys = np.array([[7, 30], [7, 10], [3, 5], [7, 20]], dtype=np.uint64)
    index = _Index((), True, [shard], [keys])
    query = np.array([[7, 20], [7, 10], [7, 30], [3, 5], [7, 15], [8, 10], [3, 6]], dtype=np.uint64)
    assert index.find(query).tolist() == [3, 1, 0, 2, -1, -1, -1]


# ----------------------------------------------------------------------------------------------------------------
# Two ranks under torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_RANK_SCRIPT = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
import numpy as np
from distill.distributed import barrier, get_info, init_distributed, shutdown
from distill.teacher_cache import TeacherCache
from test_teacher_cache import FakeEncoder, make_texts

info = init_distributed(timeout_s=60)
root, ns, out = Path({root!r}), {ns!r}, Path({out!r})
texts = make_texts(41) + make_texts(41)[:15]
cache = TeacherCache(root, shard_size=4)
enc1 = FakeEncoder()
n1 = cache.fill(ns, texts, enc1, batch_size=3, progress=True)
np.save(out / f"values{{info.rank}}.npy", cache.lookup(ns, make_texts(41))[list(range(41))].numpy())

enc2 = FakeEncoder()
n2 = cache.fill(ns, make_texts(41)[10:30] + make_texts(10, prefix="new"), enc2, batch_size=3, progress=False)

# Rank 0 corrupts one shard written by rank 1; a fresh cache object on every rank must recompute exactly it.
corrupted = 0
barrier()  # rank 1 may still be reading the index when rank 0 returns from fill
if info.rank == 0:
    victim = sorted((root / ns).glob("shard-r00001-*.emb.npy"))[0]
    corrupted = json.loads(victim.with_name(victim.name.replace(".emb.npy", ".json")).read_text())["rows"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
barrier()
enc3 = FakeEncoder()
everything = texts + make_texts(10, prefix="new")
n3 = TeacherCache(root, shard_size=4).fill(ns, everything, enc3, batch_size=3, progress=False)
(out / f"rank{{info.rank}}.json").write_text(json.dumps(dict(
    n1=n1, n2=n2, n3=n3, texts1=enc1.texts, texts2=enc2.texts, texts3=enc3.texts, corrupted=corrupted)))
shutdown()
"""


def test_two_ranks_share_the_work(tmp_path: Path) -> None:
    root, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT.format(repo=str(REPO), tests=str(TESTS), root=str(root), ns=NS, out=str(out)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(script),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-12000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))

    # Phase 1: 41 distinct texts split 21 / 20, no text encoded twice.
    assert (r0["n1"], r1["n1"]) == (21, 20)
    assert sorted(r0["texts1"] + r1["texts1"]) == sorted(make_texts(41))
    # Phase 2: only the 10 new texts are encoded, 5 per rank.
    assert (r0["n2"], r1["n2"]) == (5, 5)
    assert sorted(r0["texts2"] + r1["texts2"]) == sorted(make_texts(10, prefix="new"))
    # After rank 0 corrupted one of rank 1's shards, exactly its rows are recomputed, shared by both ranks.
    assert r0["corrupted"] in (1, 2, 3, 4)
    assert r0["n3"] + r1["n3"] == r0["corrupted"] == len(r0["texts3"]) + len(r1["texts3"])
    assert {s.split("-")[1] for s in stems(root)} == {"r00000", "r00001"}

    # Both ranks read the same values, identical to a one-process run.
    single = TeacherCache(tmp_path / "single", shard_size=4)
    single.fill(NS, make_texts(41), FakeEncoder(), batch_size=3, progress=False)
    want = single.lookup(NS, make_texts(41))[list(range(41))].numpy()
    for rank in (0, 1):
        assert np.array_equal(np.load(out / f"values{rank}.npy"), want)
