#!/usr/bin/env python
"""This project's trainer against a plain sentence-transformers ``SentenceTransformerTrainer``, same work, one run.

Workload (``configs/cpu_demo.yaml`` at reduced size): student all-MiniLM-L6-v2 with a projection head
384 -> 768 (GELU) -> 768, teacher all-mpnet-base-v2 (targets precomputed into the teacher cache first, outside
the timing), the same examples, batch sizes and optimizer steps on both sides:

* phase 1: distil the teacher's embedding of each text. Ours: ``0.4 MSE + 0.6 (1 - cos)``, length-grouped
  batches; ST: ``MSELoss`` on a ``label`` column, the same head added as two ``Dense`` modules, random batches.
* phase 2: InfoNCE with 7 hard negatives at t = 0.02. Ours: ``RetrievalDistillLoss`` (+ 0.2 MSE to the teacher);
  ST: ``MultipleNegativesRankingLoss(scale=1/t)`` over ``(anchor, positive, negative_1..7)`` columns.

Every configuration runs in its own subprocess (``--worker``) with the same torch thread count, so peak RSS is
per configuration. Inside a worker a forward pre-hook on the student's ``Transformer`` module counts the real and
padded tokens of every training forward (grad enabled, train mode), identically for both trainers; the timing
window is the training loop only (ours: ``Trainer._loop``; ST: ``on_train_begin`` .. ``on_train_end``).

Reported per configuration and phase: samples/s, texts/s, padding efficiency = real / padded tokens, teacher
forward passes, peak RSS, and achieved FLOP/s = (6 N T + 12 layers hidden sum len^2) / s (N = student
non-embedding parameters, T = real tokens, len = each text's real length: attention's term) against two rates
measured in the same run with the same threads: the fp32 / bf16 ``2048 x 2048`` matmul (after every round of the
trainings and at the end; the fastest of these is the peak), and the student's own linear-layer matmuls (forward,
input and weight gradients) at the token rows per forward of the row.
Also the first optimizer step's time (allocations, kernel selection, compilation) and samples/s after it.

Our configurations run with ``training.cpu_tuning=true``, as the CPU demo does (on CPU: the faster dropout masks of
``distill/hardware.py``): fp32, bf16, bf16 with GradCache, fp32 / bf16 with ``training.compile``, and (not by default)
fp32 / bf16 with ``training.cpu_tuning=false``, i.e. torch's own ``bernoulli_`` dropout (``-bernoulli``). The
teacher's dtype is pinned to what ``auto`` gives with the tuning on, so every configuration reads the same cached
targets. Every row also gives the minor page faults per optimizer step. ``--profile`` runs each uncompiled one once
more under ``torch.profiler`` and prints the share of its loop time per kind of op. ``--set`` adds config overrides to
every configuration (e.g. other models' dimensions).

    python benchmarks/bench_trainer.py                       # ~8 min on 2 cores
    python benchmarks/bench_trainer.py --max-train 256 --steps1 8 --steps2 6 --repeats 2 --profile --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402


class Variant(NamedTuple):
    system: str  # "ours" or "st"
    precision: str  # "fp32" or "bf16"
    cached_infonce: bool  # phase2.cached_infonce
    compile: bool  # training.compile
    cpu_tuning: bool = True  # training.cpu_tuning (ours); ST always runs torch's own dropout


VARIANTS = {
    "ours-fp32": Variant("ours", "fp32", False, False),
    "ours-bf16": Variant("ours", "bf16", False, False),
    "ours-bf16-cached": Variant("ours", "bf16", True, False),
    "ours-fp32-compile": Variant("ours", "fp32", False, True),
    "ours-bf16-compile": Variant("ours", "bf16", False, True),
    "ours-fp32-bernoulli": Variant("ours", "fp32", False, False, cpu_tuning=False),
    "ours-bf16-bernoulli": Variant("ours", "bf16", False, False, cpu_tuning=False),
    "st-fp32": Variant("st", "fp32", False, False, cpu_tuning=False),
    "st-bf16": Variant("st", "bf16", False, False, cpu_tuning=False),
}
DEFAULT_VARIANTS = "ours-fp32,st-fp32,ours-bf16,st-bf16,ours-bf16-cached,ours-fp32-compile,ours-bf16-compile"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-train", type=int, default=32, help="training rows of the demo data (default 32)")
    p.add_argument("--steps1", type=int, default=4, help="phase-1 optimizer steps (default 4)")
    p.add_argument("--steps2", type=int, default=3, help="phase-2 optimizer steps (default 3)")
    p.add_argument("--batch1", type=int, default=32, help="phase-1 batch size (default 32, as cpu_demo.yaml)")
    p.add_argument("--batch2", type=int, default=8, help="phase-2 batch size (default 8; cpu_demo.yaml has 16)")
    p.add_argument("--mini-batch", type=int, default=32, help="phase2.mini_batch_size of the cached variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every configuration (default: cores)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every configuration this many times, interleaved, and keep the fastest (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="also run each of our configurations once more under torch.profiler and print where its "
                        "loop time goes (matmul, dropout RNG, casts, optimizer, other ops); not used for the table")
    p.add_argument("--malloc", choices=list(C.MALLOCS), default="glibc",
                   help="memory allocator of every configuration: glibc's own, or tcmalloc / jemalloc preloaded "
                        "(as torch.backends.xeon.run_cpu does); default glibc")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul of the peak (default 2048)")
    p.add_argument("--models-dir", type=Path, default=C.DEFAULT_MODELS)
    p.add_argument("--workdir", type=Path, default=C.REPO / "runs" / "bench_trainer")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every configuration, after the benchmark's own; repeatable")
    p.add_argument("--worker", choices=["ours", "st", "matmul"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown or 'empty'}; choose from {', '.join(VARIANTS)}")
    args.variants = variants
    for name in ("max_train", "steps1", "steps2", "batch1", "batch2", "mini_batch", "matmul_n", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    return args


def pinned_teacher_dtype() -> str:
    """``model.teacher_dtype: auto`` as a run with ``training.cpu_tuning`` resolves it on this machine, pinned for
    every configuration: the teacher cache is keyed by dtype, and the warm-up fills it once for all of them."""
    import torch

    from distill.hardware import teacher_dtype

    return teacher_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"), cpu_tuning=True)


def run_sets(args: argparse.Namespace, work: Path, name: str) -> list[str]:
    """``--set`` items of one configuration: same data, batches, steps, threads and teacher dtype; its own output
    folder; then the user's ``--set`` items."""
    variant = VARIANTS.get(name, Variant("ours", "bf16", False, False))
    return [f"phase1.batch_size={args.batch1}", f"phase2.batch_size={args.batch2}",
            f"phase1.max_steps={args.steps1}", f"phase2.max_steps={args.steps2}",
            "phase1.num_epochs=1000", "phase2.num_epochs=1000",  # max_steps decides
            "phase1.head_only_fraction=0",  # every step trains the whole student, as ST does
            f"training.num_threads={args.threads}", f"training.precision={variant.precision}",
            f"phase2.cached_infonce={'true' if variant.cached_infonce else 'false'}",
            f"phase2.mini_batch_size={args.mini_batch}", f"training.compile={'true' if variant.compile else 'false'}",
            f"training.cpu_tuning={'true' if variant.cpu_tuning else 'false'}",
            f"model.teacher_dtype={pinned_teacher_dtype()}",
            f"paths.output_dir={work / 'runs' / name}", f"paths.cache_dir={work / 'cache'}", *args.overrides]


# --------------------------------------------------------------------------------------------------------------------
# Measurement inside a worker
# --------------------------------------------------------------------------------------------------------------------


def minor_page_faults() -> int:
    """Minor page faults of this process so far: first touches of fresh pages (getrusage's ru_minflt)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class TokenCounter:
    """Counts real / padded tokens and rows of the student's training forwards while a phase window is open.

    A global forward pre-hook sees every module call; it counts only sentence-transformers ``Transformer`` modules
    in train mode with gradients enabled, so the teacher (eval, inference mode) and GradCache's no-grad first pass
    are left out and every trained token is counted once.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.t0 = 0.0
        self.phases: dict[str, dict[str, Any]] = {}
        self.non_embedding_params: int | None = None
        self.shape: dict[str, int] | None = None  # layers, hidden, intermediate of the student's encoder
        self._handle = None

    def install(self) -> None:
        import torch
        from sentence_transformers.base.modules.transformer import Transformer

        def hook(module, args):
            if self.phase is None or not isinstance(module, Transformer) or not module.training:
                return
            if not torch.is_grad_enabled():
                return
            mask = args[0]["attention_mask"]
            rec = self.phases[self.phase]
            lengths = mask.sum(dim=1)
            rec["real_tokens"] += int(lengths.sum())
            rec["sq_tokens"] += int((lengths * lengths).sum())  # attention's FLOPs grow with each length^2
            rec["padded_tokens"] += int(mask.numel())
            rec["rows"] += int(mask.shape[0])
            rec["forwards"] += 1
            if self.non_embedding_params is None:
                self.non_embedding_params = C.non_embedding_params(module.auto_model, exclude=("pooler",))
                cfg = module.auto_model.config
                self.shape = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                              "intermediate": cfg.intermediate_size}

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)

    def uninstall(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def begin(self, phase: str) -> None:
        self.phases[phase] = {"real_tokens": 0, "sq_tokens": 0, "padded_tokens": 0, "rows": 0, "forwards": 0,
                              "first_step_s": None, "minor_faults": -minor_page_faults()}
        self.phase, self.t0 = phase, time.perf_counter()

    def step_done(self) -> None:
        """Marks an optimizer step's end; the first one splits off warm-up (allocation, compilation)."""
        rec = self.phases.get(self.phase) if self.phase else None
        if rec is not None and rec["first_step_s"] is None:
            rec["first_step_s"] = time.perf_counter() - self.t0

    def end(self, steps: int, samples: int) -> None:
        rec = self.phases[self.phase]
        rec.update(loop_s=time.perf_counter() - self.t0, steps=steps, samples=samples)
        rec["minor_faults"] += minor_page_faults()
        self.phase = None


def cuda_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """This project's trainer in this process (as ``train_ddp.py`` runs it), its loop timed and its tokens counted."""
    import distill.trainer as T
    from distill.cli import train_main

    counter = TokenCounter()
    counter.install()
    original_loop = T.Trainer._loop

    def timed_loop(trainer, run) -> None:
        prof = None
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU])
        counter.begin(run.name)
        samples0 = run.state.samples_seen
        try:
            with prof if prof is not None else contextlib.nullcontext():
                original_loop(trainer, run)
        finally:
            counter.end(run.state.step, run.state.samples_seen - samples0)
        if prof is not None:
            events = prof.key_averages()
            counter.phases[run.name]["profile_ms"] = C.profile_breakdown(events)
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
            counter.phases[run.name]["profile_top_ms"] = [(e.key, e.self_cpu_time_total / 1000.0) for e in top]

    original_step = T.Trainer._optimizer_step

    def counted_step(trainer, run, **kw) -> None:
        original_step(trainer, run, **kw)
        counter.step_done()

    T.Trainer._loop = timed_loop
    T.Trainer._optimizer_step = counted_step
    argv = ["--config", spec["config"], "--overwrite", "--log-level", "WARNING"]
    for item in spec["sets"]:
        argv += ["--set", item]
    if train_main(argv) != 0:
        raise SystemExit("training failed (see the log above)")
    from distill.config import load_config

    cfg = load_config(spec["config"], spec["sets"])
    summary = C.read_summary(cfg.run_dir)
    records = C.read_train_records(cfg.run_dir / "metrics.jsonl")
    for phase, rec in counter.phases.items():
        rec["teacher_passes"] = int(summary["teacher_forward_passes"].get(phase, 0))
        rec["padding_reported"] = summary.get("padding_efficiency", {}).get(phase)
        logged = C.loop_stats(records, phase)
        rec["metrics_elapsed_s"] = logged.elapsed_s if logged else None
    return {"phases": counter.phases, "non_embedding_params": counter.non_embedding_params, "shape": counter.shape,
            "peak_rss_mb": C.peak_rss_mb(), "cuda_peak_mb": cuda_peak_mb()}


def st_datasets(cfg: Any) -> tuple[Any, Any, int]:
    """The same examples as ours, as ST datasets: phase 1 ``(text, label)``, phase 2 ``(anchor, positive,
    negative_1..k)``; labels are the teacher targets ours trains on (from the warm teacher cache)."""
    import numpy as np
    import torch
    from datasets import Dataset

    from distill.data import load_phase_data
    from distill.teacher_targets import build_teacher_targets

    device = torch.device("cpu")
    d1 = load_phase_data(cfg, 1)
    t1 = build_teacher_targets(cfg, cfg.phase1.max_length, d1.queries, d1.documents, device)
    ex1 = np.asarray(d1.examples)
    texts, labels = [], []
    for role, row in ex1:
        texts.append(d1.queries[int(row)] if role == 0 else d1.documents[int(row)])
        labels.append((t1.query if role == 0 else t1.document)(np.asarray([row]))[0].float().tolist())
    phase1 = Dataset.from_dict({"text": texts, "label": labels})
    d2 = load_phase_data(cfg, 2)
    ex2 = np.asarray(d2.examples)
    columns: dict[str, list[str]] = {"anchor": [d2.queries[int(r)] for r in ex2[:, 0]],
                                     "positive": [d2.documents[int(r)] for r in ex2[:, 1]]}
    for j in range(2, ex2.shape[1]):
        columns[f"negative_{j - 1}"] = [d2.documents[int(r)] for r in ex2[:, j]]
    return phase1, Dataset.from_dict(columns), t1.forwards


def st_model(cfg: Any, device: str):
    """The student as a plain SentenceTransformer with the same projection head appended (Dense modules)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    m = cfg.model
    base = SentenceTransformer(m.student, device=device, model_kwargs={"dtype": torch.float32})
    base.max_seq_length = min(cfg.phase1.max_length, cfg.phase2.max_length)
    torch.manual_seed(cfg.training.seed)
    head = [Dense(m.student_dim, m.projection_hidden_dim, activation_function=torch.nn.GELU()),
            Dense(m.projection_hidden_dim, m.teacher_dim, activation_function=torch.nn.Identity())]
    return SentenceTransformer(modules=[*base, *head], device=device)


def worker_st(spec: dict[str, Any]) -> dict[str, Any]:
    """A plain ``SentenceTransformerTrainer``: MSELoss on precomputed labels, then MultipleNegativesRankingLoss."""
    import torch
    from transformers import TrainerCallback

    from distill.config import load_config
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MSELoss, MultipleNegativesRankingLoss

    cfg = load_config(spec["config"], spec["sets"])
    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    phase1, phase2, label_passes = st_datasets(cfg)
    model = st_model(cfg, device)
    counter = TokenCounter()
    counter.install()

    class Window(TrainerCallback):
        def __init__(self, phase: str, batch: int) -> None:
            self.phase, self.batch = phase, batch

        def on_train_begin(self, args, state, control, **kwargs):
            counter.begin(self.phase)

        def on_step_end(self, args, state, control, **kwargs):
            counter.step_done()

        def on_train_end(self, args, state, control, **kwargs):
            counter.end(state.global_step, state.global_step * self.batch)

    plan = [("phase1", cfg.phase1, phase1, MSELoss(model)),
            ("phase2", cfg.phase2, phase2, MultipleNegativesRankingLoss(model, scale=1.0 / cfg.phase2.temperature))]
    with tempfile.TemporaryDirectory() as out:
        for name, pcfg, dataset, loss in plan:
            args = SentenceTransformerTrainingArguments(
                output_dir=out, per_device_train_batch_size=pcfg.batch_size, max_steps=pcfg.max_steps,
                learning_rate=pcfg.learning_rate, warmup_steps=min(pcfg.warmup_steps, pcfg.max_steps),
                weight_decay=pcfg.weight_decay, max_grad_norm=pcfg.max_grad_norm,
                gradient_accumulation_steps=pcfg.gradient_accumulation_steps,
                bf16=cfg.training.precision == "bf16", use_cpu=device == "cpu", dataloader_drop_last=True,
                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                seed=cfg.training.seed)
            trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                                 callbacks=[Window(name, pcfg.batch_size)])
            trainer.train()
    phases = counter.phases
    phases["phase1"]["teacher_passes"] = 0
    phases["phase1"]["label_texts"] = len(phase1)  # teacher embeddings the label column needs (precomputed)
    phases["phase2"]["teacher_passes"] = 0
    phases["phase2"]["label_texts"] = 0
    return {"phases": phases, "non_embedding_params": counter.non_embedding_params, "shape": counter.shape,
            "peak_rss_mb": C.peak_rss_mb(), "cuda_peak_mb": cuda_peak_mb(), "label_cache_passes": label_passes}


def worker_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """The square matmul peak per dtype, and the GEMM rate at the student's own shapes for each requested
    ``(dtype, token rows per forward)`` (keyed ``"bf16:1150"``)."""
    out: dict[str, Any] = {dt: C.measure_matmul(spec["n"], dt, spec["threads"]) for dt in ("fp32", "bf16")}
    shape = spec.get("shape")
    for dt, tokens in spec.get("gemm_tokens", []):
        gemms = C.encoder_gemms(tokens, shape["hidden"], shape["intermediate"])
        out[f"{dt}:{tokens}"] = C.measure_gemms(gemms, dt, spec["threads"])
    return out


def best_peaks(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """The square matmul peak per dtype: the fastest of several measurements spread over the run, since a shared
    machine's slow spells can only lower a measurement (so "% of peak" is never flattered by one)."""
    return {dt: max(m[dt] for m in measurements) for dt in ("fp32", "bf16")}


def steady_samples_per_s(rec: dict[str, Any]) -> float | None:
    """Samples/s after the first optimizer step (allocation, kernel selection and any compilation happen there):
    the rate of a long run. Every step has the same samples here (fixed batch size, ``max_steps``)."""
    first, steps = rec.get("first_step_s"), rec["steps"]
    if first is None or steps < 2 or rec["loop_s"] <= first:
        return None
    return rec["samples"] * (steps - 1) / steps / (rec["loop_s"] - first)


def tokens_per_forward(rec: dict[str, Any]) -> int | None:
    """Mean padded token rows of one student forward in a phase (the m of its linear layers' matmuls), or None
    when no forward was counted."""
    return round(rec["padded_tokens"] / rec["forwards"]) if rec.get("forwards") else None


# --------------------------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------------------------


def run_worker(kind: str, spec: dict[str, Any], work: Path, name: str, threads: int,
               preload: str | None = None) -> dict[str, Any]:
    """``bench_trainer.py --worker KIND --spec FILE`` in a fresh process; returns its result JSON (+ ``wall_s``)."""
    out = work / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    spec = {**spec, "result": str(out)}
    spec_path = work / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path)]
    print(f"[{name}] running", flush=True)
    wall = C.run_logged(cmd, work / "logs" / f"{name}.log", C.bench_env(threads, preload))
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = wall
    print(f"[{name}] {wall:.1f} s", flush=True)
    return result


def phase_row(name: str, system: str, precision: str, phase: str, rec: dict[str, Any], params: int,
              peaks: dict[str, float], texts_per_sample: int, result: dict[str, Any]) -> dict[str, Any]:
    """One table row: throughput, padding, FLOP/s against the square matmul peak of the same dtype and against the
    GEMM rate at the student's own shapes (``peaks["<dtype>:<tokens per forward>"]``, when measured)."""
    secs = rec["loop_s"]
    shape = result.get("shape") or {}
    flops = C.achieved_flops_per_s(params, rec["real_tokens"], secs, layers=shape.get("layers", 0),
                                   hidden=shape.get("hidden", 0), sum_sq_len=rec.get("sq_tokens", 0))
    peak_dtype = "bf16" if precision == "bf16" else "fp32"
    shape_peak = peaks.get(f"{peak_dtype}:{tokens_per_forward(rec)}")
    return {
        "config": name, "system": system, "precision": precision, "phase": phase, "steps": rec["steps"],
        "loop_s": secs, "samples_per_s": rec["samples"] / secs, "texts_per_s": rec["rows"] / secs,
        "texts_per_sample": texts_per_sample,
        "first_step_s": rec.get("first_step_s"), "steady_samples_per_s": steady_samples_per_s(rec),
        "real_tokens_per_s": rec["real_tokens"] / secs,
        "padding_eff": C.padding_efficiency_from_counts(rec["real_tokens"], rec["padded_tokens"]),
        "gflop_s": flops / 1e9, "pct_peak": 100.0 * flops / peaks[peak_dtype],
        "tokens_per_forward": tokens_per_forward(rec),
        "pct_shape_peak": 100.0 * flops / shape_peak if shape_peak else None,
        "teacher_passes": rec.get("teacher_passes", 0), "label_texts": rec.get("label_texts"),
        "page_faults_per_step": rec["minor_faults"] / rec["steps"] if rec.get("minor_faults") is not None else None,
        "peak_rss_mb": result["peak_rss_mb"], "cuda_peak_mb": result.get("cuda_peak_mb"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        fn = {"ours": worker_ours, "st": worker_st, "matmul": worker_matmul}[args.worker]
        result = fn(spec)
        Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
        return 0

    teacher, student = C.check_models(args.models_dir)
    work = args.workdir.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    data = C.make_demo_data(work / f"data-{args.max_train}", args.max_train)
    config = C.write_config(work / "bench_trainer.yaml", data_dir=data, teacher=teacher, student=student,
                            output_dir=work / "runs", cache_dir=work / "cache")
    from distill.config import load_config

    num_negatives = load_config(config).phase2.num_negatives
    preload = C.malloc_preload(args.malloc)
    print(f"machine: {C.machine_line(args.threads)}; allocator {args.malloc}{f' ({preload})' if preload else ''}")
    print(f"workload: {config} (demo data --max-train {args.max_train}; phase 1 {args.steps1} steps x {args.batch1}, "
          f"phase 2 {args.steps2} steps x {args.batch2} queries with 1 + {num_negatives} documents)")

    # Teacher targets for every phase, once, outside every timing (ours then reads them; ST gets them as labels).
    t0 = time.perf_counter()
    fill = subprocess.run([sys.executable, "-m", "distill", "cache", "--config", str(config), "--log-level", "WARNING",
                           *[x for s in run_sets(args, work, "warmup") for x in ("--set", s)]],
                          cwd=C.REPO, env=C.bench_env(args.threads), capture_output=True, text=True)
    if fill.returncode != 0:
        raise SystemExit(f"teacher cache warm-up failed:\n{fill.stdout}\n{fill.stderr}")
    warm_passes = sum(int(line.rsplit(":", 1)[1].replace(",", "")) for line in fill.stdout.splitlines()
                      if "teacher forward passes" in line)
    print(f"[cache warm-up] {time.perf_counter() - t0:.1f} s, {warm_passes} teacher forward passes", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    square = {"n": args.matmul_n, "threads": args.threads, "shape": None, "gemm_tokens": []}
    square_runs = []  # the square matmul once per round too: one measurement can catch a shared machine's slow spell
    for r in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits every configuration alike
        for name in args.variants:
            spec = {"config": str(config), "sets": run_sets(args, work, name), "threads": args.threads}
            runs[name].append(run_worker(VARIANTS[name].system, spec, work, f"{name}-r{r}", args.threads, preload))
        square_runs.append(run_worker("matmul", square, work, f"matmul-r{r}", args.threads, preload))
    results = {}
    for name in args.variants:
        res = results[name] = fastest(runs[name])
        res["all_loop_s"] = [total_loop_s(x) for x in runs[name]]

    # The matmul rates, after the runs: the student's GEMMs are measured at the token rows per forward they had.
    shape = next((r["shape"] for r in results.values() if r.get("shape")), None)
    gemm_tokens = sorted({(VARIANTS[name].precision, tokens_per_forward(rec))
                          for name, res in results.items() for rec in res["phases"].values()
                          if tokens_per_forward(rec)})
    peaks = run_worker("matmul", {"n": args.matmul_n, "threads": args.threads, "shape": shape,
                                  "gemm_tokens": gemm_tokens if shape else []}, work, "matmul", args.threads,
                       preload)
    peaks.pop("wall_s", None)
    square_runs.append({dt: peaks[dt] for dt in ("fp32", "bf16")})  # a copy: peaks becomes the best below
    for dt in ("fp32", "bf16"):
        print(f"matmul {args.matmul_n}x{args.matmul_n} {dt}, {args.threads} thread(s), once per round and after: "
              f"{', '.join(f'{m[dt] / 1e9:.1f}' for m in square_runs)} GFLOP/s (the best is the peak)", flush=True)
    peaks.update(best_peaks(square_runs))
    for key in sorted(k for k in peaks if ":" in k):
        print(f"student GEMMs ({shape['hidden']} / {shape['intermediate']}) at {key.split(':')[1]} token rows, "
              f"{key.split(':')[0]}: {peaks[key] / 1e9:.1f} GFLOP/s", flush=True)

    profiles = {}
    if args.profile:
        for name in args.variants:
            if VARIANTS[name].system == "ours" and not VARIANTS[name].compile:  # compiled: one op per graph
                spec = {"config": str(config), "sets": run_sets(args, work, name), "threads": args.threads,
                        "profile": True}
                profiles[name] = run_worker("ours", spec, work, f"{name}-profile", args.threads, preload)["phases"]

    rows = []
    for name in args.variants:
        system, precision = VARIANTS[name].system, VARIANTS[name].precision
        res = results[name]
        for phase in ("phase1", "phase2"):
            rec = res["phases"].get(phase)
            if rec:
                tps = C.texts_per_sample(int(phase[-1]), num_negatives)
                rows.append(phase_row(name, system, precision, phase, rec, res["non_embedding_params"], peaks,
                                      tps, res))

    params = next((r["non_embedding_params"] for r in results.values() if r.get("non_embedding_params")), None)
    columns = ["config", "phase", "steps", "loop_s", "first_step_s", "samples_per_s", "steady_samples_per_s",
               "texts_per_s", "real_tokens_per_s",
               "padding_eff", "gflop_s", "pct_peak", "tokens_per_forward", "pct_shape_peak", "teacher_passes",
               "page_faults_per_step", "peak_rss_mb"]
    print()
    print(C.format_table(rows, columns))
    if args.repeats > 1:
        print()
        for name, res in results.items():
            print(f"{name:18s} loop seconds per repeat: {', '.join(f'{x:.1f}' for x in res['all_loop_s'])} (fastest kept)")
    if profiles:
        print("\nwhere the loop time goes (separate runs under torch.profiler; % of their loop seconds):\n")
        print(C.format_table(profile_rows(profiles), PROFILE_COLUMNS))
    comparisons = compare(rows)
    print()
    for line in comparisons["lines"]:
        print(line)
    layers = shape["layers"] if shape else 0
    hidden = shape["hidden"] if shape else 0
    print(f"\nFLOP/s = (6 x {params:,} (student non-embedding parameters) x real tokens + 12 x {layers} layers x "
          f"{hidden} hidden x sum of squared text lengths) / loop seconds; pct_peak: of the {args.matmul_n}^3 x 2 "
          f"square matmul (fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, {args.threads} "
          "thread(s)); pct_shape_peak: of the student's own linear-layer matmuls (forward, input and weight "
          "gradients) at the token rows per forward of that row, timed alone.")
    print(f"teacher: {warm_passes} texts embedded once into the cache before timing (ours reads them: "
          "teacher_passes 0 per run); ST's phase-1 label column holds the same precomputed targets, "
          "its phase 2 (MNRL) needs none.")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "machine": C.machine_line(args.threads), "matmul_flop_s": peaks,
                                         "square_matmul_runs": square_runs,
                                         "non_embedding_params": params, "cache_warmup_passes": warm_passes,
                                         "rows": rows, "ratios": comparisons["ratios"], "results": results,
                                         "profiles": profiles},
                                        indent=2), encoding="utf-8")
    return 0


PROFILE_COLUMNS = ["config", "phase", "loop_s", "matmul", "dropout RNG", "dtype casts", "optimizer", "collectives",
                   "other ops", "framework", "outside ops"]


def profile_rows(profiles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per profiled configuration and phase: each ``op_category``'s share of the loop time, in %, and
    ``outside ops``: the rest (Python between ops, data, waiting)."""
    rows = []
    for name, phases in profiles.items():
        for phase, rec in phases.items():
            ms, total = rec.get("profile_ms", {}), rec["loop_s"] * 1000.0
            row: dict[str, Any] = {"config": name, "phase": phase, "loop_s": rec["loop_s"]}
            for col in PROFILE_COLUMNS[3:-1]:
                row[col] = 100.0 * ms.get(col, 0.0) / total
            row["outside ops"] = max(0.0, 100.0 - sum(row[c] for c in PROFILE_COLUMNS[3:-1]))
            rows.append(row)
    return rows


def total_loop_s(result: dict[str, Any]) -> float:
    """Seconds in the training loops of all phases of one worker result."""
    return sum(rec["loop_s"] for rec in result["phases"].values())


def fastest(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the shortest total loop time (noise from other load only ever adds time)."""
    return min(results, key=total_loop_s)


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of samples/s: ours/ST at each precision and phase (and over both phases: total samples / total
    loop seconds), bf16/fp32 of ours, cached/uncached InfoNCE of ours in phase 2."""
    by = {(r["config"], r["phase"]): r for r in rows}

    def sps(config: str, phase: str | None) -> float | None:
        if phase is not None:
            r = by.get((config, phase))
            return r["samples_per_s"] if r else None
        parts = [by.get((config, p)) for p in ("phase1", "phase2")]
        if any(p is None for p in parts):
            return None
        return sum(p["samples_per_s"] * p["loop_s"] for p in parts) / sum(p["loop_s"] for p in parts)

    ratios: dict[str, float | None] = {}
    for prec in ("fp32", "bf16"):
        for phase in ("phase1", "phase2", None):
            ratios[f"ours/st {prec} {phase or 'both'}"] = C.ratio(sps(f"ours-{prec}", phase), sps(f"st-{prec}", phase))
    for phase in ("phase1", "phase2"):
        ratios[f"ours bf16/fp32 {phase}"] = C.ratio(sps("ours-bf16", phase), sps("ours-fp32", phase))
        ratios[f"st bf16/fp32 {phase}"] = C.ratio(sps("st-bf16", phase), sps("st-fp32", phase))
    ratios["ours cached/plain InfoNCE phase2"] = C.ratio(sps("ours-bf16-cached", "phase2"), sps("ours-bf16", "phase2"))
    for prec in ("fp32", "bf16"):
        for phase in ("phase1", "phase2"):
            compiled, eager = by.get((f"ours-{prec}-compile", phase)), by.get((f"ours-{prec}", phase))
            ratios[f"ours compile/eager {prec} {phase}"] = C.ratio(
                compiled and compiled["samples_per_s"], eager and eager["samples_per_s"])
            ratios[f"ours compile/eager {prec} {phase} after step 1"] = C.ratio(
                compiled and compiled["steady_samples_per_s"], eager and eager["steady_samples_per_s"])
    for prec in ("fp32", "bf16"):
        for phase in ("phase1", "phase2"):
            ratios[f"ours cpu_tuning on/off {prec} {phase}"] = C.ratio(
                sps(f"ours-{prec}", phase), sps(f"ours-{prec}-bernoulli", phase))
    lines = [f"{k:44s} {'-' if v is None else f'{v:.2f}x'}" for k, v in ratios.items()]
    return {"ratios": ratios, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
