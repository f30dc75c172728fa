"""training.report_to: the trackers (TensorBoard, wandb, MLflow) behind MetricsLogger, their config checks."""

from __future__ import annotations

import json
import sys
import types

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.plan import check_before_cost
from distill.report import MetricsLogger, read_metrics

TRAIN = {"event": "train", "phase": "phase1", "step": 3, "epoch": 0, "loss": 0.5, "terms": {"mse": 0.2, "cosine": 0.3},
         "lr": 1e-5, "samples_per_s": 100.0, "elapsed_s": 6.0}
EVAL = {"event": "eval", "phase": "phase2", "step": 40, "results": {"rows": [
    {"setting": "student->teacher", "dim": 48, "metrics": {"ndcg@10": 0.42}}], "mean_cosine": {"all": 0.9}}}
TRAIN_SCALARS = {"train/phase1/loss": 0.5, "train/phase1/terms/mse": 0.2, "train/phase1/terms/cosine": 0.3,
                 "train/phase1/lr": 1e-5, "train/phase1/samples_per_s": 100.0, "train/phase1/elapsed_s": 6.0}
EVAL_SCALARS = {"eval/phase2/student->teacher@48/ndcg@10": 0.42, "eval/phase2/mean_cosine/all": 0.9}


def cfg_with(*report_to: str):
    return load_config(None, [f"training.report_to={json.dumps(list(report_to))}"])


def run_logger(cfg, run_dir) -> None:
    with MetricsLogger.for_run(cfg, run_dir) as log:
        log.log(TRAIN)
        log.log(EVAL)


def fake_module(name: str, calls: list, **attrs) -> types.ModuleType:
    """A module whose functions record ``(function, args, kwargs)`` in ``calls`` and return ``attrs.get(...)``."""
    mod = types.ModuleType(name)
    for fn in ("init", "set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(mod, fn, lambda *a, _fn=fn, **k: calls.append((_fn, a, k)) or attrs.get(_fn))
    return mod


class FakeRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def define_metric(self, name, **kw):
        self.calls.append(("define_metric", (name,), kw))

    def log(self, data):
        self.calls.append(("log", (data,), {}))

    def finish(self):
        self.calls.append(("finish", (), {}))


def test_report_to_config_errors():
    assert load_config(None).training.report_to == ["none"]
    assert cfg_with("tensorboard", "wandb", "mlflow").training.report_to == ["tensorboard", "wandb", "mlflow"]
    with pytest.raises(ConfigError, match=r"training\.report_to\[1\] must be one of none, tensorboard, wandb, mlflow, "
                                          r"got 'wandbb'; did you mean 'wandb'\?"):
        cfg_with("tensorboard", "wandbb")
    with pytest.raises(ConfigError, match=r"training\.report_to: 'none' cannot be combined with trackers"):
        cfg_with("none", "mlflow")


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_tracker_package_fails_preflight_in_one_line(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # not importable, whether installed or not
    with pytest.raises(ConfigError) as err:
        check_before_cost(cfg_with(name))
    assert str(err.value) == (f"training.report_to: {name} is not installed; pip install 'distill[{name}]' (or drop "
                              f"{name} from training.report_to)")


def test_none_writes_only_metrics_jsonl(tmp_path):
    check_before_cost(cfg_with("none"))  # nothing to import
    run_logger(cfg_with("none"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert [r["event"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["train", "eval"]


def test_tensorboard_receives_scalars_and_config(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def __getattr__(self, fn):
            return lambda *a, **k: calls.append((fn, *a))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    cfg = cfg_with("tensorboard")
    run_logger(cfg, tmp_path)
    assert calls[0] == ("init", str(tmp_path / "tensorboard")) and calls[-1] == ("close",)
    hparams = next(c for c in calls if c[0] == "add_hparams")
    assert hparams[1]["phase1.batch_size"] == 64 and hparams[1]["training.report_to"] == '["tensorboard"]'
    assert hparams[1]["model.teacher_revision"] == "null" and hparams[2] == {}
    assert json.loads(next(c for c in calls if c[0] == "add_text")[2].strip("`json\n")) == cfg.to_dict()
    scalars = {c[1]: (c[2], c[3]) for c in calls if c[0] == "add_scalar"}
    assert scalars == {**{t: (v, 3) for t, v in TRAIN_SCALARS.items()}, **{t: (v, 40) for t, v in EVAL_SCALARS.items()}}


def test_real_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_logger(cfg_with("tensorboard"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/phase1/loss")] == [(3, 0.5)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval/phase2/student->teacher@48/ndcg@10")] == \
        [(40, 0.42)]
    assert "_hparams_/session_start_info" in events.summary_metadata


@pytest.mark.parametrize("project", [None, "my-project"])
def test_wandb_receives_scalars_per_phase_step_and_config(tmp_path, monkeypatch, project):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", calls, init=FakeRun(calls)))
    if project:
        monkeypatch.setenv("WANDB_PROJECT", project)
    else:
        monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = cfg_with("wandb")
    check_before_cost(cfg)  # the stand-in counts as installed
    run_logger(cfg, tmp_path)
    assert calls[0] == ("init", (), {"project": project or "distill", "name": cfg.experiment,
                                     "config": cfg.to_dict(), "dir": str(tmp_path)})
    assert [c for c in calls if c[0] == "define_metric"] == [
        ("define_metric", ("train/phase1/*",), {"step_metric": "phase1/step"}),
        ("define_metric", ("eval/phase2/*",), {"step_metric": "phase2/step"})]
    assert [c[1][0] for c in calls if c[0] == "log"] == [{**TRAIN_SCALARS, "phase1/step": 3},
                                                         {**EVAL_SCALARS, "phase2/step": 40}]
    assert calls[-1] == ("finish", (), {})


@pytest.mark.parametrize("uri", [None, "http://mlflow.example:5000"])
def test_mlflow_receives_scalars_and_params(tmp_path, monkeypatch, uri):
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", fake_module("mlflow", calls))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = cfg_with("mlflow")
    run_logger(cfg, tmp_path)
    names = [c[0] for c in calls]
    setup = [] if uri else [("set_tracking_uri", (f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}",), {})]
    assert calls[:len(setup) + 2] == [*setup, ("set_experiment", ("distill",), {}),
                                      ("start_run", (), {"run_name": cfg.experiment})]
    params = calls[names.index("log_params")][1][0]
    assert params["phase1.batch_size"] == "64" and params["model.use_projection"] == "True"
    assert params["data.phase1"].startswith('[{"path": "sentence-transformers/msmarco')
    metrics = [(c[1][0], c[2]["step"]) for c in calls if c[0] == "log_metrics"]
    assert metrics == [(TRAIN_SCALARS, 3), ({"eval/phase2/student_to_teacher_48/ndcg_10": 0.42,
                                             "eval/phase2/mean_cosine/all": 0.9}, 40)]
    assert names[-1] == "end_run"


def test_trackers_together_and_a_failed_start_closes_the_started(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", fake_module("mlflow", calls))
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", calls, init=FakeRun(calls)))
    run_logger(cfg_with("wandb", "mlflow", "wandb"), tmp_path)
    assert [c[0] for c in calls].count("init") == 1 and [c[0] for c in calls].count("log_metrics") == 2
    assert [c[0] for c in calls][-2:] == ["finish", "end_run"]

    def broken_init(**kw):
        raise RuntimeError("wandb: not logged in")

    calls.clear()
    monkeypatch.setattr(sys.modules["wandb"], "init", broken_init)
    with pytest.raises(RuntimeError, match="not logged in"):
        MetricsLogger.for_run(cfg_with("mlflow", "wandb"), tmp_path)
    assert [c[0] for c in calls][-1] == "end_run"
