#!/usr/bin/env python
"""GPU acceptance run: real-size, random-initialised models, measured on one CUDA device; one JSON of results.

Run it through ``scripts/gpu_check.sh``, which calls the stages in order with a hard timeout each:

* ``--stage prepare``: build, in ``--work``, an MPNet-base-shaped student (768-d, 12 layers, 12 heads, vocab 30527,
  mean pooling + Normalize, as all-mpnet-base-v2), a small Qwen2 teacher (512-d, 2 layers, last-token pooling +
  Normalize, the inf-retriever query prompt), the docstring training files of ``tests/tiny_data.py`` and a config
  ``e2e.yaml`` for a short two-phase run (``training.precision: auto``, a few steps per phase). Random init, local
  tokenizers (``tests/tiny_models.py``): nothing is downloaded.
* ``--stage bench`` (the default): on ``cuda:0``

  - the teacher: a Qwen2-7B-shaped decoder (3584-d, 28 layers, 28 heads, 4 KV heads, FFN 18944, vocab 152064) built
    directly on the GPU in bf16 with SDPA attention, ``inference_mode``; tokens/s and MFU on 32 x 512 tokens
    (``model.teacher_batch_size`` x ``max_length`` of configs/default.yaml), on 32-text batches of mixed lengths
    64-512 sorted by length (as the teacher cache fills) and on 64k-token batches of the same texts;
  - the student step of each phase at configs/default.yaml's batch shapes through the project's own code
    (``DistillModel`` + projection head, ``EmbeddingMSECosineLoss`` / ``RetrievalDistillLoss``, ``pad_chunks``,
    autocast from ``distill.hardware``, fused AdamW, gradient clipping, ``gradient_accumulation_steps``
    micro-batches per optimizer step): ms per optimizer step, samples/s, MFU and ``torch.cuda.max_memory_allocated``
    (reset per workload), at realistic lengths and at ``max_length`` (an out-of-memory there is a result, not a
    crash).
* ``--stage record``: merge the end-to-end run's exit status, wall time and log (the shell script runs
  ``torchrun train_ddp.py --config WORK/e2e.yaml``) into the JSON, and check that ``{run_dir}/final`` loads with
  ``SentenceTransformer`` and encodes.

FLOPs: teacher forward ``2 N T + 4 layers hidden sum len^2`` (N non-embedding parameters, T real tokens, len each
text's real length; attention counted in full, as PaLM's MFU does, though a causal kernel skips half), student
training ``6 N T + 12 layers hidden sum len^2`` (``benchmarks.common.training_flops``). MFU divides by the dense bf16
peak of the GPU's spec sheet when the name is known (H100, H200, A100, ...), else by a measured 8192^3 bf16 matmul;
the JSON says which, and always holds the measured matmul rate too.

Without CUDA this prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import gc
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO / "tests"), str(REPO)):  # tests/: the offline model and data builders
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks import common as C

NO_CUDA_LINE = "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to measure"

QWEN2_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 32768}
MPNET_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "vocab_size": 30527, "max_position_embeddings": 514}
E2E_TEACHER = {"hidden": 512, "layers": 2}  # tests/tiny_models.build_tiny_teacher: fast to save, load and run
# --tiny (CPU dry runs of this script only): the same code paths at toy size
TINY_TEACHER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 1024}
TINY_STUDENT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                "vocab_size": 1000, "max_position_embeddings": 514}
TINY_E2E_TEACHER = {"hidden": 64, "layers": 2}
TINY_OVERRIDES = ("phase1.batch_size=4", "phase1.max_length=64", "phase1.gradient_accumulation_steps=2",
                  "phase2.batch_size=2", "phase2.max_length=64", "phase2.num_negatives=3",
                  "phase2.gradient_accumulation_steps=2", "model.teacher_batch_size=8")

# (substrings of torch.cuda.get_device_name(), upper case; dense bf16 tensor-core FLOP/s, label): first match wins
PEAK_BF16: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H100", "PCIE"), 756e12, "H100 PCIe"),
    (("H100", "NVL"), 835e12, "H100 NVL"),
    (("H100",), 989e12, "H100 SXM"),
    (("H200", "NVL"), 835e12, "H200 NVL"),
    (("H200",), 989e12, "H200"),
    (("A100",), 312e12, "A100"),
    (("A800",), 312e12, "A800"),
    (("L40S",), 362e12, "L40S"),
)

QUERY_LENGTHS = (16, 48)  # realistic token lengths (uniform): queries
DOCUMENT_LENGTHS = (128, 256)  # passages
TEACHER_MIXED_LENGTHS = (64, 512)
TEACHER_TOKEN_BUDGET = 65536
FILL_LAYERS = 4  # the project-path fill runs Qwen2-7B-shaped layers, 4 of its 28


# --------------------------------------------------------------------------------------------------------------------
# Pure helpers (tests/test_gpu_check.py)
# --------------------------------------------------------------------------------------------------------------------


def spec_peak_bf16(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, label) of a GPU known by its ``torch.cuda.get_device_name()``, else None."""
    name = device_name.upper()
    for parts, peak, label in PEAK_BF16:
        if all(p in name for p in parts):
            return peak, label
    return None


def teacher_forward_flops(non_embedding_params: int, lengths: Sequence[int], layers: int, hidden: int) -> float:
    """Forward FLOPs of a decoder over texts of these real lengths: ``2 N T + 4 layers hidden sum len^2``
    (one third of :func:`benchmarks.common.training_flops`, which counts forward + backward)."""
    return C.training_flops(non_embedding_params, sum(lengths), layers=layers, hidden=hidden,
                            sum_sq_len=sum(n * n for n in lengths)) / 3.0


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / peak`` (None without a time or a peak)."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / peak


def e2e_config(work: Path, teacher: Path, student: Path, files: dict[str, Path], *, teacher_dim: int,
               student_dim: int, steps: int = 3) -> dict[str, Any]:
    """The short two-phase run: ``steps`` optimizer steps per phase, bf16 where the GPU has it (precision auto),
    evaluation at each phase end, a checkpoint mid-phase (so saving runs too)."""
    return {
        "model": {"teacher": str(teacher), "student": str(student), "teacher_dim": teacher_dim,
                  "student_dim": student_dim, "projection_hidden_dim": 2 * student_dim, "use_projection": True,
                  "teacher_batch_size": 32},
        "phase1": {"batch_size": 16, "learning_rate": 1.0e-4, "warmup_steps": 1, "num_epochs": 1, "max_length": 128,
                   "gradient_accumulation_steps": 2, "max_samples_per_dataset": None, "max_steps": steps},
        "phase2": {"batch_size": 8, "learning_rate": 5.0e-5, "warmup_steps": 1, "num_epochs": 1, "max_length": 128,
                   "num_negatives": 3, "gradient_accumulation_steps": 1, "max_samples": None, "max_steps": steps},
        "training": {"precision": "auto", "save_steps": 2, "logging_steps": 1, "dist_timeout_s": 300},
        "paths": {"output_dir": str(work / "out"), "artifacts_dir": str(work / "artifacts"), "cache_dir": None},
        "data": {"phase1": [{"name": "docs-p1", "path": str(files["phase1"]), "query_columns": ["query"],
                             "document_columns": ["positive"]}],
                 "phase2": [{"name": "docs-p2", "path": str(files["phase2"])}]},
        "eval": {"data": str(files["beir"]), "batch_size": 32},
    }


# --------------------------------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------------------------------


def build_student_folder(out_dir: Path, shape: dict[str, int]) -> Path:
    """A random-init MPNet of ``shape`` with the local lowercase WordPiece tokenizer of ``tests/tiny_models.py``
    (its few hundred ids are a subset of the vocabulary), saved as Transformer -> Pooling(mean) -> Normalize."""
    import shutil

    import torch
    from tiny_models import _atomic_build, _save_as_sentence_transformer, _student_tokenizer
    from transformers import MPNetConfig, MPNetModel

    def build(tmp: Path) -> None:
        tokenizer = _student_tokenizer("mpnet")
        tokenizer.model_max_length = shape["max_position_embeddings"] - 2  # MPNet positions start after the pad id
        config = MPNetConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2,
                             layer_norm_eps=1e-5)  # as all-mpnet-base-v2
        torch.manual_seed(0)
        hf_dir = tmp.parent / f"{tmp.name}.hf"
        try:
            MPNetModel(config).eval().save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            _save_as_sentence_transformer(hf_dir, tmp, "mean")
        finally:
            shutil.rmtree(hf_dir, ignore_errors=True)

    return _atomic_build(out_dir, build)


def build_teacher(shape: dict[str, int], device: Any, dtype: Any) -> Any:
    """A random-init ``Qwen2Model`` of ``shape`` allocated directly on ``device`` in ``dtype`` (no 28 GB fp32 copy on
    the host), SDPA attention, eval mode, no gradients."""
    import torch
    from tiny_models import default_dtype
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(**shape, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with default_dtype(dtype), torch.device(device):
        model = Qwen2Model(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _is_oom(e: BaseException) -> bool:
    import torch

    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def measure_matmul_peak(device: Any, n: int = 8192, iters: int = 50) -> float:
    """FLOP/s of an ``n x n`` bf16 matmul on ``device`` (CUDA events; CPU: ``benchmarks.common.measure_matmul``)."""
    import torch

    if device.type != "cuda":
        return C.measure_matmul(min(n, 1024), "bf16", torch.get_num_threads(), min_seconds=0.2)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000.0
    del a, b
    return 2.0 * n**3 * iters / seconds


def _random_batch(lengths: Sequence[int], vocab: int, device: Any, gen: Any) -> tuple[Any, Any]:
    """Right-padded random token ids [b, longest] and their 0/1 attention mask."""
    import torch

    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------------------------


def teacher_workloads(max_length: int, batch_texts: int, tiny: bool) -> dict[str, list[list[int]]]:
    """name -> list of batches, each a list of real lengths."""
    import numpy as np

    from distill.batches import token_budget_batches

    rng = random.Random(0)
    n_texts = 64 if tiny else 512
    lo, hi = TEACHER_MIXED_LENGTHS
    lo, hi = min(lo, max_length // 4), min(hi, max_length)
    mixed = [rng.randint(lo, hi) for _ in range(n_texts)]
    budget = 4096 if tiny else TEACHER_TOKEN_BUDGET
    sorted_batches = token_budget_batches(np.array(mixed), batch_texts)  # the teacher cache's own batching
    budget_batches = token_budget_batches(np.array(mixed), len(mixed), budget)
    return {
        f"fixed_{batch_texts}x{max_length}": [[max_length] * batch_texts for _ in range(2 if tiny else 4)],
        f"sorted_{batch_texts}_mixed_{lo}_{hi}": [[mixed[i] for i in b] for b in sorted_batches],
        f"token_budget_{budget}_mixed_{lo}_{hi}": [[mixed[i] for i in b] for b in budget_batches],
    }


def bench_teacher(device: Any, shape: dict[str, int], workloads: dict[str, list[list[int]]], peak: float | None,
                  repeats: int) -> dict[str, Any]:
    import torch

    _reset_peak(device)
    t0 = time.perf_counter()
    model = build_teacher(shape, device, torch.bfloat16)
    _sync(device)
    out: dict[str, Any] = {
        "shape": shape, "dtype": "bfloat16", "build_s": round(time.perf_counter() - t0, 2),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "params": sum(p.numel() for p in model.parameters()),
        "non_embedding_params": C.non_embedding_params(model),
        "flops_formula": "2 N T + 4 layers hidden sum(len^2)", "workloads": {},
    }
    n, layers, hidden = out["non_embedding_params"], shape["num_hidden_layers"], shape["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    for name, batches in workloads.items():
        _reset_peak(device)
        inputs = [_random_batch(b, shape["vocab_size"], device, gen) for b in batches]

        try:
            _teacher_pass(model, inputs)  # warm-up: every batch shape once (kernel selection, allocator)
            _sync(device)
            t1 = time.perf_counter()
            for _ in range(repeats):
                _teacher_pass(model, inputs)
            _sync(device)
            seconds = (time.perf_counter() - t1) / repeats
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            out["workloads"][name] = {"oom": True, "error": str(e).splitlines()[0][:300]}
            continue
        finally:
            del inputs
        lengths = [x for b in batches for x in b]
        real, padded = sum(lengths), sum(len(b) * max(b) for b in batches)
        flops = teacher_forward_flops(n, lengths, layers, hidden)
        out["workloads"][name] = {
            "texts": len(lengths), "batches": len(batches), "real_tokens": real, "padded_tokens": padded,
            "seconds": round(seconds, 4), "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
            "texts_per_s": len(lengths) / seconds, "tflops_per_s": flops / seconds / 1e12,
            "mfu": mfu(flops, seconds, peak), "peak_memory_gib": _peak_gib(device),
        }
        print(f"gpu_check: teacher {name}: {real / seconds:,.0f} tokens/s, MFU "
              f"{(out['workloads'][name]['mfu'] or 0):.1%}", flush=True)
    return out


def _teacher_pass(model: Any, inputs: list[tuple[Any, Any]]) -> None:
    """The teacher cache's work on each batch: forward, last-token pooling, L2 normalisation."""
    import torch

    from distill.models import pool

    with torch.inference_mode():
        for ids, mask in inputs:
            hidden_states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.nn.functional.normalize(pool(hidden_states.float(), mask, "last_token"), dim=-1)


def bench_teacher_fill(device: Any, work: Path, shape: dict[str, int], layers: int, cfg: Any, peak: float | None,
                       n_texts: int) -> dict[str, Any]:
    """The project's own cache fill (``TeacherCache.fill`` over ``LazyTeacher``: tokenisation on a background thread,
    forward, one read-back per shard, sha256 + fsync shard writes) on a teacher with ``shape``'s layers, ``layers`` of
    them (per-layer work is the whole model's; the folder is a few GB, not 15), over real text
    (:func:`benchmarks.common.docstrings` of the loaded modules, document role, ``cfg.phase1.max_length``). Each way is
    timed against the forward alone over the same batches: ``fill_efficiency`` = forward-only s / fill s (1.0:
    tokenisation and writes fully hidden)."""
    import numpy as np
    import torch
    from tiny_models import build_tiny_teacher

    from distill.batches import token_budget_batches as budget_batches
    from distill.models import resolve_teacher_spec
    from distill.teacher_cache import TeacherCache
    from distill.teacher_targets import LazyTeacher

    fill_shape = {k: shape[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size")} | {"num_hidden_layers": layers}
    folder = work / "fill_teacher"
    t0 = time.perf_counter()
    if not (folder / "modules.json").is_file():
        build_tiny_teacher(folder, shape=fill_shape, device=device, dtype=torch.bfloat16)
    _reset_peak(device)
    max_length = cfg.phase1.max_length
    spec = resolve_teacher_spec(str(folder), max_length=max_length, dtype="bfloat16", device=device)
    teacher = LazyTeacher(spec, device, cfg.model.teacher_attn_implementation)
    encoder = teacher.load()
    role = "document"
    texts = C.docstrings(n_texts)
    lengths = encoder.lengths(texts, role)
    net = encoder.st if encoder.st is not None else encoder.model
    n = C.non_embedding_params(net)
    flops = teacher_forward_flops(n, lengths.tolist(), layers, shape["hidden_size"])
    out: dict[str, Any] = {
        "shape": fill_shape, "of_layers": shape["num_hidden_layers"], "build_and_load_s": None,
        "texts": len(texts), "real_tokens": int(lengths.sum()), "mean_tokens": float(lengths.mean()),
        "max_length": max_length, "non_embedding_params": n, "ways": {},
        "tokenizer": "the tests' 500-token BPE (more tokens per text than Qwen2's; lengths capped at max_length)",
    }
    warm = texts[: min(256, len(texts))]
    TeacherCache(work / "fill_cache_warmup", dtype="float16").fill("warm", warm, teacher.encode_fn(role), 32,
                                                                   progress=False)
    _sync(device)
    out["build_and_load_s"] = round(time.perf_counter() - t0, 1)
    rows = cfg.model.teacher_batch_size
    ways = {f"rows_{rows}": (rows, None), f"budget_{TEACHER_TOKEN_BUDGET}": (256, TEACHER_TOKEN_BUDGET)}
    for name, (batch_size, max_tokens) in ways.items():
        batches = budget_batches(lengths, batch_size, max_tokens)
        feats = [{k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in encoder.prepare([texts[i] for i in b], role).items()} for b in batches]
        try:
            for f in feats:  # warm-up over every batch shape (kernel choice, allocator), for the fill below too
                encoder.forward(f)
            _sync(device)
            t1 = time.perf_counter()
            for f in feats:
                encoder.forward(f)
            _sync(device)
            forward_s = time.perf_counter() - t1
            del feats
            root = work / f"fill_cache_{name}"
            shutil.rmtree(root, ignore_errors=True)
            cache = TeacherCache(root, dtype="float16")
            t1 = time.perf_counter()
            cache.fill("bench", texts, teacher.encode_fn(role), batch_size, progress=False, max_tokens=max_tokens)
            fill_s = time.perf_counter() - t1
            stored = cache.lookup("bench", texts)[np.arange(len(texts))]
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            out["ways"][name] = {"oom": True, "error": str(e).splitlines()[0][:300]}
            continue
        real, padded = int(lengths.sum()), int(sum(len(b) * lengths[b].max() for b in batches))
        out["ways"][name] = {
            "batch_size": batch_size, "max_tokens": max_tokens, "batches": len(batches),
            "padding_efficiency": real / padded, "forward_only_s": round(forward_s, 3), "fill_s": round(fill_s, 3),
            "fill_efficiency": forward_s / fill_s, "tokens_per_s": real / fill_s,
            "mfu_forward_only": mfu(flops, forward_s, peak), "mfu_fill": mfu(flops, fill_s, peak),
            "stored_finite": bool(torch.as_tensor(stored).isfinite().all()), "peak_memory_gib": _peak_gib(device),
        }
        # All layers: forward x of_layers / layers, the fill's extra time (tokenisation, read-back, writes) as measured
        scale = shape["num_hidden_layers"] / layers
        full_s = forward_s * scale + max(fill_s - forward_s, 0.0)
        out["ways"][name]["projected_all_layers"] = {
            "assumes": "forward time scales with layers; the fill's extra time stays as measured (not overlapped)",
            "fill_efficiency": forward_s * scale / full_s, "mfu_fill": mfu(flops * scale, full_s, peak)}
        w = out["ways"][name]
        print(f"gpu_check: teacher fill {name}: {w['tokens_per_s']:,.0f} tokens/s, MFU {(w['mfu_fill'] or 0):.1%} "
              f"(forward alone {(w['mfu_forward_only'] or 0):.1%}; all {shape['num_hidden_layers']} layers projected "
              f"{(w['projected_all_layers']['mfu_fill'] or 0):.1%}), padding efficiency {w['padding_efficiency']:.0%}",
              flush=True)
    teacher.release()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Student
# --------------------------------------------------------------------------------------------------------------------


def _lengths(rng: random.Random, n: int, span: tuple[int, int], cap: int) -> list[int]:
    return [min(cap, rng.randint(*span)) for _ in range(n)]


def student_workloads(cfg: Any, tiny: bool) -> dict[int, dict[str, dict[str, Any]]]:
    """phase -> name -> {queries: lengths, documents: lengths} at configs/default.yaml's batch shapes."""
    rng = random.Random(0)
    p1, p2 = cfg.phase1, cfg.phase2
    b1, b2, docs = p1.batch_size, p2.batch_size, p2.batch_size * (1 + p2.num_negatives)
    qspan = (4, 12) if tiny else QUERY_LENGTHS
    dspan = (16, 48) if tiny else DOCUMENT_LENGTHS
    return {
        1: {
            "queries": {"queries": _lengths(rng, b1, qspan, p1.max_length), "documents": []},
            "documents": {"queries": [], "documents": _lengths(rng, b1, dspan, p1.max_length)},
            f"max_length_{p1.max_length}": {"queries": [], "documents": [p1.max_length] * b1},
        },
        2: {
            "realistic": {"queries": _lengths(rng, b2, qspan, p2.max_length),
                          "documents": _lengths(rng, docs, dspan, p2.max_length)},
            f"max_length_{p2.max_length}": {"queries": [p2.max_length] * b2, "documents": [p2.max_length] * docs},
        },
    }


def bench_student(device: Any, student_dir: Path, cfg: Any, peak: float | None, steps: int,
                  tiny: bool = False) -> dict[str, Any]:
    """Optimizer steps (``gradient_accumulation_steps`` forward + backward micro-batches, clip, AdamW) per workload."""
    import torch

    from distill.batches import pad_chunks
    from distill.hardware import resolve_precision
    from distill.losses import EmbeddingMSECosineLoss, RetrievalDistillLoss
    from distill.models import DistillModel, backbone, build_projection_head, load_student

    m = cfg.model
    student = load_student(str(student_dir), device=device)
    bb = backbone(student)
    head = build_projection_head(int(student.get_embedding_dimension()), m.projection_hidden_dim, m.teacher_dim, 0)
    model = DistillModel(student, head).to(device).train()
    precision = resolve_precision(cfg.training.precision, device)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    shape = {k: getattr(bb.config, k) for k in MPNET_BASE}
    n, layers, hidden = C.non_embedding_params(bb, exclude=("pooler",)), shape["num_hidden_layers"], shape["hidden_size"]
    out: dict[str, Any] = {
        "shape": shape, "precision": precision, "attn_implementation": getattr(bb.config, "_attn_implementation", None),
        "non_embedding_params": n, "head": [int(student.get_embedding_dimension()), m.projection_hidden_dim,
                                             m.teacher_dim],
        "flops_formula": "6 N T + 12 layers hidden sum(len^2) (head left out)", "steps_timed": steps,
    }
    pad_id = student.tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(0)
    loss1 = EmbeddingMSECosineLoss(cfg.phase1.mse_weight, cfg.phase1.cosine_weight)
    p2 = cfg.phase2
    loss2 = RetrievalDistillLoss(p2.temperature, p2.infonce_weight, p2.mse_weight, gather=False,
                                 documents=p2.infonce_documents)

    def tokens(lengths: list[int]) -> list[list[int]]:
        return [torch.randint(3, shape["vocab_size"], (k,), generator=gen).tolist() for k in lengths]

    for phase, workloads in student_workloads(cfg, tiny).items():
        pcfg = cfg.phase(phase)
        accum = pcfg.gradient_accumulation_steps
        out[f"phase{phase}"] = {}
        for name, spec in workloads.items():
            q_len, d_len = spec["queries"], spec["documents"]
            texts = q_len + d_len
            chunk = pcfg.batch_size  # the trainer's chunk: a micro-batch's examples (phase 2: queries, then documents)
            if phase == 1:
                enc = pad_chunks(tokens(texts), pad_id, len(texts), device, cap=pcfg.max_length)
                target = torch.nn.functional.normalize(torch.randn(len(texts), m.teacher_dim, device=device), dim=-1)

                micro = functools.partial(_phase1_loss, model, loss1, enc, target, device, precision)
                encs = [enc]
            else:
                qe = pad_chunks(tokens(q_len), pad_id, chunk, device, cap=pcfg.max_length)
                de = pad_chunks(tokens(d_len), pad_id, chunk, device, cap=pcfg.max_length)
                tq = torch.nn.functional.normalize(torch.randn(len(q_len), m.teacher_dim, device=device), dim=-1)
                td = torch.nn.functional.normalize(torch.randn(len(d_len), m.teacher_dim, device=device), dim=-1)
                doc_ids = torch.arange(len(d_len), device=device)

                micro = functools.partial(_phase2_loss, model, loss2, qe, de, tq, td, doc_ids, device, precision)
                encs = [qe, de]
            real = sum(e.real_tokens for e in encs)
            padded = sum(e.padded_tokens for e in encs)
            _reset_peak(device)
            try:
                seconds = _time_steps(micro, model, opt, scaler, accum, pcfg.max_grad_norm, device, steps)
            except RuntimeError as e:
                if not _is_oom(e):
                    raise
                result = {"oom": True, "error": str(e).splitlines()[0][:300], "peak_memory_gib": _peak_gib(device)}
            else:
                flops = accum * C.training_flops(n, real, layers=layers, hidden=hidden,
                                                 sum_sq_len=sum(k * k for k in texts))
                samples = accum * pcfg.batch_size
                result = {
                    "micro_batch": {"examples": pcfg.batch_size, "texts": len(texts), "queries": len(q_len),
                                    "documents": len(d_len), "real_tokens": real, "padded_tokens": padded},
                    "gradient_accumulation_steps": accum, "ms_per_step": seconds * 1000,
                    "ms_per_micro_batch": seconds * 1000 / accum, "samples_per_s": samples / seconds,
                    "texts_per_s": accum * len(texts) / seconds, "tokens_per_s": accum * real / seconds,
                    "tflops_per_s": flops / seconds / 1e12, "mfu": mfu(flops, seconds, peak),
                    "peak_memory_gib": _peak_gib(device),
                }
            opt.zero_grad(set_to_none=True)
            del micro, encs
            _reset_peak(device)
            out[f"phase{phase}"][name] = result
            if result.get("oom"):
                print(f"gpu_check: student phase {phase} {name}: out of memory", flush=True)
            else:
                print(f"gpu_check: student phase {phase} {name}: {result['ms_per_step']:.0f} ms/step, MFU "
                      f"{(result['mfu'] or 0):.1%}, peak {result['peak_memory_gib'] or 0:.1f} GiB", flush=True)
    return out


def _phase1_loss(model: Any, loss_fn: Any, enc: Any, target: Any, device: Any, precision: str) -> Any:
    """As ``distill.batches.Phase1Task.loss``: one forward over the chunks, restored to input order."""
    from distill.hardware import autocast

    with autocast(device, precision):
        emb = model(enc.chunks)[enc.restore]
    return loss_fn(emb.float(), target)[0]


def _phase2_loss(model: Any, loss_fn: Any, qe: Any, de: Any, tq: Any, td: Any, doc_ids: Any, device: Any,
                 precision: str) -> Any:
    """As ``distill.batches.Phase2Task.loss``: queries then documents in one forward."""
    from distill.hardware import autocast

    b = tq.shape[0]
    with autocast(device, precision):
        emb = model(qe.chunks + de.chunks)
    return loss_fn(emb[:b][qe.restore].float(), emb[b:][de.restore].float(), doc_ids, tq, td)[0]


def _time_steps(micro: Callable[[], Any], model: Any, opt: Any, scaler: Any, accum: int, max_grad_norm: float,
                device: Any, steps: int) -> float:
    """Seconds per optimizer step: one warm-up step, then ``steps`` timed ones."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for _ in range(accum):
            scaler.scale(micro() / accum).backward()
        scaler.unscale_(opt)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------


def _paths(work: Path) -> dict[str, Path]:
    return {"teacher": work / "teacher", "student": work / "student", "data": work / "data",
            "config": work / "e2e.yaml"}


def prepare(work: Path, tiny: bool) -> Path:
    """Models, data and the end-to-end config in ``work``; returns the config path."""
    import yaml
    from tiny_data import write_training_files
    from tiny_models import build_tiny_teacher

    from distill.config import load_config

    p = _paths(work)
    work.mkdir(parents=True, exist_ok=True)
    t = TINY_E2E_TEACHER if tiny else E2E_TEACHER
    student_shape = TINY_STUDENT if tiny else MPNET_BASE
    if not (p["teacher"] / "modules.json").is_file():
        build_tiny_teacher(p["teacher"], hidden=t["hidden"], layers=t["layers"])
    if not (p["student"] / "modules.json").is_file():
        build_student_folder(p["student"], student_shape)
    files = write_training_files(p["data"], num_negatives=3)
    raw = e2e_config(work, p["teacher"], p["student"], files, teacher_dim=t["hidden"],
                     student_dim=student_shape["hidden_size"])
    p["config"].write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_config(p["config"])  # fails here, not under torchrun, if the config is wrong
    return p["config"]


def _versions() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for mod in ("transformers", "sentence_transformers", "tokenizers", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a version string is informative, never fatal
            out[mod] = f"unavailable: {e}"
    return out


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {"name": platform.processor() or platform.machine(), "type": "cpu"}
    prop = torch.cuda.get_device_properties(device)
    return {"name": torch.cuda.get_device_name(device), "type": "cuda", "count": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_gib": round(prop.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported()}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


BENCH_PARTS = ("teacher", "teacher_fill", "student")


def bench(out_path: Path, work: Path, device: Any, tiny: bool, only: Sequence[str] = BENCH_PARTS) -> int:
    """Teacher and student measurements into ``out_path`` (rewritten after each part, so a timeout keeps the rest);
    ``only``: the parts to run (all by default)."""
    import torch

    from distill.config import load_config

    student_dir = _paths(work)["student"]
    if "student" in only and not (student_dir / "modules.json").is_file():
        build_student_folder(student_dir, TINY_STUDENT if tiny else MPNET_BASE)
    cfg = load_config(REPO / "configs" / "default.yaml", TINY_OVERRIDES if tiny else ())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result: dict[str, Any] = {
        "schema": "distill-gpu-check/1", "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(device), "versions": _versions(), "tiny": tiny, "errors": {},
    }
    measured = measure_matmul_peak(device)
    spec = spec_peak_bf16(result["device"]["name"]) if device.type == "cuda" else None
    result["peak"] = {"flops": spec[0] if spec else measured,
                      "source": f"spec sheet, {spec[1]} dense bf16" if spec else "measured: 8192^3 bf16 matmul",
                      "measured_matmul_flops": measured}
    peak = result["peak"]["flops"]
    print(f"gpu_check: {result['device']['name']}: peak {peak / 1e12:.0f} TFLOP/s ({result['peak']['source']}), "
          f"bf16 matmul measured {measured / 1e12:.0f} TFLOP/s", flush=True)
    write_json(out_path, result)
    failed = False
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("teacher", lambda: bench_teacher(device, TINY_TEACHER if tiny else QWEN2_7B,
                                          teacher_workloads(cfg.phase1.max_length,
                                                            cfg.model.teacher_batch_size, tiny),
                                          peak, repeats=1 if tiny else 2)),
        ("teacher_fill", lambda: bench_teacher_fill(device, work, TINY_TEACHER if tiny else QWEN2_7B,
                                                    2 if tiny else FILL_LAYERS, cfg, peak, 200 if tiny else 6000)),
        ("student", lambda: bench_student(device, student_dir, cfg, peak, steps=1 if tiny else 3, tiny=tiny)),
    ]
    for name, fn in parts:
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - record it, go on with the next part, fail at the end
            import traceback

            failed = True
            result["errors"][name] = traceback.format_exc()[-3000:]
            print(f"gpu_check: {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr, flush=True)
        _reset_peak(device)  # the part's model, optimizer and cached blocks go before the next part
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        write_json(out_path, result)
    return 1 if failed else 0


def record(out_path: Path, work: Path, device: Any, rc: int, wall: float, nproc: int, log: Path | None) -> int:
    """Merge the end-to-end run into ``out_path``; 0 when it exited 0 and its final model loads and encodes."""
    from distill.config import load_config

    result = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else {"errors": {}}
    cfg = load_config(_paths(work)["config"])
    final = cfg.run_dir / "final"
    e2e: dict[str, Any] = {"rc": rc, "wall_s": round(wall, 1), "nproc_per_node": nproc,
                           "backend": "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo",
                           "config": {k: dataclasses.asdict(getattr(cfg, k)) for k in ("phase1", "phase2")},
                           "log": str(log) if log else None, "final": str(final)}
    metrics = cfg.run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = C.read_train_records(metrics)
        e2e["last_train_record"] = {ph: next((r for r in reversed(records) if r.get("phase") == ph), None)
                                    for ph in sorted({r.get("phase") for r in records})}
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(final), device=str(device))
        emb = model.encode(["what is a context manager?", "Return a new path."], convert_to_tensor=True)
        e2e.update(final_loads=True, final_dim=int(emb.shape[-1]), final_finite=bool(emb.isfinite().all()))
    except Exception as e:  # noqa: BLE001 - the result says why
        e2e.update(final_loads=False, final_error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    e2e["final_dim_expected"] = cfg.model.output_dim
    e2e["ok"] = (rc == 0 and bool(e2e.get("final_loads")) and bool(e2e.get("final_finite"))
                 and e2e.get("final_dim") == cfg.model.output_dim)
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log and log.is_file() else []
    e2e["precision_line"] = next((ln.split("INFO", 1)[-1].strip() for ln in lines if "training.precision" in ln), None)
    if lines and not e2e["ok"]:
        e2e["log_tail"] = lines[-40:]
    result["e2e"] = e2e
    write_json(out_path, result)
    print(f"gpu_check: end-to-end ({nproc} rank(s)): rc {rc}, {wall:.0f} s, final model "
          f"{'loads' if e2e.get('final_loads') else 'does NOT load'}", flush=True)
    return 0 if e2e["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check.json", help="the JSON of results")
    ap.add_argument("--work", type=Path, default=None, help="folder for the built models, data and run "
                    "(default: a new temporary folder)")
    ap.add_argument("--stage", choices=("prepare", "bench", "record"), default="bench")
    ap.add_argument("--parts", default=",".join(BENCH_PARTS),
                    help=f"bench: comma-separated parts to run (default: all of {', '.join(BENCH_PARTS)})")
    ap.add_argument("--e2e-rc", type=int, default=None, help="record: the end-to-end run's exit status")
    ap.add_argument("--e2e-wall", type=float, default=0.0, help="record: its wall time in seconds")
    ap.add_argument("--e2e-nproc", type=int, default=1, help="record: its ranks")
    ap.add_argument("--e2e-log", type=Path, default=None, help="record: its log")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # dry runs of the code paths on CPU
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy shapes (with --allow-cpu)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(NO_CUDA_LINE)
        return 0
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    work = args.work.resolve()
    if args.stage == "prepare":
        print(prepare(work, args.tiny))
        return 0
    if args.stage == "record":
        if args.e2e_rc is None:
            ap.error("--stage record needs --e2e-rc")
        return record(args.out, work, device, args.e2e_rc, args.e2e_wall, args.e2e_nproc, args.e2e_log)
    only = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(only) - set(BENCH_PARTS)):
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(BENCH_PARTS)}")
    return bench(args.out, work, device, args.tiny, only)


if __name__ == "__main__":
    sys.exit(main())
