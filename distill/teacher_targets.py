"""The teacher embeddings each phase (and the eval set) distills from, via :class:`~distill.teacher_cache.TeacherCache`:
before each phase all ranks embed the missing (text, role) pairs (the teacher loads only then, and is freed before
the student trains). :func:`precompute` fills (or counts) the cache ahead of training (``python -m distill cache``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from distill import distributed as D
from distill.config import Config
from distill.data import load_phase_data
from distill.models import TeacherEncoder, TeacherSpec, VllmTeacher, check_teacher_runtime, teacher_spec_from_config

log = logging.getLogger(__name__)


class TeacherTargets:
    """Teacher embeddings of a phase's query and document tables, looked up by row: ``query(rows)`` -> [n, D_t]."""

    def __init__(self, query_fn: Callable[[np.ndarray], torch.Tensor], document_fn: Callable[[np.ndarray], torch.Tensor],
                 dim: int, forwards: int):
        self.query, self.document, self.dim, self.forwards = query_fn, document_fn, dim, forwards


class LazyTeacher:
    """Loads the teacher on first use (so a fully cached phase never loads it) and frees it on :meth:`release`;
    ``backend``: ``transformers`` (:class:`TeacherEncoder`) or ``vllm`` (:class:`VllmTeacher`)."""

    def __init__(self, spec: TeacherSpec, device: torch.device, attn_implementation: str = "auto",
                 backend: str = "transformers"):
        self.spec, self.device, self.attn, self.backend = spec, device, attn_implementation, backend
        self.encoder: TeacherEncoder | VllmTeacher | None = None

    def load(self) -> TeacherEncoder | VllmTeacher:
        if self.encoder is None:
            log.info("loading teacher %s (%s, %s, %s pooling)", self.spec.name, self.backend, self.spec.dtype,
                     self.spec.pooling)
            self.encoder = VllmTeacher(self.spec, self.device) if self.backend == "vllm" else \
                TeacherEncoder(self.spec, self.device, self.attn)
        return self.encoder

    def encode_fn(self, role: str) -> _RoleEncoder:
        return _RoleEncoder(self, role)

    def release(self) -> None:
        self.encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _RoleEncoder:
    """One role of a :class:`LazyTeacher` as :meth:`TeacherCache.fill` pipelines it: ``lengths`` (token counts, on
    the calling thread, first: it loads the teacher), ``prepare`` (tokenisation, on fill's background thread) and
    the call (the forward)."""

    def __init__(self, teacher: LazyTeacher, role: str):
        self.teacher, self.role = teacher, role

    def lengths(self, texts: list[str]) -> np.ndarray:
        return self.teacher.load().lengths(texts, self.role)

    def prepare(self, texts: list[str]) -> Any:
        return self.teacher.load().prepare(texts, self.role)

    def __call__(self, features: Any) -> torch.Tensor:
        return self.teacher.load().forward(features)


def open_cache(cfg: Config):
    from distill.teacher_cache import TeacherCache

    return TeacherCache(cfg.cache_root / "teacher", dtype=cfg.cache.dtype, shard_size=cfg.cache.shard_size)


def fill_roles(cfg: Config, cache, spec: TeacherSpec, tables: dict[str, Sequence[str]], device: torch.device) -> int:
    """Embed every missing text of each role (collective); returns the global forward count. Look up through the
    same ``cache`` afterwards: it has already verified the shards it read."""
    m = cfg.model
    teacher = LazyTeacher(spec, device, m.teacher_attn_implementation, m.teacher_backend)
    local = 0
    for role, texts in tables.items():
        local += cache.fill(spec.fingerprint(role), texts, teacher.encode_fn(role), batch_size=m.teacher_batch_size,
                            max_tokens=m.teacher_max_tokens_per_batch)
    teacher.release()
    return int(D.all_reduce_sum(torch.tensor(local)).item())


def build_teacher_targets(cfg: Config, phase_max_length: int, queries, documents, device: torch.device) -> TeacherTargets:
    """Fill the cache with every text of the phase and return lookups into it."""
    spec = teacher_spec_from_config(cfg.model, phase_max_length, device, cpu_tuning=cfg.training.cpu_tuning)
    cache = open_cache(cfg)
    forwards = fill_roles(cfg, cache, spec, {"query": queries, "document": documents}, device)
    q = cache.lookup(spec.fingerprint("query"), queries)
    d = cache.lookup(spec.fingerprint("document"), documents)
    return TeacherTargets(lambda rows: q[rows], lambda rows: d[rows], d.dim, forwards)


def eval_teacher_embeddings(cfg: Config, beir: Any, device: torch.device):
    """Teacher embeddings of a BEIR eval set (queries with the query prompt, documents without), via the cache."""
    from distill.evaluate import Embeddings

    spec = teacher_spec_from_config(cfg.model, cfg.phase2.max_length, device, cpu_tuning=cfg.training.cpu_tuning)
    texts = _beir_texts(beir)
    cache = open_cache(cfg)
    fill_roles(cfg, cache, spec, texts, device)
    q, d = (cache.lookup(spec.fingerprint(role), t)[np.arange(len(t))] for role, t in texts.items())
    return Embeddings(list(beir.queries), list(beir.corpus), q, d)


def _beir_texts(beir: Any) -> dict[str, list[str]]:
    """{role: texts} of a BEIR set, queries and corpus in their ids' order."""
    return {"query": list(beir.queries.values()), "document": list(beir.corpus.values())}


def _phase_tables(cfg: Config) -> dict[str, tuple[int, dict[str, Sequence[str]]]]:
    """Per phase: (max_length, {role: texts}) of every phase the config trains, plus the eval set if any."""
    out: dict[str, tuple[int, dict[str, Sequence[str]]]] = {}
    for phase in cfg.phases:
        data = load_phase_data(cfg, phase)
        out[f"phase{phase}"] = (cfg.phase(phase).max_length, {"query": data.queries, "document": data.documents})
    if cfg.eval.data:
        from distill.evaluate import load_eval_set

        out["eval"] = (cfg.phase2.max_length, _beir_texts(load_eval_set(cfg.eval.data, cfg.eval.split)))
    return out


def precompute(cfg: Config, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """Fill (or, with ``dry_run``, count) the cache for every phase of ``cfg``; returns per-phase numbers."""
    if not dry_run:
        check_teacher_runtime(cfg.model)
    info = D.init_distributed(timeout_s=cfg.training.dist_timeout_s)
    cache = open_cache(cfg)
    report: dict[str, dict[str, Any]] = {}
    for phase, (max_len, tables) in _phase_tables(cfg).items():
        spec = teacher_spec_from_config(cfg.model, max_len, info.device, cpu_tuning=cfg.training.cpu_tuning)
        if dry_run:
            report[phase] = {}
            for role, texts in tables.items():
                missing = cache.count_missing(spec.fingerprint(role), texts)
                unique = len(set(texts[:]))
                report[phase][role] = {"texts": unique, "missing": missing, "cached": unique - missing}
        else:
            report[phase] = {"teacher_forward_passes": fill_roles(cfg, cache, spec, tables, info.device)}
    return report
