"""distill.distributed: the process group serves CPU tensors on GPU machines too (no NCCL-only group)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distill import distributed as D


@pytest.fixture
def fake_torchrun(monkeypatch):
    """Rank 0 of 2 under torchrun on a CUDA machine, with init_process_group recorded instead of run."""
    calls: dict = {}
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(D, "_INFO", D._INFO)  # restored after the test
    return calls


def test_cuda_group_has_a_cpu_backend(fake_torchrun) -> None:
    """Objects (broadcast_object, all_gather_object) and CPU counters are collected on CPU tensors; an NCCL-only
    group raises on them, so on CUDA every collective needs gloo beside NCCL."""
    info = D.init_distributed(timeout_s=60)
    assert info.device == torch.device("cuda", 0)
    backends = dict(part.split(":") for part in fake_torchrun["backend"].split(","))
    assert backends == {"cuda": "nccl", "cpu": "gloo"}
    assert fake_torchrun["device_id"] == torch.device("cuda", 0)


def test_cpu_group_is_gloo() -> None:
    assert D.default_backend(torch.device("cpu")) == "gloo"


def test_the_backend_string_parses_as_one_backend_per_device() -> None:
    """torch accepts the string as a per-device backend map (what init_process_group does with it)."""
    config = dist.BackendConfig(D.default_backend(torch.device("cuda", 0)))
    assert config.get_device_backend_map() == {"cuda": "nccl", "cpu": "gloo"}
