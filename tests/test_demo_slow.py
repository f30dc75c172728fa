"""The CPU demo (configs/cpu_demo.yaml), end to end with the real pretrained models (marked slow).

Needs ./models from scripts/fetch_demo_models.py (scripts/test.sh and CI fetch them). The distilled student must load
as a sentence-transformers model, output the teacher's dimension, and beat the untrained student on held-out queries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_models import REPO_ROOT, run_torchrun

MODELS = REPO_ROOT / "models"
TEACHER, STUDENT = MODELS / "all-mpnet-base-v2", MODELS / "all-MiniLM-L6-v2"
have_models = (TEACHER / ".complete").is_file() and (STUDENT / ".complete").is_file()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_models, reason="demo models not fetched: run python scripts/fetch_demo_models.py"),
]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_reduced_cpu_demo_beats_the_untrained_student(tmp_path):
    data = tmp_path / "demo_data"
    # The full held-out split (400 queries): on small subsets the untrained student can even beat the teacher.
    built = subprocess.run([sys.executable, "-m", "distill.demo_data", "--out", str(data), "--general", "3000"],
                           cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]

    baseline_dir = tmp_path / "baseline"
    base = subprocess.run([sys.executable, "-m", "distill.evaluate", "--model", str(STUDENT), "--data",
                           str(data / "test"), "--out", str(baseline_dir)], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert base.returncode == 0, base.stderr[-2000:]
    untrained = json.loads((baseline_dir / "eval.json").read_text())
    untrained_ndcg = next(r for r in untrained["rows"] if r["setting"] == "student->student")["metrics"]["ndcg@10"]

    # configs/cpu_demo.yaml as the README's demo runs it, only with this test's paths. (Smaller runs, e.g. max_length
    # 64 or 480 phase-2 examples, end at 0.659-0.661 against the untrained 0.662: the margin needs the whole recipe.)
    overrides = [
        f"model.teacher={TEACHER}", f"model.student={STUDENT}",
        f"data.phase1=[{{path: {data / 'phase1.jsonl'}, query_columns: [query], document_columns: [positive]}}, "
        f"{{path: {data / 'phase1_general.jsonl'}, query_columns: [query], document_columns: [positive]}}]",
        f"data.phase2=[{{path: {data / 'phase2.jsonl'}}}]", f"eval.data={data / 'test'}",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.artifacts_dir={tmp_path / 'artifacts'}",
    ]
    args = ["--config", str(REPO_ROOT / "configs" / "cpu_demo.yaml")]
    for o in overrides:
        args += ["--set", o]
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=args, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]

    from sentence_transformers import SentenceTransformer

    artifact = tmp_path / "artifacts" / "distilled-minilm-768d-cpu_demo"
    model = SentenceTransformer(str(artifact), device="cpu")
    assert model.encode(["copy a file to a directory"]).shape == (1, 768)
    report = json.loads((artifact / "report.json").read_text())
    rows = {r["setting"]: r["metrics"] for r in report["eval"]["rows"]}
    assert rows["student->student"]["ndcg@10"] > untrained_ndcg, (rows, untrained_ndcg)
    assert rows["student->teacher"]["ndcg@10"] > 0.5 * rows["teacher->teacher"]["ndcg@10"]
