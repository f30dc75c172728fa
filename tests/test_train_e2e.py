"""End to end: train_ddp.py under real torchrun (2 ranks, gloo, CPU) on tiny models and real docstring text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_data import tiny_config_yaml, write_training_files
from tiny_models import REPO_ROOT, run_torchrun

from distill.hardware import resolve_precision


def train_single(config: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "train_ddp.py", "--config", str(config), *extra], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_records(run_dir: Path, phase: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "train" and r["phase"] == phase]


def train_each_setting(tmp_path: Path, teacher: Path, student: Path, files: dict[str, Path], key: str,
                       values: list[str], *extra: str) -> dict[str, Path]:
    """One single-process run per value of the ``--set`` key ``key`` (each in its own folder, same data and models);
    returns each value's run folder, for tests that compare runs differing in one setting."""
    runs = {}
    for value in values:
        (tmp_path / value).mkdir()
        cfg = tiny_config_yaml(tmp_path / value, teacher, student, files)
        res = train_single(cfg, *extra, "--set", f"{key}={value}")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[value] = tmp_path / value / "out" / f"distilled-{student.name}-48d-tiny"
    return runs


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def assert_loss_falls(records: list[dict]) -> None:
    losses = [r["loss"] for r in records]
    k = max(2, len(losses) // 4)
    assert mean(losses[-k:]) < mean(losses[:k]), losses


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    return write_training_files(tmp_path_factory.mktemp("data"))


def _ddp_run(tmp: Path, teacher: Path, student: Path, files, use_projection: bool, *args: str) -> tuple[Path, str]:
    cfg = tiny_config_yaml(tmp, teacher, student, files, use_projection=use_projection)
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *args], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    name = "distilled-model-48d-tiny" if use_projection else "distilled-model-32d-tiny"
    return tmp / "out" / name, res.stdout + res.stderr


@pytest.fixture(scope="module")
def projection_run(tmp_path_factory, tiny_teacher_dir, tiny_student_dir, data_files):
    return _ddp_run(tmp_path_factory.mktemp("proj"), tiny_teacher_dir, tiny_student_dir, data_files, True,
                    "--set", "training.cpu_tuning=true")


@pytest.fixture(scope="module")
def mrl_run(tmp_path_factory, tiny_teacher_dir, tiny_student_dir, data_files):
    return _ddp_run(tmp_path_factory.mktemp("mrl"), tiny_teacher_dir, tiny_student_dir, data_files, False)


def test_projection_two_ranks_trains_both_phases(projection_run):
    run_dir, log = projection_run
    for phase in ("phase1", "phase2"):
        records = train_records(run_dir, phase)
        assert records, f"no {phase} records"
        assert_loss_falls(records)
    assert (run_dir / "phase1" / "model.safetensors").is_file()
    assert json.loads((run_dir / "DONE").read_text()) == {"phases": [1, 2]}
    # Two ranks: the global batch is twice the per-rank batch.
    assert "global batch 16" in log
    # training.cpu_tuning on a CPU: dropout masks from random_ bit lanes, every nn.Dropout of the student swapped.
    swapped = re.search(r"cpu_tuning: dropout from random_ bit lanes \((\d+) dropout modules swapped\)", log)
    assert swapped and int(swapped.group(1)) > 0


def test_mrl_run_without_cpu_tuning_keeps_stock_dropout(mrl_run):
    _, log = mrl_run
    assert "cpu_tuning" not in log


def test_projection_artifact_encodes_teacher_dim(projection_run):
    from sentence_transformers import SentenceTransformer

    run_dir, _ = projection_run
    model = SentenceTransformer(str(run_dir / "final"), device="cpu")
    emb = model.encode(["How do I copy a file?", "shutil.copy copies a file"], convert_to_tensor=True)
    assert emb.shape == (2, 48)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)  # final Normalize after the head
    kinds = [type(m).__name__ for m in model]
    assert kinds[-3:] == ["Dense", "Dense", "Normalize"]
    for f in ("report.md", "report.json", "metrics.jsonl", "distill_config.yaml", "loss_phase1.png"):
        assert (run_dir / "final" / f).stat().st_size > 0, f


def test_teacher_forwards_equal_unique_texts(projection_run, data_files):
    run_dir, _ = projection_run
    summary = json.loads((run_dir / "final" / "distill_summary.json").read_text())
    p1 = [json.loads(x) for x in data_files["phase1"].read_text().splitlines()]
    unique = len({r["query"] for r in p1}) + len({r["positive"] for r in p1})
    # Phase 1 embeds every query and passage once; phase 2 reuses them (its negatives are phase-1 passages too).
    assert summary["teacher_forward_passes"] == {"phase1": unique, "phase2": 0}
    assert summary["padding_efficiency"]["phase1"] >= 0.8


def test_mrl_two_ranks(mrl_run):
    from sentence_transformers import SentenceTransformer

    run_dir, _ = mrl_run
    for phase in ("phase1", "phase2"):
        assert_loss_falls(train_records(run_dir, phase))
    model = SentenceTransformer(str(run_dir / "final"), device="cpu")
    assert model.encode(["a query"]).shape == (1, 32)
    assert not any(type(m).__name__ == "Dense" for m in model)
    small = SentenceTransformer(str(run_dir / "final"), device="cpu", truncate_dim=8)
    assert small.encode(["a query"]).shape == (1, 8)
    report = json.loads((run_dir / "final" / "report.json").read_text())
    dims = sorted(r["dim"] for r in report["eval"]["rows"] if r["setting"].startswith("student"))
    assert dims == [8, 16, 32]


def test_skip_phase1_reuses_phase1_result(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files,
                           extra="")
    res = train_single(cfg, "--set", "training.skip_phase2=true", "--set", "phase1.num_epochs=1",
                       "--set", "training.precision=auto")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "out" / "distilled-model-48d-tiny"
    # precision auto: the choice for this machine is logged and is what the run dir's config records.
    chosen, _ = resolve_precision("auto", torch.device("cpu"))
    assert f"training.precision auto -> {chosen} (" in res.stderr
    assert f"precision: {chosen}" in (run_dir / "config.yaml").read_text()
    phase1 = load_file(str(run_dir / "phase1" / "model.safetensors"))
    # Phase 2 alone, with a learning rate so small the weights cannot move: the result must be phase 1's weights.
    res = train_single(cfg, "--set", "training.skip_phase1=true", "--set", "phase2.learning_rate=1.0e-12",
                       "--set", "phase1.num_epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "phase 2 starts from the phase-1 weights" in res.stderr
    final = load_file(str(run_dir / "phase2" / "model.safetensors"))
    assert final.keys() == phase1.keys()
    for k in phase1:
        assert torch.allclose(final[k], phase1[k], atol=1e-6), k
    assert json.loads((run_dir / "DONE").read_text()) == {"phases": [1, 2]}
    # Both phases done: a rerun refuses to overwrite the finished experiment.
    res = train_single(cfg, "--set", "training.skip_phase1=true", "--set", "phase1.num_epochs=1")
    assert res.returncode == 2 and "already finished" in res.stderr and "--overwrite" in res.stderr


def test_skip_phase1_without_phase1_result_names_the_path(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--set", "training.skip_phase1=true")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert str(tmp_path / "out" / "distilled-model-48d-tiny" / "phase1" / "model.safetensors") in err[0]


def test_dim_mismatch_is_reported(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--set", "model.student_dim=64", "--set", "model.projection_hidden_dim=128")
    assert res.returncode == 2
    assert "model.student_dim is 64 but" in res.stderr and "outputs 32-d embeddings" in res.stderr
    res = train_single(cfg, "--set", "model.teacher_dim=50")
    assert res.returncode == 2
    assert "model.teacher_dim is 50 but" in res.stderr and "48-d" in res.stderr


def test_dry_run_prints_the_plan_and_loads_no_weights(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("experiment   distilled-model-48d-tiny", "projection: student 32-d -> head 32->64->48",
                   "examples   192", "examples   96", "8/rank, 8 global, x2 accumulation = 16 per optimizer step",
                   "24 optimizer steps", "final model", str(tmp_path / "out")):
        assert needle in out, needle
    assert not (tmp_path / "out").exists()  # nothing written, no weights loaded
    assert "Loading SentenceTransformer" not in res.stderr


def test_head_only_steps_leave_the_student_untouched(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    """LP-FT: during phase1.head_only_fraction of the steps only the projection head learns."""
    from sentence_transformers import SentenceTransformer

    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--set", "training.skip_phase2=true", "--set", "phase1.head_only_fraction=0.99",
                       "--set", "eval.data=null")
    assert res.returncode == 0, res.stderr[-3000:]
    trained = load_file(str(tmp_path / "out" / "distilled-model-48d-tiny" / "phase1" / "model.safetensors"))
    base = {f"student.{k}": v for k, v in SentenceTransformer(str(tiny_student_dir), device="cpu").state_dict().items()}
    student_keys = [k for k in trained if k.startswith("student.")]
    assert student_keys and all(torch.equal(trained[k], base[k]) for k in student_keys)
    records = train_records(tmp_path / "out" / "distilled-model-48d-tiny", "phase1")
    assert_loss_falls(records)  # the head alone still learns


def test_phase2_only_config_starts_from_another_experiments_phase1(projection_run):
    """The spec's use case 3 under 2-rank torchrun: after the two-rank run above, a phase2_only config (its own
    experiment name, same output_dir) finds that run's phase-1 result and starts phase 2 from it."""
    run_dir, _ = projection_run
    phase1_path = run_dir / "phase1" / "model.safetensors"
    phase1 = load_file(str(phase1_path))
    phase2_only = run_dir.parent.parent / "phase2_only.yaml"
    phase2_only.write_text((run_dir.parent.parent / "tiny.yaml").read_text())
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, timeout=600,
                       args=["--config", str(phase2_only), "--set", "training.skip_phase1=true", "--set",
                             "phase2.learning_rate=1.0e-12", "--set", "phase2.num_epochs=1", "--set", "eval.data=null"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"phase 2 starts from the phase-1 weights in {phase1_path}" in res.stderr
    new_dir = run_dir.parent / "distilled-model-48d-phase2_only"
    final = load_file(str(new_dir / "phase2" / "model.safetensors"))
    assert final.keys() == phase1.keys()
    assert all(torch.allclose(final[k], phase1[k], atol=1e-6) for k in phase1)
    assert json.loads((new_dir / "DONE").read_text()) == {"phases": [2]}
    assert load_file(str(phase1_path)).keys() == phase1.keys()  # the phase-1 experiment is untouched


def test_find_phase1_picks_the_only_result_or_asks(tmp_path) -> None:
    from distill.checkpoint import CheckpointManager
    from distill.errors import CheckpointError

    out = tmp_path / "out"
    manager = CheckpointManager(out / "m-phase2_only", keep_last=1)
    with pytest.raises(CheckpointError, match="no phase-1 result exists at"):
        manager.find_phase1(out, "m", None)
    first = out / "m-default" / "phase1" / "model.safetensors"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    (out / "other-default" / "phase1").mkdir(parents=True)
    (out / "other-default" / "phase1" / "model.safetensors").write_bytes(b"x")  # another model: not a candidate
    assert manager.find_phase1(out, "m", None) == first
    second = out / "m-ablation" / "phase1" / "model.safetensors"
    second.parent.mkdir(parents=True)
    second.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"several phase-1 results of m .*\(m-ablation, m-default\); set "
                                              r"training.phase1_from"):
        manager.find_phase1(out, "m", None)
    assert manager.find_phase1(out, "m", "m-ablation") == second
    assert manager.find_phase1(out, "m", str(first)) == first
    assert manager.find_phase1(out, "m", str(out / "m-default")) == first
    with pytest.raises(CheckpointError, match="training.phase1_from: 'nope'"):
        manager.find_phase1(out, "m", "nope")


def test_overwrite_replaces_at_the_end_and_artifacts_know_their_run(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                    data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    quick = ["--set", "training.skip_phase2=true", "--set", "phase1.num_epochs=1", "--set", "eval.data=null",
             "--set", "training.save_to_artifacts=true"]
    res = train_single(cfg, *quick)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir, artifact = tmp_path / "out" / "distilled-model-48d-tiny", tmp_path / "artifacts" / "distilled-model-48d-tiny"
    made = json.loads((artifact / "distill_summary.json").read_text())["provenance"]
    assert made["run_dir"] == str(run_dir.resolve()) and len(made["config_sha256"]) == 64
    # The same config with another output_dir would replace the published artifact: refused before any work.
    res = train_single(cfg, *quick, "--set", f"paths.output_dir={tmp_path / 'other'}")
    assert res.returncode == 2 and f"{artifact} holds a model made by run {run_dir.resolve()}" in res.stderr
    assert not (tmp_path / "other").exists()
    # --overwrite that fails (a wrong teacher_dim, found after the models load) leaves the finished run intact.
    before = (run_dir / "final" / "model.safetensors").read_bytes()
    res = train_single(cfg, *quick, "--overwrite", "--set", "model.teacher_dim=50")
    assert res.returncode == 2 and "model.teacher_dim is 50" in res.stderr
    assert (run_dir / "final" / "model.safetensors").read_bytes() == before
    assert json.loads((run_dir / "DONE").read_text()) == {"phases": [1]}
    # --overwrite that succeeds swaps the new run in at the end; no staging folder is left.
    res = train_single(cfg, *quick, "--overwrite", "--set", "phase1.learning_rate=2.0e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() != before
    assert not (tmp_path / "out" / ".distilled-model-48d-tiny.overwrite").exists()
    assert "learning_rate: 0.002" in (run_dir / "config.yaml").read_text()
    assert json.loads((artifact / "distill_summary.json").read_text())["provenance"]["config_sha256"] != \
        made["config_sha256"]
