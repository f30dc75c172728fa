"""Typed configuration: the dataclasses below are the single source of truth for every key, default and check.

A YAML file (``safe_load``) and ``--set section.key=value`` overrides are merged onto the defaults, key by key, so a
partial file such as ``phase1: {num_epochs: 2}`` is a complete config. Unknown keys, wrong types and impossible values
raise :class:`~distill.errors.ConfigError` with one line naming the file, line and key (and the closest valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distill.errors import ConfigError


@dataclass
class ModelConfig:
    teacher: str = "infly/inf-retriever-v1-pro"
    student: str = "sentence-transformers/all-mpnet-base-v2"
    teacher_dim: int = 3584
    student_dim: int = 768
    projection_hidden_dim: int = 1536
    use_projection: bool = True
    head_lr_multiplier: float = 10.0  # the projection head learns at lr x this (projection mode); 0: kept at its start
    # procrustes: the head starts as the best orthogonal map from the frozen student's embeddings to the teacher's
    # over phase-1 texts (keeps the student's own similarities exactly); least_squares: the ridge-regression affine
    # map (a lower MSE, at the cost of those similarities); both exact in the GELU MLP (hidden >= 2 * student_dim);
    # random: PyTorch's init
    head_init: Literal["procrustes", "least_squares", "random"] = "procrustes"
    head_init_max_texts: int = 50000  # phase-1 texts (a seeded random subset) the head's (or MRL rotation's) start
                                      # is fitted on
    model_name: str | None = None  # None: distilled-{student family}-{output dim}d
    teacher_revision: str | None = None
    student_revision: str | None = None
    trust_remote_code: bool = False
    teacher_pooling: Literal["auto", "mean", "cls", "last_token"] = "auto"
    teacher_normalize: bool | None = None  # None: from the teacher's sentence-transformers config (else true)
    teacher_query_prompt: str | None = None  # None: the teacher's saved "query" prompt (else none)
    teacher_document_prompt: str | None = None
    teacher_max_length: int | None = None  # None: the phase's max_length
    # auto: bf16 where the hardware multiplies it natively (bf16 GPUs, AVX512-BF16/AMX CPUs), else fp16 (GPU) / fp32
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    teacher_batch_size: int = 32  # texts per teacher forward (with a token budget: the most rows of one batch)
    # N: length-sorted teacher batches of at most N padded tokens (rows x longest text; a longer text goes alone);
    # None: teacher_batch_size texts per batch
    teacher_max_tokens_per_batch: int | None = None
    # the teacher's own attention (the student keeps attn_implementation); flash_attention_2 needs CUDA and flash_attn
    teacher_attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    teacher_backend: Literal["transformers", "vllm"] = "transformers"  # vllm: pip install 'distill[vllm]'
    matryoshka_dims: list[int] = field(default_factory=lambda: [768, 512, 256, 128, 64])
    matryoshka_weights: list[float] | None = None  # None: all 1
    # MRL mode: pca inserts a d x d rotation after the student's pooling, started at the principal axes of its
    # embeddings of phase-1 texts (at most head_init_max_texts): full-dim similarities unchanged, the first dims
    # the ones with the most variance; none: the student's dims in their pretrained order
    matryoshka_init: Literal["pca", "none"] = "none"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: sdpa where supported

    def validate(self) -> None:
        _positive(self, "teacher_dim", "student_dim", "projection_hidden_dim", "teacher_batch_size",
                  "head_init_max_texts", section="model")
        _positive(self, "head_lr_multiplier", section="model", allow_zero=True)
        if self.use_projection and self.head_init != "random" and self.projection_hidden_dim < 2 * self.student_dim:
            raise ConfigError(f"model.head_init: {self.head_init} needs projection_hidden_dim >= 2 * student_dim "
                              f"({2 * self.student_dim}), got {self.projection_hidden_dim}; raise it or set "
                              "model.head_init: random")
        for key in ("teacher_max_length", "teacher_max_tokens_per_batch"):
            if getattr(self, key) is not None:
                _positive(self, key, section="model")
        if not self.use_projection:
            dims = self.matryoshka_dims
            if not dims:
                raise ConfigError("model.matryoshka_dims: MRL mode (use_projection: false) needs at least one dim")
            if any(d < 1 or d > self.student_dim for d in dims):
                raise ConfigError(f"model.matryoshka_dims: every dim must be in 1..student_dim={self.student_dim}, got {dims}")
            if sorted(set(dims), reverse=True) != dims:
                raise ConfigError(f"model.matryoshka_dims: must be strictly decreasing, got {dims}")
            if self.matryoshka_weights is not None:
                if len(self.matryoshka_weights) != len(dims):
                    raise ConfigError("model.matryoshka_weights: needs one weight per entry of model.matryoshka_dims")
                if any(w < 0 for w in self.matryoshka_weights) or sum(self.matryoshka_weights) <= 0:
                    raise ConfigError("model.matryoshka_weights: weights must be >= 0 and not all 0")

    @property
    def output_dim(self) -> int:
        return self.teacher_dim if self.use_projection else self.student_dim


@dataclass
class PhaseCommon:
    batch_size: int = 64
    learning_rate: float = 2.0e-5
    warmup_steps: int = 1000
    num_epochs: int = 1
    mse_weight: float = 0.4
    max_length: int = 512
    gradient_accumulation_steps: int = 4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int | None = None  # stop the phase after this many optimizer steps (None: the epochs decide)
    # fraction of the phase's optimizer steps spent in linear warm-up; when set it replaces warmup_steps
    warmup_ratio: float | None = None

    def validate(self, section: str) -> None:
        _positive(self, "batch_size", "learning_rate", "num_epochs", "max_length", "gradient_accumulation_steps",
                  section=section)
        _positive(self, "warmup_steps", "mse_weight", "weight_decay", "max_grad_norm", section=section, allow_zero=True)
        if self.max_steps is not None:
            _positive(self, "max_steps", section=section)
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{section}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def warmup(self, total_steps: int) -> int:
        """Warm-up steps of a phase of ``total_steps`` optimizer steps (``warmup_ratio`` first, else ``warmup_steps``)."""
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * total_steps)
        return self.warmup_steps


@dataclass
class Phase1Config(PhaseCommon):
    cosine_weight: float = 0.6
    similarity_weight: float = 0.0  # projection mode: in-batch similarity-matrix term (keeps the student's ranking)
    max_samples_per_dataset: int | None = 100000
    head_only_fraction: float = 0.1  # projection mode: the first 10% of steps train the head alone (LP-FT)

    def validate(self, section: str = "phase1") -> None:
        super().validate(section)
        _positive(self, "cosine_weight", "similarity_weight", section=section, allow_zero=True)
        if self.mse_weight + self.cosine_weight <= 0:
            raise ConfigError("phase1: mse_weight + cosine_weight must be > 0 (the loss would be 0)")
        if self.max_samples_per_dataset is not None:
            _positive(self, "max_samples_per_dataset", section=section)
        if not 0.0 <= self.head_only_fraction < 1.0:
            raise ConfigError(f"{section}.head_only_fraction must be in [0, 1), got {self.head_only_fraction}")


@dataclass
class Phase2Config(PhaseCommon):
    learning_rate: float = 5.0e-6
    warmup_steps: int = 500
    num_epochs: int = 3
    infonce_weight: float = 0.8
    mse_weight: float = 0.2
    temperature: float = 0.02
    num_negatives: int = 7
    gradient_accumulation_steps: int = 8
    max_samples: int | None = 500000
    gather_across_ranks: bool = True  # every query sees every rank's documents as candidates
    # projection mode: the InfoNCE candidates are embedded by the student, the teacher (drop-in), or both (mean)
    infonce_documents: Literal["student", "teacher", "both"] = "both"
    # GradCache: large contrastive batch, activation memory of one mini-batch; auto: on where the plan's phase-2 memory
    # estimate exceeds the GPU's memory (off on CPU), see plan.gradcache_choice
    cached_infonce: Literal[True, False, "auto"] = False
    mini_batch_size: int = 32  # texts per forward chunk when cached_infonce is on

    def validate(self, section: str = "phase2") -> None:
        super().validate(section)
        _positive(self, "temperature", "mini_batch_size", section=section)
        _positive(self, "infonce_weight", "num_negatives", section=section, allow_zero=True)
        if self.infonce_weight + self.mse_weight <= 0:
            raise ConfigError("phase2: infonce_weight + mse_weight must be > 0 (the loss would be 0)")
        if self.max_samples is not None:
            _positive(self, "max_samples", section=section)
        if not isinstance(self.cached_infonce, bool) and self.cached_infonce != "auto":
            raise ConfigError(f"{section}.cached_infonce must be true, false or auto, got {self.cached_infonce!r}")


@dataclass
class TrainingConfig:
    skip_phase1: bool = False
    skip_phase2: bool = False
    save_to_artifacts: bool = False
    seed: int = 42
    # autocast dtype of the student forward; auto: bf16 where the GPU / CPU multiplies bf16 natively, else fp16 (GPU)
    # or fp32 (CPU; bf16 on CPUs with AVX512-BF16/AMX when cpu_tuning is on), see hardware.resolve_precision
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_steps: int = 500  # checkpoint every N optimizer steps (0: only at phase ends)
    keep_last: int = 2
    logging_steps: int = 10
    max_nonfinite_steps: int = 10  # stop after this many consecutive non-finite losses or gradients
    dist_timeout_s: float = 1800.0  # a collective waiting longer than this on a dead rank fails the run
    compile: bool = False  # torch.compile the student
    num_threads: int | None = None  # torch intra-op threads per rank on CPU (None: torch's default)
    # CPU runs only: the CPU-specific tuning of distill/hardware.py (bf16 detection for precision auto, faster
    # dropout masks); off for GPU recipes, where it changes nothing
    cpu_tuning: bool = False
    # micro-batches whose inputs (tokens padded into chunks, teacher targets, pinned) a background thread prepares
    # ahead of the one training; 0: each is prepared when needed, on the training thread
    prefetch_batches: int = 1
    # phase-2-only runs (skip_phase1): the phase-1 result to start from: an experiment name in output_dir, a run
    # folder or a model.safetensors; null: this experiment's own, else the only phase-1 result of the same model
    phase1_from: str | None = None
    # experiment trackers (rank 0) beside metrics.jsonl, which is always written; each needs its pip extra
    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["none"])
    # rank 0 uploads the final folder (model + card) to this Hub model repo at the end; token: HF_TOKEN or the login
    push_to_hub: bool = False
    hub_model_id: str | None = None  # "user-or-org/name"; required with push_to_hub
    hub_private: bool = True  # a repo created by the push is private

    def validate(self) -> None:
        if self.skip_phase1 and self.skip_phase2:
            raise ConfigError("training: skip_phase1 and skip_phase2 are both true, nothing would be trained")
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise ConfigError(f"training.report_to: 'none' cannot be combined with trackers, got {self.report_to}")
        _positive(self, "save_steps", "seed", section="training", allow_zero=True)
        _positive(self, "keep_last", "logging_steps", "max_nonfinite_steps", "dist_timeout_s", section="training")
        if self.dist_timeout_s > 1e9:  # beyond that, timedelta and torch's nanosecond clocks overflow
            raise ConfigError(f"training.dist_timeout_s must be <= 1e9 (about 31 years), got {self.dist_timeout_s}")
        _positive(self, "prefetch_batches", section="training", allow_zero=True)
        if self.push_to_hub:
            if not self.hub_model_id or not re.fullmatch(r"([\w.-]+/)?[\w.-]{1,96}", self.hub_model_id):
                raise ConfigError(f"training.hub_model_id: push_to_hub needs a Hub repo id 'user-or-org/name', "
                                  f"got {self.hub_model_id!r}")
            if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
                raise ConfigError("training.push_to_hub: HF_HUB_OFFLINE is set, so the upload at the end would fail; "
                                  "unset HF_HUB_OFFLINE or set training.push_to_hub: false")


@dataclass
class PathsConfig:
    output_dir: str = "./checkpoints"
    artifacts_dir: str = "./artifacts"
    cache_dir: str | None = None  # teacher embeddings and prepared data; None: {output_dir}/cache


@dataclass
class SourceConfig:
    path: str = ""  # Hub dataset id, or a local file/folder (jsonl, csv, parquet)
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    format: Literal["auto", "jsonl", "csv", "parquet", "hub"] = "auto"
    query_columns: list[str] = field(default_factory=list)
    document_columns: list[str] = field(default_factory=list)
    query_column: str | None = None
    positive_column: str | None = None
    negative_columns: list[str] | None = None
    max_samples: int | None = None

    def validate(self, section: str = "data") -> None:
        if not self.path:
            raise ConfigError(f"{section}.path: every data source needs a path (Hub dataset id or local file)")
        if self.max_samples is not None:
            _positive(self, "max_samples", section=section)


def _default_phase1_sources() -> list[SourceConfig]:
    return [
        SourceConfig(path="sentence-transformers/msmarco-msmarco-distilbert-base-tas-b", name="msmarco",
                     subset="triplet", query_columns=["query"], document_columns=["positive"]),
        SourceConfig(path="sentence-transformers/natural-questions", name="natural-questions", subset="pair",
                     query_columns=["query"], document_columns=["answer"]),
        SourceConfig(path="sentence-transformers/hotpotqa", name="hotpotqa", subset="triplet",
                     query_columns=["anchor"], document_columns=["positive"]),
    ]


def _default_phase2_sources() -> list[SourceConfig]:
    return [
        SourceConfig(path="sentence-transformers/msmarco-msmarco-distilbert-base-tas-b", name="msmarco-hard-negatives",
                     subset="triplet-50", query_column="query", positive_column="positive",
                     negative_columns=None),
    ]


@dataclass
class DataConfig:
    phase1: list[SourceConfig] = field(default_factory=_default_phase1_sources)
    phase2: list[SourceConfig] = field(default_factory=_default_phase2_sources)
    on_bad_row: Literal["error", "skip"] = "error"
    fill_negatives: Literal["error", "random"] = "error"
    length_pool_batches: int = 64

    def validate(self) -> None:
        _positive(self, "length_pool_batches", section="data")
        for phase in ("phase1", "phase2"):
            for i, src in enumerate(getattr(self, phase)):
                src.validate(section=f"data.{phase}[{i}]")


@dataclass
class CacheConfig:
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_size: int = 4096

    def validate(self) -> None:
        _positive(self, "shard_size", section="cache")


@dataclass
class EvalConfig:
    data: str | None = None  # a BEIR folder or a Hub dataset in BEIR layout (mteb/scifact); None: no evaluation
    split: str = "test"
    every_n_steps: int = 0  # 0: only at the end of each phase
    batch_size: int = 64
    dims: list[int] | None = None  # MRL dims to report (None: model.matryoshka_dims in MRL mode)
    mteb_tasks: list[str] | None = None  # MTEB tasks run on the final model by rank 0 (the mteb pip extra)
    # [SETTING[@DIM]/]METRIC, e.g. ndcg@10 or student->teacher/ndcg@10: the final model is the best-scoring evaluated
    # state (saved to {run_dir}/best when it is evaluated), not the last step; None: the last step
    select_best: str | None = None

    def validate(self) -> None:
        _positive(self, "every_n_steps", section="eval", allow_zero=True)
        _positive(self, "batch_size", section="eval")
        if self.select_best is not None and not self.data:
            raise ConfigError("eval.select_best needs eval.data: the evaluations it selects the final model by")
        if self.mteb_tasks:
            check_mteb("eval.mteb_tasks")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (a stand-in in ``sys.modules`` counts, a None entry there blocks it)."""
    return sys.modules.get(module) is not None or importlib.util.find_spec(module) is not None


def check_mteb(key: str) -> None:
    """A one-line ConfigError naming ``key`` when the ``mteb`` package is not importable."""
    if not installed("mteb"):
        raise ConfigError(f"{key}: MTEB tasks need the mteb package; pip install 'distill[mteb]' (or mteb)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    config_name: str = "default"  # the YAML file's stem; not a YAML key

    def validate(self) -> None:
        if self.model.model_name is not None:
            _check_name(self.model.model_name, "model.model_name")
        _check_name(self.config_name, "the config file's name (the experiment is {model_name}-{config name})")
        for section in (self.model, self.phase1, self.phase2, self.training, self.data, self.cache, self.eval):
            section.validate()
        if self.model.use_projection and self.model.head_lr_multiplier == 0 and 1 in self.phases \
                and self.phase1.head_only_fraction > 0:
            raise ConfigError(f"phase1.head_only_fraction: {self.phase1.head_only_fraction} trains the head alone, but "
                              "model.head_lr_multiplier: 0 keeps it fixed; set it to 0")
        if self.eval.select_best is not None:
            from distill.evaluate import BestMetric  # torch and pytrec_eval: imported only when the key is set

            BestMetric.from_config(self)

    @property
    def model_name(self) -> str:
        if self.model.model_name:
            return self.model.model_name
        return f"distilled-{student_family(self.model.student)}-{self.model.output_dim}d"

    @property
    def phases(self) -> list[int]:
        """The phases this config trains, in order (1 and/or 2)."""
        return [p for p in (1, 2) if not getattr(self.training, f"skip_phase{p}")]

    def phase(self, p: int) -> Phase1Config | Phase2Config:
        """The ``phase1`` or ``phase2`` section."""
        return self.phase1 if p == 1 else self.phase2

    @property
    def experiment(self) -> str:
        return f"{self.model_name}-{self.config_name}"

    @property
    def run_dir(self) -> Path:
        return Path(self.paths.output_dir) / self.experiment

    @property
    def cache_root(self) -> Path:
        return Path(self.paths.cache_dir) if self.paths.cache_dir else Path(self.paths.output_dir) / "cache"

    @property
    def artifact_dir(self) -> Path:
        return Path(self.paths.artifacts_dir) / self.experiment

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "config_name"}


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "config_name")


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_name(name: str, what: str) -> None:
    """Names that become folder names must be one safe path component (no ``/``, ``..``, spaces or a leading dot)."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ConfigError(f"{what}: {name!r} must be one folder name of letters, digits, '.', '_' and '-' (starting "
                          "with a letter or digit, at most 100 characters, no '..')")


def student_family(student: str) -> str:
    """``sentence-transformers/all-mpnet-base-v2`` -> ``mpnet``; ``models/all-MiniLM-L6-v2`` -> ``minilm``."""
    base = Path(student.rstrip("/")).name.lower().removeprefix("all-")
    return re.split(r"[-_]", base)[0] or base


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML) and ``overrides`` (``section.key=value``, value parsed as YAML) into a validated Config."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(text := path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}{_yaml_error_where(text, e)}: invalid YAML ({_yaml_problem(e)})") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
        cfg = _build(Config, raw or {}, prefix="", origin=str(path), lines=_key_lines(text))
        cfg.config_name = path.stem
    for item in overrides:
        cfg = _apply_override(cfg, item)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    text = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    return " ".join(str(text).split())


def _yaml_error_where(text: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    position = getattr(e, "position", None)  # ReaderError (a control character): a character offset
    if position is not None:
        return f":{text.count(chr(10), 0, position) + 1}"
    return ""


def _apply_override(cfg: Config, item: str) -> Config:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected section.key=value")
    dotted, value_text = item.split("=", 1)
    try:
        nested: Any = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        nested = value_text
    for k in reversed(dotted.strip().split(".")):
        nested = {k: nested}
    new = _build(Config, _merge(cfg.to_dict(), nested), prefix="", origin=f"--set {item}", lines={})
    new.config_name = cfg.config_name
    return new


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*prefix, str(i))] = item.start_mark.line + 1
                walk(item, (*prefix, str(i)))

    walk(root, ())
    return lines


def _where(origin: str, lines: dict[tuple[str, ...], int], key_path: tuple[str, ...]) -> str:
    line = lines.get(key_path)
    return f"{origin}:{line}" if line else origin


def _build(cls: type, raw: Any, prefix: str, origin: str, lines: dict[tuple[str, ...], int]) -> Any:
    """Instantiate dataclass ``cls`` from the mapping ``raw``; missing keys take the dataclass defaults."""
    path = _key_path(prefix)
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(origin, lines, path)}: {prefix or 'config'} must be a mapping, got {_tname(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "config_name"}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{_where(origin, lines, (*path, key))}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, origin, lines, (*path, key))
    return cls(**kwargs)


def _key_path(dotted: str) -> tuple[str, ...]:
    """``data.phase1[0].path`` -> ``("data", "phase1", "0", "path")`` (the keys of :func:`_key_lines`)."""
    return tuple(p for p in re.split(r"[.\[\]]+", dotted) if p)


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(tp: Any, value: Any, dotted: str, origin: str, lines: dict, key_path: tuple[str, ...]) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, Literal, list[...], X | None, dataclass)."""
    where = _where(origin, lines, key_path)
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, dotted, origin, lines, key_path)
    if value is None:
        raise ConfigError(f"{where}: {dotted} must not be null")
    if origin_tp is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: {dotted} must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin_tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {dotted} must be a list, got {_tname(value)}")
        return [_coerce(args[0], v, f"{dotted}[{i}]", origin, lines, (*key_path, str(i))) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted, origin, lines)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {dotted} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {dotted} must be an integer, got {value!r}")
        return value
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # str: PyYAML reads "1e-5" (no dot) as a string (YAML 1.1); accept numeric text
                number = float(value)
            except OverflowError:  # an int beyond float's range
                raise ConfigError(f"{where}: {dotted} is too large for a number") from None
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: {dotted} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {dotted} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {dotted} must be a string, got {_tname(value)} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {dotted}")  # a bug in this module, not user input


def _positive(obj: Any, *names: str, section: str, allow_zero: bool = False) -> None:
    """Each ``section.name`` must be > 0 (>= 0 with ``allow_zero``); None fails too."""
    for name in names:
        value = getattr(obj, name)
        if value is None or value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{section}.{name} must be {'>=' if allow_zero else '>'} 0, got {value}")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what was really run), loadable by :func:`load_config`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
