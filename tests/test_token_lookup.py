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


def _table_sized_fills(vocab_shape: list[int], run) -> int:
    """Zero-filled [vocab, hidden] buffers in ``run()`` (forward + backward): dense embedding gradients."""
    with profile(record_shapes=True) as prof:
        run()
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
               if e.key in ("aten::fill_", "aten::zero_") and e.input_shapes and e.input_shapes[0] == vocab_shape)


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
        """The embedding backward's dense grads in one forward + backward."""
        model.zero_grad()
        return _table_sized_fills(vocab_shape, lambda: run().sum().backward())

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


@pytest.mark.parametrize("kind", ["mpnet", "bert"])
def test_sparse_table_grad_adds_rows_into_the_kept_dense_grad(tmp_path, kind: str) -> None:
    """With ``sparse_table_grad`` the lookup's backward adds the looked-up rows into the table's existing dense
    ``.grad`` in place (no new [vocab, hidden] buffer), for one chunk and for several, and every gradient equals the
    dense lookup's; without a dense ``.grad`` autograd would store the sparse tensor (why the trainer keeps one)."""
    from sentence_transformers import SentenceTransformer

    path = build_tiny_student(tmp_path / kind, kind=kind)
    grads = {}
    for sparse in (False, True):
        student = SentenceTransformer(str(path), device="cpu")
        student.eval()
        model = DistillModel(student, build_projection_head(32, 64, 48, seed=0), sparse_table_grad=sparse)
        table = model.token_table()
        assert table is _token_embedding_table(student)
        kept = torch.zeros_like(table.weight)
        if sparse:
            table.weight.grad = kept
        one, several = _chunks(student, TEXTS[:3], chunk_size=3), _chunks(student, TEXTS, chunk_size=2)
        assert len(one.chunks) == 1 and len(several.chunks) == 3

        def step(enc=one, m=model) -> None:
            m(enc.chunks).pow(2).sum().backward()

        fills = _table_sized_fills(list(table.weight.shape), step)
        fills += _table_sized_fills(list(table.weight.shape), lambda m=model, enc=several: step(enc, m))
        assert fills == (0 if sparse else 2)
        if sparse:
            assert table.weight.grad is kept and not kept.is_sparse  # accumulated in place, both backwards
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], atol=1e-5, rtol=1e-4, msg=name)
    assert grads[True][next(n for n, p in model.named_parameters() if p is table.weight)].abs().sum() > 0

    model.zero_grad(set_to_none=True)
    step()
    assert model.token_table().weight.grad.is_sparse


def test_the_trainer_keeps_one_dense_table_grad_and_trains_as_with_dense_lookups(
        tmp_path, tiny_teacher_dir, tiny_student_dir) -> None:
    """A single-process phase-1 run with ``training.sparse_embedding_grad`` on and off: the same losses and weights
    (up to summation order), so the trainer gives the table a dense ``.grad`` before each full step."""
    from safetensors.torch import load_file
    from test_train_e2e import train_each_setting, train_records
    from tiny_data import write_training_files

    files = write_training_files(tmp_path / "data", n=48)
    runs = train_each_setting(tmp_path, tiny_teacher_dir, tiny_student_dir, files, "training.sparse_embedding_grad",
                              ["true", "false"], "--set", "training.skip_phase2=true", "--set", "eval.data=null",
                              "--set", "phase1.head_only_fraction=0.25")
    weights = {k: load_file(str(run / "phase1" / "model.safetensors")) for k, run in runs.items()}
    losses = {k: [r["loss"] for r in train_records(run, "phase1")] for k, run in runs.items()}
    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(str(tiny_student_dir), device="cpu").state_dict()
    table = next(k for k in base if k.endswith("word_embeddings.weight"))
    assert not torch.equal(weights["true"][f"student.{table}"], base[table])  # the table did learn
    assert len(losses["true"]) >= 2
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), atol=1e-4, rtol=1e-4)
    for name, w in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], w, atol=1e-4, rtol=1e-3, msg=name)
