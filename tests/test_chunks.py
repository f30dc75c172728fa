"""How a batch's texts are cut into padded chunks for the student's forwards: sorted by length, ``chunk_size`` rows
per chunk, each padded to its own longest text, and the input order restorable."""

from __future__ import annotations

import torch

from distill.trainer import pad_chunks


def test_pad_chunks_pads_each_chunk_and_restores_the_input_order() -> None:
    seqs = [[7] * n for n in (30, 3, 31, 4, 60, 5)]
    for i, s in enumerate(seqs):
        s[0] = 100 + i  # a marker of the input position
    enc = pad_chunks(seqs, pad_id=0, chunk_size=2, device=torch.device("cpu"))
    assert [tuple(c["input_ids"].shape) for c in enc.chunks] == [(2, 4), (2, 30), (2, 60)]  # {3,4} {5,30} {31,60}
    assert enc.real_tokens == sum(map(len, seqs)) and enc.padded_tokens == 2 * 4 + 2 * 30 + 2 * 60
    for c in enc.chunks:
        assert torch.equal(c["attention_mask"].sum(1), (c["input_ids"] != 0).sum(1))
    firsts = torch.cat([c["input_ids"][:, 0] for c in enc.chunks])[enc.restore]
    assert firsts.tolist() == [100 + i for i in range(len(seqs))]


def test_one_chunk_when_chunk_size_covers_the_batch() -> None:
    seqs = [[1, 2, 3], [4], [5, 6]]
    enc = pad_chunks(seqs, pad_id=0, chunk_size=len(seqs), device=torch.device("cpu"))
    assert len(enc.chunks) == 1
    ids = enc.chunks[0]["input_ids"][enc.restore]
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert (enc.real_tokens, enc.padded_tokens) == (6, 9)
