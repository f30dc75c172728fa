"""The one command line (``python -m distill COMMAND``, ``train_ddp.py``): subcommands, shared error handling, and
no import circle between the CLI and the library modules it drives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import REPO_ROOT

from distill import cli
from distill.errors import ConfigError, DataError, Preempted

QUICK = "configs/quick_test.yaml"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_command() -> None:
    proc = _run("-m", "distill", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "plan", "cache", "evaluate"):
        assert f"    {command}" in proc.stdout, proc.stdout


def test_plan_is_train_dry_run_and_train_ddp_dry_run() -> None:
    """The three spellings of the dry run print the same plan (stdout) and exit 0."""
    runs = [_run("-m", "distill", "plan", "--config", QUICK),
            _run("-m", "distill", "train", "--config", QUICK, "--dry-run"),
            _run("train_ddp.py", "--config", QUICK, "--dry-run")]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "experiment   distilled-" in runs[0].stdout and "outputs" in runs[0].stdout
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout


def test_teacher_targets_does_not_import_the_cli_or_the_trainer() -> None:
    probe = ("import sys, distill.teacher_targets\n"
             "print(','.join(m for m in ('distill.cli', 'distill.trainer') if m in sys.modules))")
    proc = _run("-c", probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("command", [["train"], ["plan"], ["cache"], ["cache", "--dry-run"]])
def test_a_bad_config_is_one_error_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     command: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase1:\n  learing_rate: 1.0e-5\n", encoding="utf-8")
    assert cli.main([command[0], "--config", str(bad), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "phase1.learing_rate" in err and "\n" not in err


def test_train_main_takes_the_train_ddp_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase1:\n  learing_rate: 1.0e-5\n", encoding="utf-8")
    args = ["--config", str(bad), "--set", "phase2.temperature=0.05", "--overwrite", "--allow-config-change",
            "--log-level", "WARNING"]
    assert cli.train_main(args) == 2
    assert "phase1.learing_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.train_main(["train", "--config", str(bad)])  # no subcommand on train_ddp.py


def test_run_guarded_maps_errors_and_always_shuts_down(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import distill.distributed

    calls: list[str] = []
    monkeypatch.setattr(distill.distributed, "shutdown", lambda: calls.append("shutdown"))

    def raising(exc: Exception):
        def command() -> int:
            raise exc
        return command

    assert cli.run_guarded(lambda: 0) == 0
    assert cli.run_guarded(raising(DataError("bad row"))) == 2
    assert capsys.readouterr().err == "error: bad row\n"
    assert cli.run_guarded(raising(Preempted("preempted: checkpoint saved"))) == 0
    assert capsys.readouterr().err == "preempted: checkpoint saved\n"
    with pytest.raises(KeyError):  # a bug is not an expected failure: it keeps its traceback
        cli.run_guarded(raising(KeyError("x")))
    assert calls == ["shutdown"] * 4


def test_parse_dims() -> None:
    assert cli.parse_dims(None) is None and cli.parse_dims("") is None
    assert cli.parse_dims("768, 256,64") == [768, 256, 64]
    with pytest.raises(ConfigError, match="expected comma-separated integers"):
        cli.parse_dims("16,x")
    with pytest.raises(ConfigError, match="must be positive"):
        cli.parse_dims("16,0")


def test_cache_report_lines() -> None:
    counts = {"phase1": {"query": {"texts": 1200, "cached": 200, "missing": 1000}}}
    assert cli.format_cache_report(Path("/c"), counts, dry_run=True).splitlines() == [
        "teacher cache /c", "  phase1  query         1,200 texts        200 cached      1,000 to compute"]
    passes = {"phase2": {"teacher_forward_passes": 4096}}
    assert cli.format_cache_report(Path("/c"), passes, dry_run=False).splitlines()[1] == \
        "  phase2  teacher forward passes: 4,096"
