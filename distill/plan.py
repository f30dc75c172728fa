"""``python -m distill plan`` (= ``train --dry-run``): validate a config and print what the run would do, without
loading any weights or writing anything.

The compute estimate counts matmul FLOPs the usual way (forward 2·P·tokens, forward+backward 6·P·tokens for the
trained student, forward only for the frozen teacher, once per unique text thanks to the cache) and converts them to
GPU-hours at an assumed utilisation of the GPU's dense bf16 peak.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from distill.config import Config
from distill.errors import DistillError

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets.
GPU_PEAK_BF16 = {"H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}
ASSUMED_UTILISATION = 0.35  # fraction of peak a well-fed BERT/Qwen2 encoder reaches in practice (MFU)
# Parameter counts used when a model's config.json cannot be read offline (from the models' cards).
KNOWN_PARAMS = {
    "infly/inf-retriever-v1-pro": 7_069_121_024,
    "infly/inf-retriever-v1": 7_069_121_024,
    "sentence-transformers/all-mpnet-base-v2": 109_486_464,
    "sentence-transformers/all-MiniLM-L6-v2": 22_713_216,
}
# (hidden size, layers, attention heads) used when config.json cannot be read offline (from the models' configs).
KNOWN_SHAPES = {
    "infly/inf-retriever-v1-pro": (3584, 28, 28),
    "infly/inf-retriever-v1": (3584, 28, 28),
    "sentence-transformers/all-mpnet-base-v2": (768, 12, 12),
    "sentence-transformers/all-MiniLM-L6-v2": (384, 6, 12),
}
GPU_MEMORY_GB = {"H100": 80, "A100": 80, "L4": 24, "A10G": 24}
SPEC_STANDARD_HOURS = (4.0, 5.0)  # the spec's "Standard (4-5 hours on 8 GPUs)"
ASSUMED_TOKENS = {"query": 16, "document": 96}  # MS MARCO-like mean lengths when the data cannot be read


@dataclass
class PhasePlan:
    name: str
    examples: int | None
    source_note: str
    batches_per_rank: int | None
    steps: int | None
    per_rank_batch: int
    global_batch: int
    effective_batch: int
    texts_per_example: int
    unique_texts: int | None
    mean_tokens: float


def _model_config(name: str) -> dict | None:
    """The model's config.json (local folder or Hub cache), or None when it cannot be read here."""
    from distill.models import _read_model_file

    try:
        return _read_model_file(name, "config.json", None)
    except DistillError:
        return None


def _params(name: str) -> tuple[int | None, str]:
    """(parameter count, how it was obtained) from the model's config.json, else the table above."""
    cfg = _model_config(name)
    if cfg:
        h, layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
        inter, vocab = cfg.get("intermediate_size", 4 * (h or 0)), cfg.get("vocab_size", 0)
        if h and layers:
            kv = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
            heads = cfg.get("num_attention_heads") or 1
            attn = h * h * 2 + 2 * h * (h // heads) * (kv or heads)
            mlp = (3 if cfg.get("model_type") in ("qwen2", "llama", "mistral") else 2) * h * inter
            return layers * (attn + mlp) + vocab * h, "config.json"
    if name in KNOWN_PARAMS:
        return KNOWN_PARAMS[name], "model card (config.json not readable offline)"
    return None, "unknown"


def _phase_plan(cfg: Config, phase: int, world: int) -> PhasePlan:
    pcfg = cfg.phase(phase)
    per_example = 1 if phase == 1 else 2 + cfg.phase2.num_negatives
    examples = unique = None
    note = ""
    try:
        from distill.data import load_phase_data

        with tempfile.TemporaryDirectory() as tmp:
            d = load_phase_data(cfg, phase, tmp)
            examples, unique = len(d.examples), len(d.queries) + len(d.documents)
            chars = sum(len(t) for t in d.queries[: min(len(d.queries), 2000)]) + \
                sum(len(t) for t in d.documents[: min(len(d.documents), 2000)])
            n = min(len(d.queries), 2000) + min(len(d.documents), 2000)
            mean_tokens = min(chars / max(n, 1) / 4.0, pcfg.max_length)  # ~4 characters per token
            note = "read"
    except DistillError as e:
        note = f"not readable here ({e}); sizes below assume the caps"
        caps = [s.max_samples or (cfg.phase1.max_samples_per_dataset if phase == 1 else cfg.phase2.max_samples)
                for s in (cfg.data.phase1 if phase == 1 else cfg.data.phase2)]
        examples = sum(c for c in caps if c) if phase == 1 else (cfg.phase2.max_samples or None)
        if phase == 1 and examples:
            examples *= 2  # a query and a document per row
        unique = examples * per_example if examples else None
        mean_tokens = (ASSUMED_TOKENS["query"] + ASSUMED_TOKENS["document"]) / 2
    global_batch = pcfg.batch_size * world
    batches = examples // global_batch if examples else None
    steps = None
    if batches is not None:
        steps = math.ceil(batches / pcfg.gradient_accumulation_steps) * pcfg.num_epochs
        if pcfg.max_steps:
            steps = min(steps, pcfg.max_steps)
    return PhasePlan(f"phase{phase}", examples, note, batches, steps, pcfg.batch_size, global_batch,
                     global_batch * pcfg.gradient_accumulation_steps, per_example, unique, mean_tokens)


def estimate_compute(cfg: Config, plans: list[PhasePlan], gpu: str = "H100", world: int = 8) -> dict[str, Any]:
    """FLOPs and wall-clock hours of the configured run on ``world`` GPUs of type ``gpu``."""
    ps, ps_src = _params(cfg.model.student)
    pt, pt_src = _params(cfg.model.teacher)
    student_flops = teacher_flops = 0.0
    for p in plans:
        if p.steps is None or ps is None:
            continue
        samples = p.steps * p.effective_batch
        student_flops += 6 * ps * samples * p.texts_per_example * p.mean_tokens
        if pt is not None and p.unique_texts:
            teacher_flops += 2 * pt * p.unique_texts * p.mean_tokens
    peak = GPU_PEAK_BF16[gpu] * ASSUMED_UTILISATION * world
    hours = (student_flops + teacher_flops) / peak / 3600 if peak else None
    return {"student_params": ps, "student_params_source": ps_src, "teacher_params": pt,
            "teacher_params_source": pt_src, "student_flops": student_flops, "teacher_flops": teacher_flops,
            "gpu": gpu, "world": world, "utilisation": ASSUMED_UTILISATION, "hours": hours,
            "gpu_hours": hours * world if hours else None}


def _shape(name: str) -> tuple[int, int, int] | None:
    """(hidden size, layers, heads) from the model's config.json, else the table above."""
    cfg = _model_config(name)
    if cfg and cfg.get("hidden_size") and cfg.get("num_hidden_layers"):
        return cfg["hidden_size"], cfg["num_hidden_layers"], cfg.get("num_attention_heads") or 1
    return KNOWN_SHAPES.get(name)


def activation_bytes(shape: tuple[int, int, int], texts: int, length: int) -> float:
    """Activations a transformer keeps for backward with 16-bit autocast and no recomputation (Korthikanti et al.,
    2022): ``layers * s * b * h * (34 + 5 * a * s / h)`` bytes for b texts of s tokens, hidden h, a heads."""
    h, layers, heads = shape
    return layers * length * texts * h * (34 + 5 * heads * length / h)


def estimate_memory(cfg: Config, gpu: str = "H100") -> dict[str, Any]:
    """Peak memory per GPU (bytes) of each training phase and of the teacher-cache fill.

    Training: 16 bytes per trained parameter (fp32 weights and gradients, AdamW's two moments) + the activations of
    one forward at the phase's ``max_length`` (length-grouped batches pad the longest batch to it): ``batch_size``
    texts in phase 1; in phase 2 ``batch_size * (2 + num_negatives)`` texts, or ``mini_batch_size`` with
    ``cached_infonce`` (GradCache). Teacher fill: its weights in ``teacher_dtype`` (bf16 on GPU) plus one layer's
    activations of a ``teacher_batch_size`` batch; the teacher is released before training starts.
    """
    m = cfg.model
    ps, _ = _params(m.student)
    head = m.student_dim * m.projection_hidden_dim + m.projection_hidden_dim * m.teacher_dim if m.use_projection else 0
    shape = _shape(m.student)
    states = 16.0 * (ps + head) if ps else None
    out: dict[str, Any] = {"gpu": gpu, "gpu_memory_gb": GPU_MEMORY_GB.get(gpu)}
    for phase, pcfg in ((1, cfg.phase1), (2, cfg.phase2)):
        texts = pcfg.batch_size
        if phase == 2:
            texts = cfg.phase2.mini_batch_size if cfg.phase2.cached_infonce else pcfg.batch_size * (2 + cfg.phase2.num_negatives)
        acts = activation_bytes(shape, texts, pcfg.max_length) if shape else None
        out[f"phase{phase}"] = None if states is None or acts is None else states + acts
        out[f"phase{phase}_texts_per_forward"] = texts
    pt, _ = _params(m.teacher)
    tshape = _shape(m.teacher)
    length = m.teacher_max_length or max(cfg.phase1.max_length, cfg.phase2.max_length)
    bytes_per = 4 if m.teacher_dtype == "float32" else 2
    if pt and tshape:
        h, _, heads = tshape
        out["teacher"] = bytes_per * pt + bytes_per * m.teacher_batch_size * length * (8 * h + heads * length)
    else:
        out["teacher"] = None
    return out


def _gb(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def _fmt(n: float | int | None) -> str:
    return "?" if n is None else f"{n:,}" if isinstance(n, int) else f"{n:.3g}"


def print_plan(cfg: Config) -> dict[str, Any]:
    """Print the plan of ``cfg`` and return it as a dict."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    m = cfg.model
    mode = (f"projection: student {m.student_dim}-d -> head {m.student_dim}->{m.projection_hidden_dim}->"
            f"{m.teacher_dim} (teacher space)") if m.use_projection else \
        f"MRL: student {m.student_dim}-d, nested dims {m.matryoshka_dims} (no head)"
    lines = [f"experiment   {cfg.experiment}", f"teacher      {m.teacher} ({m.teacher_dim}-d, frozen)",
             f"student      {m.student} ({m.student_dim}-d)", f"mode         {mode}",
             f"world size   {world} process(es){'' if world > 1 else ' (run under torchrun for more)'}", ""]
    plans = []
    for phase in (1, 2):
        if phase not in cfg.phases:
            lines.append(f"phase{phase}       skipped")
            continue
        pcfg = cfg.phase(phase)
        sources = cfg.data.phase1 if phase == 1 else cfg.data.phase2
        plan = _phase_plan(cfg, phase, world)
        plans.append(plan)
        loss = (f"{pcfg.mse_weight}*MSE + {cfg.phase1.cosine_weight}*cosine" if phase == 1 else
                f"{cfg.phase2.infonce_weight}*InfoNCE(t={cfg.phase2.temperature}, {cfg.phase2.num_negatives} hard "
                f"negatives{', cross-rank' if cfg.phase2.gather_across_ranks else ''}) + {pcfg.mse_weight}*MSE")
        lines += [f"phase{phase}       loss {loss}"]
        lines += [f"  source     {s.name or s.path} ({s.path}{':' + s.subset if s.subset else ''}, {s.split})"
                  for s in sources]
        lines += [f"  data       {plan.source_note}",
                  f"  examples   {_fmt(plan.examples)}; unique teacher texts {_fmt(plan.unique_texts)}",
                  f"  batch      {plan.per_rank_batch}/rank, {plan.global_batch} global, x{pcfg.gradient_accumulation_steps}"
                  f" accumulation = {plan.effective_batch} per optimizer step",
                  f"  steps      {_fmt(plan.steps)} optimizer steps over {pcfg.num_epochs} epoch(s)"
                  f" ({_fmt(plan.batches_per_rank)} batches/rank/epoch), lr {pcfg.learning_rate}, warmup "
                  f"{pcfg.warmup_steps}", ""]
    est = estimate_compute(cfg, plans, "H100", max(world, 8) if world == 1 else world)
    lines += [f"compute      student {_fmt(est['student_params'])} params ({est['student_params_source']}), teacher "
              f"{_fmt(est['teacher_params'])} ({est['teacher_params_source']})",
              f"  FLOPs      student training {_fmt(est['student_flops'])}, teacher (once per unique text) "
              f"{_fmt(est['teacher_flops'])}"]
    if est["hours"]:
        lo, hi = SPEC_STANDARD_HOURS
        lines.append(f"  estimate   {est['hours']:.2f} h on {est['world']}x{est['gpu']} ({est['gpu_hours']:.1f} "
                     f"GPU-hours) at an assumed {est['utilisation']:.0%} of bf16 peak; the spec's standard run takes "
                     f"{lo:.0f}-{hi:.0f} h on 8 GPUs")
    mem = estimate_memory(cfg, "H100")
    lines.append(f"  memory     peak per GPU: phase 1 {_gb(mem['phase1'])} ({mem['phase1_texts_per_forward']} texts per "
                 f"forward), phase 2 {_gb(mem['phase2'])} ({mem['phase2_texts_per_forward']} texts per forward"
                 f"{', GradCache' if cfg.phase2.cached_infonce else ''}), teacher cache fill {_gb(mem['teacher'])}; "
                 f"worst case at max_length, {mem['gpu']} has {mem['gpu_memory_gb']} GB")
    over = [p for p in ("phase1", "phase2") if mem[p] and mem[p] > mem["gpu_memory_gb"] * 1e9]
    if "phase2" in over and not cfg.phase2.cached_infonce:
        lines.append("  hint       phase 2 may not fit: set phase2.cached_infonce: true (GradCache) to keep the "
                     "contrastive batch with the memory of mini_batch_size texts")
    elif over:
        lines.append(f"  hint       {', '.join(over)} may not fit: lower batch_size (raise gradient_accumulation_steps) "
                     "or max_length")
    lines += ["", "outputs",
              f"  run dir      {cfg.run_dir}  (config.yaml, metrics.jsonl, checkpoints/, phase1/, phase2/, final/)",
              f"  final model  {cfg.run_dir / 'final'}",
              f"  artifacts    {cfg.artifact_dir if cfg.training.save_to_artifacts else '(save_to_artifacts: false)'}",
              f"  cache        {cfg.cache_root} (teacher embeddings {'on' if cfg.cache.enabled else 'OFF'}, "
              f"{cfg.cache.dtype})"]
    print("\n".join(lines))
    return {"experiment": cfg.experiment, "phases": [p.__dict__ for p in plans], "compute": est, "memory": mem}

