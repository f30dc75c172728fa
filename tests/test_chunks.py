"""How a batch's texts are cut into padded chunks for the student's forwards (``distill.batches.pad_chunks``): sorted
by length, ``chunk_size`` rows per chunk, each padded to its own longest text rounded up to a multiple of 8 (never
above the phase's max_length, never below the longest text), the masks marking the real tokens, and the input order
restorable."""

from __future__ import annotations

import torch

from distill.batches import PAD_MULTIPLE, pad_chunks

CPU = torch.device("cpu")


def _marked(lengths: tuple[int, ...]) -> list[list[int]]:
    """Sequences of token 7 whose first token marks the input position (100 + i); no pad id (0) inside."""
    seqs = [[7] * n for n in lengths]
    for i, s in enumerate(seqs):
        s[0] = 100 + i
    return seqs


def _check_masks_and_order(enc, seqs: list[list[int]]) -> None:
    """Each row's mask marks exactly its real tokens, and ``restore`` gives back the input rows."""
    for c in enc.chunks:
        assert c["input_ids"].shape == c["attention_mask"].shape
        assert torch.equal(c["attention_mask"].bool(), c["input_ids"] != 0)
    rows = [row for c in enc.chunks for row in zip(c["input_ids"], c["attention_mask"], strict=True)]
    restored = [rows[i] for i in enc.restore.tolist()]
    for seq, (ids, mask) in zip(seqs, restored, strict=True):
        assert ids[mask.bool()].tolist() == seq


def test_widths_are_multiples_of_eight_and_the_order_is_restored() -> None:
    seqs = _marked((30, 3, 31, 4, 60, 5))
    enc = pad_chunks(seqs, pad_id=0, chunk_size=2, device=CPU)
    assert PAD_MULTIPLE == 8
    assert [tuple(c["input_ids"].shape) for c in enc.chunks] == [(2, 8), (2, 32), (2, 64)]  # {3,4} {5,30} {31,60}
    assert enc.real_tokens == sum(map(len, seqs)) == 133
    assert enc.padded_tokens == 2 * 8 + 2 * 32 + 2 * 64
    _check_masks_and_order(enc, seqs)
    firsts = torch.cat([c["input_ids"][:, 0] for c in enc.chunks])[enc.restore]
    assert firsts.tolist() == [100 + i for i in range(len(seqs))]


def test_a_width_already_on_the_multiple_is_not_padded_further() -> None:
    seqs = _marked((16, 9, 8))
    enc = pad_chunks(seqs, pad_id=0, chunk_size=1, device=CPU)
    assert [c["input_ids"].shape[1] for c in enc.chunks] == [8, 16, 16]
    assert (enc.real_tokens, enc.padded_tokens) == (33, 40)
    _check_masks_and_order(enc, seqs)


def test_the_cap_bounds_the_width_but_never_below_the_longest_text() -> None:
    seqs = _marked((60, 50))
    widths = {cap: pad_chunks(seqs, pad_id=0, chunk_size=2, device=CPU, cap=cap).chunks[0]["input_ids"].shape[1]
              for cap in (None, 128, 62, 60, 40)}
    assert widths == {None: 64, 128: 64, 62: 62, 60: 60, 40: 60}  # 40 < 60: the longest text is never cut
    enc = pad_chunks(seqs, pad_id=0, chunk_size=2, device=CPU, cap=60)
    assert (enc.real_tokens, enc.padded_tokens) == (110, 120)
    _check_masks_and_order(enc, seqs)


def test_one_chunk_when_chunk_size_covers_the_batch() -> None:
    seqs = [[1, 2, 3], [4], [5, 6]]
    enc = pad_chunks(seqs, pad_id=0, chunk_size=len(seqs), device=CPU)
    assert len(enc.chunks) == 1
    ids = enc.chunks[0]["input_ids"][enc.restore]
    assert ids.tolist() == [[1, 2, 3] + [0] * 5, [4] + [0] * 7, [5, 6] + [0] * 6]
    assert (enc.real_tokens, enc.padded_tokens) == (6, 24)
    _check_masks_and_order(enc, seqs)


def test_multiple_one_pads_exactly_and_a_last_short_chunk_is_kept() -> None:
    seqs = _marked((5, 3, 9, 2, 7))
    enc = pad_chunks(seqs, pad_id=0, chunk_size=2, device=CPU, multiple=1)
    assert [tuple(c["input_ids"].shape) for c in enc.chunks] == [(2, 3), (2, 7), (1, 9)]  # {2,3} {5,7} {9}
    assert (enc.real_tokens, enc.padded_tokens) == (26, 2 * 3 + 2 * 7 + 9)
    _check_masks_and_order(enc, seqs)
