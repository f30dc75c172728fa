"""The dry run (``python -m distill plan``, distill/plan.py): the compute and memory formulas on the spec's default
config, and the phase data it reads (through ``load_phase_data``) without writing anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distill.config import load_config
from distill.plan import KNOWN_SHAPES, Shape, activation_bytes, print_plan

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_activation_formula() -> None:
    # 1 layer, 2 texts of 10 tokens, hidden 8, 2 heads: 10 * 2 * 8 * (34 + 5 * 2 * 10 / 8) bytes
    shape = Shape(8, 1, 2, 32, 100, False, "test")
    assert activation_bytes(shape, 2, 10) == pytest.approx(10 * 2 * 8 * (34 + 12.5))
    assert shape.params == 4 * 64 + 2 * 8 * 32  # attention + MLP, no embeddings
    assert shape.forward_flops(100, 10) == pytest.approx(100 * (2 * shape.params + 4 * 1 * 8 * 10))


def test_default_recipe_on_8_gpus_has_no_warnings_and_states_assumptions(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = print_plan(load_config(DEFAULT), nproc=8)
    out = capsys.readouterr().out
    assert plan["warnings"] == [] and "warning" not in out
    assert "assumed MFU: teacher 40%, student 12%" in out and "assumed: the caps' row counts" in out
    assert 0 < plan["hours"] < 1.0  # the standard run on 8xH100 under an hour at the stated MFU
    phase1, phase2 = plan["phases"]
    assert (phase1["steps"], phase1["warmup"]) == (293, 29) and (phase2["steps"], phase2["warmup"]) == (366, 37)
    # unique texts, not examples x 9: queries once, documents from a shared corpus
    assert (phase2["unique_queries"], phase2["unique_documents"]) == (500_000, 1_000_000)
    teacher = KNOWN_SHAPES["infly/inf-retriever-v1-pro"]
    est = phase2["compute"]
    tokens = 500_000 * 12 + 1_000_000 * 80
    shape = Shape(*teacher, source="test")
    assert est["teacher_flops"] == pytest.approx(shape.forward_flops(tokens, 80))
    assert phase2["memory"]["texts_per_forward"] == 64 * 9
    assert "hotpotqa (sentence-transformers/hotpotqa:triplet, train), first 100,000 valid rows streamed" in out


def test_plan_warns_about_warmup_and_memory(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(DEFAULT, ["phase1.warmup_ratio=null", "phase2.batch_size=128", "phase2.cached_infonce=false"])
    plan = print_plan(cfg, nproc=8)
    assert any("phase1: warm-up (1000 steps) is not shorter than the phase" in w for w in plan["warnings"])
    assert any("phase2 may not fit in 80 GB: set phase2.cached_infonce: true or auto" in w for w in plan["warnings"])
    cached = print_plan(load_config(DEFAULT, ["phase2.batch_size=128", "phase2.cached_infonce=true"]), nproc=8)
    assert cached["phases"][1]["memory"]["texts_per_forward"] == 32 and cached["warnings"] == []
    more = print_plan(load_config(DEFAULT), nproc=16)
    assert more["phases"][0]["steps"] < 293 and more["hours"] < print_plan(load_config(DEFAULT), nproc=8)["hours"]


def test_plan_chooses_gradcache_where_phase2_would_not_fit(monkeypatch, capsys) -> None:
    """cached_infonce auto (default.yaml): on for a phase-2 batch whose estimate exceeds the stated 80 GB GPU, off for
    the default one that fits, with the reason printed; set values are kept, no capacity (CPU) or fp16: off."""
    from distill.errors import ConfigError
    from distill.plan import estimate_memory, gradcache_choice

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    huge, small = load_config(DEFAULT, ["phase2.batch_size=128"]), load_config(DEFAULT)
    assert huge.phase2.cached_infonce == small.phase2.cached_infonce == "auto"
    plan = print_plan(huge, nproc=8)
    out = capsys.readouterr().out
    need = estimate_memory(huge, 2, 256)["bytes"]  # 1152 texts of 256 tokens (the assumed longest, data unreadable)
    assert need > 80e9 and plan["warnings"] == [] and plan["phases"][1]["memory"]["texts_per_forward"] == 32
    assert f"gradcache  on (auto: on, phase 2 needs ~{need / 1e9:.1f} GB per GPU without it, 80.0 GB available)" in out
    plan = print_plan(small, nproc=8)
    off = "gradcache  off (auto: off, phase 2 needs ~75.2 GB per GPU without it, 80.0 GB available)"
    assert off in capsys.readouterr().out
    assert plan["phases"][1]["memory"]["texts_per_forward"] == 64 * 9
    mid = load_config(DEFAULT, ["phase2.batch_size=96"])  # ~112 GB: on for an 80 GB GPU, off for a 141 GB H200
    assert [print_plan(mid, nproc=8, gpu=g)["phases"][1]["memory"]["texts_per_forward"] for g in ("H100", "H200")] \
        == [32, 96 * 9]
    # set values are kept; no device memory figure (CPU) or fp16 training: off
    choice = lambda *sets: gradcache_choice(load_config(DEFAULT, ["phase2.batch_size=128", *sets]), 256, 80e9)
    assert choice("phase2.cached_infonce=false") == (False, "phase2.cached_infonce: false")
    assert choice("phase2.cached_infonce=true", "phase2.batch_size=8") == (True, "phase2.cached_infonce: true")
    assert choice("training.precision=fp16")[0] is False
    assert gradcache_choice(huge, 256, None) == (False, "auto: off, no device memory figure (CPU)")
    with pytest.raises(ConfigError, match=r"phase2.cached_infonce must be true, false or auto, got 1$"):
        load_config(DEFAULT, ["phase2.cached_infonce=1"])


def test_cli_plan_takes_the_world_size(tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "distill", "plan", "--config", str(DEFAULT), "--nproc", "4"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "planned on   4xH100" in res.stdout and "256 global" in res.stdout


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
    assert "phase1       skipped" in out and "streamed" not in out  # local files: read in full
    (phase2,) = plan["phases"]
    assert phase2["name"] == "phase2" and phase2["data_note"].startswith("read") and phase2["examples"] == 40
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


@pytest.mark.parametrize(("overrides", "nproc", "message"), [
    (["model.student_dim=64", "model.projection_hidden_dim=128"], 1, "model.student_dim is 64 but {student} outputs 32-d"),
    (["model.teacher_dim=50"], 1, "model.teacher_dim is 50 but {teacher} outputs 48-d"),
    (["eval.data={tmp}/nope"], 1, "{tmp}/nope: BEIR folder not found"),
    (["eval.data=nobody/no-such-set"], 1, "eval.data nobody/no-such-set: cannot load (ConnectionError: Couldn't reach"),
    (["paths.output_dir={tmp}/a_file/out"], 1, "paths.output_dir: {tmp}/a_file/out cannot be written"),
    (["training.save_to_artifacts=true", "paths.artifacts_dir={tmp}/a_file"], 1, "paths.artifacts_dir: {tmp}/a_file"),
    ([], 64, "phase1: only 192 training examples, but one global batch needs 512 (batch_size 8 x 64 ranks)"),
    (["model.teacher_max_length=600"], 1, "model.teacher_max_length: 600 tokens exceed {teacher}'s 512 positions"),
])
def test_dry_run_refuses_what_training_would_fail_on(tmp_path: Path, tiny_teacher_dir, tiny_student_dir, overrides,
                                                     nproc, message, monkeypatch) -> None:
    """Everything knowable without loading a model fails the plan with one DistillError, nothing written."""
    from tiny_data import tiny_config_yaml, write_training_files

    from distill.errors import DistillError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = write_training_files(tmp_path / "data")
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    (tmp_path / "a_file").write_text("x")
    expected = message.format(tmp=tmp_path, student=tiny_student_dir, teacher=tiny_teacher_dir)
    with pytest.raises(DistillError) as err:
        print_plan(load_config(cfg, [o.format(tmp=tmp_path) for o in overrides]), nproc=nproc)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_dry_run_error_is_one_line_and_exit_2(tmp_path: Path, tiny_teacher_dir, tiny_student_dir) -> None:
    import subprocess
    import sys

    from tiny_data import tiny_config_yaml, write_training_files

    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, write_training_files(tmp_path / "data"))
    res = subprocess.run([sys.executable, "train_ddp.py", "--config", str(cfg), "--dry-run", "--set",
                          "model.teacher_dim=50"], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if "Traceback" in line or line.startswith("error: ")]
    assert errors == [f"error: model.teacher_dim is 50 but {tiny_teacher_dir} outputs 48-d embeddings"], res.stderr
    assert not (tmp_path / "out").exists()
