"""The student input pipeline: micro-batches prepared ahead on a thread (``distill.batches.Prefetch``,
``training.prefetch_batches``) train bit-identically to no prefetch, and teacher targets are read per shard
(``CachedEmbeddings``) with the values of the previous reader."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_data import tiny_config_yaml, write_training_files

from benchmarks.bench_prefetch import LegacyReader
from benchmarks.bench_prefetch import main as bench_main
from distill.batches import Phase2Task, Prefetch
from distill.config import load_config
from distill.errors import Preempted
from distill.teacher_cache import TeacherCache
from distill.trainer import run


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "distill-prefetch"]


def test_prefetch_keeps_order_runs_ahead_and_raises_in_the_consumer() -> None:
    made: list[int] = []

    def prepare(i: int) -> int:
        made.append(i)
        if i == 5:
            raise ValueError("bad micro-batch 5")
        return i * 10

    with Prefetch(range(8), prepare, depth=2) as items:
        assert [next(items) for _ in range(3)] == [0, 10, 20]
        deadline = time.monotonic() + 5
        while len(made) < 6 and time.monotonic() < deadline:  # 3 taken, 2 queued, 1 held by the blocked worker
            time.sleep(0.01)
        assert made == [0, 1, 2, 3, 4, 5]
        assert [next(items), next(items)] == [30, 40]
        with pytest.raises(ValueError, match="bad micro-batch 5"):
            next(items)
    assert not prefetch_threads()
    assert list(Prefetch(range(4), lambda i: -i, depth=0)) == [0, -1, -2, -3]  # depth 0: no thread
    stopped = Prefetch(iter(range(10**6)), lambda i: i, depth=1)
    assert next(stopped) == 0
    stopped.close()  # closed before the items run out: the thread ends
    assert not prefetch_threads()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cached_embeddings_match_the_previous_reader(tmp_path: Path, tiny_teacher_dir: Path, dtype: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(tiny_teacher_dir), device="cpu")
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(40)]
    cache = TeacherCache(tmp_path, dtype=dtype, shard_size=6)  # 7 shards
    cache.fill("ns", texts, lambda b: torch.from_numpy(teacher.encode(b)), batch_size=9, progress=False)
    emb = cache.lookup("ns", texts + texts[::-1])  # positions 40.. are the same texts again: duplicate cache rows
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    rows = np.random.default_rng(0).integers(0, 80, (12, 9))  # repeats, every shard, unsorted, 2-d
    rows[0, :4] = [3, 3, 76, 3]  # the same cache row three times and once through the duplicate text
    want = LegacyReader(emb)(rows)
    assert len(loads) == 7
    got = emb[rows]
    assert got.shape == (12, 9, 48) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(emb[rows[0]], want[0]) and torch.equal(emb[int(rows[1, 2])], want[1, 2])
    assert len(loads) == 14  # each shard opened once by each reader, then kept open
    torch.testing.assert_close(emb[np.arange(80)][:40], torch.from_numpy(teacher.encode(texts)), atol=1e-2, rtol=0)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_teacher_dir, tiny_student_dir) -> Path:
    tmp = tmp_path_factory.mktemp("prefetch")
    return tiny_config_yaml(tmp, tiny_teacher_dir, tiny_student_dir, write_training_files(tmp / "data", n=48))


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs here compare weights and losses; the report and its plots (most of a tiny run's time) are skipped."""
    monkeypatch.setattr("distill.report.plot_metrics", lambda *a, **k: None)
    monkeypatch.setattr("distill.report.write_report", lambda *a, **k: None)


def train(config: Path, name: str, *sets: str) -> Path:
    """One in-process run (both phases, 3 optimizer steps each, shared teacher cache); returns its run folder."""
    cfg = load_config(config, [f"paths.output_dir={config.parent / name}", f"paths.cache_dir={config.parent / 'cache'}",
                               "eval.data=null", "phase1.max_steps=3", "phase2.max_steps=3", "training.save_steps=0",
                               *sets])
    run(cfg)
    return cfg.run_dir


def losses(run_dir: Path) -> list[tuple]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["phase"], r["step"], r["loss"], r["terms"]) for r in map(json.loads, lines) if r.get("event") == "train"]


def assert_same_weights(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in (a / "final").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in (b / "final").rglob("*.safetensors"))
    for rel in files:
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel


@pytest.mark.parametrize("cached", [False, True])
def test_prefetch_trains_bit_identically(config: Path, cached: bool) -> None:
    sets = [f"phase2.cached_infonce={str(cached).lower()}", "phase2.mini_batch_size=8"]
    off = train(config, f"off-{cached}", "training.prefetch_batches=0", *sets)
    on = train(config, f"on-{cached}", "training.prefetch_batches=2", *sets)
    assert [r[:2] for r in losses(off)] == [("phase1", s) for s in (1, 2, 3)] + [("phase2", s) for s in (1, 2, 3)]
    assert losses(on) == losses(off)
    assert_same_weights(off, on)
    assert not prefetch_threads()


def test_sigterm_and_resume_with_prefetch(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM arrives while the prefetch thread prepares phase 2's 2nd micro-batch: a checkpoint, Preempted, no thread
    left; the rerun resumes at the saved sampler position and ends with the weights of an uninterrupted run."""
    prepare, calls = Phase2Task.prepare, []

    def signalling(self, batch):
        calls.append(1)
        if len(calls) == 3:  # 1: the probe, 2: step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return prepare(self, batch)

    monkeypatch.setattr(Phase2Task, "prepare", signalling)
    with pytest.raises(Preempted, match="phase2 step"):
        train(config, "stopped", "training.prefetch_batches=1")
    assert not prefetch_threads()
    monkeypatch.setattr(Phase2Task, "prepare", prepare)
    resumed = train(config, "stopped", "training.prefetch_batches=1")
    full = train(config, "full", "training.prefetch_batches=1")
    assert losses(resumed)[-1] == losses(full)[-1]
    assert_same_weights(resumed, full)


def test_bench_prefetch_reads_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--only", "reads", "--texts", "300", "--dim", "8", "--shard-size", "16", "--rows", "40",
                       "--batches", "3", "--repeats", "1", "--threads", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 19 | 40 |" in out and "target reads new vs old:" in out
