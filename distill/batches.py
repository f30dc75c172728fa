"""How a micro-batch becomes student inputs, teacher targets and a loss: one object per phase.

The training loop (:mod:`distill.trainer`) is the same for both phases; everything that differs lives here.

* :class:`Phase1Task`: an example is one text ``(role, row)`` (a query or a document); the student embeds the
  batch's texts ``[b, D]`` and the loss compares them with the teacher's vectors of the same texts ``[b, D_t]``.
* :class:`Phase2Task`: an example is ``(query, positive, k negatives)``; the b queries and b * (1 + k) documents are
  embedded in one forward (queries first) and the loss is InfoNCE against every candidate plus a teacher term. With
  ``phase2.cached_infonce`` the backward is GradCache's (:mod:`distill.gradcache`): the same gradients with the
  activation memory of one chunk of ``mini_batch_size`` texts.

Texts are sorted by length and padded per chunk (:func:`pad_chunks`), so documents of one batch that vary in
length waste little compute on padding. :func:`token_budget_batches` groups texts that are only encoded (the
teacher cache, evaluation) into length-sorted batches of a bounded number of padded tokens.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.hardware import autocast

PAD_MULTIPLE = 8  # padded widths are multiples of 8 tokens: the shapes tensor cores run at full rate


@dataclass
class Encoded:
    """Token chunks for one forward: ``chunks[i]`` padded to its own length; ``restore`` maps back to input order."""

    chunks: list[dict[str, torch.Tensor]]
    restore: torch.Tensor  # embeddings_in_input_order = cat(chunk outputs)[restore]
    real_tokens: int
    padded_tokens: int


def _place(t: torch.Tensor, device: torch.device, host: bool = False) -> torch.Tensor:
    """``t`` on ``device``, or with ``host`` on the host (page-locked when bound for a GPU, for :func:`to_device`)."""
    t = t.pin_memory() if device.type == "cuda" else t
    return t if host else to_device(t, device)


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or a list, dict or dataclass holding tensors) on ``device``; a copy to a GPU does not wait."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=device.type == "cuda")
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device) for f in dataclasses.fields(x)})
    return x


def pad_chunks(seqs: list[list[int]], pad_id: int, chunk_size: int, device: torch.device, *,
               multiple: int = PAD_MULTIPLE, cap: int | None = None, host: bool = False) -> Encoded:
    """Sort ``seqs`` by length, cut into chunks of ``chunk_size`` sequences and pad each chunk to its longest one,
    rounded up to a multiple of ``multiple`` (never above ``cap``, the phase's max_length, if given); with ``host``
    the tensors stay on the host (see :func:`_place`)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = []
    padded = 0
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        longest = max(len(seqs[i]) for i in idx)
        width = -(-longest // multiple) * multiple
        width = max(longest, min(width, cap)) if cap is not None else width
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, : len(seqs[i])] = 1
        chunks.append({"input_ids": _place(ids, device, host), "attention_mask": _place(mask, device, host)})
        padded += ids.numel()
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return Encoded(chunks, _place(restore, device, host), sum(len(s) for s in seqs), padded)


class Prefetch:
    """``prepare(item)`` of each of ``items`` in order, made by a background thread up to ``depth`` items ahead of the
    consumer (``depth`` 0: made by ``next`` itself). An exception in ``prepare`` is raised by ``next`` at its item;
    :meth:`close` (or leaving the ``with`` block) stops and joins the thread."""

    def __init__(self, items: Iterable[Any], prepare: Callable[[Any], Any], depth: int,
                 device: torch.device | None = None):
        self._items, self._prepare, self._end = iter(items), prepare, None
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(device,), name="distill-prefetch", daemon=True) \
            if depth > 0 else None
        if self._thread is not None:
            self._thread.start()

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return self._prepare(next(self._items))
        if self._end is None:
            done, value = self._queue.get()
            if not done:
                return value
            self._end = value
        raise self._end

    def _work(self, device: torch.device | None) -> None:
        torch.set_num_threads(1)  # this thread's own pool (as DataLoader's pin-memory thread's): no oversubscription
        if device is not None and device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # pinned memory belongs to the rank's GPU, not GPU 0
        try:
            for item in self._items:
                if not self._put((False, self._prepare(item))):
                    return
            self._put((True, StopIteration()))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            self._put((True, exc))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(entry, timeout=0.05)
                return True
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class MicroBatch:
    """What one micro-batch gave: its loss (a scalar tensor) and loss terms, and its real and padded token counts."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    real_tokens: int
    padded_tokens: int


NoSync = Callable[[], contextlib.AbstractContextManager]


class PhaseTask:
    """A phase's data (text tables, tokenized tables, teacher targets) and loss; subclasses turn a micro-batch of
    example indices into host-side inputs (:meth:`prepare`: thread-safe, no RNG, so it can run ahead on a
    :class:`Prefetch` thread), those into a :class:`MicroBatch` (:meth:`loss`) and backpropagate it (:meth:`backward`).
    """

    def __init__(self, data: Any, tables: tuple[Any, Any], targets: Any, loss_fn: nn.Module, *, pad_id: int,
                 max_length: int, device: torch.device, precision: str):
        self.data, self.tables, self.targets, self.loss_fn = data, tables, targets, loss_fn
        self.pad_id, self.max_length, self.device, self.precision = pad_id, max_length, device, precision

    def with_loss(self, loss_fn: nn.Module) -> PhaseTask:
        """The same task with another loss (e.g. one without collectives, for a probe before DDP exists)."""
        task = copy.copy(self)
        task.loss_fn = loss_fn
        return task

    def pad(self, seqs: list[list[int]], chunk_size: int, host: bool = False) -> Encoded:
        return pad_chunks(seqs, self.pad_id, chunk_size, self.device, cap=self.max_length, host=host)

    def examples(self, batch: list[int]) -> np.ndarray:
        return self.data.examples[np.asarray(batch)]

    def prepare(self, batch: list[int]) -> Any:
        """Token chunks and teacher targets of micro-batch ``batch`` on the host (pinned for a GPU)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: Any) -> MicroBatch:
        """Forward and loss of ``inputs`` (from :meth:`prepare`; copied to the device here)."""
        raise NotImplementedError

    def backward(self, model: nn.Module, inputs: Any, *, scale: float, scaler: torch.amp.GradScaler,
                 no_sync: NoSync | None, last: bool) -> MicroBatch:
        """Forward, loss and backward of ``scale * loss``; gradients sync across ranks only on the ``last`` micro-batch
        of a step (``no_sync`` is the DDP module's context manager, None in a single process)."""
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            out = self.loss(model, inputs)
            scaler.scale(out.loss * scale).backward()
        return out


class Phase1Task(PhaseTask):
    """Phase 1: ``loss_fn(student [b, D], teacher [b, D_t])`` over texts of both roles."""

    def prepare(self, batch: list[int]) -> tuple[Encoded, torch.Tensor]:
        ex = self.examples(batch)
        roles, rows = ex[:, 0], ex[:, 1]
        seqs: list[Any] = [None] * len(rows)
        for role in (0, 1):  # one table read per role
            at = np.nonzero(roles == role)[0]
            for i, ids in zip(at, self.tables[role].input_ids(rows[at]) if len(at) else []):
                seqs[i] = ids
        return self.pad(seqs, len(seqs), host=True), self.teacher_vectors(roles, rows, host=True)

    def loss(self, model: nn.Module, inputs: tuple[Encoded, torch.Tensor]) -> MicroBatch:
        enc, teacher = to_device(inputs, self.device)
        with autocast(self.device, self.precision):
            emb = model(enc.chunks)[enc.restore]
        loss, terms = self.loss_fn(emb.float(), teacher)
        return MicroBatch(loss, terms, enc.real_tokens, enc.padded_tokens)

    def teacher_vectors(self, roles: np.ndarray, rows: np.ndarray, host: bool = False) -> torch.Tensor:
        """The teacher's vectors [n, D_t] of texts ``(roles[i], rows[i])`` on the device (see :func:`_place`)."""
        out = torch.empty(len(rows), self.targets.dim)
        is_query = roles == 0
        if is_query.any():
            out[torch.from_numpy(is_query)] = self.targets.query(rows[is_query])
        if (~is_query).any():
            out[torch.from_numpy(~is_query)] = self.targets.document(rows[~is_query])
        return _place(out, self.device, host)


@dataclass
class _Phase2Inputs:
    """Tokenized queries and documents of a phase-2 micro-batch with their teacher targets."""

    queries: Encoded
    documents: Encoded
    tq: torch.Tensor  # [b, D_t]
    td: torch.Tensor  # [b * (1 + k), D_t]
    doc_ids: torch.Tensor  # [b * (1 + k)]

    @property
    def chunks(self) -> list[dict[str, torch.Tensor]]:
        return self.queries.chunks + self.documents.chunks

    def loss(self, loss_fn: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``out``: embeddings of the query chunks then the document chunks, in chunk order."""
        b = self.tq.shape[0]
        return loss_fn(out[:b][self.queries.restore].float(), out[b:][self.documents.restore].float(), self.doc_ids,
                       self.tq, self.td)

    def micro_batch(self, loss: torch.Tensor, terms: dict) -> MicroBatch:
        return MicroBatch(loss, terms, self.queries.real_tokens + self.documents.real_tokens,
                          self.queries.padded_tokens + self.documents.padded_tokens)


class Phase2Task(PhaseTask):
    """Phase 2: ``loss_fn(q [b, D], docs [b(1+k), D], doc_ids, teacher q, teacher docs)``; with ``cached`` the
    GradCache backward over chunks of ``mini_batch_size`` texts."""

    def __init__(self, *args: Any, cached: bool = False, mini_batch_size: int = 32, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cached, self.mini_batch_size = cached, mini_batch_size

    def prepare(self, batch: list[int]) -> _Phase2Inputs:
        """Chunks of ``mini_batch_size`` texts with ``cached``, else one chunk of queries and one of documents."""
        ex = self.examples(batch)
        q_rows, d_rows = ex[:, 0], ex[:, 1:].reshape(-1)
        chunk, dev = self.mini_batch_size if self.cached else len(batch), self.device
        return _Phase2Inputs(self.pad(self.tables[0].input_ids(q_rows), chunk, host=True),
                             self.pad(self.tables[1].input_ids(d_rows), chunk, host=True),
                             _place(self.targets.query(q_rows), dev, True),
                             _place(self.targets.document(d_rows), dev, True),
                             _place(torch.from_numpy(np.ascontiguousarray(d_rows)), dev, True))

    def loss(self, model: nn.Module, inputs: _Phase2Inputs) -> MicroBatch:
        inp = to_device(inputs, self.device)
        with autocast(self.device, self.precision):
            out = model(inp.chunks)
        return inp.micro_batch(*inp.loss(self.loss_fn, out))

    def backward(self, model: nn.Module, inputs: _Phase2Inputs, *, scale: float, scaler: torch.amp.GradScaler,
                 no_sync: NoSync | None, last: bool) -> MicroBatch:
        if not self.cached:
            return super().backward(model, inputs, scale=scale, scaler=scaler, no_sync=no_sync, last=last)
        from distill.gradcache import cached_backward

        inp = to_device(inputs, self.device)

        def forward(chunk: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast(self.device, self.precision):
                return model([chunk])

        # cached_infonce refuses fp16 (config check), so the scaler is disabled here and the loss is not scaled
        loss, terms = cached_backward(forward, inp.chunks, lambda e: inp.loss(self.loss_fn, e), scale=scale,
                                      no_sync=no_sync, sync_last=last, device=self.device)
        return inp.micro_batch(loss, terms)


def token_budget_batches(lengths: np.ndarray, max_rows: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Batches (positions into ``lengths``, the texts' token counts) longest first: ``max_rows`` texts each, or with
    ``max_tokens`` as many as keep rows x the batch's longest <= max_tokens (at most ``max_rows``; a longer text
    goes alone). The first batch is the longest, so an out-of-memory batch shows at once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    if max_tokens is None:
        return [order[i : i + max_rows] for i in range(0, len(order), max_rows)]
    batches, i = [], 0
    while i < len(order):
        rows = min(max_rows, max(1, max_tokens // max(int(lengths[order[i]]), 1)))
        batches.append(order[i : i + rows])
        i += rows
    return batches
