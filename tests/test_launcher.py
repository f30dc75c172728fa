"""Tests for the launchers: run_ddp.sh (torchrun command construction, validation, a real 2-process --dry-run) and
scripts/slurm_distill.sbatch (syntax, srun/c10d wiring, SIGTERM forwarding and requeue), with fake ``torchrun``,
``nvidia-smi``, ``srun`` and ``scontrol`` executables on a hermetic PATH where a real cluster is needed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_data import tiny_config_yaml, write_training_files

REPO = Path(__file__).resolve().parent.parent
RUN_DDP = REPO / "run_ddp.sh"
SBATCH = REPO / "scripts" / "slurm_distill.sbatch"
VENV_BIN = Path(sys.executable).parent
BASH = shutil.which("bash") or "/bin/bash"  # absolute: the tests run with a PATH that lacks it

# Variables the scripts read; cleared so the developer's shell cannot change what a test sees.
_LAUNCH_VARS = (
    "NPROC",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV_ID",
    "RDZV_BACKEND",
    "RDZV_ENDPOINT",
    "RDZV_PORT",
    "RDZV_CONF",
    "MAX_RESTARTS",
    "OMP_NUM_THREADS",
    "PYTHON",
    "CUDA_VISIBLE_DEVICES",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    "GPUS_PER_NODE",
    "DISTILL_DIR",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
)
# System tools the two scripts call; linked into a private bin dir so PATH holds nothing else (no real torchrun).
_TOOLS = ("bash", "dirname", "basename", "nproc", "getconf", "grep", "sed", "head", "date", "sleep", "cat", "env")

FAKE_TORCHRUN = r"""#!/bin/bash
# Records how it was called; FAKE_MODE=exitN exits with N, FAKE_MODE=wait runs until SIGTERM.
out=${FAKE_OUT:?}
printf '%s\n' "$0" "$@" > "$out/torchrun_args.txt"
printf 'OMP_NUM_THREADS=%s\nTORCH_ELASTIC_SHUTDOWN_TIMEOUT=%s\n' "${OMP_NUM_THREADS-}" \
    "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT-}" > "$out/torchrun_env.txt"
mode=${FAKE_MODE:-exit0}
case "$mode" in
    wait)
        trap 'echo TERM >> "$out/signals.txt"; kill "$sleeper" 2>/dev/null; exit 143' TERM
        sleep 60 &
        sleeper=$!
        printf '%s %s\n' "$$" "$sleeper" > "$out/pids.txt"
        : > "$out/started"
        wait "$sleeper"
        exit 0
        ;;
    exit*) exit "${mode#exit}" ;;
esac
"""

FAKE_NVIDIA_SMI = r"""#!/bin/bash
[[ $1 == -L ]] || exit 1
for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""

FAKE_SRUN = r"""#!/bin/bash
printf '%s\n' "$@" > "${FAKE_OUT:?}/srun_args.txt"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = r"""#!/bin/bash
case "$1" in
    show) printf 'node-a\nnode-b\n' ;;
    requeue) echo "$2" >> "${FAKE_OUT:?}/requeue.txt" ;;
    *) exit 1 ;;
esac
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` capturing text output; the caller checks the exit status."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


@pytest.fixture()
def fake(tmp_path: Path):
    """A hermetic PATH (fake torchrun/nvidia-smi/srun/scontrol + a few system tools), an output dir, a config."""
    fake_bin, tools, out = tmp_path / "fakebin", tmp_path / "tools", tmp_path / "out"
    for d in (fake_bin, tools, out):
        d.mkdir()
    for name in _TOOLS:
        found = shutil.which(name)
        assert found, f"system tool {name} missing"
        (tools / name).symlink_to(found)
    _write_exe(fake_bin / "torchrun", FAKE_TORCHRUN)
    _write_exe(fake_bin / "srun", FAKE_SRUN)
    _write_exe(fake_bin / "scontrol", FAKE_SCONTROL)
    config = tmp_path / "exp.yaml"
    config.write_text("phase1: {num_epochs: 1}\n", encoding="utf-8")

    class Fake:
        def __init__(self) -> None:
            self.bin, self.out, self.config = fake_bin, out, config

        def env(self, **extra: str) -> dict[str, str]:
            env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
            env.update(PATH=f"{fake_bin}{os.pathsep}{tools}", FAKE_OUT=str(out), HF_HUB_OFFLINE="1")
            env.update(extra)
            return env

        def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
            return _run([BASH, str(RUN_DDP), *args], env=self.env(**extra), timeout=60, cwd=tmp_path)

        def torchrun_args(self) -> list[str]:
            return (out / "torchrun_args.txt").read_text(encoding="utf-8").splitlines()

        def torchrun_env(self) -> dict[str, str]:
            lines = (out / "torchrun_env.txt").read_text(encoding="utf-8").splitlines()
            return dict(line.split("=", 1) for line in lines)

    return Fake()


# --------------------------------------------------------------------------------------------------------------------
# run_ddp.sh with a real torchrun: the plan of a 2-process CPU job
# --------------------------------------------------------------------------------------------------------------------


def test_dry_run_two_processes_on_cpu_prints_plan_and_command(tmp_path, tiny_teacher_dir, tiny_student_dir):
    files = write_training_files(tmp_path / "data")
    config = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, files)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(
        NPROC="2",
        PATH=f"{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    res = _run([BASH, str(RUN_DDP), str(config), "--dry-run"], env=env, timeout=180, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # the launch summary and the exact command
    assert "2 process(es) per node on CPU, gloo backend" in out
    cmd_line = next(line for line in res.stdout.splitlines() if line.startswith("run_ddp.sh: running:"))
    cmd = cmd_line.split(":", 2)[2].split()
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[1:6] == [
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "--local-ranks-filter=0",
    ]
    assert cmd[6] == str(REPO / "train_ddp.py")
    assert cmd[7:] == ["--config", str(config), "--dry-run"]
    # train_ddp.py's plan, computed for world size 2 (tiny config: batch 8/rank, accumulation 2 then 1), printed once
    assert out.count("planned on   2xH100") == 1
    assert "batch      8/rank, 16 global, x2 accumulation = 32 per optimizer step" in out
    assert "batch      8/rank, 16 global, x1 accumulation = 16 per optimizer step" in out
    assert "3 hard negatives, cross-rank" in out
    assert not (tmp_path / "out").exists(), "a dry run must not create the run folder"


def test_missing_config_fails_with_clear_message(tmp_path):
    res = _run([BASH, str(RUN_DDP), str(tmp_path / "nope.yaml"), "--dry-run"], timeout=30)
    assert res.returncode == 2
    assert f"run_ddp.sh: error: config file not found: {tmp_path / 'nope.yaml'}" in res.stderr
    assert "running:" not in res.stdout

    res = _run([BASH, str(RUN_DDP)], timeout=30)
    assert res.returncode == 2
    assert "run_ddp.sh: error: missing CONFIG" in res.stderr


def test_script_is_executable_and_help_lists_the_variables():
    assert os.access(RUN_DDP, os.X_OK)
    res = _run([str(RUN_DDP), "--help"], timeout=30)
    assert res.returncode == 0
    for var in (
        "NPROC",
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RDZV_ID",
        "RDZV_BACKEND",
        "RDZV_ENDPOINT",
        "MAX_RESTARTS",
        "OMP_NUM_THREADS",
    ):
        assert var in res.stdout


# --------------------------------------------------------------------------------------------------------------------
# run_ddp.sh command construction (fake torchrun)
# --------------------------------------------------------------------------------------------------------------------


def test_single_node_cpu_defaults(fake):
    res = fake.run(str(fake.config), "--set", "phase1.num_epochs=2", "--log-level", "DEBUG")
    assert res.returncode == 0, res.stderr
    assert "1 process(es) per node on CPU, gloo backend: no GPU found by nvidia-smi" in res.stdout
    args = fake.torchrun_args()
    assert args[0] == str(fake.bin / "torchrun")
    assert args[1:] == [
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--max-restarts=0",
        str(REPO / "train_ddp.py"),
        "--config",
        str(fake.config),
        "--set",
        "phase1.num_epochs=2",
        "--log-level",
        "DEBUG",
    ]
    env = fake.torchrun_env()
    assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))  # all cores for the single process
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
    assert "run_ddp.sh: running: torchrun --standalone --nnodes=1 --nproc-per-node=1" in res.stdout


def test_user_settings_are_kept(fake):
    res = fake.run(
        str(fake.config), NPROC="3", OMP_NUM_THREADS="5", MAX_RESTARTS="2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="40"
    )
    assert res.returncode == 0, res.stderr
    args = fake.torchrun_args()
    assert "--nproc-per-node=3" in args and "--max-restarts=2" in args
    assert fake.torchrun_env() == {
        "OMP_NUM_THREADS": "5",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "40",
    }


def test_restarts_refuse_overwrite(fake):
    res = fake.run(str(fake.config), "--overwrite", MAX_RESTARTS="2")
    assert res.returncode == 2
    assert "--overwrite with MAX_RESTARTS=2 would delete the run again at every restart" in res.stderr
    assert not (fake.out / "torchrun_args.txt").exists()
    res = fake.run(str(fake.config), "--overwrite")
    assert res.returncode == 0 and fake.torchrun_args()[-1] == "--overwrite"


def test_gpu_count_from_nvidia_smi_and_cuda_visible_devices(fake):
    _write_exe(fake.bin / "nvidia-smi", FAKE_NVIDIA_SMI)
    res = fake.run(str(fake.config), FAKE_GPUS="4")
    assert res.returncode == 0, res.stderr
    assert "--nproc-per-node=4" in fake.torchrun_args()
    assert "4 process(es) per node on GPU, NCCL backend (4 GPU(s) visible)" in res.stdout

    res = fake.run(str(fake.config), FAKE_GPUS="4", CUDA_VISIBLE_DEVICES="2,3")
    assert res.returncode == 0, res.stderr
    assert "--nproc-per-node=2" in fake.torchrun_args()

    res = fake.run(str(fake.config), FAKE_GPUS="4", NPROC="8")
    assert res.returncode == 2
    assert "NPROC=8 but only 4 GPU(s) are visible" in res.stderr


def test_multi_node_c10d_rendezvous(fake):
    res = fake.run(str(fake.config), NNODES="2", MASTER_ADDR="10.1.2.3", NPROC="8", NODE_RANK="1")
    assert res.returncode == 0, res.stderr
    args = fake.torchrun_args()
    assert args[1:7] == [
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.1.2.3:29500",
        "--rdzv-id=distill-exp",
        "--nproc-per-node=8",
        "--max-restarts=0",
    ]
    assert "--standalone" not in args and not any(a.startswith("--node-rank") for a in args)

    res = fake.run(
        str(fake.config),
        NNODES="2:4",
        RDZV_ENDPOINT="head:7777",
        RDZV_ID="job42",
        MASTER_ADDR="x",
        RDZV_CONF="join_timeout=1800",
    )
    assert res.returncode == 0, res.stderr
    assert fake.torchrun_args()[1:6] == [
        "--nnodes=2:4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=head:7777",
        "--rdzv-id=job42",
        "--rdzv-conf=join_timeout=1800",
    ]

    res = fake.run(str(fake.config), NNODES="2", SLURM_JOB_ID="777", MASTER_ADDR="h", MASTER_PORT="1234")
    assert res.returncode == 0, res.stderr
    assert fake.torchrun_args()[3:5] == ["--rdzv-endpoint=h:1234", "--rdzv-id=slurm-777"]


def test_multi_node_static_rendezvous(fake):
    res = fake.run(
        str(fake.config), NNODES="2", RDZV_BACKEND="static", NODE_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234"
    )
    assert res.returncode == 0, res.stderr
    assert fake.torchrun_args()[1:5] == ["--nnodes=2", "--node-rank=1", "--master-addr=h0", "--master-port=1234"]

    res = fake.run(str(fake.config), NNODES="2", RDZV_BACKEND="static", MASTER_ADDR="h0")
    assert res.returncode == 2 and "needs NODE_RANK" in res.stderr
    res = fake.run(str(fake.config), NNODES="2", RDZV_BACKEND="static", MASTER_ADDR="h0", NODE_RANK="2")
    assert res.returncode == 2 and "NODE_RANK must be in 0..1" in res.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2"}, "needs RDZV_ENDPOINT=HOST:PORT or MASTER_ADDR"),
        ({"NPROC": "0"}, "NPROC must be a positive integer, got '0'"),
        ({"NPROC": "two"}, "NPROC must be a positive integer, got 'two'"),
        ({"NNODES": "0"}, "NNODES must be N or MIN:MAX"),
        ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a non-negative integer"),
        ({"MASTER_PORT": "port"}, "MASTER_PORT must be a port number"),
    ],
)
def test_invalid_environment_is_rejected(fake, env, message):
    res = fake.run(str(fake.config), **env)
    assert res.returncode == 2
    assert message in res.stderr
    assert not (fake.out / "torchrun_args.txt").exists()


def test_config_given_twice_is_rejected(fake):
    res = fake.run(str(fake.config), "--config", "other.yaml")
    assert res.returncode == 2
    assert "give the config once" in res.stderr
    res = fake.run("--config", str(fake.config), "--dry-run")  # train_ddp.py's own spelling works
    assert res.returncode == 0, res.stderr
    assert fake.torchrun_args()[-3:] == ["--config", str(fake.config), "--dry-run"]


def test_falls_back_to_python_module_without_torchrun(fake):
    (fake.bin / "torchrun").unlink()
    _write_exe(fake.bin / "python3", FAKE_TORCHRUN)
    res = fake.run(str(fake.config))
    assert res.returncode == 0, res.stderr
    args = fake.torchrun_args()
    assert args[0] == str(fake.bin / "python3")
    assert args[1:4] == ["-m", "torch.distributed.run", "--standalone"]

    custom = fake.bin / "mypython"
    _write_exe(custom, FAKE_TORCHRUN)
    res = fake.run(str(fake.config), PYTHON=str(custom))
    assert res.returncode == 0, res.stderr
    assert fake.torchrun_args()[:3] == [str(custom), "-m", "torch.distributed.run"]


def test_exit_status_of_torchrun_is_returned(fake):
    res = fake.run(str(fake.config), FAKE_MODE="exit3")
    assert res.returncode == 3


# --------------------------------------------------------------------------------------------------------------------
# scripts/slurm_distill.sbatch
# --------------------------------------------------------------------------------------------------------------------


def test_sbatch_script_syntax_and_directives():
    res = _run([BASH, "-n", str(SBATCH)], timeout=30)
    assert res.returncode == 0, res.stderr
    directives = [
        line.split("#", 2)[1].split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")
    ]
    for d in ("--requeue", "--signal=B:TERM@120", "--ntasks-per-node=1", "--gpus-per-node=8", "--nodes=2"):
        assert d in directives


def _slurm_env(fake, **extra: str) -> dict[str, str]:
    return fake.env(
        SLURM_JOB_ID="4321",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_PER_TASK="16",
        SLURM_GPUS_ON_NODE="8",
        **extra,
    )


def test_sbatch_launches_one_torchrun_per_node_with_c10d(fake):
    res = _run(
        [BASH, str(SBATCH), str(fake.config), "--set", "phase2.temperature=0.05"], env=_slurm_env(fake), timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    srun = (fake.out / "srun_args.txt").read_text().splitlines()
    assert srun[:4] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
    assert srun[4:6] == ["bash", "./run_ddp.sh"]
    args = fake.torchrun_args()
    assert args[1:7] == [
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=node-a:{29500 + 4321 % 1000}",
        "--rdzv-id=slurm-4321",
        "--nproc-per-node=8",
        "--max-restarts=0",
    ]
    assert args[-4:] == ["--config", str(fake.config), "--set", "phase2.temperature=0.05"]
    assert fake.torchrun_env()["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "100"
    assert not (fake.out / "requeue.txt").exists()
    assert "training finished with exit status 0" in res.stdout


def test_sbatch_requeued_job_drops_overwrite(fake):
    res = _run([BASH, str(SBATCH), str(fake.config), "--overwrite"], env=_slurm_env(fake), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert fake.torchrun_args()[-1] == "--overwrite"  # first start: as asked

    res = _run(
        [BASH, str(SBATCH), str(fake.config), "--log-level", "DEBUG", "--overwrite"],
        env=_slurm_env(fake, SLURM_RESTART_COUNT="1"),
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert fake.torchrun_args()[-4:] == ["--config", str(fake.config), "--log-level", "DEBUG"]
    assert "dropping --overwrite so training resumes" in res.stdout


def test_sbatch_failure_is_not_requeued(fake):
    res = _run([BASH, str(SBATCH), str(fake.config)], env=_slurm_env(fake, FAKE_MODE="exit3"), timeout=60)
    assert res.returncode == 3
    assert not (fake.out / "requeue.txt").exists()


def _kill_if_ours(pid: int, fake_bin: Path) -> None:
    """SIGKILL the fake torchrun or its ``sleep 60`` if a failed test left them running (checked by command line)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # already gone
    if cmdline == b"sleep\x0060\x00" or str(fake_bin / "torchrun").encode() in cmdline:
        os.kill(pid, signal.SIGKILL)


def test_sbatch_forwards_sigterm_and_requeues(fake):
    proc = subprocess.Popen(
        [BASH, str(SBATCH), str(fake.config)],
        env=_slurm_env(fake, FAKE_MODE="wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (fake.out / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "fake torchrun never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pids = fake.out / "pids.txt"
        for pid in pids.read_text().split() if pids.exists() else []:
            _kill_if_ours(int(pid), fake.bin)
    assert proc.returncode == 0, stdout + stderr
    assert (fake.out / "signals.txt").read_text().split() == ["TERM"]  # torchrun got exactly one SIGTERM
    assert (fake.out / "requeue.txt").read_text().split() == ["4321"]
    assert "training stopped after SIGTERM (exit 143): requeueing job 4321" in stdout


def test_sbatch_rejects_missing_config(fake):
    res = _run([BASH, str(SBATCH), "configs/does-not-exist.yaml"], env=_slurm_env(fake), timeout=60)
    assert res.returncode == 2
    assert "config file not found: configs/does-not-exist.yaml" in res.stderr
    assert not (fake.out / "srun_args.txt").exists()
