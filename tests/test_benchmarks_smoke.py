"""The benchmark scripts, each run end to end at toy size on the tests' tiny models (tests/tiny_models.py): they exit
0 and print their tables and ratio lines. No timing is asserted and no model is downloaded."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_cache, bench_compile, bench_dropout
from benchmarks import common as C

# ---- bench_cache ----


def test_bench_cache_args_and_runs(tmp_path: Path) -> None:
    args = bench_cache.parse_args(["--nproc", "2", "--threads", "1", "--epochs2", "2"])
    assert (args.max_train, args.epochs1, args.epochs2, args.nproc, args.threads) == (24, 1, 2, 2, 1)
    with pytest.raises(SystemExit):
        bench_cache.parse_args(["--nproc", "0"])
    assert bench_cache.default_threads(1, cores=2) == 2
    assert bench_cache.default_threads(2, cores=2) == 1
    assert bench_cache.default_threads(4, cores=2) == 1

    nocache, ow0 = bench_cache.run_overrides("no-cache", args, tmp_path)
    cold, ow1 = bench_cache.run_overrides("cold", args, tmp_path)
    warm, ow2 = bench_cache.run_overrides("warm", args, tmp_path)
    assert not any(s.startswith("cache.") for s in nocache)  # the library always caches: see inline_command
    assert (ow0, ow1, ow2) == (False, False, True)
    assert cold == warm  # the warm run is the cold one again, cache kept
    assert f"paths.cache_dir={tmp_path / 'cached' / 'cache'}" in cold
    assert f"paths.cache_dir={tmp_path / 'no-cache' / 'cache'}" in nocache
    assert "phase2.num_epochs=2" in cold and "training.num_threads=1" in cold
    assert "training.precision=auto" in cold  # the default: the precision the trainer picks for this CPU
    cmd = C.train_command(tmp_path / "c.yaml", nocache, nproc=2)
    inline = bench_cache.inline_command(cmd)
    assert inline[inline.index(str(Path(bench_cache.__file__).resolve())) + 1] == bench_cache.INLINE
    assert str(C.REPO / "train_ddp.py") not in inline and inline[:6] == cmd[:6] and inline[8:] == cmd[7:]


def test_inloop_teacher_texts() -> None:
    stats = {"phase1": C.LoopStats(steps=3, samples=48, elapsed_s=1.0, padding_efficiency=1.0),
             "phase2": C.LoopStats(steps=3, samples=24, elapsed_s=1.0, padding_efficiency=1.0)}
    assert bench_cache.inloop_teacher_texts(stats, 7) == 48 * 1 + 24 * 9
    assert bench_cache.inloop_teacher_texts({"phase1": None, "phase2": stats["phase2"]}, 3) == 24 * 5



def test_docstrings_of_named_and_of_loaded_modules() -> None:
    import inspect
    import json as json_module

    doc = inspect.getdoc(json_module.dumps)
    assert len(C.docstrings(20, ["json", "textwrap"], first_lines=True)) == 20
    with_first = C.docstrings(1000, ["json", "textwrap"], first_lines=True)  # all of them: fewer than 1000
    assert len(with_first) == len(set(with_first)) < 1000
    at = with_first.index(doc)
    assert with_first[at - 1] == doc.splitlines()[0]  # each docstring right after its first line
    plain = C.docstrings(1000, ["json", "textwrap"])
    assert doc in plain and doc.splitlines()[0] not in plain and all(len(t) > 20 for t in plain)
    assert C.docstrings(3, ["no_such_module_here", "json"]) == C.docstrings(3, ["json"])  # unimportable: skipped
    loaded = C.docstrings(200)  # every loaded module (pytest, torch, ...): far more than 200
    assert len(loaded) == len(set(loaded)) == 200 and all(len(t) > 20 for t in loaded)


def test_store_overhead_reports_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    result = bench_cache.store_overhead(tmp_path, n_texts=300, dim=8, shard_size=64, batch_size=32, lookup_batch=8,
                                        lookup_batches=5)
    assert set(result) == {
        "hash_texts_per_s",
        "fill_texts_per_s",
        "count_missing_s",
        "lookup_s",
        "read_rows_per_s",
        "bytes_on_disk",
    }
    assert all(v > 0 for v in result.values())
    assert result["bytes_on_disk"] > 300 * 8 * 2 + 300 * 16  # fp16 vectors + 128-bit keys
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_bench_cache_store_mode_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "store.json"
    assert bench_cache.main(["--store", "--store-texts", "200", "--store-dim", "8", "--threads", "1",
                             "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    assert "fill_texts_per_s" in capsys.readouterr().out
    assert json.loads(out.read_text())["store"]["bytes_on_disk"] > 0
    assert list((tmp_path / "work").iterdir()) == []


# ---- bench_trainer ----


def _demo_models(tmp_path: Path, teacher: Path, student: Path) -> Path:
    """A --models-dir whose demo model names are the tiny teacher and student."""
    models = tmp_path / "models"
    models.mkdir()
    (models / C.TEACHER_NAME).symlink_to(teacher)
    (models / C.STUDENT_NAME).symlink_to(student)
    return models


def test_bench_trainer_runs_ours_and_st_and_prints_the_ratios(tmp_path: Path, tiny_teacher_dir: Path,
                                                              tiny_student_dir: Path) -> None:
    """Ours with and without training.cpu_tuning, and sentence-transformers' trainer when its ``bench`` extra
    (accelerate) is installed; the loop hooks count every step, sample and text of the run."""
    with_st = importlib.util.find_spec("accelerate") is not None
    variants = ["ours-fp32", "ours-fp32-bernoulli"] + (["st-fp32"] if with_st else [])
    steps1, steps2, batch1, batch2 = 2, 2, 8, 4
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(C.REPO / "benchmarks" / "bench_trainer.py"),
           "--models-dir", str(_demo_models(tmp_path, tiny_teacher_dir, tiny_student_dir)),
           "--workdir", str(tmp_path / "work"), "--variants", ",".join(variants), "--max-train", "16",
           "--steps1", str(steps1), "--steps2", str(steps2), "--batch1", str(batch1), "--batch2", str(batch2),
           "--mini-batch", "8", "--matmul-n", "64", "--threads", "1", "--json", str(out),
           "--set", "model.teacher_dim=48", "--set", "model.student_dim=32", "--set", "model.projection_hidden_dim=64"]
    proc = subprocess.run(cmd, cwd=C.REPO, env=C.bench_env(1), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in variants:
        for phase in ("phase1", "phase2"):
            assert re.search(rf"^\| {name} \| {phase} \| ", proc.stdout, re.MULTILINE), (name, phase, proc.stdout)
    assert re.search(r"^ours cpu_tuning on/off fp32 phase2 +\d+\.\d\dx$", proc.stdout, re.MULTILINE), proc.stdout
    st_ratio = r"\d+\.\d\dx" if with_st else "-"
    for phase in ("phase1", "phase2", "both"):
        assert re.search(rf"^ours/st fp32 {phase} +{st_ratio}$", proc.stdout, re.MULTILINE), proc.stdout

    result = json.loads(out.read_text(encoding="utf-8"))
    texts_per_sample = {"phase1": 1, "phase2": 2 + 7}  # cpu_demo.yaml: 7 negatives
    for row in result["rows"]:
        steps, batch = (steps1, batch1) if row["phase"] == "phase1" else (steps2, batch2)
        rec = result["results"][row["config"]]["phases"][row["phase"]]
        assert (row["steps"], rec["samples"]) == (steps, steps * batch), row
        assert rec["rows"] == steps * batch * texts_per_sample[row["phase"]], row  # every trained text, once
        assert 0 < row["padding_eff"] <= 1 and row["teacher_passes"] == 0, row  # the targets come from the cache
        assert 0 < rec["first_step_s"] <= rec["loop_s"], row
        if row["config"].startswith("ours"):
            assert rec["padding_reported"] == pytest.approx(row["padding_eff"], abs=1e-3), row


# ---- bench_dropout, bench_compile ----


def test_bench_dropout_times_all_three_methods_on_both_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    bench_dropout.main(["--texts", "2", "--length", "6", "--hidden", "8", "--heads", "2", "--calls", "1",
                        "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| float32", "| bfloat16"))]
    assert len(rows) == 2 * 2 * len(bench_dropout.METHODS)
    assert "hidden states [12, 8]" in out and "attention probs [2, 2, 6, 6]" in out
    assert len(re.findall(r"lanes / torch.rand \d+\.\d\dx, lanes / F.dropout \d+\.\d\dx", out)) == 4


def test_bench_compile_eager_ways(tiny_student_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The eager ways on the tiny student (the compiled ways cost minutes of compiling: the script, not the tests,
    runs them)."""
    rows = bench_compile.main(["--student", str(tiny_student_dir), "--ways", "eager-bernoulli,eager-lanes",
                               "--dtypes", "fp32,bf16", "--texts", "2", "--length", "6", "--steps", "1",
                               "--repeats", "1"])
    assert [(r["dtype"], r["way"]) for r in rows] == [("fp32", "eager-bernoulli"), ("fp32", "eager-lanes"),
                                                      ("bf16", "eager-bernoulli"), ("bf16", "eager-lanes")]
    assert {r["speed vs eager-lanes"] for r in rows if r["way"] == "eager-lanes"} == {"1.00x"}
    out = capsys.readouterr().out
    assert re.search(r"^\| bf16 \| eager-bernoulli \| [\d.,]+ \| [\d.,]+ \| \d+\.\d\dx \|$", out, re.MULTILINE), out
