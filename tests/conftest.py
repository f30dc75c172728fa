"""Shared pytest fixtures: offline environment, tiny teacher/student models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# huggingface_hub and datasets read these once, when first imported (here, or while collecting a test module): set
# after that, by a fixture, they change nothing, and a Hub id then costs minutes of HTTP retries with backoff.
os.environ.update(dict.fromkeys(_OFFLINE_VARS, "1"))

_TESTS_DIR = Path(__file__).resolve().parent
for _p in (str(_TESTS_DIR), str(_TESTS_DIR.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tiny_models import build_tiny_student, build_tiny_teacher  # noqa: E402  (after the offline variables)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face Hub (this machine has no internet anyway)."""
    for name in _OFFLINE_VARS:
        monkeypatch.setenv(name, "1")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentence-transformers folder: Qwen2 48-d, lasttoken pooling, Normalize, inf-retriever query prompt."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _OFFLINE_VARS:
            mp.setenv(name, "1")
        return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher") / "model")


@pytest.fixture(scope="session")
def tiny_teacher_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain transformers folder (config.json, model.safetensors, tokenizer) of the same tiny Qwen2 teacher."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _OFFLINE_VARS:
            mp.setenv(name, "1")
        return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher_hf") / "model", with_st_config=False)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentence-transformers folder: MPNet 32-d, mean pooling, Normalize, own lowercase WordPiece tokenizer."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _OFFLINE_VARS:
            mp.setenv(name, "1")
        return build_tiny_student(tmp_path_factory.mktemp("tiny_student") / "model")
