#!/usr/bin/env python
"""The student input pipeline (issue 20 item 3), side by side in one run: two ratios.

1. ``reads``: one phase-2 micro-batch's teacher targets from the teacher cache, the previous
   ``CachedEmbeddings.__getitem__`` (:class:`LegacyReader`: a fancy-index per shard found by a scan per shard, an
   LRU of 64 memory maps) against the current one (distinct rows sorted once, one read per shard, maps kept open),
   on a synthetic cache (random vectors, no model) with many shards; the values are checked equal.
2. ``loop``: the phase-2 training loop's samples/s with ``training.prefetch_batches`` 1 against 0 (``train_ddp.py``
   on ``configs/cpu_demo.yaml`` at reduced size, demo models, the teacher cache shared and warm after the first
   run; phase 1 only ``--steps1`` steps). Interleaved repeats, the fastest of each kept.

    python benchmarks/bench_prefetch.py                      # ~6 min on 2 quiet cores (first run: + teacher cache)
    python benchmarks/bench_prefetch.py --only reads --texts 40000 --dim 1024 --shard-size 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C


class LegacyReader:
    """``CachedEmbeddings.__getitem__`` before issue 20 item 3 (integer rows only), for comparison and tests."""

    max_open = 64

    def __init__(self, emb: Any) -> None:
        self.emb, self.open = emb, OrderedDict()

    def array(self, s: int) -> np.ndarray:
        if s in self.open:
            self.open.move_to_end(s)
            return self.open[s]
        if len(self.open) >= self.max_open:
            self.open.popitem(last=False)
        self.open[s] = np.load(self.emb._shards[s].emb_path, mmap_mode="r", allow_pickle=False)
        return self.open[s]

    def __call__(self, rows: Any) -> torch.Tensor:
        from distill.teacher_cache import _DTYPES

        e = self.emb
        flat = np.asarray(rows).reshape(-1)
        glob = e._positions[flat]
        shard_ids = np.searchsorted(e._offsets, glob, side="right") - 1
        local = glob - e._offsets[shard_ids]
        out = np.empty((len(flat), e.dim), dtype=np.float32)
        for s in np.unique(shard_ids):
            sel = np.nonzero(shard_ids == s)[0]
            sel = sel[np.argsort(local[sel], kind="stable")]
            stored = torch.from_numpy(np.asarray(self.array(int(s))[local[sel]]))
            out[sel] = stored.view(_DTYPES[e._shards[s].dtype][0]).float().numpy()
        return torch.from_numpy(out).reshape(*np.shape(rows), e.dim)


def target_reads(root: Path, *, texts: int, dim: int, shard_size: int, rows: int, batches: int, repeats: int,
                 seed: int = 0) -> dict[str, float]:
    """Milliseconds per micro-batch of ``rows`` random rows (duplicates too, like hard negatives shared by queries)
    with one torch thread: ``old_ms`` / ``new_ms`` (fastest of ``repeats`` interleaved rounds) and ``speedup``;
    asserts equal values."""
    from distill.teacher_cache import TeacherCache

    rng = np.random.default_rng(seed)
    names = [f"bench text {i}" for i in range(texts)]
    cache = TeacherCache(root, dtype="float16", shard_size=shard_size)
    cache.fill("bench", names, lambda b: torch.randn(len(b), dim), batch_size=4096, progress=False)
    emb = cache.lookup("bench", names)
    picks = [rng.integers(0, texts, rows) for _ in range(batches)]
    old, new = LegacyReader(emb), emb
    assert all(torch.equal(old(p), new[p]) for p in picks[:3])
    best = {"old": float("inf"), "new": float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the prefetch thread
    try:
        for _ in range(repeats):
            for name, read in (("old", old), ("new", new.__getitem__)):
                t0 = time.perf_counter()
                for p in picks:
                    read(p)
                best[name] = min(best[name], (time.perf_counter() - t0) / batches)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root / "bench", ignore_errors=True)
    return {"shards": -(-texts // shard_size), "rows": rows, "old_ms": best["old"] * 1e3,
            "new_ms": best["new"] * 1e3, "speedup": best["old"] / best["new"]}


def loop_runs(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Phase-2 loop samples/s with prefetch 0 and 1 (fastest of ``--repeats`` interleaved runs each)."""
    teacher, student = C.check_models(args.models_dir)
    data = C.make_demo_data(work / f"data-{args.max_train}", args.max_train)
    config = C.write_config(work / "bench_prefetch.yaml", data_dir=data, teacher=teacher, student=student,
                            output_dir=work / "out", cache_dir=work / "cache")
    run_dir = work / "out" / C.experiment_name(config)
    env = C.bench_env(args.threads)
    best: dict[int, dict[str, Any]] = {}
    for r in range(args.repeats):
        for depth in (0, 1):
            sets = [f"training.prefetch_batches={depth}", f"training.num_threads={args.threads}",
                    f"phase1.max_steps={args.steps1}", f"phase2.max_steps={args.steps2}",
                    f"phase2.batch_size={args.batch2}", f"training.precision={args.precision}"]
            C.run_logged(C.train_command(config, sets, overwrite=run_dir.exists()), work / f"p{depth}-r{r}.log", env)
            stats = C.loop_stats(C.read_train_records(run_dir / "metrics.jsonl"), "phase2")
            row = {"prefetch_batches": depth, "steps": stats.steps, "loop_s": stats.elapsed_s,
                   "samples_per_s": stats.samples_per_s}
            print(f"[prefetch {depth} #{r + 1}] {row}", flush=True)
            if depth not in best or row["samples_per_s"] > best[depth]["samples_per_s"]:
                best[depth] = row
    return [best[0], best[1]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["reads", "loop"], default=None, help="run one of the two parts")
    p.add_argument("--texts", type=int, default=40000, help="reads: cached texts (default 40000)")
    p.add_argument("--dim", type=int, default=1024, help="reads: vector dim (default 1024)")
    p.add_argument("--shard-size", type=int, default=256, help="reads: rows per shard (default 256: 157 shards)")
    p.add_argument("--rows", type=int, default=288, help="reads: rows per micro-batch (default 288 = 32 x 9)")
    p.add_argument("--batches", type=int, default=50, help="reads: micro-batches per round (default 50)")
    p.add_argument("--max-train", type=int, default=64, help="loop: demo data rows (default 64)")
    p.add_argument("--batch2", type=int, default=4, help="loop: phase-2 batch size (default 4)")
    p.add_argument("--steps1", type=int, default=1, help="loop: phase-1 steps (default 1)")
    p.add_argument("--steps2", type=int, default=4, help="loop: phase-2 steps (default 4)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats, fastest kept (default 3)")
    p.add_argument("--models-dir", type=Path, default=C.DEFAULT_MODELS)
    p.add_argument("--workdir", type=Path, default=C.REPO / "runs" / "bench_prefetch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {C.machine_line(args.threads)}")
    result: dict[str, Any] = {}
    if args.only in (None, "reads"):
        result["reads"] = target_reads(work, texts=args.texts, dim=args.dim, shard_size=args.shard_size,
                                       rows=args.rows, batches=args.batches, repeats=args.repeats)
        print(C.format_table([result["reads"]], list(result["reads"])))
        print(f"target reads new vs old: {result['reads']['speedup']:.2f}x")
    if args.only in (None, "loop"):
        result["loop"] = loop_runs(args, work)
        print(C.format_table(result["loop"], list(result["loop"][0])))
        ratio = C.ratio(result["loop"][1]["samples_per_s"], result["loop"][0]["samples_per_s"])
        print(f"phase-2 samples/s prefetch 1 vs 0: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
