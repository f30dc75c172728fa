#!/usr/bin/env python
"""Teacher cache fill speed, side by side in one run: the same texts embedded into a fresh cache three ways.

1. ``serial``: the fill before issue 20 (:func:`serial_fill`): character-sorted batches of ``--batch-size`` texts,
   tokenisation, forward, read-back, NaN check and shard write (sha256 + fsync) one after the other;
2. ``overlap``: :meth:`TeacherCache.fill` with the same fixed batches, tokenisation and shard writes on background
   threads, one read-back per shard;
3. ``budget``: the same plus token-budget batches (``--max-tokens`` padded tokens, at most ``--rows`` texts).

Texts: docstrings of the standard library (whole, and their first lines as short query-like texts), so lengths vary
as in real data. Prints texts/s, padding efficiency (real / padded tokens), batches and the ratios to ``serial``;
the stored vectors of the three runs are compared (max abs difference).

    python benchmarks/bench_teacher.py                       # the demo teacher (models/all-mpnet-base-v2), ~3 min
    python benchmarks/bench_teacher.py --teacher PATH --texts 4000 --max-length 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

MODULES = ("os", "json", "re", "collections", "pathlib", "argparse", "subprocess", "itertools", "shutil",
           "logging", "functools", "asyncio", "email.message", "http.client", "urllib.request", "tarfile", "zipfile",
           "csv", "sqlite3", "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "io")


def docstring_texts(n: int) -> list[str]:
    """``n`` texts: distinct stdlib docstrings and their first lines in a fixed order, repeated if there are fewer."""
    texts = C.docstrings(n, MODULES, first_lines=True)
    return (texts * (n // max(len(texts), 1) + 1))[:n]


def serial_fill(cache: Any, namespace: str, texts: list[str], encoder: Any, role: str, batch_size: int) -> None:
    """The fill loop before issue 20: fixed character-sorted batches, everything on this thread."""
    import numpy as np
    import torch

    from distill import teacher_cache as tc

    keys, order = tc.text_keys(texts), np.argsort([-len(t) for t in texts], kind="stable")
    directory = cache.root / namespace
    directory.mkdir(parents=True, exist_ok=True)
    held_keys, held = [], []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        values = encoder.encode([texts[i] for i in batch], role, batch_size).to("cpu", torch.float32)
        if not bool(values.abs().max() <= torch.finfo(torch.float16).max):
            raise RuntimeError("NaN/inf")
        held_keys.append(keys[batch])
        held.append(values.to(torch.float16).numpy())
        if sum(len(k) for k in held_keys) >= cache.shard_size or start + batch_size >= len(order):
            tc._write_shard(directory, 0, np.concatenate(held_keys), np.concatenate(held), "float16")
            held_keys, held = [], []


def padding_efficiency(lengths: Any, batches: list[Any]) -> float:
    """Real tokens / padded tokens (rows x the batch's longest) over ``batches`` (positions into ``lengths``)."""
    return float(sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches))


def run(teacher: str | Path, workdir: Path, n_texts: int = 1500, max_length: int = 256, batch_size: int = 32,
        max_tokens: int = 8192, rows: int = 256, shard_size: int = 512, role: str = "document") -> list[dict[str, Any]]:
    """Fill a fresh cache under ``workdir`` three ways (module docstring); one row of numbers per way."""
    import numpy as np
    import torch

    from distill.models import resolve_teacher_spec
    from distill.teacher_cache import TeacherCache, token_budget_batches
    from distill.teacher_targets import LazyTeacher

    texts = docstring_texts(n_texts)
    spec = resolve_teacher_spec(str(teacher), max_length=max_length, dtype="float32",
                                device=torch.device("cpu"))
    teacher_ = LazyTeacher(spec, torch.device("cpu"))
    encoder, role_encoder = teacher_.load(), teacher_.encode_fn(role)
    encoder.encode(texts[:8], role, 8)  # warm-up
    lengths = encoder.lengths(texts, role)
    char_sorted = np.argsort([-len(t) for t in texts], kind="stable")
    plans = {"serial": [char_sorted[i : i + batch_size] for i in range(0, len(texts), batch_size)],
             "overlap": token_budget_batches(lengths, batch_size), "budget": token_budget_batches(lengths, rows,
                                                                                                 max_tokens)}
    rows_out, stored = [], {}
    for way, plan in plans.items():
        root = workdir / way
        shutil.rmtree(root, ignore_errors=True)
        cache = TeacherCache(root, dtype="float16", shard_size=shard_size)
        start = time.perf_counter()
        if way == "serial":
            serial_fill(cache, "bench", texts, encoder, role, batch_size)
        else:
            cache.fill("bench", texts, role_encoder, batch_size=batch_size if way == "overlap" else rows,
                       progress=False, max_tokens=None if way == "overlap" else max_tokens)
        seconds = time.perf_counter() - start
        stored[way] = TeacherCache(root).lookup("bench", texts)[np.arange(len(texts))]
        rows_out.append({"way": way, "texts": len(texts), "seconds": seconds, "texts_per_s": len(texts) / seconds,
                         "padding_efficiency": padding_efficiency(lengths, plan), "batches": len(plan),
                         "max_abs_diff_vs_serial": float((stored[way] - stored["serial"]).abs().max())})
    return rows_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=C.DEFAULT_MODELS / C.TEACHER_NAME)
    p.add_argument("--texts", type=int, default=1500)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="serial / overlap texts per batch (default 32)")
    p.add_argument("--max-tokens", type=int, default=8192, help="budget: padded tokens per batch (default 8192)")
    p.add_argument("--rows", type=int, default=256, help="budget: most texts per batch (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--workdir", type=Path, default=C.REPO / "runs" / "bench_teacher")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.teacher, args.workdir, args.texts, args.max_length, args.batch_size, args.max_tokens, args.rows)
    print(f"machine: {C.machine_line(torch.get_num_threads())}")
    print(f"teacher: {args.teacher} (fp32, max_length {args.max_length}); {args.texts} stdlib docstring texts")
    print(C.format_table(rows, list(rows[0])))
    for row in rows[1:]:
        print(f"{row['way']}/serial texts/s: {C.ratio(row['texts_per_s'], rows[0]['texts_per_s']):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
