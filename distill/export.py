"""Write the trained student as a standard sentence-transformers folder that ``SentenceTransformer(path)`` loads,
with its model card (README.md), and upload it to the Hugging Face Hub."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from distill.atomic import fresh_tmp_dir, replace_dir

if TYPE_CHECKING:
    from distill.config import Config

log = logging.getLogger(__name__)


def build_export_model(student, head: nn.Sequential | None):
    """The student's modules, then (projection mode: unit ``teacher_dim`` vectors) the head's Dense and a Normalize.
    The modules are shared, not copied, so the model is built on the student's device: moving it would move the
    training model's weights too (on a GPU, out from under the optimizer)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    modules = list(student)
    if head is not None:
        modules += list(head) + [Normalize()]
    device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
    model = SentenceTransformer(modules=modules, device=str(device))
    model.prompts = dict(getattr(student, "prompts", {}) or {})
    model.default_prompt_name = getattr(student, "default_prompt_name", None)
    return model


def save_model_atomic(model, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """``model.save`` into a temp sibling folder, then rename over ``out_dir`` (never a half-written model)."""
    out_dir = Path(out_dir)
    tmp = fresh_tmp_dir(out_dir)
    model.save(str(tmp), safe_serialization=True, create_model_card="README.md" not in (extra_files or {}))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    return replace_dir(tmp, out_dir)


def copy_tree_atomic(src: Path, dst: Path) -> Path:
    """Copy a finished folder (model + report) to ``dst`` through a temp sibling and a rename."""
    dst = Path(dst)
    tmp = fresh_tmp_dir(dst)
    tmp.rmdir()
    shutil.copytree(src, tmp)
    return replace_dir(tmp, dst)


def hub_id(name: str) -> str | None:
    """``name`` when it reads as a Hub id (``org/name``; not a local path or data file), else None."""
    local = name.startswith((".", "/", "~")) or name.endswith((".jsonl", ".json", ".csv", ".parquet"))
    return name if re.fullmatch(r"[\w-]+/[\w.-]+", name) and not local and not Path(name).exists() else None


def phase_loss(cfg: Config, phase: int) -> tuple[str, dict[str, Any]]:
    """The loss class ``phase`` trains with (as ``Trainer._loss`` builds it) and the config keys that set it."""
    m, p = cfg.model, cfg.phase(phase)
    if phase == 1:
        name = "EmbeddingMSECosineLoss" if m.use_projection else "MatryoshkaSimilarityLoss"
        keys = ["mse_weight", "cosine_weight"] + (["similarity_weight"] if m.use_projection else [])
    else:
        name = "RetrievalDistillLoss"
        keys = ["infonce_weight", "mse_weight", "temperature", "num_negatives", "gather_across_ranks"]
        keys += ["infonce_documents"] if m.use_projection else []
    params = {f"phase{phase}.{k}": getattr(p, k) for k in keys}
    if not m.use_projection:
        params.update({"model.matryoshka_dims": m.matryoshka_dims, "model.matryoshka_weights": m.matryoshka_weights})
    return f"distill.losses.{name}", params


def _train_datasets(cfg: Config, data: Mapping[int, Any]) -> list[dict[str, Any]]:
    """sentence-transformers' ``train_datasets`` entries: one per source and phase, with rows kept and the loss."""
    out = []
    for p, d in data.items():
        loss, params = phase_loss(cfg, p)
        loss_info = {"fullname": loss, "config_code": "```json\n" + json.dumps(params, indent=4) + "\n```"}
        for src, report in zip(getattr(cfg.data, f"phase{p}"), d.reports):
            columns = [*src.query_columns, *src.document_columns] if p == 1 else \
                [c for c in (src.query_column, src.positive_column, *(src.negative_columns or [])) if c]
            entry = {"name": f"{report.name} (phase {p})", "size": report.kept, "loss": loss_info,
                     "columns": columns or ["detected from the data"]}
            if dataset_id := src.path if src.format == "hub" else hub_id(src.path):
                entry["id"] = dataset_id
            out.append(entry)
    return out


def _card_sections(cfg: Config, data: Mapping[int, Any], evals: Mapping[str, Mapping[str, Any]], where: str) -> str:
    """Markdown: the Distillation section (student, teacher, mode, data and loss per phase, how to load) and the
    held-out evaluation tables."""
    from distill.report import format_eval_table

    m = cfg.model
    rev = f" at revision `{m.student_revision}`" if m.student_revision else ""
    lines = ["## Distillation", "", f"- **Student (base model):** `{m.student}`{rev} ({m.student_dim}-d)",
             f"- **Teacher:** `{m.teacher}` ({m.teacher_dim}-d)"]
    dims = ", ".join(map(str, m.matryoshka_dims))
    if m.use_projection:
        lines.append(f"- **Mode:** projection: the student's {m.student_dim}-d embedding goes through a head "
                     f"{m.student_dim}->{m.projection_hidden_dim}->{m.teacher_dim} (GELU) and is normalised: the "
                     f"output is {m.teacher_dim}-d (`model.teacher_dim`) in the teacher's embedding space, so queries "
                     "embedded by this model can search an index built by the teacher.")
    else:
        lines.append(f"- **Mode:** Matryoshka (MRL), no head: {m.student_dim}-d embeddings whose first D dims, for D "
                     f"in {dims}, are each trained as an embedding of their own; load a smaller one with "
                     "`SentenceTransformer(path, truncate_dim=D)`."
                     + (" A linear map after the pooling (Dense, no bias) started as the rotation onto the principal "
                        "axes of the student's embeddings of the phase-1 texts (`model.matryoshka_init: pca`), so the "
                        "first dims started as those with the most variance." if m.matryoshka_init == "pca" else ""))
    if 1 not in data:
        lines.append("- **Phase 1**: the weights of an earlier phase-1 run (`training.phase1_from`)")
    for p, d in data.items():
        loss, params = phase_loss(cfg, p)
        what = "embedding distillation" if p == 1 else \
            f"retrieval distillation: query, positive, {cfg.phase2.num_negatives} hard negatives"
        weights = ", ".join(f"`{k}` {json.dumps(v)}" for k, v in params.items())
        sources = ", ".join(f"{r.name} ({r.kept:,} rows)" for r in d.reports)
        lines.append(f"- **Phase {p}** ({what}): {len(d.examples):,} examples from {sources}; loss "
                     f"`{loss.rsplit('.', 1)[1]}` with {weights}")
    load = [f'model = SentenceTransformer("{where}")',
            f'q = model.encode_query(["how do I reset my password"])  # {m.teacher_dim}-d, the teacher\'s space',
            "# search the teacher's document index with q (cosine)"] if m.use_projection else \
        [f'model = SentenceTransformer("{where}", truncate_dim={m.matryoshka_dims[-1]})  # any of {dims}',
         'q = model.encode_query(["how do I reset my password"])  # ' + f"{m.matryoshka_dims[-1]}-d"]
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer", "", *load, "```", "",
              "## Evaluation", ""]
    if not evals:
        return "\n".join(lines + ["No held-out evaluation in this run (`eval.data` is not set).", ""])
    last = list(evals.values())[-1]
    lines += [(f"Held-out retrieval on `{cfg.eval.data}` (split `{cfg.eval.split}`): {last.get('num_queries', '?')} "
               f"queries, {last.get('num_documents', '?')} documents"
               + ("; drop-in = this model's queries against the teacher's documents." if m.use_projection else ".")), ""]
    for phase, results in evals.items():
        lines += [f"### After {phase.replace('phase', 'phase ')}", "", format_eval_table(results), ""]
    return "\n".join(lines)


def model_card(model, cfg: Config, data: Mapping[int, Any], metrics_jsonl: Path | None = None) -> str:
    """README.md of the export: sentence-transformers' card rendered from ``model.model_card_data`` (front matter with
    base_model when the student is a Hub id, tags, library_name, pipeline_tag; each source with its rows kept and loss;
    every phase hyper-parameter), with the Distillation and Evaluation sections before its Usage section.

    ``data``: each trained phase's prepared data (``examples``, per-source ``reports``); the tables are each phase's
    last eval record in ``metrics_jsonl``. Nothing is looked up on the Hub."""
    from sentence_transformers.base.model_card import generate_model_card

    from distill.report import read_metrics

    m, t = cfg.model, cfg.training
    card = model.model_card_data
    card.local_files_only, card.model_name, card.task_name = True, cfg.model_name, "semantic search and retrieval"
    card.base_model = hub_id(m.student)
    card.base_model_revision = m.student_revision if card.base_model else None
    card.model_id = t.hub_model_id if t.push_to_hub else str(cfg.artifact_dir if t.save_to_artifacts else
                                                                cfg.run_dir / "final")
    card.add_tags(["distillation"] + ([] if m.use_projection else ["matryoshka"]))
    card.train_datasets = _train_datasets(cfg, data)
    card.datasets = sorted({d["id"] for d in card.train_datasets if "id" in d})
    card.all_hyperparameters = {f"phase{p}.{k}": v for p in data for k, v in dataclasses.asdict(cfg.phase(p)).items()}
    defaults = {f"phase{p}.{k}": v for p in data for k, v in dataclasses.asdict(type(cfg.phase(p))()).items()}
    card.non_default_hyperparameters = {k: v for k, v in card.all_hyperparameters.items() if v != defaults[k]}
    records = read_metrics(metrics_jsonl) if metrics_jsonl is not None else []
    evals = {r["phase"]: r["results"] for r in records if r.get("event") == "eval"}
    ours = _card_sections(cfg, data, evals, card.model_id)
    try:
        text = generate_model_card(model)
    except Exception as e:  # noqa: BLE001 - sentence-transformers' template is not ours: the run must not fail
        log.warning("sentence-transformers could not render the model card (%s); writing a plain one", type(e).__name__)
        front = {k: getattr(card, k) for k in ("base_model", "library_name", "pipeline_tag", "tags")}
        text = f"---\n{yaml.safe_dump({k: v for k, v in front.items() if v}, sort_keys=False)}---\n\n# {cfg.model_name}\n"
    head, usage, tail = text.partition("\n## Usage\n")
    return f"{head}\n{ours}{usage}{tail}" if usage else f"{text}\n{ours}"


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str | None:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created ``private`` when missing; the token is
    huggingface_hub's own: ``HF_TOKEN`` or the saved login). Returns the repo URL; a failure logs one error line that
    names the local copy and returns None (nothing is lost)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload {Path(folder).name} (distill)")
    except Exception as e:  # noqa: BLE001 - network, auth, quota: all reported the same way
        log.error("push to the Hub (%s) failed (%s: %s); the model is saved locally at %s (retry: hf upload %s %s)",
                  repo_id, type(e).__name__, " ".join(str(e).split())[:300], folder, repo_id, folder)
        return None
    log.info("pushed the model to %s", url)
    return str(url)
