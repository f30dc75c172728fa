"""Write the trained student as a standard sentence-transformers folder that ``SentenceTransformer(path)`` loads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from distill.atomic import fresh_tmp_dir, replace_dir

log = logging.getLogger(__name__)


def build_export_model(student, head: nn.Sequential | None):
    """The student's modules, then (projection mode: unit ``teacher_dim`` vectors) the head's Dense and a Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    modules = list(student)
    if head is not None:
        modules += list(head) + [Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu")
    model.prompts = dict(getattr(student, "prompts", {}) or {})
    model.default_prompt_name = getattr(student, "default_prompt_name", None)
    return model


def save_model_atomic(model, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """``model.save`` into a temp sibling folder, then rename over ``out_dir`` (never a half-written model)."""
    out_dir = Path(out_dir)
    tmp = fresh_tmp_dir(out_dir)
    model.save(str(tmp), safe_serialization=True)
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
