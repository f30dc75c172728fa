"""The --dry-run compute and memory estimates (distill/plan.py): the formulas on the spec's default config."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import load_config
from distill.plan import KNOWN_PARAMS, activation_bytes, estimate_compute, estimate_memory, print_plan

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_activation_formula() -> None:
    # 1 layer, 2 texts of 10 tokens, hidden 8, 2 heads: 10 * 2 * 8 * (34 + 5 * 2 * 10 / 8) bytes
    assert activation_bytes((8, 1, 2), 2, 10) == pytest.approx(10 * 2 * 8 * (34 + 12.5))


def test_memory_of_the_default_config_and_gradcache(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(DEFAULT)
    mem = estimate_memory(cfg)
    ps = KNOWN_PARAMS["sentence-transformers/all-mpnet-base-v2"]
    head = 768 * 1536 + 1536 * 3584
    states = 16 * (ps + head)
    assert mem["phase1_texts_per_forward"] == 64 and mem["phase2_texts_per_forward"] == 64 * 9
    assert mem["phase1"] == pytest.approx(states + activation_bytes((768, 12, 12), 64, 512))
    assert mem["phase2"] == pytest.approx(states + activation_bytes((768, 12, 12), 576, 512))
    assert mem["phase2"] > 80e9  # 576 texts of 512 tokens cannot fit on an 80 GB GPU without GradCache ...
    cached = estimate_memory(load_config(DEFAULT, ["phase2.cached_infonce=true", "phase2.mini_batch_size=32"]))
    assert cached["phase2_texts_per_forward"] == 32 and cached["phase2"] < 20e9  # ... and fits with it
    assert mem["teacher"] > 2 * KNOWN_PARAMS["infly/inf-retriever-v1-pro"]  # bf16 weights + activations


def test_dry_run_prints_time_against_the_spec_and_memory_hint(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = print_plan(load_config(DEFAULT))
    out = capsys.readouterr().out
    assert "on 8xH100" in out and "the spec's standard run takes 4-5 h on 8 GPUs" in out
    assert "phase 2 may not fit: set phase2.cached_infonce: true" in out
    est = plan["compute"]
    assert est["world"] == 8 and est["gpu"] == "H100"
    total = est["student_flops"] + est["teacher_flops"]
    assert est["hours"] == pytest.approx(total / (989e12 * 0.35 * 8) / 3600)
    assert estimate_compute(load_config(DEFAULT), [], "H100", 8)["student_flops"] == 0.0
