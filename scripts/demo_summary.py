#!/usr/bin/env python
"""Print (and save as demo_summary.md beside the model) the CPU demo's quality table and its two bars.

Bars (held-out split): projection mode — student queries against teacher documents reach nDCG@10 >= 0.95 x
teacher->teacher; both modes — the distilled student->student beats the untrained student. MRL mode lists each
nested dim with its retention.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.config import load_config  # noqa: E402

DROP_IN_BAR = 0.95


def _row(rows: list[dict], setting: str, dim: int | None = None) -> dict | None:
    return next((r for r in rows if r["setting"] == setting and (dim is None or r["dim"] == dim)), None)


def summarize(final_dir: Path, baseline: dict) -> tuple[str, bool]:
    report = json.loads((final_dir / "report.json").read_text())
    ev = report["eval"]
    rows = ev["rows"]
    teacher = _row(rows, "teacher->teacher")["metrics"]["ndcg@10"]
    base = _row(baseline["rows"], "student->student")["metrics"]["ndcg@10"]
    lines = [f"Held-out split: {ev['num_queries']} queries, {ev['num_documents']} documents. nDCG@10:", "",
             "| setting | dim | nDCG@10 | MRR@10 | R@10 | retention (nDCG@10) |", "|---|---:|---:|---:|---:|---:|"]

    def add(label: str, r: dict) -> None:
        m = r["metrics"]
        lines.append(f"| {label} | {r['dim']} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@10']:.4f} | "
                     f"{m['ndcg@10'] / teacher:.1%} |")

    add("teacher->teacher (reference)", _row(rows, "teacher->teacher"))
    add("untrained student->student", _row(baseline["rows"], "student->student"))
    ok = True
    for r in rows:
        if r["setting"] == "student->student":
            add(f"distilled student->student", r)
    full = max(r["dim"] for r in rows if r["setting"] == "student->student")
    distilled = _row(rows, "student->student", full)["metrics"]["ndcg@10"]
    checks = [f"distilled student->student {distilled:.4f} vs untrained {base:.4f}: "
              f"{'beats it' if distilled > base else 'DOES NOT beat it'}"]
    ok &= distilled > base
    drop = _row(rows, "student->teacher")
    if drop is not None:
        add("distilled student queries -> teacher documents (drop-in)", drop)
        ratio = drop["metrics"]["ndcg@10"] / teacher
        checks.append(f"drop-in nDCG@10 = {ratio:.1%} of teacher->teacher (bar {DROP_IN_BAR:.0%}): "
                      f"{'met' if ratio >= DROP_IN_BAR else 'MISSED'}")
        ok &= ratio >= DROP_IN_BAR
    if ev.get("mean_cosine"):
        checks.append(f"mean cosine(student, teacher) on held-out texts: {ev['mean_cosine']['all']:.4f}")
    return "\n".join(lines + [""] + [f"- {c}" for c in checks]), ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--baseline", required=True, help="eval.json of the untrained student (python -m distill.evaluate)")
    args = p.parse_args()
    cfg = load_config(args.config)
    final = cfg.artifact_dir if cfg.training.save_to_artifacts else cfg.run_dir / "final"
    text, ok = summarize(final, json.loads(Path(args.baseline).read_text()))
    (final / "demo_summary.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nmodel:  {final}\nreport: {final / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
