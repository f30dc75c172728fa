"""The tiny stand-in models load like the real ones and have the properties other tests rely on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from tiny_models import (
    TEACHER_EOS,
    TEACHER_QUERY_PROMPT,
    build_tiny_student,
    build_tiny_teacher,
    free_port,
    run_torchrun,
)
from transformers import AutoModel, AutoTokenizer

TEXTS = ["How do I parse JSON in Python?", "Return a shallow copy of the list.", "x"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def student(tiny_student_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_student_dir), device="cpu")


def test_teacher_encodes_unit_vectors_of_dim_48(teacher: SentenceTransformer) -> None:
    emb = teacher.encode(TEXTS, convert_to_numpy=True)
    assert emb.shape == (3, 48)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert teacher.get_embedding_dimension() == 48


def test_student_encodes_unit_vectors_of_dim_32(student: SentenceTransformer) -> None:
    emb = student.encode(TEXTS, convert_to_numpy=True)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert student.get_embedding_dimension() == 32


def test_modules_and_pooling_modes(tiny_teacher_dir: Path, tiny_student_dir: Path) -> None:
    for folder, mode, arch in ((tiny_teacher_dir, "lasttoken", "Qwen2Model"), (tiny_student_dir, "mean", "MPNetModel")):
        modules = json.loads((folder / "modules.json").read_text())
        assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
        assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == mode
        assert json.loads((folder / "config.json").read_text())["architectures"] == [arch]


def test_teacher_prompts_mirror_inf_retriever(tiny_teacher_dir: Path, teacher: SentenceTransformer) -> None:
    saved = json.loads((tiny_teacher_dir / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": TEACHER_QUERY_PROMPT, "document": ""}
    assert saved["default_prompt_name"] is None
    assert teacher.prompts["query"] == TEACHER_QUERY_PROMPT
    q = teacher.encode_query(["parse json"], convert_to_numpy=True)
    d = teacher.encode_document(["parse json"], convert_to_numpy=True)
    plain = teacher.encode(["parse json"], convert_to_numpy=True)
    np.testing.assert_allclose(d, plain, atol=1e-6)
    assert not np.allclose(q, d, atol=1e-3)


def test_teacher_tokenizer_appends_eos(tiny_teacher_dir: Path, teacher: SentenceTransformer) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    eos_id = tok.convert_tokens_to_ids(TEACHER_EOS)
    assert tok.eos_token == TEACHER_EOS and tok.pad_token == TEACHER_EOS
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[-1] == eos_id
        assert ids.count(eos_id) == 1
    features = teacher.preprocess(TEXTS)
    lengths = features["attention_mask"].sum(dim=1)
    last = features["input_ids"][torch.arange(len(TEXTS)), lengths - 1]
    assert last.tolist() == [eos_id] * len(TEXTS)


def test_teacher_lasttoken_pooling_reads_eos_hidden_state(tiny_teacher_hf_dir: Path, teacher: SentenceTransformer) -> None:
    """ST embedding == L2-normalised last_hidden_state at the eos position, computed by hand (and padding-invariant)."""
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_hf_dir))
    model = AutoModel.from_pretrained(str(tiny_teacher_hf_dir), dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            enc = tok(text, return_tensors="pt")
            assert enc["input_ids"][0, -1].item() == tok.convert_tokens_to_ids(TEACHER_EOS)
            hidden = model(**enc).last_hidden_state[0, -1]
            expected.append(torch.nn.functional.normalize(hidden, dim=0).numpy())
    batched = teacher.encode(TEXTS, batch_size=3, convert_to_numpy=True)  # padded batch
    np.testing.assert_allclose(batched, np.stack(expected), atol=1e-5)


def test_teacher_hf_dir_is_plain_transformers(tiny_teacher_hf_dir: Path, tiny_teacher_dir: Path) -> None:
    names = {p.name for p in tiny_teacher_hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "modules.json" not in names and "config_sentence_transformers.json" not in names
    cfg = json.loads((tiny_teacher_hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] == 48 and cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    # Same weights as the sentence-transformers variant.
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
    assert digest(tiny_teacher_hf_dir) == digest(tiny_teacher_dir)


def test_tokenizers_differ(tiny_teacher_dir: Path, tiny_student_dir: Path) -> None:
    t_tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    s_tok = AutoTokenizer.from_pretrained(str(tiny_student_dir))
    assert t_tok.get_vocab() != s_tok.get_vocab()
    assert 300 <= len(s_tok) <= 400 and 400 <= len(t_tok) <= 500
    text = "Hello World"
    assert t_tok(text)["input_ids"] != s_tok(text)["input_ids"]
    # Student lowercases and wraps in <s> ... </s>; the teacher keeps case.
    assert s_tok(text)["input_ids"] == s_tok(text.lower())["input_ids"]
    assert t_tok(text)["input_ids"] != t_tok(text.lower())["input_ids"]
    s_ids = s_tok(text)["input_ids"]
    assert s_tok.convert_ids_to_tokens([s_ids[0], s_ids[-1]]) == ["<s>", "</s>"]


def test_builds_are_deterministic(tmp_path: Path, tiny_teacher_dir: Path, tiny_student_dir: Path) -> None:
    teacher2 = build_tiny_teacher(tmp_path / "t")
    student2 = build_tiny_student(tmp_path / "s")
    for a, b in ((tiny_teacher_dir, teacher2), (tiny_student_dir, student2)):
        for name in ("model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rebuild_replaces_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "s"
    build_tiny_student(out)
    (out / "stale.txt").write_text("old")
    build_tiny_student(out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left behind


def test_bert_student_and_custom_sizes(tmp_path: Path) -> None:
    path = build_tiny_student(tmp_path / "bert", kind="bert", hidden=16, layers=1)
    model = SentenceTransformer(str(path), device="cpu")
    assert model.encode(["hello"], convert_to_numpy=True).shape == (1, 16)
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
    ids = model.preprocess(["hello"])["input_ids"][0].tolist()
    assert model.tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["[CLS]", "[SEP]"]
    with pytest.raises(ValueError, match="kind must be"):
        build_tiny_student(tmp_path / "bad", kind="roberta")  # type: ignore[arg-type]


def test_teacher_custom_hidden(tmp_path: Path) -> None:
    path = build_tiny_teacher(tmp_path / "t", hidden=32, layers=1)
    assert SentenceTransformer(str(path), device="cpu").encode(["a b"], convert_to_numpy=True).shape == (1, 32)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_run_torchrun_two_ranks(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.tensor([dist.get_rank() + 1.0])\n"
        "dist.all_reduce(t)\n"
        "print(f'rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item():.0f} arg={sys.argv[1]} "
        "env={os.environ[\"MY_FLAG\"]} offline={os.environ[\"HF_HUB_OFFLINE\"]}')\n"
        "dist.destroy_process_group()\n"
    )
    result = run_torchrun(script, nproc=2, args=["hello"], env={"MY_FLAG": "on"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank={rank} world=2 sum=3 arg=hello env=on offline=1" in result.stdout


def test_run_torchrun_reports_failure(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    result = run_torchrun(script, nproc=1, timeout=120)
    assert result.returncode != 0
    assert "boom" in result.stderr
