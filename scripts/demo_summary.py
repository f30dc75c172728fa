#!/usr/bin/env python
"""Print (and save as demo_summary.md beside the model) the CPU demo's quality table and its two bars.

Bars (held-out split): projection mode — student queries against teacher documents reach nDCG@10 >= 0.95 x
teacher->teacher; both modes — the distilled student->student beats the untrained student. MRL mode lists each
nested dim with its retention. With ``--ood``/``--ood-baseline`` the same table follows for the out-of-domain split
(news articles, scripts/demo_data.py ``--ood-out``), reported without bars.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.config import load_config

DROP_IN_BAR = 0.95


def _row(rows: list[dict], setting: str, dim: int | None = None) -> dict | None:
    return next((r for r in rows if r["setting"] == setting and (dim is None or r["dim"] == dim)), None)


def split_table(title: str, ev: dict, baseline: dict, drop_in_bar: float | None) -> tuple[list[str], list[str], bool]:
    """Markdown table of one evaluated split (teacher->teacher, untrained and distilled student->student per dim,
    drop-in in projection mode), its checks and whether the bars hold (``drop_in_bar`` None: no drop-in bar)."""
    rows = ev["rows"]
    teacher = _row(rows, "teacher->teacher")["metrics"]["ndcg@10"]
    base = _row(baseline["rows"], "student->student")["metrics"]["ndcg@10"]
    lines = [f"{title}: {ev['num_queries']} queries, {ev['num_documents']} documents. nDCG@10:", "",
             "| setting | dim | nDCG@10 | MRR@10 | R@10 | retention (nDCG@10) |", "|---|---:|---:|---:|---:|---:|"]

    def add(label: str, r: dict) -> None:
        m = r["metrics"]
        lines.append(f"| {label} | {r['dim']} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@10']:.4f} | "
                     f"{m['ndcg@10'] / teacher:.1%} |")

    add("teacher->teacher (reference)", _row(rows, "teacher->teacher"))
    add("untrained student->student", _row(baseline["rows"], "student->student"))
    for r in rows:
        if r["setting"] == "student->student":
            add("distilled student->student", r)
    full = max(r["dim"] for r in rows if r["setting"] == "student->student")
    distilled = _row(rows, "student->student", full)["metrics"]["ndcg@10"]
    verdict = "beats it" if distilled > base else "DOES NOT beat it"
    checks = [f"distilled student->student {distilled:.4f} vs untrained {base:.4f}: {verdict}"]
    ok = distilled > base
    drop = _row(rows, "student->teacher")
    if drop is not None:
        add("distilled student queries -> teacher documents (drop-in)", drop)
        ratio = drop["metrics"]["ndcg@10"] / teacher
        if drop_in_bar is None:
            checks.append(f"drop-in nDCG@10 = {ratio:.1%} of teacher->teacher")
        else:
            checks.append(f"drop-in nDCG@10 = {ratio:.1%} of teacher->teacher (bar {drop_in_bar:.0%}): "
                          f"{'met' if ratio >= drop_in_bar else 'MISSED'}")
            ok &= ratio >= drop_in_bar
    if ev.get("mean_cosine"):
        checks.append(f"mean cosine(student, teacher) on these texts: {ev['mean_cosine']['all']:.4f}")
    return lines, checks, ok


def summarize(final_dir: Path, baseline: dict, ood: dict | None = None,
              ood_baseline: dict | None = None) -> tuple[str, bool]:
    """The in-domain table with its bars and, given both out-of-domain evals, the out-of-domain table (no bars)."""
    report = json.loads((final_dir / "report.json").read_text())
    lines, checks, ok = split_table("Held-out split (docstrings)", report["eval"], baseline, DROP_IN_BAR)
    text = "\n".join(lines + [""] + [f"- {c}" for c in checks])
    if ood is not None and ood_baseline is not None:
        lines, checks, _ = split_table("Out-of-domain split (news: lead sentence -> rest of the article)", ood,
                                       ood_baseline, None)
        text += "\n\n" + "\n".join(lines + [""] + [f"- {c}" for c in checks])
    return text, ok


def final_dir_of(cfg) -> Path:
    return cfg.artifact_dir if cfg.training.save_to_artifacts else cfg.run_dir / "final"


def eval_args(cfg) -> str:
    """``--model <final model> [--dims ...]``: how the demo evaluates the final model on another BEIR split, with
    the dims the trainer's own evaluation uses."""
    m = cfg.model
    dims = cfg.eval.dims or (None if m.use_projection else m.matryoshka_dims)
    return f"--model {final_dir_of(cfg)}" + (f" --dims {','.join(str(d) for d in dims)}" if dims else "")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--baseline", help="eval.json of the untrained student (python -m distill evaluate)")
    p.add_argument("--ood", help="eval.json of the final model on the out-of-domain split")
    p.add_argument("--ood-baseline", help="eval.json of the untrained student on the out-of-domain split")
    p.add_argument("--eval-args", action="store_true",
                   help="print the --model/--dims arguments that evaluate the final model, and exit")
    args = p.parse_args()
    cfg = load_config(args.config)
    if args.eval_args:
        print(eval_args(cfg))
        return 0
    if not args.baseline:
        p.error("--baseline is required")
    final = final_dir_of(cfg)
    ood, ood_base = (json.loads(Path(f).read_text()) if f else None for f in (args.ood, args.ood_baseline))
    text, _ = summarize(final, json.loads(Path(args.baseline).read_text()), ood, ood_base)
    (final / "demo_summary.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nmodel:  {final}\nreport: {final / 'report.md'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
