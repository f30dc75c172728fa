"""The exported model card (README.md) and the push to the Hub (a fake HfApi: no network), plus their config checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from distill.config import load_config
from distill.data import SourceReport
from distill.errors import ConfigError
from distill.export import build_export_model, model_card, push_to_hub, save_model_atomic
from distill.models import build_projection_head


def front_matter(card: str) -> dict:
    """The YAML between the card's leading ``---`` lines (what the Hub reads)."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def eval_record(phase: str, ndcg: float) -> dict:
    metrics = {"ndcg@10": ndcg, "mrr@10": ndcg, "recall@10": ndcg, "recall@100": 1.0}
    rows = [{"setting": s, "dim": 48, "metrics": metrics, "retention": {"ndcg@10": ndcg / 0.5}}
            for s in ("teacher->teacher", "student->student", "student->teacher")]
    return {"event": "eval", "phase": phase, "step": 3, "results": {"rows": rows, "num_queries": 24,
                                                                     "num_documents": 24, "mode": "projection"}}


@pytest.fixture(scope="module")
def export_model(tiny_student_dir):
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(tiny_student_dir), device="cpu")
    return build_export_model(student, build_projection_head(32, 64, 48, seed=0))


def test_card_of_a_hub_student_has_base_model_sources_losses_and_eval_tables(export_model, tmp_path):
    cfg = load_config(None, ["model.teacher_dim=48", "model.student_dim=32", "model.projection_hidden_dim=64"])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(eval_record(p, v)) + "\n" for p, v in
                               (("phase1", 0.1111), ("phase2", 0.3333), ("phase2", 0.4444))))
    reports = [SourceReport(r, kept=k) for r, k in (("msmarco", 1200), ("natural-questions", 800), ("hotpotqa", 7))]
    data = {1: SimpleNamespace(examples=np.zeros((3000, 2)), reports=reports),
            2: SimpleNamespace(examples=np.zeros((500, 10)), reports=[SourceReport("msmarco-hard-negatives", kept=500)])}
    card = model_card(export_model, cfg, data, metrics)
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-mpnet-base-v2"
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "distillation" in meta["tags"] and "matryoshka" not in meta["tags"]
    assert "sentence-transformers/hotpotqa" in meta["datasets"]
    assert "- **Teacher:** `infly/inf-retriever-v1-pro` (48-d)" in card
    assert "queries embedded by this model can search an index built by the teacher" in card
    assert "- **Phase 1** (embedding distillation): 3,000 examples from msmarco (1,200 rows)" in card
    assert "`phase1.mse_weight` 0.4, `phase1.cosine_weight` 0.6" in card
    assert "`phase2.infonce_weight` 0.8, `phase2.mse_weight` 0.2, `phase2.temperature` 0.02" in card
    assert "* Size: 7 training samples" in card  # sentence-transformers' dataset section, per source
    assert "- `phase2.learning_rate`: 5e-06" in card  # every phase hyper-parameter
    # each phase's last eval, before the Usage section
    assert card.index("### After phase 1") < card.index("### After phase 2") < card.index("## Usage")
    after2 = card[card.index("### After phase 2"):]
    assert "| student->teacher (drop-in) | 48 | 0.4444 |" in after2 and "0.3333" not in after2
    assert "0.1111" in card[card.index("### After phase 1"):card.index("### After phase 2")]


def test_push_uploads_the_final_folder_privately(export_model, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.update(repo_id=repo_id, private=private, exist_ok=exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    final = save_model_atomic(export_model, tmp_path / "final", extra_files={"README.md": "---\ntags: [x]\n---\n"})
    with caplog.at_level(logging.INFO, logger="distill.export"):
        url = push_to_hub(final, "me/tiny-distilled")
    assert url == "https://huggingface.co/me/tiny-distilled"
    assert calls["repo_id"] == "me/tiny-distilled" and calls["private"] is True and calls["exist_ok"] is True
    assert {"README.md", "model.safetensors", "modules.json"} <= set(calls["files"])
    assert (final / "README.md").read_text() == "---\ntags: [x]\n---\n"  # our card, not sentence-transformers' default
    assert "pushed the model to https://huggingface.co/me/tiny-distilled" in caplog.text


def test_push_failure_is_one_line_naming_the_local_copy(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    class DeniedApi:
        def create_repo(self, *args, **kwargs):
            raise PermissionError("401 Unauthorized\nInvalid credentials")

    monkeypatch.setattr(huggingface_hub, "HfApi", DeniedApi)
    assert push_to_hub(tmp_path, "me/x", private=False) is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"saved locally at {tmp_path}" in errors[0] and "401 Unauthorized Invalid credentials" in errors[0]


def test_push_config_checks(monkeypatch):
    with pytest.raises(ConfigError, match=r"^training.hub_model_id: push_to_hub needs a Hub repo id"):
        load_config(None, ["training.push_to_hub=true"])
    with pytest.raises(ConfigError, match=r"^training.push_to_hub: HF_HUB_OFFLINE is set"):
        load_config(None, ["training.push_to_hub=true", "training.hub_model_id=me/model"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cfg = load_config(None, ["training.push_to_hub=true", "training.hub_model_id=me/model"])
    assert cfg.training.hub_private is True
    with pytest.raises(ConfigError, match="training.hub_model_id"):
        load_config(None, ["training.push_to_hub=true", "training.hub_model_id=me/bad name"])


def test_export_model_shares_the_training_weights_and_leaves_them_where_they_are(tiny_student_dir):
    """The export model is built from the training model's own modules: building it must not move them (before the
    fix it moved them to the CPU, and on a GPU the next training step failed with 'tensors on cuda:0 and cpu').
    The meta device stands in for a GPU here: any move off it raises."""
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(tiny_student_dir), device="cpu")
    head = build_projection_head(32, 64, 48, seed=0)
    student.to("meta"), head.to("meta")
    model = build_export_model(student, head)
    assert {p.device.type for p in student.parameters()} == {"meta"}
    assert {p.device.type for p in head.parameters()} == {"meta"}
    assert model[0] is student[0] and model.device.type == "meta"
