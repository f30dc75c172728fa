"""Length-grouped, DDP-aware batching: similar lengths share a batch, so little compute is spent on padding.

Per epoch (all ranks compute the same thing from ``(seed, epoch)``; nothing is communicated):

1. a random permutation of the ``n`` examples, truncated to ``G * floor(n / G)`` with ``G = batch_size *
   world_size`` (the dropped remainder differs between epochs);
2. pools of ``pool_batches * G`` consecutive examples, each sorted by length;
3. each pool cut into global batches of ``G``; the global batches of all pools shuffled;
4. rank ``r`` takes slice ``[r * batch_size, (r + 1) * batch_size)`` of every global batch.

So every rank gets the same number of full batches, the ranks' batches are disjoint, and every rank's batch
is a contiguous stretch of a sorted pool (length-homogeneous). Randomness survives through step 1 (which
examples meet in a pool) and step 3 (batch order).

Example lengths (token counts from :class:`distill.data.TokenizedTable`):

* phase 1: the length of the example's text (:func:`phase1_lengths`);
* phase 2: the query length + the longest of its documents (positive and negatives), since the query and the
  documents are padded separately and the longest document sets the document padding (:func:`phase2_lengths`).
"""

from __future__ import annotations

import numpy as np

from distill.errors import DataError


def check_enough(examples: int, batch_size: int, world_size: int, phase: str = "") -> None:
    """A one-line DataError (prefixed ``{phase}: `` when given) when ``examples`` fill no global batch."""
    if examples < batch_size * world_size:
        raise DataError(f"{phase}{': ' if phase else ''}only {examples} training examples, but one global batch needs "
                        f"{batch_size * world_size} (batch_size {batch_size} x {world_size} ranks)")


class LengthGroupedBatchSampler:
    """Batches of example indices for one rank; see the module docstring for the algorithm."""

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int,
                 pool_batches: int = 64) -> None:
        if batch_size < 1 or world_size < 1 or pool_batches < 1:
            raise ValueError(
                f"batch_size, world_size and pool_batches must be >= 1, got {batch_size}, {world_size}, {pool_batches}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.pool_batches = pool_batches
        check_enough(len(self.lengths), batch_size, world_size)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return len(self.lengths) // self.global_batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for ``epoch``: ``len(self)`` lists of ``batch_size`` example indices."""
        g = self.global_batch_size
        num_global = len(self)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: num_global * g]
        pool = self.pool_batches * g
        global_batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            global_batches.append(chunk.reshape(-1, g))
        stacked = np.concatenate(global_batches)[rng.permutation(num_global)]
        return stacked[:, self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


def phase1_lengths(examples: np.ndarray, query_lengths: np.ndarray, document_lengths: np.ndarray) -> np.ndarray:
    """Length of each phase-1 example ``(role, row)``: ``query_lengths[row]`` or ``document_lengths[row]``. [N]"""
    examples = np.asarray(examples)
    roles, rows = examples[:, 0], examples[:, 1]
    out = np.empty(len(examples), dtype=np.int64)
    is_query = roles == 0
    out[is_query] = np.asarray(query_lengths)[rows[is_query]]
    out[~is_query] = np.asarray(document_lengths)[rows[~is_query]]
    return out


def phase2_lengths(examples: np.ndarray, query_lengths: np.ndarray, document_lengths: np.ndarray) -> np.ndarray:
    """Length of each phase-2 example ``(query, positive, negatives...)``: query length + longest document. [N]"""
    examples = np.asarray(examples)
    query = np.asarray(query_lengths, dtype=np.int64)[examples[:, 0]]
    docs = np.asarray(document_lengths, dtype=np.int64)[examples[:, 1:]]
    return query + docs.max(axis=1)
