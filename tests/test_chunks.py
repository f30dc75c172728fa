"""How a batch's texts are cut into padded chunks for the student's forwards: sorted by length, ``chunk_size`` rows
per chunk, each padded to its own longest text (rounded up to a coarse grid of lengths, ``training.pad_length_grid``),
and the input order restorable."""

from __future__ import annotations

import torch

from distill.trainer import grid_length, pad_chunks


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


def test_grid_length_bounds_and_few_distinct_lengths() -> None:
    for grid in (1 / 16, 1 / 8, 0.5):
        widths = [grid_length(w, grid) for w in range(1, 1025)]
        for w, g in zip(range(1, 1025), widths, strict=True):
            assert w <= g <= w * (1 + grid), (w, g, grid)
        assert widths == sorted(widths)  # longer texts never get a shorter chunk
    assert len({grid_length(w, 1 / 16) for w in range(1, 513)}) == 96  # not 512: shapes recur
    assert [grid_length(w, 1 / 16) for w in (31, 33, 65, 129, 257, 500)] == [31, 34, 68, 136, 272, 512]
    assert [grid_length(w, 0.0) for w in (3, 257, 511)] == [3, 257, 511]


def test_grid_length_never_passes_the_cap_nor_shortens() -> None:
    assert grid_length(299, 1 / 16, cap=300) == 300  # 304 on the grid, capped at max_length
    assert grid_length(300, 1 / 16, cap=300) == 300
    assert grid_length(290, 1 / 16, cap=300) == 300
    assert grid_length(257, 1 / 16, cap=512) == 272


def test_pad_chunks_on_the_grid_pads_to_grid_widths_with_exact_masks() -> None:
    seqs = [[5] * n for n in (33, 3, 65, 40)]
    enc = pad_chunks(seqs, pad_id=0, chunk_size=2, device=torch.device("cpu"), grid=1 / 8, cap=66)
    assert [tuple(c["input_ids"].shape) for c in enc.chunks] == [(2, 36), (2, 66)]  # {3,33}: 36; {40,65}: 72 > cap
    assert enc.padded_tokens == 2 * 36 + 2 * 66 and enc.real_tokens == 33 + 3 + 65 + 40
    lengths = torch.cat([c["attention_mask"].sum(1) for c in enc.chunks])[enc.restore]
    assert lengths.tolist() == [33, 3, 65, 40]
    for c in enc.chunks:
        assert torch.equal(c["attention_mask"].bool(), c["input_ids"] != 0)


def test_the_grid_changes_shapes_not_the_training(tmp_path, tiny_teacher_dir) -> None:
    """A single-process run of both phases with exact and with grid padding: the same losses and weights (the masks
    hide the extra padding) and a lower padding efficiency on the grid. No dropout: its masks follow the shapes."""
    import json

    from safetensors.torch import load_file
    from test_train_e2e import train_each_setting, train_records
    from tiny_data import write_training_files
    from tiny_models import build_tiny_student

    student = build_tiny_student(tmp_path / "no_dropout" / "model", dropout=0.0)
    files = write_training_files(tmp_path / "data", n=48)
    runs = train_each_setting(tmp_path, tiny_teacher_dir, student, files, "training.pad_length_grid", ["0", "0.5"],
                              "--set", "eval.data=null")
    weights = {k: load_file(str(run / "phase2" / "model.safetensors")) for k, run in runs.items()}
    losses = {k: [r["loss"] for p in ("phase1", "phase2") for r in train_records(run, p)] for k, run in runs.items()}
    padding = {k: json.loads((run / "final" / "distill_summary.json").read_text())["padding_efficiency"]
               for k, run in runs.items()}
    assert len(losses["0"]) >= 4
    torch.testing.assert_close(torch.tensor(losses["0.5"]), torch.tensor(losses["0"]), atol=1e-4, rtol=1e-4)
    for name, w in weights["0"].items():
        torch.testing.assert_close(weights["0.5"][name], w, atol=1e-4, rtol=1e-3, msg=name)
    for phase in ("phase1", "phase2"):
        assert padding["0.5"][phase] < padding["0"][phase] <= 1.0, padding
