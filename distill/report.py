"""Training/eval metrics logging (JSON lines, optional TensorBoard), plots, and the human report.

Records written by the trainer (one JSON object per line)::

    {"event": "train", "phase": "phase1", "step": 10, "epoch": 0, "loss": 0.41,
     "terms": {"mse": 0.2, "cosine": 0.3}, "lr": 2e-5, "samples_per_s": 120.0, "elapsed_s": 33.1}
    {"event": "eval", "phase": "phase1", "step": 10, "results": <distill.evaluate.evaluate_settings dict>}

Only rank 0 should own a :class:`MetricsLogger`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill.errors import DataError

logger = logging.getLogger(__name__)

METRIC_LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "R@10", "recall@100": "R@100"}
SETTING_LABELS = {
    "teacher->teacher": "teacher->teacher (reference)",
    "student->student": "student->student",
    "student->teacher": "student->teacher (drop-in)",
}
MRL_PLOT = "mrl_quality.png"


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: tensors / numpy scalars and arrays via ``tolist``, anything else via ``str``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, default=_jsonable, indent=indent)


def _load_summary_writer() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter`` when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a record, ``{tag: value}``.

    train: ``train/{phase}/{loss|lr|samples_per_s|...}`` and ``train/{phase}/terms/{term}``;
    eval: ``eval/{phase}/{setting}@{dim}/{metric}`` and ``eval/{phase}/mean_cosine/{part}``;
    any other event: its top-level numbers under ``{event}/{phase}/``.
    """
    event, phase = str(record.get("event", "event")), str(record.get("phase", "all"))
    prefix = f"{event}/{phase}"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("event", "phase", "step", "epoch"):
            continue
        if _is_number(value):
            out[f"{prefix}/{key}"] = float(value)
        elif key == "terms" and isinstance(value, Mapping):
            out.update({f"{prefix}/terms/{t}": float(v) for t, v in value.items() if _is_number(v)})
    results = record.get("results")
    if isinstance(results, Mapping):
        for row in results.get("rows", []):
            for metric, value in row.get("metrics", {}).items():
                if _is_number(value):
                    out[f"{prefix}/{row['setting']}@{row['dim']}/{metric}"] = float(value)
        for part, value in (results.get("mean_cosine") or {}).items():
            if _is_number(value):
                out[f"{prefix}/mean_cosine/{part}"] = float(value)
    return out


def _drop_partial_last_line(path: Path) -> None:
    """Cut a final line without its newline (a crash mid-write) so the next record starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        handle.truncate(keep)
    logger.warning("%s: dropped a partial last line (%d bytes) left by an interrupted run", path, len(data) - keep)


class MetricsLogger:
    """Append records to a JSON-lines file (flushed per line) and, if available, to TensorBoard."""

    def __init__(self, jsonl_path: str | Path, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(jsonl_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard_dir is not None:
            writer_cls = _load_summary_writer()
            if writer_cls is None:
                logger.info("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._writer = writer_cls(log_dir=str(tensorboard_dir))

    def log(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one JSON line (and its scalars to TensorBoard at ``record["step"]``)."""
        self._file.write(_dumps(dict(record)) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = int(record.get("step", 0))
            for tag, value in record_scalars(record).items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file. A broken *last* line (crash mid-write) is skipped with a warning; a broken
    line elsewhere is a :class:`DataError` naming the file and line."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == last:
                logger.warning("%s:%d: skipping a truncated last line", path, i + 1)
                continue
            raise DataError(f"{path}:{i + 1}: invalid metrics record ({exc})") from None
        records.append(record)
    return records


def _phases(records: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r.get("phase", "all")) for r in records))


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
    evals = [r["results"] for r in records if r.get("event") == "eval" and isinstance(r.get("results"), Mapping)]
    return dict(evals[-1]) if evals else None


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def _plot_loss(phase: str, series: list[dict[str, Any]], path: Path) -> Path | None:
    steps = [r["step"] for r in series]
    lines = {"loss": [r.get("loss") for r in series]}
    for term in dict.fromkeys(t for r in series for t in (r.get("terms") or {})):
        lines[term] = [(r.get("terms") or {}).get(term) for r in series]
    lines = {name: vals for name, vals in lines.items() if any(_is_number(v) for v in vals)}
    if not lines:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, vals in lines.items():
        pts = [(s, v) for s, v in zip(steps, vals) if _is_number(v)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=2.2 if name == "loss" else 1.2)
    if all(v > 0 for vals in lines.values() for v in vals if _is_number(v)):
        ax.set_yscale("log")  # terms differ by orders of magnitude (e.g. MSE vs InfoNCE)
    ax.set(title=f"{phase}: loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_lr(series_by_phase: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    drawn = False
    for phase, series in series_by_phase.items():
        pts = [(r["step"], r["lr"]) for r in series if _is_number(r.get("lr"))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=phase)
            drawn = True
    if not drawn:
        return None
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_eval_history(records: list[Mapping[str, Any]], path: Path) -> Path | None:
    """nDCG@10 of every setting row against the step at which it was evaluated (one line per phase and row)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get("event") != "eval" or not _is_number(r.get("step")) or not isinstance(r.get("results"), Mapping):
            continue
        for row in r["results"].get("rows", []):
            value = row.get("metrics", {}).get("ndcg@10")
            if _is_number(value):
                name = f"{r.get('phase', 'all')} {row['setting']}@{row['dim']}"
                lines.setdefault(name, []).append((r["step"], value))
    if not lines:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(title="eval nDCG@10 during training", xlabel="step", ylabel="nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def mrl_points(eval_results: Mapping[str, Any] | None) -> list[tuple[int, float]]:
    """``(dim, nDCG@10)`` of the student->student rows, ascending dim; empty unless there are >= 2 dims."""
    if not eval_results:
        return []
    pts = sorted(
        (int(row["dim"]), float(row["metrics"]["ndcg@10"]))
        for row in eval_results.get("rows", [])
        if row.get("setting") == "student->student" and _is_number(row.get("metrics", {}).get("ndcg@10"))
    )
    return pts if len(pts) >= 2 else []


def plot_mrl(eval_results: Mapping[str, Any] | None, path: str | Path) -> Path | None:
    """nDCG@10 against embedding dim (MRL truncation), with the teacher reference as a dashed line."""
    pts = mrl_points(eval_results)
    if not pts:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="student->student")
    for row in eval_results.get("rows", []):
        if row.get("setting") == "teacher->teacher":
            ax.axhline(row["metrics"]["ndcg@10"], linestyle="--", color="gray", label=f"teacher ({row['dim']}d)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in pts], [str(p[0]) for p in pts])
    ax.set(title="quality against dimension", xlabel="embedding dim", ylabel="nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_metrics(jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """PNG plots from a metrics file: ``loss_{phase}.png`` (total and each term against step), ``lr.png``,
    ``eval_ndcg.png`` (eval history) and ``mrl_quality.png`` (nDCG@10 against dim from the last eval, when it has
    several student dims). Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(jsonl_path)
    series = train_series(records)
    written = [_plot_loss(phase, s, out_dir / f"loss_{_safe(phase)}.png") for phase, s in series.items()]
    written.append(_plot_lr(series, out_dir / "lr.png"))
    written.append(_plot_eval_history(records, out_dir / "eval_ndcg.png"))
    written.append(plot_mrl(last_eval_results(records), out_dir / MRL_PLOT))
    return [p for p in written if p is not None]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "-"


def format_eval_table(eval_results: Mapping[str, Any]) -> str:
    """Markdown table of the settings rows (retention = nDCG@10 / teacher nDCG@10), plus the mean cosine line."""
    header = ["Setting", "Dim", *METRIC_LABELS.values(), "Retention (nDCG@10)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in eval_results.get("rows", []):
        retention = (row.get("retention") or {}).get("ndcg@10")
        cells = [
            SETTING_LABELS.get(row["setting"], row["setting"]),
            str(row["dim"]),
            *(_fmt(row["metrics"].get(m)) for m in METRIC_LABELS),
            f"{100 * retention:.1f}%" if _is_number(retention) else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    cos = eval_results.get("mean_cosine")
    if cos:
        lines.append("")
        lines.append(
            f"Mean cosine(student, teacher) on held-out texts: queries {_fmt(cos.get('queries'))}, "
            f"documents {_fmt(cos.get('documents'))}, all {_fmt(cos.get('all'))}"
        )
    return "\n".join(lines)


def _format_training(summary: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| Phase | Steps | Final loss | Final terms | Samples/s | Elapsed (s) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for phase, s in summary.items():
        terms = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("final_terms") or {}).items()) or "-"
        lines.append(
            f"| {phase} | {s['steps']} | {_fmt(s.get('final_loss'))} | {terms} | "
            f"{_fmt(s.get('samples_per_s'), 1)} | {_fmt(s.get('elapsed_s'), 1)} |"
        )
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    eval_results: Mapping[str, Any] | None = None,
    metrics_jsonl: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` (eval table, mean cosine, per-phase training summary, plots, config) and
    ``report.json`` (the same data) into ``out_dir``; returns both paths.

    Without ``eval_results`` the last eval record of ``metrics_jsonl`` (if any) is reported.
    """
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
    if eval_results:
        md += [
            f"{eval_results.get('num_queries', '?')} queries, {eval_results.get('num_documents', '?')} documents; "
            f"mode: {eval_results.get('mode', '?')}.",
            "",
            format_eval_table(eval_results),
            "",
        ]
    else:
        md += ["No evaluation results.", ""]
    if metrics_jsonl is not None:
        md += ["## Training", ""]
        md += [_format_training(summary), ""] if summary else ["No training records.", ""]
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
