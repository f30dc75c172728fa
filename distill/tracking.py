"""Experiment trackers chosen by ``training.report_to``: TensorBoard, Weights & Biases, MLflow. Each one receives the
scalars of :func:`distill.report.record_scalars` (tags ``{event}/{phase}/...``) at the record's phase step, and the
run's config once at start (TensorBoard hparams, wandb config, MLflow params). Only rank 0 opens trackers.

wandb: project ``$WANDB_PROJECT`` (default ``distill``), run name = the experiment, files under the run folder; each
phase's tags are plotted against their own ``{phase}/step``. MLflow: ``$MLFLOW_TRACKING_URI`` (default SQLite
``{run folder}/mlflow.db``), experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``distill``), run name = the experiment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from distill.config import installed
from distill.errors import ConfigError

PROJECT = "distill"


class Tracker(Protocol):
    def log(self, scalars: Mapping[str, float], step: int, phase: str) -> None: ...

    def close(self) -> None: ...


def requested(report_to: list[str]) -> list[str]:
    """The trackers named in ``report_to``, in order, without ``none`` and duplicates."""
    return [name for name in dict.fromkeys(report_to) if name != "none"]


def check_installed(report_to: list[str]) -> None:
    """Raise a one-line ConfigError for the first requested tracker whose package (= pip extra) is not importable."""
    for name in requested(report_to):
        if not installed(name):
            raise ConfigError(f"training.report_to: {name} is not installed; pip install 'distill[{name}]' "
                              f"(or drop {name} from training.report_to)")


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}``: numbers, strings and booleans kept, lists and null as JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str)) else json.dumps(value, default=str)
    return out


class TensorBoardTracker:
    """SummaryWriter in ``{run_dir}/tensorboard``; the config as hparams (and text) in the same folder."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._writer.add_text("config", f"```json\n{json.dumps(config, indent=2, default=str)}\n```")
        self._writer.add_hparams(flat_config(config), {}, run_name=".")

    def log(self, scalars: Mapping[str, float], step: int, phase: str) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, config=dict(config),
                               dir=str(run_dir))
        self._prefixes: set[str] = set()

    def log(self, scalars: Mapping[str, float], step: int, phase: str) -> None:
        for prefix in {"/".join(tag.split("/")[:2]) for tag in scalars} - self._prefixes:
            self._run.define_metric(f"{prefix}/*", step_metric=f"{phase}/step")
            self._prefixes.add(prefix)
        self._run.log({**scalars, f"{phase}/step": step})

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:500] for k, v in flat_config(config).items()})
        self._mlflow = mlflow

    def log(self, scalars: Mapping[str, float], step: int, phase: str) -> None:
        """Tags in MLflow's key alphabet (letters, digits, ``_-. /:``): ``s->t@768`` -> ``s_to_t_768``."""
        self._mlflow.log_metrics({re.sub(r"[^\w\-. /:]", "_", tag.replace("->", "_to_")): value
                                  for tag, value in scalars.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(report_to: list[str], run_dir: str | Path, name: str, config: Mapping[str, Any]) -> list[Tracker]:
    """One started tracker per requested name (run ``name``, ``config`` logged once); if one fails to start, those
    already started are closed before the error propagates."""
    opened: list[Tracker] = []
    try:
        for t in requested(report_to):
            opened.append(TRACKERS[t](Path(run_dir), name, config))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
