"""InfoNCE and the collectives of distill/distributed.py under a real 2-rank ``torchrun`` (gloo, CPU).

One torchrun job (module fixture) runs every 2-rank scenario and saves each rank's results; the tests compare them
with single-process computations on the concatenated batch.

Gradient bookkeeping. Rank r holds b = B/W of the B queries and their documents and computes
``loss_r = (1/b) sum_{i in r} l_i`` where every l_i uses the documents of *all* ranks (``gather_with_grad``). One
process on the whole batch computes ``L = (1/B) sum_i l_i = (1/W) sum_r loss_r``. ``gather_with_grad``'s backward
all-reduces (sums) the gradient of the gathered documents, so each rank's ``backward()`` delivers to its local rows
``d(sum_r loss_r)/dx = W * dL/dx`` (for documents, which every rank's queries use, and for queries, which only their
own rank's loss uses, alike). Hence ``dL/dx = (rank-local grad) / W`` row by row; DDP's all-reduce-*mean* of parameter
gradients applies exactly this 1/W, so DDP training on W ranks matches one process on the concatenated batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill import distributed
from distill.losses import InfoNCELoss
from tiny_models import run_torchrun

WORLD = 2
B, K, D = 8, 3, 16  # 8 queries in all, 1 positive + 3 hard negatives each, 16-d
G = 1 + K
TAU = 0.05

_SCRIPT = r'''
import sys
from pathlib import Path

import torch

from distill.distributed import (all_gather_object, all_reduce_sum, barrier, broadcast_object, gather_with_grad,
                                 get_info, init_distributed, is_distributed, is_main, shutdown)
from distill.losses import InfoNCELoss

batch = torch.load(sys.argv[1])
out = Path(sys.argv[2])
info = init_distributed(backend="gloo", timeout_s=120)
r, world = info.rank, info.world_size
b = batch["queries"].shape[0] // world
g = batch["docs"].shape[0] // batch["queries"].shape[0]
rows_q = slice(r * b, (r + 1) * b)
rows_d = slice(r * b * g, (r + 1) * b * g)
ids = batch["doc_ids"][rows_d]
res = {"rank": r, "world": world, "local_rank": info.local_rank, "is_main": is_main(), "dist": is_distributed()}

for gather in (True, False):
    q = batch["queries"][rows_q].clone().requires_grad_(True)
    d = batch["docs"][rows_d].clone().requires_grad_(True)
    loss = InfoNCELoss(temperature=batch["tau"], gather=gather)(q, d, ids)
    loss.backward()
    res[f"loss_{gather}"] = loss.detach()
    res[f"grad_q_{gather}"] = q.grad
    res[f"grad_d_{gather}"] = d.grad
    res[f"loss_sum_{gather}"] = all_reduce_sum(loss.detach())

# gather_with_grad: each rank's rows differ; rank r' weights the gathered rows by (r'+1) * w, so the gradient that
# reaches rank r's rows is sum_r' (r'+1) * w[rows of r] = 3 * w[rows of r].
x = (torch.arange(6.0).reshape(2, 3) + 100 * r).requires_grad_(True)
y = gather_with_grad(x)
(y * batch["w"] * (r + 1)).sum().backward()
res["gathered"] = y.detach()
res["gather_grad"] = x.grad
ids_gathered = gather_with_grad(torch.tensor([10 * r, 10 * r + 1]))
res["gathered_ids"] = ids_gathered

t = torch.tensor([r + 1.0, 10.0 * (r + 1)])
res["reduced"] = all_reduce_sum(t)
res["reduce_input_after"] = t
res["bcast0"] = broadcast_object({"from": r, "items": [1, 2, 3]} if r == 0 else None)
res["bcast1"] = broadcast_object(f"hello from {r}", src=1)
res["all_objects"] = all_gather_object({"rank": r, "sq": r * r})
barrier()
torch.save(res, out / f"rank{r}.pt")
shutdown()
'''


def make_batch() -> dict:
    """Queries [8, 16], docs [32, 16] (query i's rows 4i..4i+3, positive first), ids with cross-rank duplicates."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(B, D, generator=gen)
    docs = torch.randn(B * G, D, generator=gen)
    # Nudge each positive toward its query so the loss is in a realistic range (not ~log(32)).
    docs[::G] += 1.5 * queries
    doc_ids = torch.arange(100, 100 + B * G)
    # Same id -> same text -> same embedding. Rank 0 holds queries 0-3 (doc rows 0-15), rank 1 queries 4-7 (16-31).
    for dup, orig in ((17, 0),   # rank 1's query 4, hard negative 1 = rank 0's query 0 positive
                      (2, 20),   # rank 0's query 0, hard negative 2 = rank 1's query 5 positive
                      (24, 8),   # rank 1's query 6 positive = rank 0's query 2 positive (shared positive)
                      (31, 13)):  # an ordinary shared hard negative across ranks
        doc_ids[dup] = doc_ids[orig]
        docs[dup] = docs[orig]
    w = torch.randn(WORLD * 2, 3, generator=gen)
    return {"queries": queries, "docs": docs, "doc_ids": doc_ids, "tau": TAU, "w": w}


def reference(queries: torch.Tensor, docs: torch.Tensor, doc_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """Single-process InfoNCE written out: cosine logits / tau, copies of a query's positive id masked (except at
    its own column), cross-entropy with labels i*g, mean over queries."""
    b, g = queries.shape[0], docs.shape[0] // queries.shape[0]
    qn = queries / queries.norm(dim=1, keepdim=True)
    dn = docs / docs.norm(dim=1, keepdim=True)
    logits = qn @ dn.T / tau
    labels = torch.arange(b) * g
    same = doc_ids[None, :] == doc_ids[labels][:, None]
    same[torch.arange(b), labels] = False
    logits = logits.masked_fill(same, -math.inf)
    return -torch.log_softmax(logits, dim=1)[torch.arange(b), labels].mean()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("infonce_ddp")
    batch = make_batch()
    torch.save(batch, tmp / "batch.pt")
    script = tmp / "ddp_script.py"
    script.write_text(_SCRIPT)
    proc = run_torchrun(script, nproc=WORLD, args=[tmp / "batch.pt", tmp], timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return batch, results


def _leaf_grads(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = batch["queries"].clone().requires_grad_(True)
    d = batch["docs"].clone().requires_grad_(True)
    loss = reference(q, d, batch["doc_ids"], batch["tau"])
    loss.backward()
    return loss.detach(), q.grad, d.grad


def test_ranks_joined_the_group(ranks: tuple[dict, list[dict]]) -> None:
    _, results = ranks
    assert [(r["rank"], r["world"], r["local_rank"], r["is_main"], r["dist"]) for r in results] == [
        (0, 2, 0, True, True), (1, 2, 1, False, True)]


def test_reference_matches_infonce_loss_in_one_process() -> None:
    """The written-out reference agrees with InfoNCELoss in a plain process (where gather is a no-op)."""
    batch = make_batch()
    ours = InfoNCELoss(TAU, gather=True)(batch["queries"], batch["docs"], batch["doc_ids"])
    assert ours.item() == pytest.approx(reference(batch["queries"], batch["docs"], batch["doc_ids"], TAU).item(),
                                        rel=1e-6)
    # The duplicated ids matter: without the mask the value differs.
    unmasked = reference(batch["queries"], batch["docs"], torch.arange(B * G), TAU)
    assert abs(unmasked.item() - ours.item()) > 1e-3


def test_gathered_loss_equals_single_process(ranks: tuple[dict, list[dict]]) -> None:
    batch, results = ranks
    single, _, _ = _leaf_grads(batch)
    per_rank = torch.stack([r["loss_True"] for r in results])
    assert per_rank.mean().item() == pytest.approx(single.item(), abs=1e-5)
    # all_reduce_sum of the rank losses agrees on both ranks and with W * the single-process loss.
    for r in results:
        assert r["loss_sum_True"].item() == pytest.approx(WORLD * single.item(), abs=1e-5)
    # Each rank's loss is the single-process per-query loss averaged over its own queries.
    q, d, ids = batch["queries"], batch["docs"], batch["doc_ids"]
    qn, dn = q / q.norm(dim=1, keepdim=True), d / d.norm(dim=1, keepdim=True)
    b = B // WORLD
    for rank, res in enumerate(results):
        mine = slice(rank * b, (rank + 1) * b)
        labels = torch.arange(rank * b, (rank + 1) * b) * G
        logits = qn[mine] @ dn.T / TAU
        same = ids[None, :] == ids[labels][:, None]
        same[torch.arange(b), labels] = False
        expected = -torch.log_softmax(logits.masked_fill(same, -math.inf), 1)[torch.arange(b), labels].mean()
        assert res["loss_True"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_gathered_gradients_equal_single_process(ranks: tuple[dict, list[dict]]) -> None:
    """rank-local grad / W == single-process grad, for every query row and every document row (module docstring)."""
    batch, results = ranks
    _, grad_q, grad_d = _leaf_grads(batch)
    b = B // WORLD
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["grad_q_True"] / WORLD, grad_q[rank * b:(rank + 1) * b], rtol=0, atol=1e-5)
        torch.testing.assert_close(res["grad_d_True"] / WORLD, grad_d[rank * b * G:(rank + 1) * b * G], rtol=0,
                                   atol=1e-5)
    # Every document row (also the other rank's) receives gradient, and not a vanishing one.
    assert all((res["grad_d_True"].abs().sum(dim=1) > 1e-6).all() for res in results)


def test_without_gather_each_rank_sees_only_its_documents(ranks: tuple[dict, list[dict]]) -> None:
    batch, results = ranks
    b = B // WORLD
    for rank, res in enumerate(results):
        q = batch["queries"][rank * b:(rank + 1) * b].clone().requires_grad_(True)
        d = batch["docs"][rank * b * G:(rank + 1) * b * G].clone().requires_grad_(True)
        local = reference(q, d, batch["doc_ids"][rank * b * G:(rank + 1) * b * G], TAU)
        local.backward()
        assert res["loss_False"].item() == pytest.approx(local.item(), abs=1e-5)
        torch.testing.assert_close(res["grad_q_False"], q.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(res["grad_d_False"], d.grad, rtol=0, atol=1e-5)
        # Fewer candidates (16 instead of 32): a different, here smaller, loss than with gathering.
        assert res["loss_False"].item() < res["loss_True"].item() - 1e-3


def test_gather_with_grad(ranks: tuple[dict, list[dict]]) -> None:
    batch, results = ranks
    x0, x1 = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3) + 100
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], torch.cat([x0, x1]))
        # Rank r' multiplies by (r'+1) * w, so rank r's rows get (1 + 2) * w[its rows].
        torch.testing.assert_close(res["gather_grad"], 3 * batch["w"][rank * 2:(rank + 1) * 2])
        assert res["gathered_ids"].tolist() == [0, 1, 10, 11]
        assert res["gathered_ids"].dtype == torch.int64


def test_all_reduce_sum_and_objects(ranks: tuple[dict, list[dict]]) -> None:
    _, results = ranks
    for rank, res in enumerate(results):
        assert res["reduced"].tolist() == [3.0, 30.0]
        assert res["reduce_input_after"].tolist() == [rank + 1.0, 10.0 * (rank + 1)]  # input untouched
        assert res["bcast0"] == {"from": 0, "items": [1, 2, 3]}
        assert res["bcast1"] == "hello from 1"
        assert res["all_objects"] == [{"rank": 0, "sq": 0}, {"rank": 1, "sq": 1}]


# --------------------------------------------------------------------------------------------------------------------
# The same helpers in a plain process are identities
# --------------------------------------------------------------------------------------------------------------------


def test_single_process_helpers_are_identities() -> None:
    assert not distributed.is_distributed()
    info = distributed.get_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    x = torch.arange(4.0, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    reduced = distributed.all_reduce_sum(x)
    assert reduced.tolist() == [0.0, 1.0, 2.0, 3.0] and reduced is not x and not reduced.requires_grad
    reduced += 1
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    obj = {"a": [1]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.all_gather_object(obj) == [obj]
    distributed.barrier()  # no process group: returns at once
