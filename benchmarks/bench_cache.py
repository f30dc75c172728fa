#!/usr/bin/env python
"""What the teacher cache saves: the same two-phase CPU workload three times, side by side in one run.

1. ``no-cache``: the teacher stays loaded and embeds every batch inside the loop (this script's ``--inline-teacher``
   mode, :func:`train_inline`: the library always caches);
2. ``cold``: a fresh cache directory, the teacher embeds each unique text once before each phase;
3. ``warm``: run 2 again with ``--overwrite`` and the cache kept; the teacher is never loaded.

Each run is a ``train_ddp.py`` subprocess (``--nproc 2``: ``torchrun --nproc_per_node=2``) on
``configs/cpu_demo.yaml`` at reduced size (demo data with ``--max-train``, one epoch per phase by default). The
script prints wall times, the training-loop time of each phase (``metrics.jsonl`` ``elapsed_s``), teacher forward
passes (``final/distill_summary.json`` ``teacher_forward_passes``; texts embedded by the teacher) and the ratios
no-cache/cold and no-cache/warm.

``--store`` instead times only the cache's own storage overhead (:func:`store_overhead`: key hashing, fill, lookup,
random reads) with a random-vector encoder: no model, no training.

    python benchmarks/bench_cache.py                                 # ~5 min on 2 cores
    python benchmarks/bench_cache.py --nproc 2 --epochs1 2 --epochs2 2 --max-train 64 --json out.json
    python benchmarks/bench_cache.py --store --store-texts 20000 --store-dim 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

RUNS = ("no-cache", "cold", "warm")
INLINE = "--inline-teacher"  # first argument: run train_ddp.py with the teacher inside the loop (train_inline)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-train", type=int, default=24, help="training rows of the demo data (default 24)")
    p.add_argument("--batch1", type=int, default=16, help="phase-1 batch size (default 16; cpu_demo.yaml has 32)")
    p.add_argument("--batch2", type=int, default=8, help="phase-2 batch size (default 8; cpu_demo.yaml has 16)")
    p.add_argument("--epochs1", type=int, default=1, help="phase-1 epochs (default 1)")
    p.add_argument("--epochs2", type=int, default=1, help="phase-2 epochs (default 1)")
    p.add_argument("--nproc", type=int, default=1, help="processes (1: python train_ddp.py, >1: torchrun)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: cores // nproc, at least 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="student autocast (default auto: bf16 on CPUs with AVX512-BF16/AMX, else fp32)")
    p.add_argument("--repeats", type=int, default=1,
                   help="repeat the three runs (cold cache wiped each time) and keep each run's fastest (default 1)")
    p.add_argument("--models-dir", type=Path, default=C.DEFAULT_MODELS)
    p.add_argument("--workdir", type=Path, default=C.REPO / "runs" / "bench_cache")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--store", action="store_true",
                   help="time only the cache's storage overhead (no model, no training) in a folder under --workdir")
    p.add_argument("--store-texts", type=int, default=20000, help="texts --store fills and reads (default 20000)")
    p.add_argument("--store-dim", type=int, default=1024, help="embedding dim of --store (default 1024)")
    args = p.parse_args(argv)
    for name in ("max_train", "batch1", "batch2", "epochs1", "epochs2", "nproc", "repeats", "store_texts",
                 "store_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.threads is None:
        args.threads = default_threads(args.nproc)
    return args


def default_threads(nproc: int, cores: int | None = None) -> int:
    """Torch threads per process so that processes x threads does not exceed the cores."""

    return max(1, (cores or os.cpu_count() or 1) // nproc)


def run_overrides(run: str, args: argparse.Namespace, work: Path) -> tuple[list[str], bool]:
    """``--set`` items and ``--overwrite`` of one of the three runs (separate output dirs; cold/warm share a cache)."""
    sets = [f"phase1.num_epochs={args.epochs1}", f"phase2.num_epochs={args.epochs2}",
            f"phase1.batch_size={args.batch1}", f"phase2.batch_size={args.batch2}",
            f"training.num_threads={args.threads}", f"training.precision={args.precision}"]
    if run == "no-cache":
        sets += [f"paths.output_dir={work / 'no-cache'}", f"paths.cache_dir={work / 'no-cache' / 'cache'}"]
    else:
        sets += [f"paths.output_dir={work / 'cached'}", f"paths.cache_dir={work / 'cached' / 'cache'}"]
    return sets, run == "warm"


def inline_command(cmd: list[str]) -> list[str]:
    """A :func:`benchmarks.common.train_command` with ``train_ddp.py`` replaced by this script's inline mode."""
    at = cmd.index(str(C.REPO / "train_ddp.py"))
    return [*cmd[:at], str(Path(__file__).resolve()), INLINE, *cmd[at + 1 :]]


def train_inline(argv: list[str]) -> int:
    """``train_ddp.py argv`` without the teacher cache, the naive baseline: the teacher is loaded once per phase and
    embeds every batch inside the loop (and the eval set directly). Patches :mod:`distill.teacher_targets` in this
    process only; the trainer imports its functions when it calls them."""
    import distill.teacher_targets as T
    from distill.cli import train_main
    from distill.evaluate import Embeddings
    from distill.models import TeacherEncoder, teacher_spec_from_config

    def teacher(cfg: Any, max_length: int, device: Any) -> Any:
        spec = teacher_spec_from_config(cfg.model, max_length, device, cpu_tuning=cfg.training.cpu_tuning)
        return TeacherEncoder(spec, device, cfg.model.teacher_attn_implementation)

    def build_teacher_targets(cfg: Any, phase_max_length: int, queries: Any, documents: Any, device: Any) -> Any:
        enc, bs = teacher(cfg, phase_max_length, device), cfg.model.teacher_batch_size
        return T.TeacherTargets(lambda rows: enc.encode(queries.take(rows), "query", bs),
                                lambda rows: enc.encode(documents.take(rows), "document", bs), enc.dim, 0)

    def eval_teacher_embeddings(cfg: Any, beir: Any, device: Any) -> Any:
        enc = teacher(cfg, cfg.phase2.max_length, device)
        texts = T._beir_texts(beir)
        q, d = (enc.encode(t, role, cfg.model.teacher_batch_size) for role, t in texts.items())
        return Embeddings(list(beir.queries), list(beir.corpus), q, d)

    T.build_teacher_targets, T.eval_teacher_embeddings = build_teacher_targets, eval_teacher_embeddings
    return train_main(argv)


def inloop_teacher_texts(stats: dict[str, C.LoopStats | None], num_negatives: int) -> int:
    """Texts the teacher embeds inside the loop in the ``no-cache`` run: every sample of every step, as
    many texts as the sample has (the summary reports 0 in that mode; the freeze probe's 2 examples not counted)."""
    total = 0
    for phase, s in stats.items():
        if s is not None:
            total += s.samples * C.texts_per_sample(int(phase[-1]), num_negatives)
    return total


def collect(run: str, wall: float, run_dir: Path, num_negatives: int) -> dict[str, Any]:
    summary = C.read_summary(run_dir)
    records = C.read_train_records(run_dir / "metrics.jsonl")
    stats = {p: C.loop_stats(records, p) for p in ("phase1", "phase2")}
    reported = C.total_teacher_passes(summary)
    row: dict[str, Any] = {"run": run, "wall_s": wall, "teacher_passes_reported": reported}
    row["teacher_texts"] = inloop_teacher_texts(stats, num_negatives) if run == "no-cache" else reported
    for p, s in stats.items():
        row[f"{p}_loop_s"] = s.elapsed_s if s else None
        row[f"{p}_steps"] = s.steps if s else None
        row[f"{p}_samples_per_s"] = s.samples_per_s if s else None
    row["loop_s"] = sum(row[f"{p}_loop_s"] or 0.0 for p in stats)
    return row


def store_overhead(
    root: str | Path,
    n_texts: int = 20000,
    dim: int = 1024,
    dtype: str = "float16",
    shard_size: int = 4096,
    batch_size: int = 256,
    lookup_batch: int = 64,
    lookup_batches: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Time the teacher cache's own overhead, without a model, in a throw-away namespace under ``root`` (removed
    after).

    A random-vector encoder fills ``n_texts`` synthetic texts; then ``lookup_batches`` random batches of
    ``lookup_batch`` rows are read back. Returns ``hash_texts_per_s`` (key hashing), ``fill_texts_per_s``
    (hash + sort + store, encoder time excluded), ``count_missing_s``, ``lookup_s`` (index build with checksums
    + key search for all texts), ``read_rows_per_s`` (random rows from the memory maps) and ``bytes_on_disk``.
    Collective like :meth:`TeacherCache.fill` when run under torchrun.
    """
    import numpy as np
    import torch

    from distill.distributed import barrier, broadcast_object, get_info
    from distill.teacher_cache import TeacherCache, text_keys

    rng = np.random.default_rng(seed)
    texts = [f"benchmark text {i} " + "w" * int(rng.integers(0, 200)) for i in range(n_texts)]
    namespace = broadcast_object(f"benchmark-{uuid.uuid4().hex}")
    cache = TeacherCache(root, dtype=dtype, shard_size=shard_size)
    encode_s = 0.0

    def encode(batch: list[str]) -> torch.Tensor:
        nonlocal encode_s
        start = time.perf_counter()
        out = torch.nn.functional.normalize(torch.randn(len(batch), dim), dim=1)
        encode_s += time.perf_counter() - start
        return out

    try:
        t0 = time.perf_counter()
        text_keys(texts)
        t1 = time.perf_counter()
        cache.fill(namespace, texts, encode, batch_size=batch_size, progress=False)
        t2 = time.perf_counter()
        cache.count_missing(namespace, texts)
        t3 = time.perf_counter()
        emb = TeacherCache(root, dtype=dtype, shard_size=shard_size).lookup(namespace, texts)
        t4 = time.perf_counter()
        for _ in range(lookup_batches):
            emb[rng.integers(0, n_texts, lookup_batch)]
        t5 = time.perf_counter()
        size = sum(p.stat().st_size for p in (Path(root) / namespace).iterdir() if p.is_file())
    finally:
        barrier()
        if get_info().is_main:
            shutil.rmtree(Path(root) / namespace, ignore_errors=True)
    return {
        "hash_texts_per_s": n_texts / max(t1 - t0, 1e-9),
        "fill_texts_per_s": n_texts / max(t2 - t1 - encode_s, 1e-9),
        "count_missing_s": t3 - t2,
        "lookup_s": t4 - t3,
        "read_rows_per_s": lookup_batches * lookup_batch / max(t5 - t4, 1e-9),
        "bytes_on_disk": float(size),
    }


def main_store(args: argparse.Namespace) -> int:
    """``--store``: print (and with ``--json`` write) :func:`store_overhead` at the requested size."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = store_overhead(args.workdir, n_texts=args.store_texts, dim=args.store_dim)
    print(f"machine: {C.machine_line(args.threads)}")
    print(C.format_table([result], list(result)))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "store": result},
                                        indent=2), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.store:
        return main_store(args)
    teacher, student = C.check_models(args.models_dir)
    work = args.workdir.resolve()
    data = C.make_demo_data(work / f"data-{args.max_train}", args.max_train)
    config = C.write_config(work / "bench_cache.yaml", data_dir=data, teacher=teacher, student=student,
                            output_dir=work / "unused", cache_dir=work / "unused-cache")
    experiment = C.experiment_name(config)
    from distill.config import load_config

    num_negatives = load_config(config).phase2.num_negatives
    env = C.bench_env(args.threads)
    print(f"machine: {C.machine_line(args.threads)}")
    print(f"workload: {config} (demo data --max-train {args.max_train}; phase 1 {args.epochs1} epoch(s) of batch "
          f"{args.batch1}, phase 2 {args.epochs2} epoch(s) of batch {args.batch2} x (2 + {num_negatives}) texts; "
          f"{args.precision}; {args.nproc} process(es) x {args.threads} thread(s))")
    every: dict[str, list[dict[str, Any]]] = {run: [] for run in RUNS}
    for r in range(args.repeats):
        for sub in ("no-cache", "cached"):
            shutil.rmtree(work / sub, ignore_errors=True)  # cold means cold
        for run in RUNS:
            sets, overwrite = run_overrides(run, args, work)
            cmd = C.train_command(config, sets, nproc=args.nproc, overwrite=overwrite)
            if run == "no-cache":
                cmd = inline_command(cmd)
            print(f"[{run} #{r + 1}] {' '.join(cmd)}", flush=True)
            wall = C.run_logged(cmd, work / "logs" / f"{run}-r{r}.log", env)
            run_dir = work / ("no-cache" if run == "no-cache" else "cached") / experiment
            every[run].append(collect(run, wall, run_dir, num_negatives))
            print(f"[{run} #{r + 1}] {wall:.1f} s", flush=True)
    rows = [min(every[run], key=lambda row: row["wall_s"]) for run in RUNS]

    columns = ["run", "wall_s", "loop_s", "phase1_loop_s", "phase2_loop_s", "phase1_samples_per_s",
               "phase2_samples_per_s", "teacher_texts", "teacher_passes_reported"]
    print()
    print(C.format_table(rows, columns))
    by = {r["run"]: r for r in rows}
    ratios = {
        "wall no-cache/cold": C.ratio(by["no-cache"]["wall_s"], by["cold"]["wall_s"]),
        "wall no-cache/warm": C.ratio(by["no-cache"]["wall_s"], by["warm"]["wall_s"]),
        "loop no-cache/cold": C.ratio(by["no-cache"]["loop_s"], by["cold"]["loop_s"]),
        "loop no-cache/warm": C.ratio(by["no-cache"]["loop_s"], by["warm"]["loop_s"]),
        "teacher texts no-cache/cold": C.ratio(by["no-cache"]["teacher_texts"], by["cold"]["teacher_texts"]),
    }
    print()
    for k, v in ratios.items():
        print(f"{k:30s} {'-' if v is None else f'{v:.2f}x'}")
    print("\nteacher_texts of no-cache = samples x texts per sample (computed: the summary reports "
          f"{by['no-cache']['teacher_passes_reported']} without the cache)")
    if args.repeats > 1:
        for run in RUNS:
            walls = ", ".join(f"{x['wall_s']:.1f}" for x in every[run])
            print(f"{run:9s} wall seconds per repeat: {walls} (fastest kept)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "machine": C.machine_line(args.threads), "rows": rows, "ratios": ratios,
                                         "all_runs": every},
                                        indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(train_inline(sys.argv[2:]) if sys.argv[1:2] == [INLINE] else main())
