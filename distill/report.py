"""Metrics logging (JSON lines, and the ``training.report_to`` trackers of distill/tracking.py), plots and the human
report. Records, one JSON object a line:
``{"event": "train", "phase", "step", "epoch", "loss", "terms": {name: value}, "lr", "samples_per_s", "elapsed_s"}``
and ``{"event": "eval", "phase", "step", "results": <evaluate_settings dict>}``. Only rank 0 owns a MetricsLogger.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from distill.config import Config
    from distill.tracking import Tracker

from distill.errors import DataError

logger = logging.getLogger(__name__)

METRIC_LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "R@10", "recall@100": "R@100"}
SETTING_LABELS = {"teacher->teacher": "teacher->teacher (reference)", "student->teacher": "student->teacher (drop-in)"}
MRL_PLOT = "mrl_quality.png"


def _dumps(obj: Any, indent: int | None = None) -> str:
    """JSON text; tensors and numpy values via ``tolist``, anything else unknown (e.g. paths) via ``str``."""
    return json.dumps(obj, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v), indent=indent)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(prefix: str, values: Mapping[str, Any] | None) -> dict[str, float]:
    return {f"{prefix}/{key}": float(v) for key, v in (values or {}).items() if _is_number(v)}


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Tracker ``{tag: value}``: ``{event}/{phase}/{key}``, ``.../terms/{term}``, ``.../{setting}@{dim}/{metric}``
    and ``.../mean_cosine/{part}``."""
    prefix = f"{record.get('event', 'event')}/{record.get('phase', 'all')}"
    out = _numbers(prefix, {k: v for k, v in record.items() if k not in ("step", "epoch")})
    out.update(_numbers(f"{prefix}/terms", record.get("terms")))
    results = record.get("results") or {}
    for row in results.get("rows", []):
        out.update(_numbers(f"{prefix}/{row['setting']}@{row['dim']}", row["metrics"]))
    out.update(_numbers(f"{prefix}/mean_cosine", results.get("mean_cosine")))
    return out


class MetricsLogger(AbstractContextManager):
    """Append records to a JSON-lines file (flushed per line) and their scalars to ``trackers``."""

    def __init__(self, jsonl_path: str | Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(jsonl_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.is_file() else b""
        if data and not data.endswith(b"\n"):  # a crash mid-write: the next record must start on a line of its own
            keep = data.rfind(b"\n") + 1
            os.truncate(self.path, keep)
            logger.warning("%s: dropped a partial last line (%d bytes)", self.path, len(data) - keep)
        self._file = self.path.open("a", encoding="utf-8")
        self._trackers = list(trackers)

    @classmethod
    def for_run(cls, cfg: Config, run_dir: Path) -> MetricsLogger:
        """``{run_dir}/metrics.jsonl`` plus the trackers of ``cfg.training.report_to`` (run name: the experiment)."""
        from distill.tracking import open_trackers

        trackers = open_trackers(cfg.training.report_to, run_dir, cfg.experiment, cfg.to_dict())
        return cls(run_dir / "metrics.jsonl", trackers)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one JSON line and its scalars (read back from that line) to every tracker at
        ``record["step"]``."""
        line = _dumps(dict(record))
        self._file.write(line + "\n")
        self._file.flush()
        scalars = record_scalars(json.loads(line)) if self._trackers else {}
        for tracker in self._trackers:
            tracker.log(scalars, int(record.get("step", 0)), str(record.get("phase", "all")))

    def close(self) -> None:
        """Close the file and the trackers (idempotent)."""
        self._file.close()
        while self._trackers:
            self._trackers.pop(0).close()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a broken last line (crash mid-write) is skipped, any other is a DataError."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
        except (TypeError, ValueError) as exc:
            if n != lines[-1][0]:
                raise DataError(f"{path}:{n}: invalid metrics record ({exc})") from None
            logger.warning("%s:%d: skipping a truncated last line", path, n)
            continue
        records.append(record)
    return records


def train_series(records: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Train records per phase, sorted by step; a step logged twice (a resumed run) keeps its last record."""
    by_phase: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        if r.get("event") == "train" and _is_number(r.get("step")):
            by_phase.setdefault(str(r.get("phase", "all")), {})[int(r["step"])] = dict(r)
    return {phase: [steps[s] for s in sorted(steps)] for phase, steps in by_phase.items()}


def training_summary(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per phase: last step, final loss and terms, final lr, mean samples/s, elapsed seconds."""
    summary = {}
    for phase, series in train_series(records).items():
        last = series[-1]
        speeds = [r["samples_per_s"] for r in series if _is_number(r.get("samples_per_s"))]
        summary[phase] = {
            "steps": int(last["step"]),
            "final_loss": last.get("loss"),
            "final_terms": last.get("terms", {}),
            "final_lr": last.get("lr"),
            "samples_per_s": sum(speeds) / len(speeds) if speeds else None,
            "elapsed_s": last.get("elapsed_s"),
        }
    return summary


def last_eval_results(records: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    evals = [r["results"] for r in records if r.get("event") == "eval" and r.get("results")]
    return dict(evals[-1]) if evals else None


@functools.cache
def _have_matplotlib() -> bool:
    """Whether plots can be drawn; warns once when they cannot (matplotlib is the optional ``plots`` extra)."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed: no plots (pip install 'distill[plots]')")
        return False
    return True


def _axes(
    lines: Mapping[str, list[tuple[float, float]]],
    title: str,
    ylabel: str,
    xlabel: str = "step",
    figsize: tuple[float, float] = (7, 4.5),
    **style: Any,
) -> Axes | None:
    """Axes with one line per non-empty ``{label: [(x, y)]}`` entry; None when there is none."""
    from matplotlib.figure import Figure

    lines = {name: pts for name, pts in lines.items() if pts}
    if not lines:
        return None
    ax = Figure(figsize=figsize, layout="tight").add_subplot()
    for name, pts in lines.items():
        ax.plot(*zip(*pts), label=name, **style)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return ax


def _save(ax: Axes | None, path: Path, **legend: Any) -> Path | None:
    if ax is None:
        return None
    ax.legend(**legend)
    ax.figure.savefig(path, format="png", dpi=100)
    return path


def _plot_loss(phase: str, series: list[dict[str, Any]], path: Path) -> Path | None:
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in series:
        for name, value in {"loss": r.get("loss"), **(r.get("terms") or {})}.items():
            if _is_number(value):
                lines.setdefault(name, []).append((r["step"], value))
    ax = _axes(lines, f"{phase}: loss", "loss")
    if ax is None:
        return None
    for line in ax.lines:
        line.set_linewidth(2.2 if line.get_label() == "loss" else 1.2)
    if all(v > 0 for pts in lines.values() for _, v in pts):
        ax.set_yscale("log")  # terms differ by orders of magnitude (e.g. MSE vs InfoNCE)
    return _save(ax, path)


def mrl_points(eval_results: Mapping[str, Any] | None) -> list[tuple[int, float]]:
    """``(dim, nDCG@10)`` of the student->student rows, ascending dim; empty unless there are >= 2 dims."""
    pts = sorted(
        (int(row["dim"]), float(row["metrics"]["ndcg@10"]))
        for row in (eval_results or {}).get("rows", [])
        if row["setting"] == "student->student" and _is_number(row["metrics"].get("ndcg@10"))
    )
    return pts if len(pts) >= 2 else []


def plot_mrl(eval_results: Mapping[str, Any] | None, path: str | Path) -> Path | None:
    """nDCG@10 against embedding dim (MRL truncation), with the teacher reference as a dashed line."""
    pts = mrl_points(eval_results)
    if not pts or not _have_matplotlib():
        return None
    ax = _axes({"student->student": pts}, "quality against dimension", "nDCG@10", "embedding dim", (6, 4), marker="o")
    if ax is None:
        return None
    for row in eval_results["rows"]:
        if row["setting"] == "teacher->teacher":
            ax.axhline(row["metrics"]["ndcg@10"], linestyle="--", color="gray", label=f"teacher ({row['dim']}d)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in pts], [str(p[0]) for p in pts])
    return _save(ax, Path(path))


def plot_metrics(jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``loss_{phase}.png``, ``lr.png``, ``eval_ndcg.png`` (nDCG@10 of every eval row against step) and
    ``mrl_quality.png`` (last eval, several student dims) from a metrics file; returns the files written."""
    if not _have_matplotlib():
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(jsonl_path)
    series = train_series(records)
    written = [_plot_loss(phase, s, out_dir / f"loss_{phase}.png") for phase, s in series.items()]
    lr = {phase: [(r["step"], r["lr"]) for r in s if _is_number(r.get("lr"))] for phase, s in series.items()}
    written.append(_save(_axes(lr, "learning rate", "lr", figsize=(7, 4)), out_dir / "lr.png"))
    ndcg: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get("event") == "eval" and _is_number(r.get("step")):
            for row in r["results"].get("rows", []):
                if _is_number(row["metrics"].get("ndcg@10")):
                    name = f"{r.get('phase', 'all')} {row['setting']}@{row['dim']}"
                    ndcg.setdefault(name, []).append((r["step"], row["metrics"]["ndcg@10"]))
    ax = _axes(ndcg, "eval nDCG@10 during training", "nDCG@10", marker="o")
    written.append(_save(ax, out_dir / "eval_ndcg.png", fontsize="small"))
    written.append(plot_mrl(last_eval_results(records), out_dir / MRL_PLOT))
    return [p for p in written if p is not None]


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "-"


def _table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """Markdown table lines; ``align`` has one letter per column: l(eft) or r(ight)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in rows)]


def format_eval_table(eval_results: Mapping[str, Any]) -> str:
    """Markdown table of the settings rows (retention = nDCG@10 / teacher nDCG@10), plus the mean cosine line."""
    rows = []
    for row in eval_results.get("rows", []):
        retention = (row.get("retention") or {}).get("ndcg@10")
        rows.append([
            SETTING_LABELS.get(row["setting"], row["setting"]),
            str(row["dim"]),
            *(_fmt(row["metrics"].get(m)) for m in METRIC_LABELS),
            f"{100 * retention:.1f}%" if _is_number(retention) else "-",
        ])
    lines = _table(["Setting", "Dim", *METRIC_LABELS.values(), "Retention (nDCG@10)"], "lrrrrrr", rows)
    cos = eval_results.get("mean_cosine")
    if cos:
        lines.append("")
        lines.append(
            f"Mean cosine(student, teacher) on held-out texts: queries {_fmt(cos.get('queries'))}, "
            f"documents {_fmt(cos.get('documents'))}, all {_fmt(cos.get('all'))}"
        )
    return "\n".join(lines)


def format_mteb_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown table of the MTEB tasks' main scores (or the error that stopped the MTEB run)."""
    cells = [[r.get("task", "-"), r["error"] if "error" in r else _fmt(r.get("main_score"))] for r in rows]
    return "\n".join(_table(["MTEB task", "Main score"], "lr", cells))


def write_report(
    out_dir: str | Path,
    eval_results: Mapping[str, Any] | None = None,
    metrics_jsonl: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` (eval table, training summary, plots, config) and ``report.json`` (the same data) into
    ``out_dir``; returns both paths. Without ``eval_results`` the last eval record of ``metrics_jsonl`` is reported."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(metrics_jsonl) if metrics_jsonl is not None else []
    plots = plot_metrics(metrics_jsonl, out_dir) if metrics_jsonl is not None else []
    if eval_results is None:
        eval_results = last_eval_results(records)
    else:  # the explicit (final) results win over the log's last eval for the MRL figure
        mrl = plot_mrl(eval_results, out_dir / MRL_PLOT)
        if mrl is not None and mrl not in plots:
            plots.append(mrl)
    summary = training_summary(records)
    config_plain = json.loads(_dumps(dict(config))) if config is not None else None

    md = ["# Distillation report", ""]
    if extra:
        md += [f"- **{k}**: {v}" for k, v in extra.items()] + [""]
    md += ["## Retrieval evaluation", ""]
    if eval_results and eval_results.get("rows"):
        counts = f"{eval_results.get('num_queries', '?')} queries, {eval_results.get('num_documents', '?')} documents"
        md += [f"{counts}; mode: {eval_results.get('mode', '?')}.", "", format_eval_table(eval_results), ""]
    else:
        md += ["No evaluation results.", ""]
    if eval_results and eval_results.get("mteb"):
        md += ["## MTEB", "", format_mteb_table(eval_results["mteb"]), ""]
    if metrics_jsonl is not None:
        rows = []
        for phase, s in summary.items():
            terms = ", ".join(f"{k} {_fmt(v)}" for k, v in (s["final_terms"] or {}).items()) or "-"
            speed, elapsed = _fmt(s["samples_per_s"], 1), _fmt(s["elapsed_s"], 1)
            rows.append([phase, str(s["steps"]), _fmt(s["final_loss"]), terms, speed, elapsed])
        header = ["Phase", "Steps", "Final loss", "Final terms", "Samples/s", "Elapsed (s)"]
        md += ["## Training", ""]
        md += [*_table(header, "lrrlrr", rows), ""] if summary else ["No training records.", ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if config_plain is not None:
        md += ["## Config", "", "```yaml", yaml.safe_dump(config_plain, sort_keys=False).rstrip(), "```", ""]
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    md_path.write_text("\n".join(md), encoding="utf-8")
    data = {
        "eval": eval_results,
        "training": summary,
        "plots": [p.name for p in plots],
        "config": config_plain,
        "extra": dict(extra) if extra else None,
    }
    json_path.write_text(_dumps(data, indent=2) + "\n", encoding="utf-8")
    return md_path, json_path
