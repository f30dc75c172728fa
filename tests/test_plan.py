"""The dry run (``python -m distill plan``, distill/plan.py): the compute and memory formulas on the spec's default
config, and the phase data it reads (through ``load_phase_data``) without writing anything."""

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


def test_plan_reads_the_phase_data_and_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """The plan loads each enabled phase through load_phase_data in a temporary folder: sizes are read, the
    config's cache and output folders are not created; a skipped phase is only named."""
    from tiny_data import tiny_config_yaml, write_training_files

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = write_training_files(tmp_path / "data", n=40)
    path = tiny_config_yaml(tmp_path, tmp_path / "teacher", tmp_path / "student", files)
    cfg = load_config(path, ["training.skip_phase1=true"])
    assert cfg.phases == [2]
    plan = print_plan(cfg)
    out = capsys.readouterr().out
    assert "phase1       skipped" in out
    (phase2,) = plan["phases"]
    assert phase2["name"] == "phase2" and phase2["source_note"] == "read" and phase2["examples"] == 40
    assert not (tmp_path / "out").exists()


def test_load_phase_data_default_folder_and_bad_phase(tmp_path: Path, monkeypatch) -> None:
    from tiny_data import tiny_config_yaml, write_training_files

    from distill.data import Phase1Data, Phase2Data, load_phase_data
    from distill.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = write_training_files(tmp_path / "data", n=40)
    cfg = load_config(tiny_config_yaml(tmp_path, tmp_path / "teacher", tmp_path / "student", files))
    assert isinstance(load_phase_data(cfg, 1), Phase1Data)
    assert isinstance(load_phase_data(cfg, 2), Phase2Data)
    assert sorted(p.name.split("-")[0] for p in (cfg.cache_root / "data").iterdir()) == ["phase1", "phase2"]
    with pytest.raises(ConfigError, match="phase must be 1 or 2"):
        load_phase_data(cfg, 3)
