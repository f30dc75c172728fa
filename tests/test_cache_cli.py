"""python -m distill cache: precompute the teacher cache (2 ranks), then training never loads the teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tiny_data import tiny_config_yaml, write_training_files
from tiny_models import REPO_ROOT, run_torchrun


def _cache_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "distill", "cache", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _counts(stdout: str) -> dict[tuple[str, str], tuple[int, int]]:
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 9 and parts[3] == "texts":
            out[(parts[0], parts[1])] = (int(parts[4].replace(",", "")), int(parts[6].replace(",", "")))
    return out


def test_precompute_then_train_without_teacher(tmp_path, tiny_teacher_dir, tiny_student_dir):
    files = write_training_files(tmp_path / "data")
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, files,
                           extra="").as_posix()
    before = _cache_cli("--config", cfg, "--dry-run")
    assert before.returncode == 0, before.stderr
    counts = _counts(before.stdout)
    assert counts[("phase1", "query")] == (0, 96) and counts[("phase1", "document")] == (0, 96)
    assert counts[("eval", "query")] == (0, 24)
    assert "loading teacher" not in before.stderr

    # torchrun's --module flag: the "script" is the package, as in ``torchrun -m distill cache --config X``
    fill = run_torchrun("--module", nproc=2, args=["distill", "cache", "--config", cfg])
    assert fill.returncode == 0, fill.stderr[-3000:]
    assert "phase1  teacher forward passes: 192" in fill.stdout
    assert "phase2  teacher forward passes: 0" in fill.stdout  # phase 2's texts are phase 1's
    assert "eval    teacher forward passes: 48" in fill.stdout

    after = _cache_cli("--config", cfg, "--dry-run")
    assert all(missing == 0 for _, missing in _counts(after.stdout).values())

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    train = subprocess.run([sys.executable, "train_ddp.py", "--config", cfg, "--set", "phase1.num_epochs=1",
                            "--set", "phase2.num_epochs=1"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "loading teacher" not in train.stderr
    summary = json.loads((tmp_path / "out" / "distilled-model-48d-tiny" / "final" / "distill_summary.json").read_text())
    assert summary["teacher_forward_passes"] == {"phase1": 0, "phase2": 0}
