"""Shared helpers of the benchmark scripts: the CPU workload, subprocess runs, and the arithmetic of the reports.

The workload is ``configs/cpu_demo.yaml`` (teacher all-mpnet-base-v2, student all-MiniLM-L6-v2, projection head
384 -> 768 -> 768) on the offline docstring data set at reduced size, with every path made absolute and evaluation,
artifacts and mid-phase checkpoints switched off. The functions at the bottom are the reports' arithmetic (padding
efficiency, FLOP counts, matmul peak, table formatting); ``tests/test_benchmarks_smoke.py`` runs the scripts end to
end on tiny models.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "cpu_demo.yaml"
DEFAULT_MODELS = REPO / "models"
TEACHER_NAME = "all-mpnet-base-v2"
STUDENT_NAME = "all-MiniLM-L6-v2"


# --------------------------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------------------------


def docstrings(n: int, modules: Sequence[str] | None = None, *, first_lines: bool = False) -> list[str]:
    """Up to ``n`` distinct docstrings (> 20 characters) of the classes and callables in ``modules`` (imported
    here), or with None in every module already imported (torch and transformers are: thousands), in module and
    name order; with ``first_lines`` each docstring's first line comes before it. Real prose and code of varied
    length, nothing downloaded."""
    import importlib
    import inspect
    import warnings

    names = sorted(sys.modules) if modules is None else list(modules)
    out: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = sys.modules[name] if modules is None else importlib.import_module(name)
                items = sorted(vars(module).items())
            except Exception:  # noqa: BLE001, S112 - lazy or odd modules: no docstrings to take
                continue
            for _, obj in items:
                try:
                    doc = inspect.getdoc(obj) if callable(obj) or inspect.isclass(obj) else None
                except Exception:  # noqa: BLE001, S112 - an object whose attributes raise has none either
                    continue
                if doc and len(doc) > 20:
                    if first_lines:
                        out.setdefault(doc.splitlines()[0])
                    out.setdefault(doc)
                    if len(out) >= n:
                        return list(out)[:n]
    return list(out)


def check_models(models_dir: Path) -> tuple[Path, Path]:
    """(teacher, student) folders of the demo models, or SystemExit naming the command that fetches them."""
    teacher, student = models_dir / TEACHER_NAME, models_dir / STUDENT_NAME
    for path in (teacher, student):
        if not (path / "modules.json").is_file():
            raise SystemExit(f"{path}: demo model missing; run `python scripts/fetch_demo_models.py --models-dir "
                             f"{models_dir}` first")
    return teacher.resolve(), student.resolve()


def make_demo_data(out: Path, max_train: int, seed: int = 0) -> Path:
    """``python scripts/demo_data.py --out OUT --max-train N`` unless OUT already holds that exact build."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if meta.get("max_train") == max_train and meta.get("seed") == seed:
            return out
    cmd = [sys.executable, str(REPO / "scripts" / "demo_data.py"), "--out", str(out), "--max-train", str(max_train),
           "--seed", str(seed)]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def write_config(path: Path, *, data_dir: Path, teacher: Path, student: Path, output_dir: Path,
                 cache_dir: Path) -> Path:
    """The benchmark config: ``configs/cpu_demo.yaml`` with absolute paths, no eval, no artifacts, a log line and
    no checkpoint per step (``save_steps: 0`` still saves at each phase end), 7 phase-2 negatives (the product's).
    Per-run changes go on ``--set``."""
    raw = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    raw["model"]["teacher"] = str(teacher)
    raw["model"]["student"] = str(student)
    for phase in ("phase1", "phase2"):  # the docstring rows only (not the demo's package or Wikipedia texts)
        raw["data"][phase] = [{**raw["data"][phase][0], "path": str(data_dir / f"{phase}.jsonl"), "max_samples": None}]
    raw["eval"]["data"] = None
    raw["paths"] = {"output_dir": str(output_dir), "artifacts_dir": str(output_dir / "artifacts"),
                    "cache_dir": str(cache_dir)}
    raw["training"].update({"save_to_artifacts": False, "save_steps": 0, "logging_steps": 1})
    raw["phase2"]["num_negatives"] = 7  # the workload docs/PERFORMANCE.md measures (the demo trains with 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def experiment_name(config_path: Path) -> str:
    """The run folder name train_ddp.py uses for the benchmark config (student family minilm, 768-d output)."""
    from distill.config import load_config

    return load_config(config_path).experiment


def train_command(config: Path, overrides: Sequence[str] = (), *, nproc: int = 1, overwrite: bool = False) -> list[str]:
    """``python train_ddp.py ...`` (``nproc == 1``) or ``torchrun --nproc_per_node=N train_ddp.py ...``."""
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train_ddp.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={nproc}", str(REPO / "train_ddp.py")]
    cmd += ["--config", str(config), "--log-level", "WARNING"]
    for item in overrides:
        cmd += ["--set", item]
    if overwrite:
        cmd.append("--overwrite")
    return cmd


MALLOCS = {"glibc": None, "tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}  # --malloc: library to preload
MALLOC_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}  # Debian / Ubuntu


def malloc_preload(malloc: str) -> str | None:
    """The shared library to ``LD_PRELOAD`` for ``malloc`` (None: glibc's own), or SystemExit naming its package."""
    import ctypes.util

    if MALLOCS[malloc] is None:
        return None
    lib = ctypes.util.find_library(MALLOCS[malloc])
    if lib is None:
        raise SystemExit(f"--malloc {malloc}: lib{MALLOCS[malloc]} not found; install it (Debian/Ubuntu: "
                         f"apt-get install {MALLOC_PACKAGES[malloc]})")
    return lib


def bench_env(threads: int, preload: str | None = None) -> dict[str, str]:
    """Offline, one thread pool size for torch/OpenMP/MKL, no tokenizer threads; ``preload``: an allocator library
    for ``LD_PRELOAD``."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
    if preload:
        env["LD_PRELOAD"] = " ".join(p for p in (preload, env.get("LD_PRELOAD", "")) if p)
    return env


def run_logged(cmd: Sequence[str], log_path: Path, env: Mapping[str, str]) -> float:
    """Run ``cmd`` (cwd = repo), output to ``log_path``; return the wall time in seconds. Fails with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(list(cmd), cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")
    return wall


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "final" / "distill_summary.json").read_text(encoding="utf-8"))


def read_train_records(metrics_path: Path) -> list[dict[str, Any]]:
    """The ``event: train`` lines of a ``metrics.jsonl``."""
    out = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("event") == "train":
                out.append(rec)
    return out


@dataclass
class LoopStats:
    """One phase's training loop as logged in metrics.jsonl (t0 is just before the first step)."""

    steps: int
    samples: int
    elapsed_s: float
    padding_efficiency: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def loop_stats(records: Iterable[Mapping[str, Any]], phase: str) -> LoopStats | None:
    """Last train record of ``phase``: steps, samples (``samples_per_s * elapsed_s``), elapsed, padding."""
    last = None
    for rec in records:
        if rec.get("phase") == phase:
            last = rec
    if last is None:
        return None
    samples = int(round(last["samples_per_s"] * last["elapsed_s"]))
    return LoopStats(int(last["step"]), samples, float(last["elapsed_s"]), float(last["padding_efficiency"]))


def total_teacher_passes(summary: Mapping[str, Any]) -> int:
    """Sum of ``teacher_forward_passes`` over phases (the summary stores a dict per phase)."""
    value = summary.get("teacher_forward_passes", 0)
    return int(sum(value.values())) if isinstance(value, Mapping) else int(value)


# --------------------------------------------------------------------------------------------------------------------
# Arithmetic of the reports (pure)
# --------------------------------------------------------------------------------------------------------------------


def texts_per_sample(phase: int, num_negatives: int) -> int:
    """Texts embedded per training example: phase 1 one text; phase 2 a query, its positive and the negatives."""
    return 1 if phase == 1 else 2 + num_negatives


def padding_efficiency_from_counts(real_tokens: int, padded_tokens: int) -> float:
    """real / padded tokens (1.0 when nothing was padded); padded counts every position of every padded batch."""
    if real_tokens < 0 or padded_tokens < real_tokens:
        raise ValueError(f"need 0 <= real <= padded tokens, got {real_tokens} and {padded_tokens}")
    return real_tokens / padded_tokens if padded_tokens else 1.0


def padding_efficiency(attention_masks: Iterable[Any]) -> float:
    """sum(real tokens) / sum(padded tokens) over 2-d 0/1 attention masks [b, L] (torch or numpy)."""
    real = padded = 0
    for mask in attention_masks:
        real += int(mask.sum())
        padded += int(mask.numel() if hasattr(mask, "numel") else mask.size)
    return padding_efficiency_from_counts(real, padded)


def training_flops(non_embedding_params: int, real_tokens: int, *, layers: int = 0, hidden: int = 0,
                   sum_sq_len: int = 0) -> float:
    """Training FLOPs of a transformer encoder, forward + backward (x3 of the forward):

        6 * N * T + 12 * layers * hidden * sum_i len_i^2

    N = non-embedding parameters, T = real (unpadded) tokens; the second term is attention's scores and weighted sum
    (QK^T and AV: 2 * len^2 * hidden multiply-adds per layer and text, x2 FLOPs, x3 for the backward), over each
    text's real length. The per-text projection head (< 0.3 % here) is left out. Same count as PaLM's MFU."""
    return 6.0 * non_embedding_params * real_tokens + 12.0 * layers * hidden * sum_sq_len


def achieved_flops_per_s(non_embedding_params: int, real_tokens: int, seconds: float, **attention: int) -> float:
    """``training_flops(...)`` / wall seconds (``attention``: ``layers``, ``hidden``, ``sum_sq_len``)."""
    return training_flops(non_embedding_params, real_tokens, **attention) / seconds if seconds > 0 else float("nan")


def encoder_gemms(tokens: int, hidden: int, intermediate: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) matmuls of one encoder layer's training step on ``tokens`` token rows: for each linear layer
    (query, key, value, attention output: hidden -> hidden; feed-forward in: hidden -> intermediate; out:
    intermediate -> hidden) the forward Y = X W, the input gradient dX = dY W^T and the weight gradient
    dW = X^T dY."""
    gemms = []
    for k, n in [(hidden, hidden)] * 4 + [(hidden, intermediate), (intermediate, hidden)]:
        gemms += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]
    return gemms


def matmul_flop_count(m: int, k: int, n: int) -> int:
    """FLOPs of one [m, k] @ [k, n] matmul: m n dot products of length k, a multiply and an add each = 2 m k n."""
    return 2 * m * k * n


def non_embedding_params(module: Any, exclude: Sequence[str] = ()) -> int:
    """Parameters of ``module`` outside its embedding tables (``nn.Embedding``: words, positions, types) and outside
    submodules whose name has a part in ``exclude`` (e.g. ``pooler``: run once per text, not per token)."""
    from torch import nn

    skip = set()
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) or any(part in exclude for part in name.split(".")):
            skip.update(id(p) for p in m.parameters())
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def measure_matmul(n: int, dtype: str, threads: int, min_seconds: float = 1.0) -> float:
    """FLOP/s of an ``n x n`` fp32/bf16 matmul on the CPU with ``threads`` torch threads (best of the repeats)."""
    return measure_gemms([(n, n, n)], dtype, threads, min_seconds)


def measure_gemms(gemms: Sequence[tuple[int, int, int]], dtype: str, threads: int, min_seconds: float = 1.0) -> float:
    """FLOP/s of running every ``(m, k, n)`` matmul ``[m, k] @ [k, n]`` of ``gemms`` once, fp32 or bf16, on the CPU
    with ``threads`` torch threads: total 2 m k n FLOPs over the fastest of the repeats."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(m, k, generator=gen).to(dt), torch.randn(k, n, generator=gen).to(dt)) for m, k, n in gemms]
    flops = sum(matmul_flop_count(*g) for g in gemms)
    for a, b in pairs:  # first calls: kernel selection / packing
        a @ b
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < min_seconds:
        t0 = time.perf_counter()
        for a, b in pairs:
            a @ b
        dt_s = time.perf_counter() - t0
        best, spent, runs = min(best, dt_s), spent + dt_s, runs + 1
    return flops / best


OP_CATEGORIES = (  # (category, op names); first match wins, anything else under aten:: is "other ops"
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")),
    ("dropout RNG", ("aten::bernoulli_", "aten::uniform_", "aten::random_", "aten::rand", "aten::rand_like",
                     "aten::native_dropout")),
    ("dtype casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("optimizer", ("aten::_fused_adamw_", "aten::_foreach_")),
    ("collectives", ("c10d::", "gloo:", "nccl:")),
)


def op_category(name: str) -> str:
    """Where a profiled op's time goes: ``matmul``, ``dropout RNG``, ``dtype casts``, ``optimizer``, ``collectives``,
    ``other ops`` (every other ATen op: attention softmax, layer norm, GELU, element-wise, reductions) or
    ``framework`` (record-function ranges such as autograd nodes or ``Optimizer.step#...``: Python and dispatch)."""
    for category, prefixes in OP_CATEGORIES:
        if any(name == p or (p.endswith(("_", ":")) and name.startswith(p)) for p in prefixes):
            return category
    return "other ops" if name.startswith("aten::") else "framework"


def profile_breakdown(events: Iterable[Any]) -> dict[str, float]:
    """Self CPU milliseconds per ``op_category`` from ``torch.profiler`` ``key_averages()`` events."""
    out: dict[str, float] = {}
    for e in events:
        cat = op_category(e.key)
        out[cat] = out.get(cat, 0.0) + e.self_cpu_time_total / 1000.0
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats with 3 significant digits, None as '-')."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "nan"
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    """CPU model, cores, the SIMD flags that matter for bf16, load average, torch version, threads."""
    import torch

    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "unknown CPU", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(simd) or 'n/a'}, load average {load}, "
            f"torch {torch.__version__}, {threads} torch thread(s) per process")
