"""Kill, elastic restart, preemption, corrupt checkpoints and caches, concurrent runs and bad numerics, with real
`torchrun --nproc_per_node=2` processes on CPU."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_data import tiny_config_yaml, write_training_files
from tiny_models import REPO_ROOT, free_port, run_torchrun

EXPERIMENT = "distilled-model-48d-tiny"
# Phase 2 long enough to be interrupted; checkpoints every 2 steps; no evaluation (not what is tested here).
OVERRIDES = ["--set", "phase1.num_epochs=1", "--set", "phase2.num_epochs=3", "--set", "training.save_steps=2",
             "--set", "eval.data=null"]


def _config(tmp: Path, teacher: Path, student: Path, files) -> Path:
    return tiny_config_yaml(tmp, teacher, student, files)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    return env


def _popen(cfg: Path, *torchrun_args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *torchrun_args, "train_ddp.py", "--config", str(cfg), *OVERRIDES]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _worker_pid(agent: int, rank: int) -> int | None:
    for pid in _children(agent):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the workers (torchrun starts them in sessions of their own) and the agent."""
    for pid in _children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training ended before {path} appeared:\n{err[-3000:]}")
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def _phase2_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in records if r.get("event") == "train" and r["phase"] == "phase2"]
    assert steps == sorted(set(steps)), f"duplicate or out-of-order phase-2 steps in the log: {steps}"
    return {r["step"]: r["loss"] for r in records if r.get("event") == "train" and r["phase"] == "phase2"}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_training_files(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_teacher_dir, tiny_student_dir, files) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp, tiny_teacher_dir, tiny_student_dir, files)
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *OVERRIDES], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "out" / EXPERIMENT


def test_sigkill_of_one_rank_then_elastic_restart_gives_the_same_model(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                        files, uninterrupted):
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir = tmp_path / "out" / EXPERIMENT
    proc = _popen(cfg, "--max-restarts=1")
    try:
        _wait_for(run_dir / "checkpoints" / "phase2-step00000004" / "MANIFEST.json", proc)
        victim = _worker_pid(proc.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            _kill_all(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err
    _assert_same_weights(run_dir / "phase2" / "model.safetensors", uninterrupted / "phase2" / "model.safetensors")
    # The log continues where the checkpoint left off: same steps, same losses as the uninterrupted run.
    resumed, reference = _phase2_losses(run_dir), _phase2_losses(uninterrupted)
    assert resumed.keys() == reference.keys()
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


def test_sigkill_without_restarts_stops_every_rank_quickly(tmp_path, tiny_teacher_dir, tiny_student_dir, files,
                                                            uninterrupted):
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir = tmp_path / "out" / EXPERIMENT
    proc = _popen(cfg)
    try:
        _wait_for(run_dir / "checkpoints" / "phase2-step00000002" / "MANIFEST.json", proc)
        os.kill(_worker_pid(proc.pid, rank=1), signal.SIGKILL)
        killed_at = time.time()
        proc.communicate(timeout=120)
        assert time.time() - killed_at < 60  # the surviving rank does not hang
    finally:
        if proc.poll() is None:
            _kill_all(proc)
    assert proc.returncode != 0
    # A plain rerun of the same command resumes and ends with the uninterrupted run's weights.
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *OVERRIDES], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(run_dir / "phase2" / "model.safetensors", uninterrupted / "phase2" / "model.safetensors")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_teacher_dir, tiny_student_dir, files,
                                                       uninterrupted):
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir = tmp_path / "out" / EXPERIMENT
    proc = _popen(cfg)
    try:
        _wait_for(run_dir / "checkpoints" / "phase2-step00000002" / "MANIFEST.json", proc)
        for rank in (0, 1):  # what SLURM's --signal does: every task of the step gets SIGTERM
            os.kill(_worker_pid(proc.pid, rank), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_all(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted (SIGTERM) at phase2 step" in err
    assert not (run_dir / "final").exists()
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *OVERRIDES], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(run_dir / "phase2" / "model.safetensors", uninterrupted / "phase2" / "model.safetensors")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    from distill.checkpoint import MANIFEST, load_latest

    ckpts = tmp_path / "ckpts"
    shutil.copytree(uninterrupted / "checkpoints", ckpts)
    names = sorted(p.name for p in ckpts.iterdir())
    assert len(names) == 2  # keep_last
    newest = ckpts / names[-1]
    (newest / "model.safetensors").write_bytes(b"\0" * 100)  # truncated / garbage
    loaded = load_latest(ckpts)
    assert loaded is not None and loaded.path.name == names[0]
    (ckpts / names[0] / MANIFEST).unlink()  # an incomplete one is skipped too
    assert load_latest(ckpts) is None


def _flip_byte(path: Path, at: float = 0.5) -> None:
    """XOR one bit of the byte at fraction ``at`` of ``path`` (a silent disk or copy error)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
                                  "MANIFEST.json", "rng.pt unloadable", "no manifest"])
def test_corrupt_part_of_newest_checkpoint_falls_back_with_one_warning(tmp_path, uninterrupted, part, caplog):
    """Checkpoints of the real 2-rank run: one flipped byte in any part (or a part that does not load although its
    checksum matches, or no manifest) makes load_latest return the previous checkpoint, with one warning line."""
    from distill.checkpoint import load_latest
    from distill.manifest import write_manifest

    ckpts = tmp_path / "ckpts"
    shutil.copytree(uninterrupted / "checkpoints", ckpts)
    older, newest = sorted(ckpts.iterdir())
    assert load_latest(ckpts).path == newest
    if part == "rng.pt unloadable":  # the checksum matches (manifest rewritten) but the file is not RNG states
        torch.save({"not": "rng"}, newest / "rng.pt")
        write_manifest(newest)
    elif part == "no manifest":  # incomplete, or written before checkpoints had manifests
        (newest / "MANIFEST.json").unlink()
    else:
        _flip_byte(newest / part)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.checkpoint"):
        loaded = load_latest(ckpts)
    assert loaded is not None and loaded.path == older
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    named = {"rng.pt unloadable": "rng.pt is unreadable", "no manifest": "no MANIFEST.json"}.get(part, part)
    assert str(newest) in warnings[0] and named in warnings[0] and "falling back" in warnings[0], warnings


def _token_cache_of(cache: Path, phase: str, role: str) -> Path:
    """The tokenized-data folder of ``phase``'s ``role`` table, found through the manifests."""
    found = []
    for folder in (cache / "data").glob("tokens-*"):
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        if manifest["table"].startswith(f"{phase}-") and manifest["role"] == role:
            found.append(folder)
    assert len(found) == 1, found
    return found[0]


def _unfinished_copy(tmp_path: Path, uninterrupted: Path) -> tuple[Path, Path, Path]:
    """A copy of the real run's output folder in ``tmp_path/out``, unfinished again (DONE and results removed):
    its run folder, older and newest checkpoint."""
    shutil.copytree(uninterrupted.parent, tmp_path / "out")
    run_dir = tmp_path / "out" / EXPERIMENT
    for done in ("DONE", "final", "phase2"):
        shutil.rmtree(run_dir / done) if (run_dir / done).is_dir() else (run_dir / done).unlink()
    older, newest = sorted((run_dir / "checkpoints").iterdir())
    return run_dir, older, newest


def test_rerun_after_corrupt_rng_and_token_cache_falls_back_rebuilds_and_matches(
        tmp_path, tiny_teacher_dir, tiny_student_dir, files, uninterrupted):
    """A copy of the real run's output folder, unfinished again (DONE and results removed), with one flipped byte in
    the newest checkpoint's rng.pt and one in the phase-2 document token ids: the rerun skips that checkpoint with one
    warning, resumes from the previous one, rebuilds the token cache with one warning, and ends (rc 0) with the
    uninterrupted run's weights -- no crash, no training on wrong token ids."""
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir, older, newest = _unfinished_copy(tmp_path, uninterrupted)
    _flip_byte(newest / "rng.pt")
    tokens = _token_cache_of(run_dir.parent / "cache", "phase2", "document")
    manifest_before = (tokens / "MANIFEST.json").read_text()
    arrow = next((tokens / "tokens").glob("*.arrow"))
    _flip_byte(arrow, 0.6)  # inside the input_ids buffer: a changed token id, the file still loads
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *OVERRIDES], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [x for x in res.stderr.splitlines() if "skipping checkpoint" in x]
    assert len(skipped) == 1 and newest.name in skipped[0] and "rng.pt" in skipped[0], skipped
    assert f"resuming from {older}" in res.stderr
    rebuilt = [x for x in res.stderr.splitlines() if "are unusable" in x]
    assert len(rebuilt) == 1 and tokens.name in rebuilt[0] and arrow.name in rebuilt[0], rebuilt
    files_before = json.loads(manifest_before)["files"]
    assert json.loads((tokens / "MANIFEST.json").read_text())["files"] == files_before  # rebuilt byte for byte
    _assert_same_weights(run_dir / "phase2" / "model.safetensors", uninterrupted / "phase2" / "model.safetensors")


def test_resume_from_a_named_earlier_checkpoint_gives_the_uninterrupted_run(tmp_path, tiny_teacher_dir,
                                                                          tiny_student_dir, files, uninterrupted):
    """A copy of the real run's folder, unfinished again, resumed with --resume-from its older checkpoint (not the
    newest): the newer one moves to superseded/, and the run ends with the uninterrupted run's weights and log."""
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir, older, newest = _unfinished_copy(tmp_path, uninterrupted)
    assert older.name.startswith("phase2-") and older.name < newest.name
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, timeout=600,
                       args=["--config", str(cfg), *OVERRIDES, "--resume-from", str(older)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {older} (phase 2, step {int(older.name[-8:])})" in res.stderr
    assert (run_dir / "superseded" / newest.name / "MANIFEST.json").is_file()
    _assert_same_weights(run_dir / "phase2" / "model.safetensors", uninterrupted / "phase2" / "model.safetensors")
    resumed, reference = _phase2_losses(run_dir), _phase2_losses(uninterrupted)
    assert resumed.keys() == reference.keys()
    assert all(resumed[s] == pytest.approx(reference[s], abs=1e-5) for s in reference)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_second_run_on_the_same_run_folder_fails_naming_the_holder(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                     files, launcher):
    """While a run holds the run folder's lock (taken here through the same API), a second run -- even with
    --overwrite -- fails at once with one error line (per rank) naming the holder, and touches nothing in the folder.
    Under torchrun rank 0 tries the lock and broadcasts the outcome: every rank stops with the same line, no hang."""
    from distill.checkpoint import RunLock
    from distill.errors import DistillError

    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir = tmp_path / "out" / EXPERIMENT
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    args = ["--config", str(cfg), *OVERRIDES, "--overwrite"]
    lock = RunLock.acquire(run_dir)
    try:
        assert lock.path == tmp_path / "out" / f".{EXPERIMENT}.lock"
        if launcher == "python":
            res = subprocess.run([sys.executable, "train_ddp.py", *args], check=False, cwd=REPO_ROOT, env=_env(),
                                 capture_output=True, text=True, timeout=300)
        else:
            res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=args, timeout=300)
        assert res.returncode == (2 if launcher == "python" else 1), res.stderr[-3000:]
        # one line per process (the two ranks write to the same pipe, so their lines may run into each other)
        err = re.findall(r"error: [^\n]*?paths\.output_dir", res.stderr)
        assert len(err) == (1 if launcher == "python" else 2) and len(set(err)) == 1, res.stderr[-3000:]
        assert f"run folder {run_dir} is in use by pid {os.getpid()} on host " in err[0]
        assert err[0].endswith("; wait for that run to end or use another paths.output_dir")
        if launcher == "python":
            assert "Traceback" not in res.stderr
        assert (run_dir / "metrics.jsonl").read_text() == "{}\n"  # --overwrite deleted nothing
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl"]
        with pytest.raises(DistillError, match=f"in use by pid {os.getpid()}"):
            RunLock(run_dir).take()
    finally:
        lock.release()
    RunLock.acquire(run_dir).release()  # released: the next run gets it


def test_resume_with_changed_config_is_an_error(tmp_path, tiny_teacher_dir, tiny_student_dir, files):
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    run_dir = tmp_path / "out" / EXPERIMENT
    proc = _popen(cfg)
    try:
        _wait_for(run_dir / "checkpoints" / "phase2-step00000002" / "MANIFEST.json", proc)
        _kill_all(proc)
    finally:
        if proc.poll() is None:
            _kill_all(proc)
    env = _env()
    base = [sys.executable, "train_ddp.py", "--config", str(cfg), *OVERRIDES]
    res = subprocess.run([*base, "--set", "phase2.temperature=0.05"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert "the config changed since this checkpoint (phase2.temperature)" in res.stderr
    assert "--allow-config-change" in res.stderr


def test_non_finite_losses_skip_steps_then_stop_with_the_step(tmp_path, tiny_teacher_dir, tiny_student_dir, files):
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    res = subprocess.run([sys.executable, "train_ddp.py", "--config", str(cfg), "--set", "eval.data=null",
                          "--set", "phase1.learning_rate=1.0e+30", "--set", "phase1.max_grad_norm=0",
                          "--set", "training.max_nonfinite_steps=3"],
                         cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "3 consecutive non-finite losses/gradients" in err[0] and "phase1 step" in err[0]
    assert "optimizer step skipped" in res.stderr
    run_dir = tmp_path / "out" / EXPERIMENT
    assert not (run_dir / "final").exists()


def _phase1_done(checkpoints: Path) -> bool:
    """Whether the phase-1-end checkpoint is in place (folders appear whole: they are renamed in when complete)."""
    for folder in checkpoints.glob("phase1-*"):
        try:
            if json.loads((folder / "state.json").read_text())["state"]["phase_done"]:
                return True
        except (OSError, ValueError):
            continue
    return False


def test_kill_between_phases_then_rerun_gives_the_uninterrupted_weights(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                       files, uninterrupted):
    """Killed after the phase-1-end checkpoint and before phase 2's first one (the window that holds the whole phase-2
    teacher fill), a rerun ends with the uninterrupted run's weights, bit for bit (the phase-end RNG is restored)."""
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
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *OVERRIDES], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = load_file(str(run_dir / "phase2" / "model.safetensors"))
    theirs = load_file(str(uninterrupted / "phase2" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_failed_checkpoint_write_is_one_line_with_the_path_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk surfaces from torch.save as the zip writer's RuntimeError: the run stops with one CheckpointError
    naming the checkpoint folder and saying what is likely wrong; the checkpoint before it stays loadable."""
    from distill.checkpoint import CheckpointManager, TrainState, load_latest
    from distill.errors import CheckpointError

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": None, "config": {"model": {}}}
    manager.save("phase1-step00000002", state=TrainState(phase=1, step=2), **parts)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed\nmore detail")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        manager.save("phase1-step00000004", state=TrainState(phase=1, step=4), **parts)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoints' / 'phase1-step00000004'}: cannot write the "
                              "checkpoint (disk full, read-only or no permission?): RuntimeError: [enforce fail")
    assert "\n" not in message
    monkeypatch.setattr(torch, "save", real_save)
    assert load_latest(tmp_path / "run" / "checkpoints").path.name == "phase1-step00000002"


@pytest.mark.parametrize("value", ["0", "-1", "-0.001", "1e10"])
def test_dist_timeout_s_out_of_range_is_refused_at_load(value):
    from distill.config import load_config
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training\.dist_timeout_s must be (>|<=)"):
        load_config(None, [f"training.dist_timeout_s={value}"])
    assert load_config(None, ["training.dist_timeout_s=0.001"]).training.dist_timeout_s == 0.001


def test_collective_errors_become_one_line_naming_dist_timeout_s(capsys, monkeypatch):
    """gloo's timeouts and dropped connections, the store's timeouts and any torch.distributed error end a rank with one
    ``error:`` line (status 2, no traceback); other RuntimeErrors keep their traceback."""
    import torch.distributed as dist

    from distill import distributed
    from distill.cli import run_guarded

    monkeypatch.setattr(distributed, "_TIMEOUT_S", 0.5)
    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/{}] "
    timeouts = [RuntimeError(gloo.format("unbound_buffer.cc:78") + "Timed out waiting 500ms for recv operation"),
                dist.DistNetworkError("The client socket has timed out after 500ms while trying to connect"),
                dist.DistStoreError("wait timeout after 500ms, keys: /default_pg/0//cpu//0/0")]
    for error in timeouts:
        message = str(distributed.collective_error(error))
        assert message.startswith("a collective timed out after training.dist_timeout_s=0.5 s"), message
        assert "\n" not in message and "[/__w" not in message
    closed = distributed.collective_error(RuntimeError(gloo.format("pair.cc:553") + "Connection closed by peer\nGLHF"))
    assert str(closed) == ("a collective failed, probably because another rank stopped (see its error): "
                           "Connection closed by peer GLHF")
    assert distributed.collective_error(RuntimeError("shape mismatch: timed out")) is None
    assert distributed.collective_error(ValueError("x")) is None

    def raising(error: Exception):
        def command() -> int:
            raise error
        return command

    assert run_guarded(raising(timeouts[0])) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {distributed.collective_error(timeouts[0])}"]
    with pytest.raises(RuntimeError, match="unrelated"):
        run_guarded(raising(RuntimeError("unrelated")))


def test_tiny_dist_timeout_s_ends_every_rank_with_one_line_and_writes_nothing(tmp_path, tiny_teacher_dir,
                                                                               tiny_student_dir, files):
    """A valid but tiny timeout (1 ms) under torchrun: the ranks stop within seconds, each with one ``error:`` line
    (the first names training.dist_timeout_s), no traceback from the package, no run folder."""
    cfg = _config(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    start = time.time()
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, timeout=120,
                       args=["--config", str(cfg), *OVERRIDES, "--set", "training.dist_timeout_s=0.001"])
    assert res.returncode != 0 and time.time() - start < 120
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert errors and "a collective timed out after training.dist_timeout_s=0.001 s" in errors[0], res.stderr[-3000:]
    assert all("dist_timeout_s" in x or "another rank stopped" in x for x in errors), errors
    assert f'File "{REPO_ROOT / "distill"}' not in res.stderr
    assert not (tmp_path / "out" / EXPERIMENT).exists() and not (tmp_path / "artifacts").exists()
