"""GradCache: a contrastive loss over a large batch with the activation memory of one mini-batch.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021). The InfoNCE loss
couples every query with every document of the batch, so the batch cannot simply be split into independent
micro-batches. Instead:

1. embed every chunk without building a graph (``torch.no_grad``), remembering the RNG state before each chunk;
2. compute the loss on those embeddings as leaf tensors and backpropagate to them only: ``g = dL/de`` ([n, d]);
3. embed each chunk again *with* a graph (same RNG state, so dropout masks match) and backpropagate the surrogate
   ``sum(e_chunk * g_chunk)``, whose parameter gradient is exactly the chunk's share of ``dL/dθ`` (chain rule).

The parameter gradients equal those of the uncached loss; the price is a second forward pass. Under DDP, every
chunk but the last runs inside ``no_sync`` so gradients are all-reduced once. ``phase2.cached_infonce: auto`` turns it
on only where phase 2 would not fit in the GPU's memory without it (:func:`resolve_cached_infonce`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from distill.config import Config

_CPU = torch.device("cpu")


def resolve_cached_infonce(cfg: Config, lengths: Sequence[np.ndarray], device: torch.device) -> tuple[bool, str]:
    """The trainer's ``phase2.cached_infonce``, and why: :func:`distill.plan.gradcache_choice` at the longest of the
    tokenized phase-2 texts (``lengths``) and the memory of ``device`` (CUDA; CPU: no figure, so auto is off)."""
    from distill.plan import gradcache_choice

    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return gradcache_choice(cfg, max((int(x.max()) for x in lengths if len(x)), default=0), capacity)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(
    forward: Callable[[Any], torch.Tensor],
    chunks: Sequence[Any],
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    *,
    scale: float = 1.0,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
    device: torch.device = _CPU,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backpropagate ``scale * loss_fn(cat(forward(c) for c in chunks))`` into the parameters, chunk by chunk.

    ``forward(chunk)`` -> [n_c, d] embeddings; ``loss_fn(embeddings [sum n_c, d])`` -> (loss, terms), embeddings in
    chunk order. ``no_sync`` (e.g. ``ddp.no_sync``) wraps every chunk's backward except the last one, and the last one
    too unless ``sync_last``. Returns the (unscaled, detached) loss and terms.
    """
    states, outs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            outs.append(forward(chunk))
    after = _rng_state(device)
    emb = torch.cat(outs).detach().float().requires_grad_(True)
    loss, terms = loss_fn(emb)
    (loss * scale).backward()
    grads = emb.grad.split([o.shape[0] for o in outs])
    for i, (chunk, grad) in enumerate(zip(chunks, grads)):
        last = i == len(chunks) - 1
        ctx = no_sync() if no_sync is not None and not (last and sync_last) else contextlib.nullcontext()
        with ctx:
            _set_rng_state(states[i], device)
            out = forward(chunk)
            (out.float() * grad).sum().backward()
    _set_rng_state(after, device)
    return loss.detach(), terms
