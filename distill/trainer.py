"""The training loop: one loop for both phases, DDP, gradient accumulation, checkpoints and resume.

Read top to bottom: :func:`run` checks the config and data, joins the process group and builds a :class:`Trainer`;
:meth:`Trainer.run` resumes from the newest checkpoint (:class:`~distill.checkpoint.CheckpointManager` decides) and
trains each phase with :meth:`Trainer.train_phase`: data -> tokenized tables -> teacher targets (teacher cache) ->
length-grouped batches -> the phase's task (:mod:`distill.batches`: inputs and loss of a micro-batch) ->
:meth:`Trainer._loop`: accumulate (``no_sync`` until the last micro-batch), clip, AdamW step, linear warm-up/decay,
log, checkpoint, evaluate. Losses and models know nothing of this loop; nothing here depends on the device type.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from distill import distributed as D
from distill import hardware
from distill.atomic import replace_dir, write_json_atomic
from distill.batches import Phase1Task, Phase2Task, PhaseTask, Prefetch
from distill.checkpoint import (
    CheckpointManager,
    LoadedCheckpoint,
    RunLock,
    TrainState,
    check_artifact,
    check_resume_path,
    load_model_state,
    provenance,
    restore_rng,
)
from distill.config import Config, dump_config
from distill.errors import ConfigError, DistillError, Preempted
from distill.export import build_export_model, copy_tree_atomic, model_card, push_to_hub, save_model_atomic
from distill.losses import EmbeddingMSECosineLoss, MatryoshkaSimilarityLoss, RetrievalDistillLoss
from distill.models import DistillModel, add_rotation, backbone, build_projection_head, check_dims, load_student
from distill.sampling import LengthGroupedBatchSampler, check_enough, phase1_lengths, phase2_lengths

log = logging.getLogger(__name__)


@dataclass
class PhaseRun:
    """One phase in progress: its task, batches, optimizer and where it stands."""

    phase: int
    task: PhaseTask
    sampler: LengthGroupedBatchSampler
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    state: TrainState
    total_steps: int
    head_only_steps: int  # projection mode: the first steps train the head alone (linear probing, then fine-tuning)
    accum: int  # micro-batches per optimizer step
    epochs: int
    real_tokens: int = 0
    padded_tokens: int = 0
    consecutive_nonfinite: int = 0
    inputs: Any = None  # the Prefetch of each micro-batch's inputs, in groups() order, while the loop runs

    @property
    def name(self) -> str:
        return f"phase{self.phase}"

    def groups(self) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(epoch, index of the first micro-batch, micro-batches of one optimizer step), from the resume point on."""
        epoch0, micro0 = self.state.epoch, self.state.micro
        for epoch in range(epoch0, self.epochs):
            batches = self.sampler.batches(epoch)
            for i in range(micro0 if epoch == epoch0 else 0, len(batches), self.accum):
                yield epoch, i, batches[i : i + self.accum]

    def prefetch(self, depth: int, device: torch.device) -> Prefetch:
        """Start preparing every micro-batch's inputs in order, ``depth`` ahead on a background thread (0: none)."""
        self.inputs = Prefetch((b for _, _, group in self.groups() for b in group), self.task.prepare, depth, device)
        return self.inputs


class Trainer:
    """Holds the models, the run folder and the logger across phases."""

    def __init__(self, cfg: Config, info: D.DistInfo, *, allow_config_change: bool = False,
                 run_dir: Path | None = None, resume_from: str | None = None):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.run_dir = run_dir or cfg.run_dir  # --overwrite trains beside the finished run, swapped in at the end
        self.checkpoints = CheckpointManager(self.run_dir, cfg.training.keep_last)
        self.allow_config_change, self.resume_from = allow_config_change, resume_from  # --resume-from PATH
        self.metrics = None
        self._stop_requested = False
        self.eval_results: dict[str, Any] | None = None
        self.teacher_forwards: dict[str, int] = {}
        self.padding: dict[str, float] = {}
        self._wrapped: dict[str, Any] = {}

    def load_data(self) -> None:
        """Read and validate every phase's data (rank 0 prepares, all ranks read) before any model loads or any
        file of the run is written, so bad input costs seconds and touches nothing."""
        from distill.data import load_phase_data

        self.data = {p: load_phase_data(self.cfg, p) for p in self.cfg.phases}
        for p, data in self.data.items():  # every phase's size before phase 1 spends anything
            check_enough(len(data.examples), self.cfg.phase(p).batch_size, self.info.world_size, f"phase{p}")

    def setup(self) -> None:
        m, t = self.cfg.model, self.cfg.training
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg), encoding="utf-8")
        D.barrier()
        self.student = load_student(m.student, revision=m.student_revision, trust_remote_code=m.trust_remote_code,
                                    attn_implementation=m.attn_implementation, device=self.device)
        check_dims(m, self.student, None)
        head = build_projection_head(m.student_dim, m.projection_hidden_dim, m.teacher_dim, t.seed) \
            if m.use_projection else None
        # before any checkpoint is loaded: the rotation is part of the student's weights
        self.rotation = add_rotation(self.student) if not m.use_projection and m.matryoshka_init == "pca" else None
        self.model = DistillModel(self.student, head).to(self.device)
        if t.cpu_tuning and not t.compile:  # inductor draws its own dropout masks inside fused kernels
            hardware.apply_cpu_tuning(self.student, self.device)
        if t.compile:
            # Compile the backbone's forward method (sentence-transformers calls ``model.forward`` directly, so
            # nn.Module.compile would be bypassed); parameter names, checkpoints and the export stay as they are.
            model = backbone(self.student)
            model.forward = torch.compile(model.forward, dynamic=True)
        self.tokenizer = self.student.tokenizer
        self._set_max_length()
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _set_max_length(self) -> None:
        """Train (and export) at the longest configured phase max_length the student supports; a cap is logged."""
        wanted = max(self.cfg.phase(p).max_length for p in self.cfg.phases)
        tok_max = getattr(self.tokenizer, "model_max_length", None) or wanted
        positions = getattr(getattr(backbone(self.student), "config", None), "max_position_embeddings", None)
        limits = [x for x in (tok_max, positions and positions - 2) if x and x < 100_000]
        self.max_model_len = min(limits) if limits else wanted
        if self.max_model_len < wanted:
            log.warning("the student %s supports %d tokens: texts are cut there, not at max_length %d",
                        self.cfg.model.student, self.max_model_len, wanted)
        saved = self.student.max_seq_length
        self.student.max_seq_length = min(wanted, self.max_model_len)
        if saved is not None and saved != self.student.max_seq_length:
            log.info("student max_seq_length %s -> %d (the trained length; the export keeps it)", saved,
                     self.student.max_seq_length)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self._stop_requested = True  # SLURM and torchrun may both deliver SIGTERM: every one just sets the flag

    @property
    def pad_id(self) -> int:
        """The student tokenizer's padding id (0 when it defines none; the attention mask hides it anyway)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def run(self) -> Path:
        from distill.report import MetricsLogger

        resume = self.checkpoints.resume_point(self.cfg.to_dict(), allow_config_change=self.allow_config_change,
                                               named=self.resume_from)
        if self.info.is_main:
            self.metrics = MetricsLogger.for_run(self.cfg, self.run_dir)
        if resume is not None:
            log.info("resuming from %s (phase %d, step %d)", resume.path, resume.state.phase, resume.state.step)
            load_model_state(self.model, resume)
            if resume.state.phase_done:  # the next phase starts where the uninterrupted run would: same RNG streams
                self._restore_rng(resume)
                if resume.state.phase == 1:
                    log.info("phase 2 starts from the phase-1 weights in %s", resume.path)
        elif self.cfg.phases == [2]:
            t = self.cfg.training
            path = self.checkpoints.find_phase1(Path(self.cfg.paths.output_dir), self.cfg.model_name, t.phase1_from)
            self.checkpoints.load_weights(path, self.model)
            log.info("phase 2 starts from the phase-1 weights in %s", path)
        for p in self.cfg.phases:
            if resume is not None and (p < resume.state.phase or (p == resume.state.phase and resume.state.phase_done)):
                continue  # finished before the restart; the checkpoint holds its weights
            self.train_phase(p, resume if resume is not None and resume.state.phase == p else None)
        return self.finish()

    def train_phase(self, phase: int, ckpt: LoadedCheckpoint | None) -> None:
        run = self._prepare_phase(phase, ckpt)
        log.info("%s: %d examples, %d batches/rank/epoch of %d (global batch %d, x%d accumulation = %d per step), "
                 "%d optimizer steps (%d of warm-up)", run.name, len(run.task.data.examples), len(run.sampler),
                 run.sampler.batch_size, run.sampler.global_batch_size, run.accum,
                 run.sampler.global_batch_size * run.accum, run.total_steps,
                 self.cfg.phase(phase).warmup(run.total_steps))
        with run.prefetch(self.cfg.training.prefetch_batches, self.device):  # the thread ends with the loop
            self._loop(run)
        totals = D.all_reduce_sum(torch.tensor([run.real_tokens, run.padded_tokens], dtype=torch.float64))
        self.padding[run.name] = float(totals[0] / totals[1]) if totals[1] > 0 else 1.0
        log.info("%s done: %d steps, padding efficiency (real / padded tokens) %.3f, %d non-finite steps skipped",
                 run.name, run.state.step, self.padding[run.name], run.state.nonfinite_skipped)
        run.state.phase_done = True
        self.checkpoints.save_phase_weights(phase, self.model)  # first: a phase-done checkpoint implies the weights
        self._save(run)
        if self.cfg.eval.data:
            self._evaluate(run.name, run.state.step)

    def _prepare_phase(self, phase: int, ckpt: LoadedCheckpoint | None) -> PhaseRun:
        """Tokenized data, teacher targets, the phase's task, sampler, optimizer and schedule (restored from ``ckpt``)."""
        from transformers import get_linear_schedule_with_warmup

        from distill.data import tokenize_table
        from distill.gradcache import resolve_cached_infonce
        from distill.teacher_targets import build_teacher_targets

        cfg, pcfg, name = self.cfg, self.cfg.phase(phase), f"phase{phase}"
        max_len = min(pcfg.max_length, self.max_model_len)
        data, work = self.data[phase], cfg.cache_root / "data"
        tables = (tokenize_table(data.queries, self.tokenizer, max_len, work),
                  tokenize_table(data.documents, self.tokenizer, max_len, work))
        targets = build_teacher_targets(cfg, pcfg.max_length, data.queries, data.documents, self.device)
        self.teacher_forwards[name] = targets.forwards
        if targets.dim != cfg.model.teacher_dim:
            raise ConfigError(f"model.teacher_dim is {cfg.model.teacher_dim} but {cfg.model.teacher} outputs "
                              f"{targets.dim}-d embeddings")
        log.info("%s: teacher forward passes this phase: %d", name, targets.forwards)
        common = {"pad_id": self.pad_id, "max_length": max_len, "device": self.device,
                  "precision": cfg.training.precision}
        if phase == 1:
            task: PhaseTask = Phase1Task(data, tables, targets, self._loss(1), **common)
            lengths = phase1_lengths(data.examples, tables[0].lengths, tables[1].lengths)
        else:
            cached, why = resolve_cached_infonce(cfg, [t.lengths for t in tables], self.device)
            log.info("phase2: GradCache %s (%s)", "on" if cached else "off", why)
            task = Phase2Task(data, tables, targets, self._loss(2), cached=cached, mini_batch_size=pcfg.mini_batch_size,
                              **common)
            lengths = phase2_lengths(data.examples, tables[0].lengths, tables[1].lengths)
        sampler = LengthGroupedBatchSampler(lengths, pcfg.batch_size, self.info.rank, self.info.world_size,
                                            seed=cfg.training.seed + phase, pool_batches=cfg.data.length_pool_batches)
        accum = pcfg.gradient_accumulation_steps
        total_steps = math.ceil(len(sampler) / accum) * pcfg.num_epochs
        if pcfg.max_steps is not None:
            total_steps = min(total_steps, pcfg.max_steps)
        warmup = pcfg.warmup(total_steps)
        if warmup >= total_steps:
            log.warning("%s: warm-up (%d steps) is not shorter than the phase (%d optimizer steps), so the learning "
                        "rate never reaches its peak; lower warmup_steps or set warmup_ratio", name, warmup, total_steps)
        head = self.model.head is not None
        if phase == 1 and ckpt is None and head and cfg.model.head_init != "random":
            self._init_head_map(task)
        if phase == 1 and ckpt is None and self.rotation is not None:
            self._init_rotation(task)
        self._freeze_unused_parameters(phase, task, sampler)
        optimizer = _adamw(self.model, pcfg.learning_rate, pcfg.weight_decay, cfg.model.head_lr_multiplier)
        scheduler = get_linear_schedule_with_warmup(optimizer, min(warmup, total_steps), total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.training.precision == "fp16")
        state = self._restore(ckpt, optimizer, scheduler, scaler) if ckpt is not None else TrainState(phase=phase)
        head_only = round(pcfg.head_only_fraction * total_steps) if phase == 1 and head else 0
        return PhaseRun(phase, task, sampler, optimizer, scheduler, scaler, state, total_steps, head_only, accum,
                        pcfg.num_epochs)

    def _loop(self, run: PhaseRun) -> None:
        """The step loop: accumulate, clip, step, log, checkpoint, evaluate."""
        st, tcfg = run.state, self.cfg.training
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.phase(run.phase).max_grad_norm or float("inf")
        bar = tqdm(total=run.total_steps, initial=st.step, desc=run.name, disable=not self.info.is_main,
                   dynamic_ncols=True)
        t0, samples0 = time.perf_counter(), st.samples_seen
        self.model.train()
        for epoch, first, group in run.groups():
            if st.step >= run.total_steps:
                break
            loss_sum, terms = self._accumulate(run, group)
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # one collective and one host sync per step: [loss sum, non-finite losses/norms, samples, stop requests]
            host = torch.tensor([sum(map(len, group)), self._stop_requested], dtype=torch.float64)
            nonfinite = ~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)
            stats = torch.cat([loss_sum.view(1), nonfinite.double().view(1), host.to(self.device)])
            loss_total, nonfinite, samples, stop = D.all_reduce_sum(stats).tolist()
            self._optimizer_step(run, finite=nonfinite == 0, grad_norm=grad_norm)
            st.epoch, st.micro, st.samples_seen = epoch, first + len(group), st.samples_seen + int(samples)
            if st.micro >= len(run.sampler):
                st.epoch, st.micro = epoch + 1, 0
            bar.update(1)
            if self.info.is_main and (st.step % tcfg.logging_steps == 0 or st.step == run.total_steps):
                elapsed = time.perf_counter() - t0
                self._log(run, epoch, loss_total / self.info.world_size / len(group),
                          {k: float(v) / len(group) for k, v in terms.items()},
                          (st.samples_seen - samples0) / max(elapsed, 1e-9), elapsed, bar)
            if stop > 0:
                self._save(run)
                bar.close()
                raise Preempted(f"preempted (SIGTERM) at {run.name} step {st.step}: checkpoint saved in "
                                f"{self.checkpoints.ckpt_dir}; run the same command again to resume")
            if tcfg.save_steps and st.step % tcfg.save_steps == 0 and st.step < run.total_steps:
                self._save(run)
            if self.cfg.eval.data and self.cfg.eval.every_n_steps and st.step % self.cfg.eval.every_n_steps == 0:
                self._evaluate(run.name, st.step)
                self.model.train()
        bar.close()

    def _accumulate(self, run: PhaseRun, group: list[list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward/backward every micro-batch of one optimizer step; returns the summed loss and loss terms (device
        tensors: no host sync here)."""
        model = self._trained_module(run)
        no_sync = model.no_sync if D.is_distributed() else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for j in range(len(group)):
            out = run.task.backward(model, next(run.inputs), scale=1.0 / len(group), scaler=run.scaler,
                                    no_sync=no_sync, last=j == len(group) - 1)
            loss_sum += out.loss.detach().double()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + v.detach().double()
            run.real_tokens += out.real_tokens
            run.padded_tokens += out.padded_tokens
        return loss_sum, terms

    def _trained_module(self, run: PhaseRun) -> Any:
        """What this step trains: the head alone over frozen student features during the first ``head_only_steps``
        (so a random or least-squares head does not distort the pretrained student), else the student and head
        together. Each is wrapped in DDP once, when first needed."""
        kind = "head" if run.state.step < run.head_only_steps else "full"
        if kind not in self._wrapped:
            self._wrapped[kind] = _HeadOnly(self.model, self._wrap(self.model.head)) if kind == "head" \
                else self._wrap(self.model)
        return self._wrapped[kind]

    def _optimizer_step(self, run: PhaseRun, *, finite: bool, grad_norm: torch.Tensor) -> None:
        """AdamW step (skipped, with a warning, when a loss or gradient was not finite), schedule, zero grads."""
        st = run.state
        if finite:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.consecutive_nonfinite = 0
        else:
            st.nonfinite_skipped += 1
            run.consecutive_nonfinite += 1
            log.warning("%s step %d: non-finite loss or gradient (norm %s); optimizer step skipped (%d in a row)",
                        run.name, st.step + 1, float(grad_norm), run.consecutive_nonfinite)
            if run.consecutive_nonfinite >= self.cfg.training.max_nonfinite_steps:
                raise DistillError(f"{run.name} step {st.step + 1}: {run.consecutive_nonfinite} consecutive "
                                   "non-finite losses/gradients; lower the learning rate or check the data")
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        st.step += 1

    def _log(self, run: PhaseRun, epoch: int, loss: float, terms: dict[str, float], samples_per_s: float,
             elapsed: float, bar: Any) -> None:
        lr = run.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        pe = run.real_tokens / run.padded_tokens if run.padded_tokens else 1.0
        self.metrics.log({"event": "train", "phase": run.name, "step": run.state.step, "epoch": epoch, "loss": loss,
                          "terms": terms, "lr": lr, "samples_per_s": samples_per_s, "elapsed_s": elapsed,
                          "padding_efficiency": pe, "nonfinite_skipped": run.state.nonfinite_skipped})

    def _loss(self, phase: int, gather: bool = True) -> nn.Module:
        m, cfg = self.cfg.model, self.cfg
        dims = None if m.use_projection else m.matryoshka_dims
        if phase == 1:
            if m.use_projection:
                return EmbeddingMSECosineLoss(cfg.phase1.mse_weight, cfg.phase1.cosine_weight,
                                              cfg.phase1.similarity_weight)
            return MatryoshkaSimilarityLoss(dims, m.matryoshka_weights, cfg.phase1.mse_weight, cfg.phase1.cosine_weight)
        p2 = cfg.phase2
        return RetrievalDistillLoss(p2.temperature, p2.infonce_weight, p2.mse_weight,
                                    gather=gather and p2.gather_across_ranks, dims=dims,
                                    dim_weights=m.matryoshka_weights, documents=p2.infonce_documents)

    @torch.no_grad()
    def _student_statistics(self, task: PhaseTask, teacher: bool = True, chunk: int = 64) -> tuple[torch.Tensor, ...]:
        """``(xtx [d, d], xty [d, D_t], x_sum [d], y_sum [D_t], n)`` summed over a seeded subset of at most
        ``model.head_init_max_texts`` phase-1 texts: x the (frozen, pretrained) student's embedding, y the teacher's,
        in float64 on the CPU. Without ``teacher`` no teacher vector is read and ``D_t`` is 0.

        Each rank embeds its share of the texts and sums; one all-reduce gives every rank the same sums, so the
        starts fitted on them (:meth:`_init_head_map`, :meth:`_init_rotation`) are the same on every rank.
        """
        m = self.cfg.model
        items = np.asarray(task.data.examples)[:, :2]  # (role, row): 0 = query table, 1 = document table
        if len(items) > m.head_init_max_texts:
            pick = np.random.default_rng(self.cfg.training.seed).choice(len(items), m.head_init_max_texts, replace=False)
            items = items[np.sort(pick)]
        mine = items[self.info.rank :: self.info.world_size]
        d, dt = m.student_dim, task.targets.dim if teacher else 0
        stats = [torch.zeros(d, d, dtype=torch.float64, device=self.device),
                 torch.zeros(d, dt, dtype=torch.float64, device=self.device),
                 torch.zeros(d, dtype=torch.float64, device=self.device),
                 torch.zeros(dt, dtype=torch.float64, device=self.device)]
        was_training = self.model.training
        self.model.eval()
        for role in (0, 1):
            rows = mine[mine[:, 0] == role, 1]
            rows = rows[np.argsort(task.tables[role].lengths[rows], kind="stable")]  # length-sorted: little padding
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                enc = task.pad(task.tables[role].input_ids(part), len(part))
                with hardware.autocast(self.device, task.precision):
                    x = torch.cat([self.model.student_embedding(c) for c in enc.chunks])[enc.restore].double()
                y = task.teacher_vectors(np.full(len(part), role), part).double() if teacher else x[:, :0]
                for acc, value in zip(stats, (x.T @ x, x.T @ y, x.sum(0), y.sum(0))):
                    acc += value
        self.model.train(was_training)
        n = torch.tensor([float(len(mine))], dtype=torch.float64, device=self.device)
        flat = D.all_reduce_sum(torch.cat([s.flatten() for s in stats] + [n])).cpu()
        xtx, xty, x_sum, y_sum, n_all = torch.split(flat, [d * d, d * dt, d, dt, 1])
        return xtx.view(d, d), xty.view(d, dt), x_sum, y_sum, int(n_all.item())

    def _init_head_map(self, task: PhaseTask) -> None:
        """Start the projection head as the ridge-regression map (``model.head_init: least_squares``,
        :func:`distill.models.ridge_map`) or the best orthogonal map (``procrustes``, :func:`~distill.models.
        procrustes_map`) from the student's embeddings to the teacher's (:meth:`_student_statistics`).

        A random head would first have to be learnt from scratch while its gradients disturb the pretrained student;
        this start is the best affine map at the cost of one student forward per text.
        """
        from distill.models import procrustes_map, ridge_map, set_head_to_affine_map

        m = self.cfg.model
        t0 = time.perf_counter()
        xtx, xty, x_sum, y_sum, n = self._student_statistics(task)
        a, c = procrustes_map(xty) if m.head_init == "procrustes" else ridge_map(xtx, xty, x_sum, y_sum, n)
        set_head_to_affine_map(self.model.head, a, c)
        log.info("projection head initialised by %s on %d phase-1 texts (%.1f s)", m.head_init.replace("_", " "), n,
                 time.perf_counter() - t0)

    def _init_rotation(self, task: PhaseTask) -> None:
        """MRL mode, ``model.matryoshka_init: pca``: start the student's rotation (:func:`distill.models.add_rotation`)
        at the principal axes of its embeddings of phase-1 texts (:func:`~distill.models.pca_rotation`), so each
        nested prefix starts as the subspace that keeps the most of the texts' variance."""
        from distill.models import pca_rotation, set_rotation

        t0 = time.perf_counter()
        xtx, _, x_sum, _, n = self._student_statistics(task, teacher=False)
        set_rotation(self.rotation, pca_rotation(xtx, x_sum, n))
        log.info("MRL rotation initialised by PCA on %d phase-1 texts (%.1f s)", n, time.perf_counter() - t0)

    def _freeze_unused_parameters(self, phase: int, task: PhaseTask, sampler: LengthGroupedBatchSampler) -> None:
        """Parameters no loss ever reaches (e.g. the backbone's unused pooler) would make DDP wait forever for
        their gradients; one probe forward/backward on a tiny batch finds them and freezes them."""
        if any(not p.requires_grad for p in self.model.parameters()):
            return  # already probed (phase 1)
        rng = torch.get_rng_state()
        probe = task.with_loss(self._loss(phase, gather=False))
        self.model.zero_grad(set_to_none=True)
        probe.loss(self.model, probe.prepare(sampler.batches(0)[0][:2])).loss.backward()  # no DDP yet: no collectives
        frozen = [n for n, p in self.model.named_parameters() if p.grad is None]
        for _, p in self.model.named_parameters():
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
        # no buffer broadcast before each forward (the student's buffers are constants); torch >= 2.13 names it
        # forward_sync_buffers and deprecates broadcast_buffers
        quiet = "forward_sync_buffers" in inspect.signature(DDP).parameters
        return DDP(module, device_ids=ids, find_unused_parameters=False,
                   **{"forward_sync_buffers" if quiet else "broadcast_buffers": False})

    def _restore(self, ckpt: LoadedCheckpoint, optimizer, scheduler, scaler) -> TrainState:
        """The optimizer, schedule, scaler and RNG of a mid-phase ``ckpt`` (:meth:`run` loaded its weights)."""
        load_optimizer_state(optimizer, ckpt.optimizer_state)
        scheduler.load_state_dict(ckpt.scheduler_state)
        if scaler.is_enabled() and ckpt.scaler_state is not None:
            scaler.load_state_dict(ckpt.scaler_state)
        self._restore_rng(ckpt)
        return ckpt.state

    def _restore_rng(self, ckpt: LoadedCheckpoint) -> None:
        if len(ckpt.rng_states) == self.info.world_size:
            restore_rng(ckpt.rng_states[self.info.rank])
        else:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: dropout streams restart",
                        len(ckpt.rng_states), self.info.world_size)

    def _save(self, run: PhaseRun) -> None:
        self.checkpoints.save(f"{run.name}-step{run.state.step:08d}", model=self.model, optimizer=run.optimizer,
                              scheduler=run.scheduler, scaler=run.scaler if run.scaler.is_enabled() else None,
                              state=run.state, config=self.cfg.to_dict())

    def export_model(self):
        return build_export_model(self.student, self.model.head)

    def _eval_teacher(self):
        """The eval set and its teacher embeddings, once per run (a collective: every rank helps fill the cache)."""
        if getattr(self, "_eval_cache", None) is None:
            from distill.evaluate import load_eval_set
            from distill.teacher_targets import eval_teacher_embeddings

            beir = load_eval_set(self.cfg.eval.data, self.cfg.eval.split)
            self._eval_cache = (beir, eval_teacher_embeddings(self.cfg, beir, self.device))
        return self._eval_cache

    def _evaluate(self, phase_name: str, step: int) -> None:
        """Rank 0 evaluates on the held-out BEIR set; the other ranks wait and receive the result."""
        from distill.evaluate import evaluate_settings, run_eval_distributed, student_encoder

        beir, teacher_emb = self._eval_teacher()
        m = self.cfg.model
        dims = self.cfg.eval.dims or (None if m.use_projection else m.matryoshka_dims)

        def work() -> dict[str, Any]:  # embeddings on the CPU: the eval corpus must not hold training memory
            encode = student_encoder(self.export_model(), self.cfg.eval.batch_size, to_cpu=True)
            return evaluate_settings(beir.queries, beir.corpus, beir.qrels, encode, teacher_emb, dims)

        self.eval_results = run_eval_distributed(work)
        self.model.train()
        if self.info.is_main:
            self.metrics.log({"event": "eval", "phase": phase_name, "step": step, "results": self.eval_results})
            from distill.report import format_eval_table

            log.info("%s step %d evaluation:\n%s", phase_name, step, format_eval_table(self.eval_results))
            self.checkpoints.offer_best(self.cfg, self.eval_results, phase_name, step, self.export_model)

    def finish(self) -> Path:
        final = self.run_dir / "final"
        if self.info.is_main:
            model, self.eval_results, best = self.checkpoints.final_model(self.cfg, self.export_model,
                                                                          self.eval_results)
            card = model_card(model, self.cfg, self.data, self.run_dir / "metrics.jsonl")
            save_model_atomic(model, final, extra_files={"distill_config.yaml": dump_config(self.cfg), "README.md": card})
            summary = {"experiment": self.cfg.experiment, "teacher_forward_passes": self.teacher_forwards,
                       "padding_efficiency": self.padding, "world_size": self.info.world_size,
                       "provenance": provenance(self.cfg), **({"best": best} if best else {})}
            write_json_atomic(final / "distill_summary.json", summary)
            if self.cfg.eval.mteb_tasks:  # the other ranks wait at the barrier below (training.dist_timeout_s)
                from distill.evaluate import run_mteb

                self.eval_results = {**(self.eval_results or {}), "mteb": run_mteb(
                    model, self.cfg.eval.mteb_tasks, self.cfg.eval.batch_size, keep_going=True)}
            if self.metrics is not None:
                self.metrics.close()
            from distill.report import plot_metrics, write_report

            metrics_path = self.run_dir / "metrics.jsonl"
            plot_metrics(metrics_path, final)
            write_report(final, self.eval_results, metrics_path, self.cfg.to_dict(), summary)
            if metrics_path.exists():
                (final / "metrics.jsonl").write_bytes(metrics_path.read_bytes())
            self.checkpoints.mark_done(self.cfg.phases)
            if self.run_dir != self.cfg.run_dir:  # --overwrite: the new run replaces the old one in one rename
                replace_dir(self.run_dir, self.cfg.run_dir)
            final = self.cfg.run_dir / "final"
            if self.cfg.training.save_to_artifacts:
                copy_tree_atomic(final, self.cfg.artifact_dir)
                log.info("saved the model to %s", self.cfg.artifact_dir)
            log.info("final model: %s", final)
            if self.cfg.training.push_to_hub:
                push_to_hub(final, self.cfg.training.hub_model_id, self.cfg.training.hub_private)
        D.barrier()
        return self.cfg.artifact_dir if self.cfg.training.save_to_artifacts else self.cfg.run_dir / "final"


class _HeadOnly:
    """Head-only training step: the student embeds without a graph, the (DDP-wrapped) head learns on top."""

    def __init__(self, model: DistillModel, head: nn.Module):
        self.model, self.head = model, head

    def __call__(self, chunks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        with torch.no_grad():
            feats = torch.cat([self.model.student_embedding(c) for c in chunks])
        return self.head({"sentence_embedding": feats})["sentence_embedding"]

    def no_sync(self):
        return self.head.no_sync()


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")  # where torch.optim.AdamW(fused=True) has a kernel


def _adamw(model: DistillModel, lr: float, weight_decay: float, head_lr_multiplier: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and normalisation weights (1-d tensors), as is standard for transformers.

    The projection head starts from random weights while the student is pretrained, so the head's groups get
    ``lr * head_lr_multiplier``; the linear schedule scales every group alike. The fused kernel (one pass over all
    parameters instead of a Python loop of small ops per tensor) is used on the devices torch has it for.
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


def seed_everything(seed: int, rank: int) -> None:
    """A different, reproducible stream per rank (dropout differs across ranks, as it should)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def run(cfg: Config, *, overwrite: bool = False, allow_config_change: bool = False, resume_from: str | None = None
        ) -> Path:
    """Train ``cfg`` (under torchrun or in one process) and return the final model folder."""
    from distill.plan import check_before_cost

    check_resume_path(resume_from)  # a wrong --resume-from fails at once
    if cfg.training.precision == "fp16" and cfg.phase2.cached_infonce is True:
        raise ConfigError("phase2.cached_infonce works with training.precision bf16 or fp32, not fp16")
    check_before_cost(cfg)  # before any process group: bad files, dims, folders fail in seconds
    if cfg.training.save_to_artifacts and not overwrite:
        check_artifact(cfg)
    info = D.init_distributed(timeout_s=cfg.training.dist_timeout_s)
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    t = cfg.training
    precision, why = hardware.resolve_precision(t.precision, info.device, cpu_tuning=t.cpu_tuning,
                                                cached_infonce=cfg.phase2.cached_infonce is True)
    if info.is_main and t.precision == "auto":
        log.info("training.precision auto -> %s (%s)", precision, why)
    elif info.is_main and why:
        log.warning("training.precision %s: %s", precision, why)
    t.precision = precision
    if t.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("training.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    seed_everything(t.seed, info.rank)
    run_lock, trainer = RunLock.acquire(cfg.run_dir), None  # one run per run folder, before anything in it changes
    try:
        if set(cfg.phases) <= set(CheckpointManager(cfg.run_dir, 1).finished_phases()) and not overwrite:
            raise DistillError(f"experiment '{cfg.experiment}' already finished in {cfg.run_dir}; pass --overwrite to "
                               "train it again (its checkpoints and final model are replaced when the new run ends)")
        # --overwrite keeps the old run until the new one has finished: it trains in a sibling folder (resumed by the
        # same command after a crash) that replaces the old run at the end
        staging = cfg.run_dir.with_name(f".{cfg.experiment}.overwrite") if overwrite and cfg.run_dir.exists() else None
        trainer = Trainer(cfg, info, allow_config_change=allow_config_change, run_dir=staging, resume_from=resume_from)
        trainer.load_data()
        trainer.setup()
        return trainer.run()
    finally:
        run_lock.release()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # outside the loop nobody would act on the flag
        if trainer is not None and trainer.metrics is not None:
            trainer.metrics.close()
