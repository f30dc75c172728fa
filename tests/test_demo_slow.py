"""The CPU demo (configs/cpu_demo_mrl.yaml) at reduced size, end to end with the real pretrained models (marked slow).

Needs ./models from scripts/fetch_demo_models.py (scripts/test.sh and CI fetch them). The distilled student must load
as a sentence-transformers model, output its nested dims, and beat the untrained student on held-out queries.
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
    built = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo_data.py"), "--out", str(data),
                            "--general", "0"],
                           cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]

    baseline_dir = tmp_path / "baseline"
    base = subprocess.run([sys.executable, "-m", "distill.evaluate", "--model", str(STUDENT), "--data",
                           str(data / "test"), "--out", str(baseline_dir)], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert base.returncode == 0, base.stderr[-2000:]
    untrained = json.loads((baseline_dir / "eval.json").read_text())
    untrained_ndcg = next(r for r in untrained["rows"] if r["setting"] == "student->student")["metrics"]["ndcg@10"]

    # MRL mode at reduced size (300 phase-1 rows, no extra package texts, 400 phase-2 examples) to fit CI's time. The
    # student keeps its own space, so phase 2's in-domain InfoNCE lifts it above the untrained model.
    overrides = [
        f"model.teacher={TEACHER}", f"model.student={STUDENT}", "phase1.max_samples_per_dataset=300",
        "phase2.max_samples=400",
        f"data.phase1=[{{path: {data / 'phase1.jsonl'}, query_columns: [query], document_columns: [positive]}}]",
        f"data.phase2=[{{path: {data / 'phase2.jsonl'}}}]", f"eval.data={data / 'test'}",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.artifacts_dir={tmp_path / 'artifacts'}",
    ]
    args = ["--config", str(REPO_ROOT / "configs" / "cpu_demo_mrl.yaml")]
    for o in overrides:
        args += ["--set", o]
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=args, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]

    from sentence_transformers import SentenceTransformer

    artifact = tmp_path / "artifacts" / "distilled-minilm-384d-cpu_demo_mrl"
    model = SentenceTransformer(str(artifact), device="cpu")
    assert model.encode(["copy a file to a directory"]).shape == (1, 384)
    small = SentenceTransformer(str(artifact), device="cpu", truncate_dim=64)
    assert small.encode(["copy a file to a directory"]).shape == (1, 64)
    report = json.loads((artifact / "report.json").read_text())
    ndcg = {(r["setting"], r["dim"]): r["metrics"]["ndcg@10"] for r in report["eval"]["rows"]}
    assert {d for s, d in ndcg if s == "student->student"} == {384, 256, 128, 64}
    assert ndcg[("student->student", 384)] > untrained_ndcg, (ndcg, untrained_ndcg)
    assert ndcg[("student->student", 64)] > 0.5 * ndcg[("teacher->teacher", 768)]
