"""``python -m distill plan`` (= ``train --dry-run``): check a config and print what the run would do on N GPUs, loading
no weights and writing nothing. Compute counts matmul FLOPs of the non-embedding parameters plus attention (forward
``2 * P * tokens + 4 * layers * hidden * seq * tokens``, x3 for training); the teacher runs once per unique text, the
student on every text of every example; time = FLOPs / (GPUs * bf16 peak * an assumed MFU, stated in the output).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill.config import Config
from distill.errors import ConfigError, DistillError

# Dense bf16 tensor-core peaks (FLOP/s) and memory from the vendors' datasheets.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
GPU_MEMORY_GB = {"H100": 80, "H200": 141, "A100": 80, "L4": 24}
# Measured by scripts/gpu_check.sh on an H200 (docs/PERFORMANCE.md, "GPU acceptance run"), rounded down: the
# teacher's forward (48-53%; its cache fill projected to 28 layers 46%), the eager MPNet student's phase-2 step
# (13%; short phase-1 queries lower).
ASSUMED_MFU = {"teacher": 0.40, "student": 0.12}
CHARS_PER_TOKEN = 4.0  # English text in BPE / WordPiece vocabularies, to turn characters into tokens unread
ASSUMED_TOKENS = {"query": 12, "document": 80, "longest": 256}  # MS MARCO-like texts when the data is not readable
# (hidden, layers, heads, intermediate, vocab, gated MLP) when config.json cannot be read offline (the models' configs)
KNOWN_SHAPES = {
    "infly/inf-retriever-v1-pro": (3584, 28, 28, 18944, 152064, True),
    "infly/inf-retriever-v1": (3584, 28, 28, 18944, 152064, True),
    "sentence-transformers/all-mpnet-base-v2": (768, 12, 12, 3072, 30527, False),
    "sentence-transformers/all-MiniLM-L6-v2": (384, 6, 12, 1536, 30522, False),
}
SAMPLED_TEXTS = 2000  # texts per role whose lengths the plan reads
_OFFSET_POSITIONS = ("mpnet", "roberta", "xlm-roberta")  # position ids start after the padding index


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    gated: bool  # SwiGLU MLP (three matrices) as in Qwen2 / Llama, else two
    source: str

    @property
    def params(self) -> int:
        """Non-embedding parameters (attention with grouped KV heads approximated as full, MLP)."""
        return self.layers * (4 * self.hidden**2 + (3 if self.gated else 2) * self.hidden * self.intermediate)

    def forward_flops(self, tokens: float, seq: float) -> float:
        """Matmul FLOPs of one forward over ``tokens`` tokens in sequences of ``seq`` tokens."""
        return tokens * (2 * self.params + 4 * self.layers * self.hidden * seq)


def model_shape(name: str) -> Shape | None:
    """The model's shape from its config.json (local folder or HF cache), else the table above, else None."""
    from distill.models import _read_model_file

    try:
        cfg = _read_model_file(name, "config.json", None)
    except DistillError:
        cfg = None
    if cfg and cfg.get("hidden_size") and cfg.get("num_hidden_layers"):
        h = cfg["hidden_size"]
        return Shape(h, cfg["num_hidden_layers"], cfg.get("num_attention_heads") or 1,
                     cfg.get("intermediate_size") or 4 * h, cfg.get("vocab_size") or 0,
                     cfg.get("model_type") in ("qwen2", "qwen3", "llama", "mistral"), "config.json")
    if name in KNOWN_SHAPES:
        return Shape(*KNOWN_SHAPES[name], source="known shape (config.json not readable here)")
    return None


@dataclass
class PhasePlan:
    name: str
    data_note: str
    examples: int | None
    unique_queries: int | None
    unique_documents: int | None
    query_tokens: float  # mean tokens per query / document, and the longest text's tokens (capped at max_length)
    document_tokens: float
    longest_tokens: float
    global_batch: int
    effective_batch: int
    steps: int | None
    warmup: int | None


def _mean_tokens(texts: Any, cap: int) -> tuple[float, float]:
    """(mean, max) tokens of a sample of ``texts`` from their characters, capped at ``cap``."""
    sample = [texts[i] for i in range(min(len(texts), SAMPLED_TEXTS))]
    if not sample:
        return 0.0, 0.0
    lengths = [min(len(t) / CHARS_PER_TOKEN, cap) for t in sample]
    return sum(lengths) / len(lengths), max(lengths)


def _phase_plan(cfg: Config, phase: int, world: int) -> PhasePlan:
    from distill.data import load_phase_data
    from distill.sampling import check_enough

    pcfg = cfg.phase(phase)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = load_phase_data(cfg, phase, tmp)
            examples, nq, nd = len(d.examples), len(d.queries), len(d.documents)
            q_tokens, q_max = _mean_tokens(d.queries, pcfg.max_length)
            d_tokens, d_max = _mean_tokens(d.documents, pcfg.max_length)
        note = f"read: unique texts counted, tokens from a sample of characters (~{CHARS_PER_TOKEN:g} per token)"
        longest = max(q_max, d_max)
    except DistillError as e:
        caps = [s.max_samples or (cfg.phase1.max_samples_per_dataset if phase == 1 else cfg.phase2.max_samples)
                for s in (cfg.data.phase1 if phase == 1 else cfg.data.phase2)]
        rows = sum(c for c in caps if c) if phase == 1 else cfg.phase2.max_samples
        examples = 2 * rows if phase == 1 and rows else rows  # phase 1: a query and a document per row
        # phase 2 assumption: hard negatives are mined from a shared corpus, so unique documents ~ 2 per example
        nq, nd = (rows, rows) if phase == 1 else (rows, 2 * rows if rows else None)
        q_tokens, d_tokens, longest = (ASSUMED_TOKENS["query"], ASSUMED_TOKENS["document"],
                                       min(ASSUMED_TOKENS["longest"], pcfg.max_length))
        note = (f"not readable here ({e}); assumed: the caps' row counts, {q_tokens} tokens per query, {d_tokens} per "
                f"document, longest {longest}" + ("" if phase == 1 else ", 2 unique documents per example"))
    global_batch = pcfg.batch_size * world
    if examples is not None and note.startswith("read"):
        check_enough(examples, pcfg.batch_size, world, f"phase{phase}")
    steps = warmup = None
    if examples:
        steps = math.ceil(examples // global_batch / pcfg.gradient_accumulation_steps) * pcfg.num_epochs
        steps = min(steps, pcfg.max_steps) if pcfg.max_steps else steps
        warmup = pcfg.warmup(steps)
    return PhasePlan(f"phase{phase}", note, examples, nq, nd, q_tokens, d_tokens, longest, global_batch,
                     global_batch * pcfg.gradient_accumulation_steps, steps, warmup)


def estimate_compute(cfg: Config, plan: PhasePlan, gpu: str, world: int) -> dict[str, Any]:
    """Teacher and student FLOPs and hours of one phase on ``world`` GPUs of type ``gpu``."""
    student, teacher = model_shape(cfg.model.student), model_shape(cfg.model.teacher)
    out: dict[str, Any] = {"teacher_flops": None, "student_flops": None, "hours": None}
    if plan.steps is None:
        return out
    docs_per_example = 0 if plan.name == "phase1" else 1 + cfg.phase2.num_negatives
    if plan.name == "phase1":  # an example is one text, queries and documents in equal numbers
        tokens_per_example = (plan.query_tokens + plan.document_tokens) / 2
    else:
        tokens_per_example = plan.query_tokens + docs_per_example * plan.document_tokens
    peak = GPU_PEAK_BF16[gpu] * world
    hours = 0.0
    if student:
        tokens = plan.steps * plan.effective_batch * tokens_per_example
        out["student_flops"] = 3.0 * student.forward_flops(tokens, plan.document_tokens)
        hours += out["student_flops"] / (peak * ASSUMED_MFU["student"]) / 3600
    if teacher and plan.unique_queries is not None and plan.unique_documents is not None:
        tokens = plan.unique_queries * plan.query_tokens + plan.unique_documents * plan.document_tokens
        out["teacher_flops"] = float(teacher.forward_flops(tokens, plan.document_tokens))
        hours += out["teacher_flops"] / (peak * ASSUMED_MFU["teacher"]) / 3600
    out["hours"] = hours if student else None
    return out


def activation_bytes(shape: Shape, texts: int, length: float) -> float:
    """Activations a transformer keeps for backward with 16-bit autocast and no recomputation (Korthikanti et al.,
    2022): ``layers * s * b * h * (34 + 5 * a * s / h)`` bytes for b texts of s tokens, hidden h, a heads."""
    return shape.layers * length * texts * shape.hidden * (34 + 5 * shape.heads * length / shape.hidden)


def estimate_memory(cfg: Config, phase: int, longest: float, cached: bool = False) -> dict[str, Any]:
    """Peak memory per GPU (bytes) of a phase: 16 bytes per trained parameter (weights, gradients, AdamW moments in
    fp32) + the activations of one forward of texts of ``longest`` tokens (phase 2: all 2 + k texts per query, or
    ``mini_batch_size`` when ``cached``, GradCache)."""
    m, shape = cfg.model, model_shape(cfg.model.student)
    texts = cfg.phase(phase).batch_size
    if phase == 2:
        texts = cfg.phase2.mini_batch_size if cached else texts * (2 + cfg.phase2.num_negatives)
    if shape is None:
        return {"bytes": None, "texts_per_forward": texts}
    head = m.student_dim * m.projection_hidden_dim + m.projection_hidden_dim * m.teacher_dim if m.use_projection else 0
    states = 16.0 * (shape.params + shape.vocab * shape.hidden + head)
    return {"bytes": states + activation_bytes(shape, texts, longest), "texts_per_forward": texts}


def gradcache_choice(cfg: Config, longest: float, capacity: float | None) -> tuple[bool, str]:
    """``phase2.cached_infonce`` resolved, and why: true / false are kept; ``auto`` is on exactly when phase 2's
    memory estimate without GradCache (:func:`estimate_memory` at ``longest`` tokens) exceeds ``capacity`` (bytes per
    GPU, the plan's criterion for "may not fit", no further margin); off with no capacity (CPU) or fp16 training."""
    if cfg.phase2.cached_infonce != "auto":
        return bool(cfg.phase2.cached_infonce), f"phase2.cached_infonce: {str(cfg.phase2.cached_infonce).lower()}"
    need = estimate_memory(cfg, 2, longest)["bytes"]
    if capacity is None or need is None:
        return False, f"auto: off, {'no device memory figure (CPU)' if capacity is None else 'student shape unknown'}"
    on = need > capacity
    why = f"auto: {'on' if on else 'off'}, phase 2 needs ~{_gb(need)} per GPU without it, {_gb(capacity)} available"
    if on and cfg.training.precision == "fp16":
        return False, f"{why}, but fp16 refuses GradCache: lower phase2.batch_size or max_length"
    return on, why


def teacher_memory(cfg: Config) -> float | None:
    """The teacher fill's peak per GPU: its weights in 16 bits plus one layer's activations of a batch."""
    m, shape = cfg.model, model_shape(cfg.model.teacher)
    if shape is None:
        return None
    length = m.teacher_max_length or max(cfg.phase1.max_length, cfg.phase2.max_length)
    weights = 2.0 * (shape.params + shape.vocab * shape.hidden)
    return weights + 2.0 * m.teacher_batch_size * length * (8 * shape.hidden + shape.heads * length)


def output_dim(name: str) -> int | None:
    """The embedding size a model outputs, from its files: the last Dense or Pooling module of a sentence-transformers
    folder, else config.json's hidden_size; None when they cannot be read here."""
    from distill.models import _read_model_file

    try:
        modules = _read_model_file(name, "modules.json", None)
        for module in reversed(modules or []):
            conf = _read_model_file(name, f"{module['path']}/config.json", None) or {}
            dim = conf.get("out_features") or conf.get("word_embedding_dimension")
            if dim:
                return int(dim)
        shape = model_shape(name)
    except DistillError:
        return None
    return shape.hidden if shape is not None and shape.source == "config.json" else None


def _check_writable(key: str, path: Path) -> None:
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} cannot be written ({existing} is not a writable folder)")


def check_before_cost(cfg: Config) -> None:
    """Everything knowable without loading a model, checked in seconds: local data (first rows), the models' output
    dims from their files, the eval folder, the trackers' packages and that every output folder can be written.
    Raises one-line errors."""
    from distill.data import preflight
    from distill.evaluate import check_eval_set
    from distill.models import _read_model_file, check_teacher_runtime
    from distill.tracking import check_installed

    check_installed(cfg.training.report_to)
    check_teacher_runtime(cfg.model)
    preflight(cfg.data, cfg.phases, cfg.phase2.num_negatives)
    for role, dim in (("student", cfg.model.student_dim), ("teacher", cfg.model.teacher_dim)):
        name = getattr(cfg.model, role)
        real = output_dim(name)
        if real is not None and real != dim:
            raise ConfigError(f"model.{role}_dim is {dim} but {name} outputs {real}-d embeddings")
    if Path(cfg.model.teacher).is_dir():  # a Hub teacher's config may not be readable here
        conf = _read_model_file(cfg.model.teacher, "config.json", None) or {}
        length = cfg.model.teacher_max_length or max(cfg.phase(p).max_length for p in cfg.phases)
        limit = conf.get("max_position_embeddings", length) - (2 if conf.get("model_type") in _OFFSET_POSITIONS else 0)
        if length > limit:
            raise ConfigError(f"model.teacher_max_length: {length} tokens exceed {cfg.model.teacher}'s {limit} positions")
    if cfg.eval.data:
        check_eval_set(cfg.eval.data, cfg.eval.split)
    _check_writable("paths.output_dir", Path(cfg.paths.output_dir))
    _check_writable("paths.cache_dir", cfg.cache_root)
    if cfg.training.save_to_artifacts:
        _check_writable("paths.artifacts_dir", Path(cfg.paths.artifacts_dir))


def _gb(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def _fmt(n: float | int | None) -> str:
    return "?" if n is None else f"{n:,}" if isinstance(n, int) else f"{n:.3g}"


def print_plan(cfg: Config, nproc: int | None = None, gpu: str = "H100") -> dict[str, Any]:
    """Print the plan of ``cfg`` on ``nproc`` GPUs of type ``gpu`` (default: torchrun's WORLD_SIZE, else 1) and
    return it as a dict. Warnings name what the config would do wrong there."""
    from distill.data import read_limit, source_cap

    world = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    check_before_cost(cfg)
    m = cfg.model
    mode = (f"projection: student {m.student_dim}-d -> head {m.student_dim}->{m.projection_hidden_dim}->"
            f"{m.teacher_dim} (teacher space)") if m.use_projection else \
        f"MRL: student {m.student_dim}-d, nested dims {m.matryoshka_dims} (no head)"
    shapes = {k: model_shape(getattr(m, k)) for k in ("teacher", "student")}
    lines = [f"experiment   {cfg.experiment}", f"teacher      {m.teacher} ({m.teacher_dim}-d, frozen)",
             f"student      {m.student} ({m.student_dim}-d)", f"mode         {mode}",
             f"planned on   {world}x{gpu} ({GPU_MEMORY_GB[gpu]} GB, bf16 peak {GPU_PEAK_BF16[gpu] / 1e12:.0f} TFLOP/s); "
             f"assumed MFU: teacher {ASSUMED_MFU['teacher']:.0%}, student {ASSUMED_MFU['student']:.0%}"]
    lines += [f"  {k:10s} {_fmt(s.params)} non-embedding parameters ({s.source})" if s else f"  {k:10s} shape unknown"
              for k, s in shapes.items()]
    lines.append("")
    plans, warnings, total_hours, capacity = [], [], 0.0, GPU_MEMORY_GB[gpu] * 1e9
    for phase in (1, 2):
        if phase not in cfg.phases:
            lines += [f"phase{phase}       skipped", ""]
            continue
        pcfg, plan = cfg.phase(phase), _phase_plan(cfg, phase, world)
        cached, why = gradcache_choice(cfg, plan.longest_tokens, capacity) if phase == 2 else (False, "")
        est, mem = estimate_compute(cfg, plan, gpu, world), estimate_memory(cfg, phase, plan.longest_tokens, cached)
        plans.append({**asdict(plan), "compute": est, "memory": mem})
        total_hours += est["hours"] or 0.0
        loss = (f"{pcfg.mse_weight}*MSE + {cfg.phase1.cosine_weight}*cosine" if phase == 1 else
                f"{cfg.phase2.infonce_weight}*InfoNCE(t={cfg.phase2.temperature}, {cfg.phase2.num_negatives} hard "
                f"negatives{', cross-rank' if cfg.phase2.gather_across_ranks else ''}) + {pcfg.mse_weight}*MSE")
        sources = cfg.data.phase1 if phase == 1 else cfg.data.phase2
        cap = cfg.phase1.max_samples_per_dataset if phase == 1 else cfg.phase2.max_samples
        lines += [f"phase{phase}       loss {loss}"]
        lines += [f"  source     {s.name or s.path} ({s.path}{':' + s.subset if s.subset else ''}, {s.split})"
                  + (f", first {n:,} valid rows streamed" if (n := read_limit(s, source_cap(phase, s, cap))) else "")
                  for s in sources]
        lines += [f"  data       {plan.data_note}",
                  f"  examples   {_fmt(plan.examples)}; unique teacher texts: {_fmt(plan.unique_queries)} queries, "
                  f"{_fmt(plan.unique_documents)} documents; mean tokens {plan.query_tokens:.0f} / "
                  f"{plan.document_tokens:.0f}, longest {plan.longest_tokens:.0f}",
                  f"  batch      {pcfg.batch_size}/rank, {plan.global_batch} global, x{pcfg.gradient_accumulation_steps}"
                  f" accumulation = {plan.effective_batch} per optimizer step",
                  f"  steps      {_fmt(plan.steps)} optimizer steps over {pcfg.num_epochs} epoch(s), lr "
                  f"{pcfg.learning_rate}, warm-up {_fmt(plan.warmup)} steps",
                  f"  compute    teacher {_fmt(est['teacher_flops'])} FLOPs, student {_fmt(est['student_flops'])} "
                  f"FLOPs: {_fmt(est['hours'] and est['hours'] * 60)} min on {world}x{gpu}",
                  f"  memory     {_gb(mem['bytes'])} per GPU ({mem['texts_per_forward']} texts per forward at "
                  f"{plan.longest_tokens:.0f} tokens{', GradCache' if cached else ''})",
                  *([f"  gradcache  {'on' if cached else 'off'} ({why})"] if phase == 2 else []), ""]
        if plan.steps is not None and plan.warmup is not None and plan.warmup >= plan.steps:
            warnings.append(f"phase{phase}: warm-up ({plan.warmup} steps) is not shorter than the phase "
                            f"({plan.steps} steps); set phase{phase}.warmup_ratio (e.g. 0.1)")
        if mem["bytes"] and mem["bytes"] > capacity:
            fix = "set phase2.cached_infonce: true or auto (GradCache)" if phase == 2 and not cached \
                else f"lower phase{phase}.batch_size (raise gradient_accumulation_steps) or max_length"
            warnings.append(f"phase{phase} may not fit in {GPU_MEMORY_GB[gpu]} GB: {fix}")
    fill = teacher_memory(cfg)
    lines.append(f"total        {total_hours * 60:.0f} min on {world}x{gpu} (teacher fill {_gb(fill)} per GPU, released "
                 "before training)")
    lines += [f"warning      {w}" for w in warnings]
    lines += ["", "outputs",
              f"  run dir      {cfg.run_dir}  (config.yaml, metrics.jsonl, checkpoints/, phase1/, phase2/, final/)",
              f"  final model  {cfg.run_dir / 'final'}",
              f"  artifacts    {cfg.artifact_dir if cfg.training.save_to_artifacts else '(save_to_artifacts: false)'}",
              f"  cache        {cfg.cache_root} (teacher embeddings, {cfg.cache.dtype})"]
    print("\n".join(lines))
    return {"experiment": cfg.experiment, "world": world, "gpu": gpu, "phases": plans, "hours": total_hours,
            "warnings": warnings, "teacher_fill_bytes": fill}
