"""The training loop: one loop for both phases, DDP, gradient accumulation, checkpoints and resume.

Read top to bottom: :func:`run` prepares the run folder and the models, then :meth:`Trainer.train_phase` runs each
phase: data -> tokenized tables -> teacher targets (from the teacher cache) -> length-grouped batches ->
forward / loss / backward (``no_sync`` on accumulation steps) -> clip -> AdamW step -> linear warmup/decay ->
log, checkpoint, evaluate. Losses and models know nothing of this loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from distill import distributed as D
from distill.atomic import write_json_atomic
from distill.cache import build_teacher_targets, eval_teacher_embeddings
from distill.checkpoint import (
    LoadedCheckpoint,
    TrainState,
    capture_rng,
    load_latest,
    restore_rng,
    save_checkpoint,
)
from distill.config import Config, dump_config
from distill.errors import CheckpointError, ConfigError, DistillError, Preempted
from distill.dropout import use_rand_dropout
from distill.export import build_export_model, copy_tree_atomic, save_model_atomic
from distill.losses import EmbeddingMSECosineLoss, MatryoshkaSimilarityLoss, RetrievalDistillLoss
from distill.models import DistillModel, backbone, build_projection_head, check_dims, load_student

log = logging.getLogger(__name__)

DONE_MARKER = "DONE"
# Keys that may change between a run and its resume without changing what is trained.
_RESUME_TOLERANT = {("training", k) for k in ("save_steps", "keep_last", "logging_steps", "dist_timeout_s",
                                              "num_threads", "precision", "rand_dropout", "skip_phase1",
                                              "skip_phase2", "save_to_artifacts", "sparse_embedding_grad",
                                              "keep_freed_memory", "pad_length_grid")}


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token chunks for one forward: ``chunks[i]`` padded to its own length; ``restore`` maps back to input order."""

    chunks: list[dict[str, torch.Tensor]]
    restore: torch.Tensor  # embeddings_in_input_order = cat(chunk outputs)[restore]
    real_tokens: int
    padded_tokens: int


def grid_length(width: int, grid: float, cap: int | None = None) -> int:
    """``width`` rounded up to a geometric grid: a multiple of ``s = 2**floor(log2(width * grid))`` (``s >= 1``).

    The extra padding is ``< s <= width * grid``, so at most a ``grid`` fraction; the grid has about ``1 / grid``
    lengths per octave (~96 up to 512 at ``grid = 1/16``), so a few shapes recur instead of every length
    (kernels compiled per matmul shape by oneDNN on CPU or by ``torch.compile`` are reused). Never above ``cap``
    (the phase's max_length, if given) nor below ``width``; ``grid = 0`` keeps ``width``.
    """
    if grid <= 0:
        return width
    step = 1 << max(0, math.floor(math.log2(max(1.0, width * grid))))
    rounded = -(-width // step) * step
    return rounded if cap is None else max(width, min(cap, rounded))


def pad_chunks(seqs: list[list[int]], pad_id: int, chunk_size: int, device: torch.device, *, grid: float = 0.0,
               cap: int | None = None) -> Encoded:
    """Sort ``seqs`` by length, cut into chunks of ``chunk_size`` sequences and pad each chunk to its longest one.

    Padding per length-homogeneous chunk is what keeps padded tokens low when documents of one batch vary in length.
    With ``grid > 0`` a chunk's width is its longest length rounded up by :func:`grid_length` (at most ``cap``).
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = []
    padded = 0
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        width = grid_length(max(len(seqs[i]) for i in idx), grid, cap)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, : len(seqs[i])] = 1
        chunks.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        padded += ids.numel()
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return Encoded(chunks, restore.to(device), sum(len(s) for s in seqs), padded)


@dataclass
class _Phase2Inputs:
    """Tokenized queries and documents of a phase-2 micro-batch with their teacher targets."""

    enc_q: Encoded
    enc_d: Encoded
    tq: torch.Tensor  # [b, D_t]
    td: torch.Tensor  # [b * (1 + k), D_t]
    doc_ids: torch.Tensor  # [b * (1 + k)]

    @property
    def real_tokens(self) -> int:
        return self.enc_q.real_tokens + self.enc_d.real_tokens

    @property
    def padded_tokens(self) -> int:
        return self.enc_q.padded_tokens + self.enc_d.padded_tokens

    def loss(self, loss_fn: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``out``: embeddings of the query chunks then the document chunks, in chunk order."""
        b = self.tq.shape[0]
        q = out[:b][self.enc_q.restore]
        docs = out[b:][self.enc_d.restore]
        return loss_fn(q.float(), docs.float(), self.doc_ids, self.tq, self.td)


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


class Trainer:
    """Holds the models, the run folder and the logger across phases."""

    def __init__(self, cfg: Config, info: D.DistInfo, *, allow_config_change: bool = False):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.allow_config_change = allow_config_change
        self.metrics = None
        self._stop_requested = False
        self.eval_results: dict[str, Any] | None = None
        self.teacher_forwards: dict[str, int] = {}
        self.padding: dict[str, float] = {}

    # ---- setup ----
    def setup(self) -> None:
        from distill.report import MetricsLogger

        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg), encoding="utf-8")
            tb = self.run_dir / "tensorboard"
            self.metrics = MetricsLogger(self.run_dir / "metrics.jsonl", tensorboard_dir=tb)
        D.barrier()
        m = self.cfg.model
        self.student = load_student(m.student, revision=m.student_revision, trust_remote_code=m.trust_remote_code,
                                    attn_implementation=m.attn_implementation, device=self.device)
        check_dims(m, self.student, None)
        head = build_projection_head(m.student_dim, m.projection_hidden_dim, m.teacher_dim, self.cfg.training.seed) \
            if m.use_projection else None
        sparse = self.cfg.training.sparse_embedding_grad and self.device.type == "cpu"
        self.model = DistillModel(self.student, head, sparse_table_grad=sparse).to(self.device)
        if self.cfg.training.rand_dropout and self.device.type == "cpu" and not self.cfg.training.compile:
            # inductor draws its own dropout masks inside fused kernels; GPUs have a fused native kernel
            log.info("CPU dropout from random_ bit lanes: %d dropout modules swapped", use_rand_dropout(self.student))
        if self.cfg.training.compile:
            # Compile the backbone's forward method (sentence-transformers calls ``model.forward`` directly, so
            # nn.Module.compile would be bypassed); parameter names, checkpoints and the export stay as they are.
            model = backbone(self.student)
            model.forward = torch.compile(model.forward, dynamic=True)
        self.tokenizer = self.student.tokenizer
        self.max_model_len = _max_student_length(self.student)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self._stop_requested = True  # SLURM and torchrun may both deliver SIGTERM: every one just sets the flag

    # ---- run ----
    def run(self) -> Path:
        resume = self._find_resume()
        if resume is not None:
            log.info("resuming from %s (phase %d, step %d)", resume.path, resume.state.phase, resume.state.step)
            self.model.load_state_dict(resume.model_state)
        trained_here: set[int] = set()
        for p in self.phases:
            if resume is not None and (p < resume.state.phase or (p == resume.state.phase and resume.state.phase_done)):
                continue  # finished before the restart
            ckpt = resume if resume is not None and resume.state.phase == p else None
            if p == 2 and ckpt is None and 1 not in trained_here:
                if resume is None:
                    self._load_phase1_weights()
                else:  # the phase-1 end checkpoint already holds them
                    log.info("phase 2 starts from the phase-1 weights in %s", resume.path)
            self.train_phase(p, ckpt)
            trained_here.add(p)
        return self.finish()

    @property
    def phases(self) -> list[int]:
        return [p for p in (1, 2) if not getattr(self.cfg.training, f"skip_phase{p}")]

    def _find_resume(self) -> LoadedCheckpoint | None:
        ckpt = load_latest(self.ckpt_dir) if self.info.is_main else None
        path = D.broadcast_object(str(ckpt.path) if ckpt else None)
        if path is None:
            return None
        if ckpt is None:  # other ranks read the checkpoint rank 0 chose
            from distill.checkpoint import load_checkpoint

            ckpt = load_checkpoint(Path(path))
        changed = _config_diff(ckpt.config, self.cfg.to_dict(), ckpt.state)
        if changed and not self.allow_config_change:
            raise CheckpointError(
                f"{ckpt.path}: the config changed since this checkpoint ({', '.join(changed[:5])}); resume with the "
                "original config, pass --allow-config-change, or --overwrite to start afresh"
            )
        return ckpt

    def _load_phase1_weights(self) -> None:
        path = self.run_dir / "phase1" / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(
                f"training.skip_phase1 is true but no phase-1 result exists at {path}; run phase 1 of experiment "
                f"'{self.cfg.experiment}' first (same config name and output_dir)"
            )
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(path)))
        log.info("phase 2 starts from the phase-1 weights in %s", path)

    # ---- one phase ----
    def train_phase(self, phase: int, ckpt: LoadedCheckpoint | None) -> None:
        cfg = self.cfg
        pcfg = cfg.phase1 if phase == 1 else cfg.phase2
        name = f"phase{phase}"
        max_len = min(pcfg.max_length, self.max_model_len)
        data, tables, lengths = self._prepare_data(phase, max_len)
        targets = build_teacher_targets(cfg, pcfg.max_length, data.queries, data.documents, self.device)
        self.teacher_forwards[name] = targets.forwards
        if targets.dim != cfg.model.teacher_dim:
            raise ConfigError(f"model.teacher_dim is {cfg.model.teacher_dim} but {cfg.model.teacher} outputs "
                              f"{targets.dim}-d embeddings")
        log.info("%s: teacher forward passes this phase: %d", name, targets.forwards)

        from distill.sampling import LengthGroupedBatchSampler

        sampler = LengthGroupedBatchSampler(lengths, pcfg.batch_size, self.info.rank, self.info.world_size,
                                            seed=cfg.training.seed + phase, pool_batches=cfg.data.length_pool_batches)
        accum = pcfg.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(sampler) / accum)
        total_steps = steps_per_epoch * pcfg.num_epochs
        if pcfg.max_steps is not None:
            total_steps = min(total_steps, pcfg.max_steps)
        loss_fn = self._loss(phase)
        if phase == 1 and ckpt is None and self.model.head is not None and cfg.model.head_init == "least_squares":
            self._init_head_least_squares(data, tables, targets)
        self._freeze_unused_parameters(data, tables, sampler, phase, targets)
        optimizer = _adamw(self.model, pcfg.learning_rate, pcfg.weight_decay, cfg.model.head_lr_multiplier)
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(optimizer, min(pcfg.warmup_steps, total_steps), total_steps)
        scaler = torch.amp.GradScaler(self.device.type) if cfg.training.precision == "fp16" else None
        state = TrainState(phase=phase)
        if ckpt is not None:
            state = self._restore(ckpt, optimizer, scheduler, scaler)
        head_only = round(pcfg.head_only_fraction * total_steps) if phase == 1 and self.model.head is not None else 0
        log.info("%s: %d examples, %d batches/rank/epoch of %d (global batch %d, x%d accumulation = %d per step), "
                 "%d optimizer steps", name, len(data.examples), len(sampler), pcfg.batch_size,
                 pcfg.batch_size * self.info.world_size, accum, pcfg.batch_size * self.info.world_size * accum,
                 total_steps)

        runner = _PhaseRunner(self, phase, pcfg, data, tables, targets, sampler, loss_fn, optimizer, scheduler,
                              scaler, state, total_steps, head_only)
        runner.loop()
        self.padding[name] = runner.padding_efficiency()
        log.info("%s done: %d steps, padding efficiency (real / padded tokens) %.3f, %d non-finite steps skipped",
                 name, state.step, self.padding[name], state.nonfinite_skipped)
        state.phase_done = True
        self._save_phase_weights(phase)  # first: a phase-done checkpoint implies the phase's weights exist
        self._save(state, optimizer, scheduler, scaler, name=f"phase{phase}-step{state.step:08d}")
        if cfg.eval.data:
            self._evaluate(name, state.step)

    def load_data(self) -> None:
        """Read and validate every phase's data (rank 0 prepares, all ranks read) before any model loads or any
        file of the run is written, so bad input costs seconds and touches nothing."""
        from distill import data as data_mod

        cfg = self.cfg
        work = cfg.cache_root / "data"
        self.data = {}
        if 1 in self.phases:
            self.data[1] = data_mod.load_phase1(cfg.data, cfg.phase1.max_samples_per_dataset, cfg.training.seed, work)
        if 2 in self.phases:
            self.data[2] = data_mod.load_phase2(cfg.data, cfg.phase2.num_negatives, cfg.phase2.max_samples,
                                                cfg.training.seed, work)

    @property
    def pad_id(self) -> int:
        """The student tokenizer's padding id (0 when it defines none; the attention mask hides it anyway)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _pad(self, seqs: list[list[int]], chunk_size: int, phase: int) -> Encoded:
        """:func:`pad_chunks` with the run's ``training.pad_length_grid``, capped at the phase's max_length."""
        pcfg = self.cfg.phase1 if phase == 1 else self.cfg.phase2
        return pad_chunks(seqs, self.pad_id, chunk_size, self.device, grid=self.cfg.training.pad_length_grid,
                          cap=min(pcfg.max_length, self.max_model_len))

    def _prepare_data(self, phase: int, max_len: int):
        """The phase's data with its texts tokenized once by the student's tokenizer, and each example's length."""
        from distill import data as data_mod
        from distill.sampling import phase1_lengths, phase2_lengths

        work = self.cfg.cache_root / "data"
        data = self.data[phase]
        tables = (data_mod.tokenize_table(data.queries, self.tokenizer, max_len, work),
                  data_mod.tokenize_table(data.documents, self.tokenizer, max_len, work))
        lengths_fn = phase1_lengths if phase == 1 else phase2_lengths
        return data, tables, lengths_fn(data.examples, tables[0].lengths, tables[1].lengths)

    @torch.no_grad()
    def _init_head_least_squares(self, data, tables, targets, chunk: int = 64) -> None:
        """Start the projection head as the ridge-regression map from the (frozen, pretrained) student's embeddings
        to the teacher's over a seeded subset of the phase-1 texts (:func:`distill.models.ridge_map`).

        Each rank embeds its share of the texts and sums the sufficient statistics; one all-reduce gives every rank
        the same sums and so the same head. A random head would first have to be learnt from scratch while its
        gradients disturb the pretrained student; this start is the best affine map (what the head-only warm-up
        only approaches) at the cost of one student forward per text.
        """
        from distill.models import ridge_map, set_head_to_affine_map

        m = self.cfg.model
        items = np.asarray(data.examples)[:, :2]  # (role, row): 0 = query table, 1 = document table
        if len(items) > m.head_init_max_texts:
            pick = np.random.default_rng(self.cfg.training.seed).choice(len(items), m.head_init_max_texts, replace=False)
            items = items[np.sort(pick)]
        mine = items[self.info.rank :: self.info.world_size]
        d, dt = m.student_dim, targets.dim
        xtx, xty = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dt, dtype=torch.float64)
        x_sum, y_sum = torch.zeros(d, dtype=torch.float64), torch.zeros(dt, dtype=torch.float64)
        precision = self.cfg.training.precision
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        for role in (0, 1):
            rows = mine[mine[:, 0] == role, 1]
            rows = rows[np.argsort(tables[role].lengths[rows], kind="stable")]  # length-sorted: little padding
            lookup = targets.query if role == 0 else targets.document
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                enc = self._pad(tables[role].input_ids(part), len(part), phase=1)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    x = torch.cat([self.model.student_embedding(c) for c in enc.chunks])[enc.restore]
                x = x.double().cpu()
                y = lookup(part).double().cpu()
                xtx += x.T @ x
                xty += x.T @ y
                x_sum += x.sum(0)
                y_sum += y.sum(0)
        n = torch.tensor([float(len(mine))], dtype=torch.float64)
        stats = torch.cat([xtx.flatten(), xty.flatten(), x_sum, y_sum, n])
        stats = D.all_reduce_sum(stats.to(self.device)).cpu()
        sizes = [d * d, d * dt, d, dt]
        xtx, xty, x_sum, y_sum, n_all = torch.split(stats, [*sizes, 1])
        a, c = ridge_map(xtx.view(d, d), xty.view(d, dt), x_sum, y_sum, int(n_all.item()))
        set_head_to_affine_map(self.model.head, a, c)
        self.model.train(was_training)
        log.info("projection head initialised by least squares on %d phase-1 texts (%.1f s)", int(n_all.item()),
                 time.perf_counter() - t0)

    def _loss(self, phase: int, gather: bool = True) -> nn.Module:
        m, cfg = self.cfg.model, self.cfg
        dims = None if m.use_projection else m.matryoshka_dims
        if phase == 1:
            if m.use_projection:
                return EmbeddingMSECosineLoss(cfg.phase1.mse_weight, cfg.phase1.cosine_weight)
            return MatryoshkaSimilarityLoss(dims, m.matryoshka_weights, cfg.phase1.mse_weight, cfg.phase1.cosine_weight)
        p2 = cfg.phase2
        return RetrievalDistillLoss(p2.temperature, p2.infonce_weight, p2.mse_weight, gather=gather and p2.gather_across_ranks,
                                    dims=dims, dim_weights=m.matryoshka_weights, documents=p2.infonce_documents)

    def _freeze_unused_parameters(self, data, tables, sampler, phase, targets) -> None:
        """Parameters no loss ever reaches (e.g. the backbone's unused pooler) would make DDP wait forever for
        their gradients; one probe forward/backward on a tiny batch finds them and freezes them."""
        if any(not p.requires_grad for p in self.model.parameters()):
            return  # already probed (phase 1)
        rng = torch.get_rng_state()
        batch = sampler.batches(0)[0][:2]
        self.model.zero_grad(set_to_none=True)
        probe_loss = self._loss(phase, gather=False)  # no collectives: this probe runs before DDP exists
        loss = self._batch_loss(phase, data, tables, targets, probe_loss, self.model, batch)[0]
        loss.backward()
        frozen = [n for n, p in self.model.named_parameters() if p.grad is None]
        for n, p in self.model.named_parameters():
            if p.grad is None:
                p.requires_grad_(False)
        self.model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if frozen:
            log.info("frozen %d parameter tensors that receive no gradient (e.g. %s)", len(frozen), frozen[0])

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not D.is_distributed():
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=False, broadcast_buffers=False)

    def _batch_loss(self, phase, data, tables, targets, loss_fn, model, batch) -> tuple[torch.Tensor, dict, int, int]:
        """Loss of one micro-batch of example indices; returns (loss, terms, real tokens, padded tokens)."""
        ex = data.examples[np.asarray(batch)]
        precision = self.cfg.training.precision
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                             enabled=precision != "fp32")
        if phase == 1:
            roles, rows = ex[:, 0], ex[:, 1]
            seqs = [tables[r].input_ids([i])[0] for r, i in zip(roles, rows)]
            enc = self._pad(seqs, len(seqs), phase=1)
            with amp:
                emb = model(enc.chunks)[enc.restore]
            teacher = torch.empty(len(rows), targets.dim)
            qmask = roles == 0
            if qmask.any():
                teacher[torch.from_numpy(qmask)] = targets.query(rows[qmask])
            if (~qmask).any():
                teacher[torch.from_numpy(~qmask)] = targets.document(rows[~qmask])
            loss, terms = loss_fn(emb.float(), teacher.to(self.device))
            return loss, terms, enc.real_tokens, enc.padded_tokens
        inp = self._phase2_inputs(ex, tables, targets, len(ex))
        with amp:
            out = model(inp.enc_q.chunks + inp.enc_d.chunks)
        loss, terms = inp.loss(loss_fn, out)
        return loss, terms, inp.real_tokens, inp.padded_tokens

    def _phase2_inputs(self, ex: np.ndarray, tables, targets, chunk_size: int) -> _Phase2Inputs:
        q_rows, d_rows = ex[:, 0], ex[:, 1:].reshape(-1)
        enc_q = self._pad(tables[0].input_ids(q_rows), chunk_size, phase=2)
        enc_d = self._pad(tables[1].input_ids(d_rows), chunk_size, phase=2)
        return _Phase2Inputs(enc_q, enc_d, targets.query(q_rows).to(self.device),
                             targets.document(d_rows).to(self.device),
                             torch.from_numpy(np.ascontiguousarray(d_rows)).to(self.device))

    def _cached_phase2(self, data, tables, targets, loss_fn, model, batch, scale: float, no_sync, sync_last: bool):
        """Phase-2 micro-batch with GradCache (:mod:`distill.gradcache`): forward+backward in mini-batch chunks."""
        from distill.gradcache import cached_backward

        ex = data.examples[np.asarray(batch)]
        inp = self._phase2_inputs(ex, tables, targets, self.cfg.phase2.mini_batch_size)
        precision = self.cfg.training.precision
        amp_dtype = torch.bfloat16 if precision == "bf16" else torch.float16

        def forward(chunk):
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=precision != "fp32"):
                return model([chunk])

        loss, terms = cached_backward(forward, inp.enc_q.chunks + inp.enc_d.chunks, lambda e: inp.loss(loss_fn, e),
                                      scale=scale, no_sync=no_sync, sync_last=sync_last, device=self.device)
        return loss, terms, inp.real_tokens, inp.padded_tokens

    # ---- checkpoints ----
    def _restore(self, ckpt: LoadedCheckpoint, optimizer, scheduler, scaler) -> TrainState:
        self.model.load_state_dict(ckpt.model_state)
        load_optimizer_state(optimizer, ckpt.optimizer_state)
        scheduler.load_state_dict(ckpt.scheduler_state)
        if scaler is not None and ckpt.scaler_state is not None:
            scaler.load_state_dict(ckpt.scaler_state)
        if len(ckpt.rng_states) == self.info.world_size:
            restore_rng(ckpt.rng_states[self.info.rank])
        else:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: dropout streams restart",
                        len(ckpt.rng_states), self.info.world_size)
        if self.info.is_main:
            self._truncate_metrics(f"phase{ckpt.state.phase}", ckpt.state.step)
        return ckpt.state

    def _truncate_metrics(self, phase_name: str, step: int) -> None:
        """Drop log records written after the checkpoint (the run died after them), so the resumed log continues
        from the checkpoint's step without duplicates or a jump."""
        from distill.report import MetricsLogger

        path = self.run_dir / "metrics.jsonl"
        self.metrics.close()
        keep = []
        order = {"phase1": 1, "phase2": 2}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            p = order.get(rec.get("phase"), 0)
            if p < order[phase_name] or (p == order[phase_name] and rec.get("step", 0) <= step):
                keep.append(line)
        tmp = path.with_name(".tmp-metrics.jsonl")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        tmp.replace(path)
        self.metrics = MetricsLogger(path, tensorboard_dir=self.run_dir / "tensorboard")

    def _save(self, state: TrainState, optimizer, scheduler, scaler, name: str) -> None:
        rng = D.all_gather_object(capture_rng())
        if self.info.is_main:
            save_checkpoint(self.ckpt_dir, name, model=self.model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, rng_states=rng, state=state, config=self.cfg.to_dict(),
                            keep_last=self.cfg.training.keep_last)
        D.barrier()

    def _save_phase_weights(self, phase: int) -> None:
        if self.info.is_main:
            from safetensors.torch import save_file

            from distill.checkpoint import state_dict_for_save

            out = self.run_dir / f"phase{phase}"
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".tmp-model.safetensors"
            save_file(state_dict_for_save(self.model), str(tmp))
            tmp.replace(out / "model.safetensors")
        D.barrier()

    # ---- evaluation, export ----
    def export_model(self):
        return build_export_model(self.student, self.model.head)

    def _eval_teacher(self):
        """The eval set and its teacher embeddings, once per run (a collective: every rank helps fill the cache)."""
        if getattr(self, "_eval_cache", None) is None:
            from distill.evaluate import read_beir

            beir = read_beir(self.cfg.eval.data, self.cfg.eval.split)
            self._eval_cache = (beir, eval_teacher_embeddings(self.cfg, beir, self.device))
        return self._eval_cache

    def _evaluate(self, phase_name: str, step: int) -> None:
        """Rank 0 evaluates on the held-out BEIR set; the other ranks wait and receive the result."""
        from distill.evaluate import evaluate_settings, run_eval_distributed

        beir, teacher_emb = self._eval_teacher()
        m = self.cfg.model
        dims = self.cfg.eval.dims or (None if m.use_projection else m.matryoshka_dims)
        bs = self.cfg.eval.batch_size

        def work() -> dict[str, Any]:
            model = self.export_model()
            with torch.no_grad():
                def encode(texts: list[str], role: str) -> torch.Tensor:
                    fn = model.encode_query if role == "query" else model.encode_document
                    return fn(texts, batch_size=bs, convert_to_tensor=True).float().cpu()
                return evaluate_settings(beir.queries, beir.corpus, beir.qrels, encode, teacher_emb, dims)

        self.eval_results = run_eval_distributed(work)
        self.model.train()
        if self.info.is_main:
            self.metrics.log({"event": "eval", "phase": phase_name, "step": step, "results": self.eval_results})
            from distill.report import format_eval_table

            log.info("%s step %d evaluation:\n%s", phase_name, step, format_eval_table(self.eval_results))

    def finish(self) -> Path:
        final = self.run_dir / "final"
        if self.info.is_main:
            model = self.export_model()
            save_model_atomic(model, final, extra_files={"distill_config.yaml": dump_config(self.cfg)})
            summary = {"experiment": self.cfg.experiment, "teacher_forward_passes": self.teacher_forwards,
                       "padding_efficiency": self.padding, "world_size": self.info.world_size}
            write_json_atomic(final / "distill_summary.json", summary)
            if self.metrics is not None:
                self.metrics.close()
            from distill.report import plot_metrics, write_report

            metrics_path = self.run_dir / "metrics.jsonl"
            plot_metrics(metrics_path, final)
            write_report(final, self.eval_results, metrics_path, self.cfg.to_dict(), summary)
            if metrics_path.exists():
                (final / "metrics.jsonl").write_bytes(metrics_path.read_bytes())
            if self.cfg.training.save_to_artifacts:
                copy_tree_atomic(final, self.cfg.artifact_dir)
                log.info("saved the model to %s", self.cfg.artifact_dir)
            done = set(finished_phases(self.run_dir)) | set(self.phases)
            write_json_atomic(self.run_dir / DONE_MARKER, {"phases": sorted(done)})
            log.info("final model: %s", final)
        D.barrier()
        return self.cfg.artifact_dir if self.cfg.training.save_to_artifacts else final


class _PhaseRunner:
    """The inner loop of one phase (kept apart so :class:`Trainer` stays readable)."""

    def __init__(self, tr: Trainer, phase, pcfg, data, tables, targets, sampler, loss_fn, optimizer, scheduler,
                 scaler, state: TrainState, total_steps: int, head_only_steps: int):
        self.tr, self.phase, self.pcfg = tr, phase, pcfg
        self.data, self.tables, self.targets, self.sampler = data, tables, targets, sampler
        self.loss_fn, self.optimizer, self.scheduler, self.scaler = loss_fn, optimizer, scheduler, scaler
        self.head_only_steps = head_only_steps
        self._full: nn.Module | None = None
        self._head: nn.Module | None = None
        self.state, self.total_steps = state, total_steps
        self.real_tokens = 0
        self.padded_tokens = 0
        self.consecutive_nonfinite = 0
        self.name = f"phase{phase}"
        self._table_grad: torch.Tensor | None = None  # see _keep_table_grad

    @property
    def ddp(self) -> nn.Module:
        """What this step trains: the head alone over frozen student features during the first ``head_only_steps``
        (linear probing before fine-tuning, so a random head does not distort the pretrained student), else the
        student and head together. Each is wrapped in DDP when first needed."""
        if self.state.step < self.head_only_steps:
            if self._head is None:
                self._head = _HeadOnly(self.tr.model, self.tr._wrap(_HeadModule(self.tr.model.head)))
            return self._head
        if self._full is None:
            self._full = self.tr._wrap(self.tr.model)
        return self._full

    def padding_efficiency(self) -> float:
        totals = D.all_reduce_sum(torch.tensor([self.real_tokens, self.padded_tokens], dtype=torch.float64))
        return float(totals[0] / totals[1]) if totals[1] > 0 else 1.0

    def _groups(self) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(epoch, index of the first micro-batch, micro-batches of one optimizer step), from the resume point on."""
        accum = self.pcfg.gradient_accumulation_steps
        for epoch in range(self.state.epoch, self.pcfg.num_epochs):
            batches = self.sampler.batches(epoch)
            start = self.state.micro if epoch == self.state.epoch else 0
            for i in range(start, len(batches), accum):
                yield epoch, i, batches[i : i + accum]

    def loop(self) -> None:
        tr, st = self.tr, self.state
        params = [p for p in tr.model.parameters() if p.requires_grad]
        bar = tqdm(total=self.total_steps, initial=st.step, desc=self.name, disable=not tr.info.is_main,
                   dynamic_ncols=True)
        t0, samples0 = time.perf_counter(), 0
        tr.model.train()
        for epoch, first, group in self._groups():
            if st.step >= self.total_steps:
                break
            loss_sum, terms_sum, n = self._accumulate(group)
            stats = D.all_reduce_sum(torch.tensor([loss_sum, float(not math.isfinite(loss_sum)), n,
                                                   float(tr._stop_requested)], dtype=torch.float64))
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.pcfg.max_grad_norm or float("inf"))
            finite = stats[1] == 0 and bool(torch.isfinite(grad_norm))
            self._step(finite, grad_norm)
            st.epoch, st.micro = epoch, first + len(group)
            st.samples_seen += int(stats[2])
            samples0 += int(stats[2])
            if st.micro >= len(self.sampler):
                st.epoch, st.micro = epoch + 1, 0
            bar.update(1)
            elapsed = time.perf_counter() - t0
            mean_loss = float(stats[0] / tr.info.world_size / max(len(group), 1))
            if tr.info.is_main and (st.step % tr.cfg.training.logging_steps == 0 or st.step == self.total_steps):
                self._log(epoch, mean_loss, terms_sum, len(group), samples0 / max(elapsed, 1e-9), elapsed, bar)
            if stats[3] > 0:
                tr._save(st, self.optimizer, self.scheduler, self.scaler, name=f"{self.name}-step{st.step:08d}")
                bar.close()
                raise Preempted(f"preempted (SIGTERM) at {self.name} step {st.step}: checkpoint saved in "
                                f"{tr.ckpt_dir}; run the same command again to resume")
            save_steps = tr.cfg.training.save_steps
            if save_steps and st.step % save_steps == 0 and st.step < self.total_steps:
                tr._save(st, self.optimizer, self.scheduler, self.scaler, name=f"{self.name}-step{st.step:08d}")
            if tr.cfg.eval.data and tr.cfg.eval.every_n_steps and st.step % tr.cfg.eval.every_n_steps == 0:
                tr._evaluate(self.name, st.step)
                tr.model.train()
        bar.close()

    def _accumulate(self, group: list[list[int]]) -> tuple[float, dict[str, float], int]:
        """Forward/backward every micro-batch of one optimizer step; gradients sync only on the last one."""
        tr = self.tr
        loss_sum, terms_sum, n = 0.0, {}, 0
        model = self.ddp
        is_ddp = isinstance(model, (DDP, _HeadOnly)) and D.is_distributed()
        cached = self.phase == 2 and tr.cfg.phase2.cached_infonce
        if self.state.step >= self.head_only_steps:
            self._keep_table_grad()
        for j, batch in enumerate(group):
            last = j == len(group) - 1
            if cached:
                loss, terms, real, padded = tr._cached_phase2(
                    self.data, self.tables, self.targets, self.loss_fn, model, batch, 1.0 / len(group),
                    model.no_sync if is_ddp else None, sync_last=last)
            else:
                sync = contextlib.nullcontext() if last or not is_ddp else model.no_sync()
                with sync:
                    loss, terms, real, padded = tr._batch_loss(self.phase, self.data, self.tables, self.targets,
                                                               self.loss_fn, model, batch)
                    scaled = loss / len(group)
                    if self.scaler is not None:
                        scaled = self.scaler.scale(scaled)
                    scaled.backward()
            loss_sum += float(loss.detach())
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v)
            n += len(batch)
            self.real_tokens += real
            self.padded_tokens += padded
        return loss_sum, terms_sum, n

    def _keep_table_grad(self) -> None:
        """Give the word-embedding table a zeroed dense ``.grad`` before a step's backward when the model sends it
        sparse gradient rows (``DistillModel.sparse_table_grad``): autograd adds them into it in place. The same
        buffer serves every step (``zero_grad`` drops the reference, this restores it), so its pages stay mapped."""
        table = self.tr.model.token_table() if self.tr.model.sparse_table_grad else None
        if table is None or not table.weight.requires_grad or table.weight.grad is not None:
            return
        if self._table_grad is None:
            self._table_grad = torch.zeros_like(table.weight)
        else:
            self._table_grad.zero_()
        table.weight.grad = self._table_grad

    def _step(self, finite: bool, grad_norm: torch.Tensor) -> None:
        st = self.state
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            st.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
            log.warning("%s step %d: non-finite loss or gradient (norm %s); optimizer step skipped (%d in a row)",
                        self.name, st.step + 1, float(grad_norm), self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.tr.cfg.training.max_nonfinite_steps:
                raise DistillError(f"{self.name} step {st.step + 1}: {self.consecutive_nonfinite} consecutive "
                                   "non-finite losses/gradients; lower the learning rate or check the data")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1

    def _log(self, epoch, loss, terms_sum, n_micro, samples_per_s, elapsed, bar) -> None:
        lr = self.scheduler.get_last_lr()[0]
        terms = {k: v / max(n_micro, 1) for k, v in terms_sum.items()}
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        pe = self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
        self.tr.metrics.log({"event": "train", "phase": self.name, "step": self.state.step, "epoch": epoch,
                             "loss": loss, "terms": terms, "lr": lr, "samples_per_s": samples_per_s,
                             "elapsed_s": elapsed, "padding_efficiency": pe,
                             "nonfinite_skipped": self.state.nonfinite_skipped})


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


class _HeadModule(nn.Module):
    """The projection head as a module of tensors (so DDP can wrap the head alone)."""

    def __init__(self, head: nn.Sequential):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head({"sentence_embedding": x})["sentence_embedding"]


class _HeadOnly:
    """Head-only training step: the student embeds without a graph, the (DDP-wrapped) head learns on top."""

    def __init__(self, model: DistillModel, head: nn.Module):
        self.model, self.head = model, head

    def __call__(self, chunks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        with torch.no_grad():
            feats = torch.cat([self.model.student(dict(c))["sentence_embedding"] for c in chunks])
        return self.head(feats)

    def no_sync(self):
        return self.head.no_sync()


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")  # where torch.optim.AdamW(fused=True) has a kernel


def _adamw(model: DistillModel, lr: float, weight_decay: float, head_lr_multiplier: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and normalisation weights (1-d tensors), as is standard for transformers.

    The projection head starts from random weights while the student is pretrained, so the head's groups get
    ``lr * head_lr_multiplier``; the linear schedule scales every group alike. The fused kernel (one pass over all
    parameters instead of a Python loop of small ops per tensor) is used on the devices torch has it for; on CPU it
    cut the optimizer step of all-MiniLM-L6-v2 from ~105 ms to ~20 ms (docs/PERFORMANCE.md).
    """
    head_ids = {id(p) for p in model.head.parameters()} if model.head is not None else set()
    groups = []
    for is_head, mult in ((False, 1.0), (True, head_lr_multiplier)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head_ids) == is_head]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult})
    device = next(model.parameters()).device.type
    return torch.optim.AdamW(groups, lr=lr, fused=True if device in FUSED_ADAMW_DEVICES else None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` keeping this optimizer's kernel choice (``fused`` / ``foreach``).

    Saved param groups carry the flags of the run that saved them (e.g. a GPU run, or a version before the fused
    kernel), and ``load_state_dict`` would adopt them; the kernel only changes speed, so the resuming machine's wins.
    """
    impl = {k: optimizer.defaults[k] for k in ("fused", "foreach")}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(impl)


def _max_student_length(student) -> int:
    tok_max = getattr(student.tokenizer, "model_max_length", 512) or 512
    pos = getattr(getattr(backbone(student), "config", None), "max_position_embeddings", None)
    limits = [x for x in (tok_max, pos and pos - 2) if x and x < 100_000]
    return min(limits) if limits else 512


def _config_diff(old: dict[str, Any], new: dict[str, Any], state: TrainState) -> list[str]:
    """Keys whose change would make the resumed run differ from an uninterrupted one.

    A checkpoint taken at the end of a phase only fixes the model's shape; one taken mid-phase also fixes that phase's
    hyper-parameters, the data, the teacher targets' dtype and the training settings.
    """
    sections = ["model"] if state.phase_done else ["model", f"phase{state.phase}", "data", "cache", "training"]
    out = []
    for section in sections:
        for key, value in (new.get(section) or {}).items():
            if (section, key) in _RESUME_TOLERANT:
                continue
            if old.get(section, {}).get(key) != value:
                out.append(f"{section}.{key}")
    return out


def finished_phases(run_dir: Path) -> list[int]:
    """Phases a previous run of this experiment completed and exported (read from its DONE marker)."""
    try:
        return list(json.loads((run_dir / DONE_MARKER).read_text(encoding="utf-8"))["phases"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def seed_everything(seed: int, rank: int) -> None:
    """A different, reproducible stream per rank (dropout differs across ranks, as it should)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def run(cfg: Config, *, overwrite: bool = False, allow_config_change: bool = False) -> Path:
    """Train ``cfg`` (under torchrun or in one process) and return the final model folder."""
    from distill.data import preflight

    if cfg.training.precision == "fp16" and cfg.phase2.cached_infonce:
        raise ConfigError("phase2.cached_infonce works with training.precision bf16 or fp32, not fp16")
    wanted = [p for p in (1, 2) if not getattr(cfg.training, f"skip_phase{p}")]
    preflight(cfg.data, wanted, cfg.phase2.num_negatives)  # before any process group: bad files fail in seconds
    if set(wanted) <= set(finished_phases(cfg.run_dir)) and not overwrite:
        raise DistillError(f"experiment '{cfg.experiment}' already finished in {cfg.run_dir}; pass --overwrite to "
                           "train it again (its checkpoints and final model will be replaced)")
    info = D.init_distributed(timeout_s=cfg.training.dist_timeout_s)
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    if info.device.type == "cpu" and cfg.training.keep_freed_memory and D.keep_freed_memory() and info.is_main:
        log.info("malloc keeps freed memory for reuse (mmap above %d MB only, trim above %d MB)",
                 D.MMAP_THRESHOLD_BYTES >> 20, D.TRIM_THRESHOLD_BYTES >> 20)
    precision, why = D.resolve_precision(cfg.training.precision, info.device,
                                         cached_infonce=cfg.phase2.cached_infonce)
    if info.is_main and cfg.training.precision == "auto":
        log.info("training.precision auto -> %s (%s)", precision, why)
    elif info.is_main and why:
        log.warning("training.precision %s: %s", precision, why)
    cfg.training.precision = precision
    if cfg.training.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("training.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    seed_everything(cfg.training.seed, info.rank)
    trainer = Trainer(cfg, info, allow_config_change=allow_config_change)
    trainer.load_data()
    if overwrite and info.is_main and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    D.barrier()
    trainer.setup()
    try:
        return trainer.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # outside the loop nobody would act on the flag
        if trainer.metrics is not None:
            trainer.metrics.close()
