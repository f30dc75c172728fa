"""The optimizer: AdamW groups (head learning rate, no decay on 1-d tensors), the fused kernel on CPU giving the
same updates as the reference loop, and resuming a checkpoint saved by a non-fused optimizer."""

from __future__ import annotations

import copy

import torch
from torch import nn

from distill.models import DistillModel, build_projection_head
from distill.trainer import _adamw, load_optimizer_state


def _model(seed: int = 0) -> DistillModel:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))
    return DistillModel(student, build_projection_head(4, 8, 5, seed=seed))


def _train(model: DistillModel, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        feats = model.student(x)
        out = model.head({"sentence_embedding": feats})["sentence_embedding"]
        loss = out.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_adamw_groups_and_fused_kernel_on_cpu() -> None:
    model = _model()
    opt = _adamw(model, lr=1e-3, weight_decay=0.01, head_lr_multiplier=5.0)
    assert opt.defaults["fused"] is True
    head_ids = {id(p) for p in model.head.parameters()}
    for group in opt.param_groups:
        is_head = {id(p) in head_ids for p in group["params"]}
        assert len(is_head) == 1
        assert group["lr"] == (5e-3 if is_head.pop() else 1e-3)
        assert group["weight_decay"] == (0.01 if all(p.ndim >= 2 for p in group["params"]) else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_fused_adamw_matches_the_reference_loop() -> None:
    fused_model, loop_model = _model(), _model()
    fused = _adamw(fused_model, lr=1e-2, weight_decay=0.1, head_lr_multiplier=3.0)
    loop = _adamw(loop_model, lr=1e-2, weight_decay=0.1, head_lr_multiplier=3.0)
    for group in loop.param_groups:
        group["fused"] = None
        group["foreach"] = False
    losses_fused, losses_loop = _train(fused_model, fused, 5), _train(loop_model, loop, 5)
    assert losses_fused[-1] < losses_fused[0]
    torch.testing.assert_close(torch.tensor(losses_fused), torch.tensor(losses_loop), atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resuming_a_non_fused_checkpoint_keeps_this_runs_fused_kernel() -> None:
    old_model = _model()
    old = _adamw(old_model, lr=1e-2, weight_decay=0.1, head_lr_multiplier=3.0)
    for group in old.param_groups:
        group["fused"] = None
        group["foreach"] = False
    _train(old_model, old, 3)
    saved_model, saved_opt = copy.deepcopy(old_model.state_dict()), copy.deepcopy(old.state_dict())
    want = _train(old_model, old, 2, seed=7)

    new_model = _model(seed=3)
    new_model.load_state_dict(saved_model)
    new = _adamw(new_model, lr=1e-2, weight_decay=0.1, head_lr_multiplier=3.0)
    load_optimizer_state(new, saved_opt)
    assert all(g["fused"] is True and g["foreach"] is None for g in new.param_groups)
    assert [g["lr"] for g in new.param_groups] == [g["lr"] for g in saved_opt["param_groups"]]
    got = _train(new_model, new, 2, seed=7)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
    for a, b in zip(new_model.parameters(), old_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
