"""Exact resume at the phase boundary: killed after the phase-1-end checkpoint and before phase 2's first one (the
window that holds the whole phase-2 teacher fill), a rerun ends with the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_reliability import EXPERIMENT, OVERRIDES, _config, _kill_all, _popen
from tiny_data import write_training_files
from tiny_models import REPO_ROOT, run_torchrun


def _train(cfg: Path) -> None:
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *OVERRIDES], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _phase1_done(checkpoints: Path) -> bool:
    """Whether the phase-1-end checkpoint is in place (folders appear whole: they are renamed in when complete)."""
    for folder in checkpoints.glob("phase1-*"):
        try:
            if json.loads((folder / "state.json").read_text())["state"]["phase_done"]:
                return True
        except (OSError, ValueError):
            continue
    return False


def test_kill_between_phases_then_rerun_gives_the_uninterrupted_weights(tmp_path, tiny_teacher_dir,
                                                                       tiny_student_dir) -> None:
    files = write_training_files(tmp_path / "data")
    (tmp_path / "reference").mkdir()
    _train(_config(tmp_path / "reference", tiny_teacher_dir, tiny_student_dir, files))
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir = tmp_path / "out" / EXPERIMENT
    proc = _popen(cfg)
    try:
        end = time.time() + 300
        while not _phase1_done(run_dir / "checkpoints"):
            assert proc.poll() is None and time.time() < end, "training ended or stalled before phase 1 ended"
            time.sleep(0.02)
    finally:
        _kill_all(proc)
    assert not list((run_dir / "checkpoints").glob("phase2-*")), "killed too late: phase 2 had checkpointed"
    _train(cfg)
    ours = load_file(str(run_dir / "phase2" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "out" / EXPERIMENT / "phase2" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
