"""DistillModel's forward over several chunks looks tokens up once (``inputs_embeds``): the same embeddings and the
same gradients as one lookup per chunk, with one dense word-embedding gradient per forward instead of one per chunk."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_student
from torch.profiler import profile

from distill.models import DistillModel, _token_embedding_table, build_projection_head
from distill.trainer import pad_chunks


def _chunks(student, texts: list[str], chunk_size: int):
    ids = [student.tokenizer(t)["input_ids"] for t in texts]
    return pad_chunks(ids, student.tokenizer.pad_token_id, chunk_size, torch.device("cpu"))


TEXTS = ["a short one", "somewhat longer text with several more words in it", "mid length text here",
         "x", "the longest of them all by a clear margin, with many words and some punctuation too!", "two words"]


@pytest.mark.parametrize("kind", ["mpnet", "bert"])
def test_one_lookup_matches_per_chunk_lookups(tmp_path, kind: str) -> None:
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(build_tiny_student(tmp_path / kind, kind=kind)), device="cpu")
    student.eval()  # no dropout: both paths must agree exactly
    torch.manual_seed(0)
    model = DistillModel(student, build_projection_head(32, 64, 48, seed=0))
    table = _token_embedding_table(student)
    assert isinstance(table, torch.nn.Embedding)
    enc = _chunks(student, TEXTS, chunk_size=2)
    assert len(enc.chunks) == 3

    once = model(enc.chunks)
    once.pow(2).sum().backward()
    grads_once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    per_chunk = torch.cat([model.embed(c) for c in enc.chunks])
    per_chunk.pow(2).sum().backward()
    grads_per_chunk = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert once.shape == (len(TEXTS), 48)
    torch.testing.assert_close(once, per_chunk, atol=1e-5, rtol=1e-5)
    assert grads_once.keys() == grads_per_chunk.keys()
    for name, g in grads_once.items():
        torch.testing.assert_close(g, grads_per_chunk[name], atol=1e-5, rtol=1e-4, msg=name)
    assert grads_once[next(n for n, p in model.named_parameters() if p is table.weight)].abs().sum() > 0


def test_one_dense_embedding_gradient_per_forward(tiny_student_dir) -> None:
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(tiny_student_dir), device="cpu")
    model = DistillModel(student, None)
    vocab_shape = list(_token_embedding_table(student).weight.shape)
    enc = _chunks(student, TEXTS, chunk_size=2)

    def table_sized_fills(run) -> int:
        """Zero-filled [vocab, hidden] buffers in one forward + backward: the embedding backward's dense grads."""
        model.zero_grad()
        with profile(record_shapes=True) as prof:
            run().sum().backward()
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key in ("aten::fill_", "aten::zero_") and e.input_shapes and e.input_shapes[0] == vocab_shape)

    assert table_sized_fills(lambda: model(enc.chunks)) == 1
    assert table_sized_fills(lambda: torch.cat([model.embed(c) for c in enc.chunks])) == 3


def test_models_without_a_plain_table_keep_per_chunk_lookups(tiny_student_dir) -> None:
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(tiny_student_dir), device="cpu")

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    old = student[0].model.get_input_embeddings()
    scaled = Scaled(old.num_embeddings, old.embedding_dim)
    student[0].model.set_input_embeddings(scaled)
    assert _token_embedding_table(student) is None
    enc = _chunks(student, TEXTS, chunk_size=2)
    model = DistillModel(student, None)
    assert model._look_up_tokens_once(enc.chunks) is enc.chunks
