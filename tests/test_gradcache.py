"""GradCache (phase2.cached_infonce) must give the gradients of the plain loss, with dropout active (torch's own and
training.cpu_tuning's, swapped in by ``distill.hardware.use_rand_dropout``, whose ``random_`` masks the restored RNG
state must replay as well)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.gradcache import cached_backward
from distill.hardware import RandDropout, use_rand_dropout
from distill.losses import InfoNCELoss

DROPOUTS = pytest.mark.parametrize("dropout", ["stock", "cpu_tuning"])


class DropoutEncoder(nn.Module):
    def __init__(self, dropout: str = "stock") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 8)
        self.drop = nn.Dropout(0.3)
        if dropout == "cpu_tuning":
            assert use_rand_dropout(self) == 1 and isinstance(self.drop, RandDropout)

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.lin(chunk)))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@DROPOUTS
def test_cached_backward_matches_full_batch_gradients(dropout: str):
    torch.manual_seed(1)
    b, g = 4, 3
    queries, docs = torch.randn(b, 12), torch.randn(b * g, 12)
    doc_ids = torch.arange(b * g)
    loss_fn = InfoNCELoss(temperature=0.05, gather=False)
    model = DropoutEncoder(dropout).train()

    # Reference: one forward of the whole batch. Dropout draws masks for the queries, then the documents.
    torch.manual_seed(123)
    q_ref = model(queries)
    d_ref = model(docs)
    ref = loss_fn(q_ref, d_ref, doc_ids)
    (ref * 0.5).backward()
    ref_grads = _grads(model)
    model.zero_grad()

    # Cached: chunks in the same order consume the same random stream (queries in one chunk, documents in two).
    chunks = [queries, docs[:6], docs[6:]]
    torch.manual_seed(123)

    def loss_on(emb: torch.Tensor):
        return loss_fn(emb[:b], emb[b:], doc_ids), {}

    loss, _ = cached_backward(model, chunks, loss_on, scale=0.5)
    assert torch.allclose(loss, ref.detach(), atol=1e-6)
    for got, want in zip(_grads(model), ref_grads):
        assert torch.allclose(got, want, atol=1e-6)
    assert any(w.abs().sum() > 0 for w in ref_grads)


@DROPOUTS
def test_cached_backward_restores_rng_for_each_chunk_and_continues_the_stream(dropout: str):
    model = DropoutEncoder(dropout).train()
    x = torch.randn(6, 12)
    torch.manual_seed(7)
    cached_backward(model, [x[:3], x[3:]], lambda e: (e.sum(), {}))
    after_cached = torch.rand(1)
    torch.manual_seed(7)
    with torch.no_grad():
        model(x[:3])
        model(x[3:])
    assert torch.equal(torch.rand(1), after_cached)  # the re-forward does not shift later randomness


def test_no_sync_wraps_all_but_the_last_chunk():
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    model = DropoutEncoder().eval()
    x = torch.randn(9, 12)
    cached_backward(model, [x[:3], x[3:6], x[6:]], lambda e: (e.pow(2).sum(), {}), no_sync=Ctx, sync_last=True)
    assert len(entered) == 2
    entered.clear()
    cached_backward(model, [x[:3], x[3:6], x[6:]], lambda e: (e.pow(2).sum(), {}), no_sync=Ctx, sync_last=False)
    assert len(entered) == 3


def test_trainer_resolves_auto_like_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's choice: the plan's gradcache_choice at the longest tokenized text and the CUDA device's memory;
    on CPU auto is off (no memory figure)."""
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from distill.config import load_config
    from distill.gradcache import resolve_cached_infonce
    from distill.plan import gradcache_choice

    default = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    huge, small = load_config(default, ["phase2.batch_size=128"]), load_config(default)
    lengths = [np.array([12, 30]), np.array([80, 256, 40])]
    cpu = resolve_cached_infonce(huge, lengths, torch.device("cpu"))
    assert cpu == (False, "auto: off, no device memory figure (CPU)")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80e9))
    gpu = torch.device("cuda", 0)
    assert resolve_cached_infonce(huge, lengths, gpu) == gradcache_choice(huge, 256, 80e9)
    assert resolve_cached_infonce(huge, lengths, gpu)[0] is True and "~148.6 GB per GPU without it" in \
        resolve_cached_infonce(huge, lengths, gpu)[1]
    assert resolve_cached_infonce(small, lengths, gpu) == gradcache_choice(small, 256, 80e9)
    assert resolve_cached_infonce(small, lengths, gpu)[0] is False
    assert resolve_cached_infonce(small, [lengths[0], np.array([512])], gpu)[0] is True  # longer texts: more memory
