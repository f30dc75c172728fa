"""The benchmark scripts' pure parts: argument parsing, run plans, the FLOP and padding arithmetic, the token
counter and the report tables. No timing is asserted and no model is downloaded (the token counter runs on the
session's tiny student)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import bench_cache, bench_compile, bench_dropout, bench_trainer
from benchmarks import common as C

# ---- arithmetic ----


def test_flop_formulas() -> None:
    assert C.training_flops(10_000_000, 1_000) == 6 * 10_000_000 * 1_000
    # Attention: 12 * layers * hidden * sum of squared lengths (texts of 3 and 4 tokens: 9 + 16).
    assert C.training_flops(100, 7, layers=2, hidden=8, sum_sq_len=25) == 6 * 100 * 7 + 12 * 2 * 8 * 25
    assert C.achieved_flops_per_s(100, 7, 2.0, layers=2, hidden=8, sum_sq_len=25) == pytest.approx(
        (6 * 100 * 7 + 12 * 2 * 8 * 25) / 2.0)
    assert C.achieved_flops_per_s(100, 50, 2.0) == pytest.approx(6 * 100 * 50 / 2.0)
    assert math.isnan(C.achieved_flops_per_s(100, 50, 0.0))
    assert C.matmul_flop_count(2048, 2048, 2048) == 2 * 2048**3 == 17_179_869_184
    assert C.matmul_flop_count(10, 4, 16) == 2 * 10 * 4 * 16


def test_padding_efficiency_from_masks_and_counts() -> None:
    masks = [torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), np.array([[1, 1], [1, 1]])]
    assert C.padding_efficiency(masks) == pytest.approx((4 + 4) / (8 + 4))
    assert C.padding_efficiency([]) == 1.0
    assert C.padding_efficiency_from_counts(9, 10) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="real <= padded"):
        C.padding_efficiency_from_counts(11, 10)


def test_non_embedding_params_skips_embeddings_and_excluded_modules() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.Embedding(100, 8)  # 800, skipped
            self.layer = nn.Linear(8, 8)  # 72
            self.norm = nn.LayerNorm(8)  # 16
            self.pooler = nn.Sequential(nn.Linear(8, 8))  # 72, skipped with exclude=("pooler",)

    m = Tiny()
    assert C.non_embedding_params(m) == 72 + 16 + 72
    assert C.non_embedding_params(m, exclude=("pooler",)) == 72 + 16


def test_texts_per_sample_ratio_and_teacher_passes() -> None:
    assert C.texts_per_sample(1, 7) == 1
    assert C.texts_per_sample(2, 7) == 9
    assert C.ratio(3.0, 2.0) == 1.5
    assert C.ratio(None, 2.0) is None and C.ratio(1.0, 0.0) is None
    assert C.total_teacher_passes({"teacher_forward_passes": {"phase1": 40, "phase2": 2}}) == 42
    assert C.total_teacher_passes({"teacher_forward_passes": 5}) == 5


def test_metrics_records_and_loop_stats(tmp_path: Path) -> None:
    lines = [
        {"event": "train", "phase": "phase1", "step": 1, "samples_per_s": 10.0, "elapsed_s": 1.6,
         "padding_efficiency": 0.9},
        {"event": "eval", "phase": "phase1", "step": 2, "results": {}},
        {"event": "train", "phase": "phase1", "step": 2, "samples_per_s": 16.0, "elapsed_s": 2.0,
         "padding_efficiency": 0.95},
        {"event": "train", "phase": "phase2", "step": 1, "samples_per_s": 2.0, "elapsed_s": 4.0,
         "padding_efficiency": 0.8},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n", encoding="utf-8")
    records = C.read_train_records(path)
    assert [r["step"] for r in records] == [1, 2, 1]
    s1 = C.loop_stats(records, "phase1")
    assert (s1.steps, s1.samples, s1.elapsed_s, s1.padding_efficiency) == (2, 32, 2.0, 0.95)
    assert s1.samples_per_s == pytest.approx(16.0)
    assert C.loop_stats(records, "phase2").samples == 8
    assert C.loop_stats(records, "phase3") is None


def test_format_table() -> None:
    text = C.format_table([{"a": "x", "b": 0.123456, "c": 12345.6, "d": None}, {"a": "y", "b": 7, "c": float("nan")}],
                          ["a", "b", "c", "d"])
    assert text.splitlines() == ["| a | b | c | d |", "|---|---|---|---|", "| x | 0.123 | 12,346 | - |",
                                 "| y | 7 | nan | - |"]


def test_encoder_gemms_cover_every_linear_layer_forward_and_backward() -> None:
    gemms = C.encoder_gemms(tokens=10, hidden=4, intermediate=16)
    assert len(gemms) == 6 * 3
    # Their FLOPs are 3x the forward's, and the forward's are 2 * tokens * (the layer's linear weights).
    weights = 4 * 4 * 4 + 4 * 16 + 16 * 4
    assert sum(C.matmul_flop_count(*g) for g in gemms) == 3 * 2 * 10 * weights
    assert (10, 4, 16) in gemms and (10, 16, 4) in gemms and (4, 10, 16) in gemms  # Y = XW, dX = dY W^T, dW = X^T dY


def test_measure_gemms_returns_flops() -> None:
    flops = C.measure_gemms(C.encoder_gemms(8, 4, 16), "bf16", threads=torch.get_num_threads(), min_seconds=0.0)
    assert flops > 0 and math.isfinite(flops)


def test_measure_matmul_returns_flops() -> None:
    flops = C.measure_matmul(32, "fp32", threads=torch.get_num_threads(), min_seconds=0.0)
    assert flops > 0 and math.isfinite(flops)
    with pytest.raises(KeyError):
        C.measure_matmul(32, "fp8", threads=1, min_seconds=0.0)


# ---- workload config and commands ----


def test_write_config_is_a_valid_distill_config(tmp_path: Path) -> None:
    from distill.config import load_config

    path = C.write_config(tmp_path / "bench_x.yaml", data_dir=tmp_path / "data", teacher=tmp_path / "t",
                          student=tmp_path / "all-MiniLM-L6-v2", output_dir=tmp_path / "out",
                          cache_dir=tmp_path / "cache")
    cfg = load_config(path, ["phase2.max_steps=3"])
    assert cfg.model.teacher == str(tmp_path / "t")
    assert [s.path for s in cfg.data.phase1] == [str(tmp_path / "data" / "phase1.jsonl")]  # nothing of ./demo_data
    assert cfg.data.phase2[0].path == str(tmp_path / "data" / "phase2.jsonl")
    assert cfg.eval.data is None and cfg.training.save_to_artifacts is False
    assert (cfg.training.save_steps, cfg.training.logging_steps, cfg.phase2.max_steps) == (0, 1, 3)
    assert cfg.cache_root == tmp_path / "cache"
    assert C.experiment_name(path) == "distilled-minilm-768d-bench_x"


def test_train_command() -> None:
    one = C.train_command(Path("c.yaml"), ["a.b=1"], nproc=1, overwrite=True)
    assert one[:2] == [sys.executable, str(C.REPO / "train_ddp.py")]
    assert one[2:] == ["--config", "c.yaml", "--log-level", "WARNING", "--set", "a.b=1", "--overwrite"]
    two = C.train_command(Path("c.yaml"), nproc=2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    assert "--nproc_per_node=2" in two and "--overwrite" not in two


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
    assert "cache.enabled=false" in nocache and "cache.enabled=false" not in cold
    assert (ow0, ow1, ow2) == (False, False, True)
    assert cold == warm  # the warm run is the cold one again, cache kept
    assert f"paths.cache_dir={tmp_path / 'cached' / 'cache'}" in cold
    assert f"paths.cache_dir={tmp_path / 'no-cache' / 'cache'}" in nocache
    assert "phase2.num_epochs=2" in cold and "training.num_threads=1" in cold
    assert "training.precision=auto" in cold  # the default: the precision the trainer picks for this CPU


def test_inloop_teacher_texts() -> None:
    stats = {"phase1": C.LoopStats(steps=3, samples=48, elapsed_s=1.0, padding_efficiency=1.0),
             "phase2": C.LoopStats(steps=3, samples=24, elapsed_s=1.0, padding_efficiency=1.0)}
    assert bench_cache.inloop_teacher_texts(stats, 7) == 48 * 1 + 24 * 9
    assert bench_cache.inloop_teacher_texts({"phase1": None, "phase2": stats["phase2"]}, 3) == 24 * 5



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


def test_bench_trainer_args_and_sets(tmp_path: Path) -> None:
    args = bench_trainer.parse_args(["--variants", "ours-fp32, st-bf16", "--threads", "1"])
    assert args.variants == ["ours-fp32", "st-bf16"] and args.threads == 1
    with pytest.raises(SystemExit):
        bench_trainer.parse_args(["--variants", "ours-fp8"])
    with pytest.raises(SystemExit):
        bench_trainer.parse_args(["--steps2", "0"])
    sets = bench_trainer.run_sets(args, tmp_path, "ours-bf16-cached")
    assert "training.precision=bf16" in sets and "phase2.cached_infonce=true" in sets
    assert f"phase1.max_steps={args.steps1}" in sets and f"phase2.batch_size={args.batch2}" in sets
    assert f"paths.cache_dir={tmp_path / 'cache'}" in sets
    plain = bench_trainer.run_sets(args, tmp_path, "st-fp32")
    assert "training.precision=fp32" in plain and "phase2.cached_infonce=false" in plain
    assert "training.compile=false" in plain
    assert "training.compile=true" in bench_trainer.run_sets(args, tmp_path, "ours-bf16-compile")
    assert "training.sparse_embedding_grad=true" in plain and "training.keep_freed_memory=true" in plain
    faulting = bench_trainer.run_sets(args, tmp_path, "ours-fp32-faulting")
    assert "training.sparse_embedding_grad=false" in faulting and "training.keep_freed_memory=false" in faulting
    assert not any(x.startswith("training.pad_length_grid") for x in plain)  # the config's default grid
    assert "training.pad_length_grid=0" in bench_trainer.run_sets(args, tmp_path, "ours-bf16-exactpad")


def _rec(samples: int, loop_s: float, real: int, padded: int, rows: int, steps: int = 2) -> dict:
    return {"samples": samples, "loop_s": loop_s, "real_tokens": real, "padded_tokens": padded, "rows": rows,
            "steps": steps, "teacher_passes": 0}


def test_phase_row_and_compare() -> None:
    peaks = {"fp32": 100e9, "bf16": 400e9}
    res = {"peak_rss_mb": 512.0}
    row = bench_trainer.phase_row("ours-bf16", "ours", "bf16", "phase2", _rec(16, 4.0, 9_000, 10_000, 144),
                                  1_000_000, peaks, 9, res)
    assert row["samples_per_s"] == 4.0 and row["texts_per_s"] == 36.0
    assert row["padding_eff"] == pytest.approx(0.9)
    assert row["gflop_s"] == pytest.approx(6 * 1e6 * 9_000 / 4.0 / 1e9)
    assert row["pct_peak"] == pytest.approx(100 * 6 * 1e6 * 9_000 / 4.0 / 400e9)  # against the bf16 peak
    assert row["pct_shape_peak"] is None  # no GEMM rate measured at its shapes
    # With the encoder's shape: attention's term counts, and the GEMM rate at 10,000 / 5 = 2,000 token rows is used.
    rec = {**_rec(16, 4.0, 9_000, 10_000, 144), "forwards": 5, "sq_tokens": 700_000}
    shaped = bench_trainer.phase_row("ours-bf16", "ours", "bf16", "phase2", rec, 1_000_000,
                                     {**peaks, "bf16:2000": 100e9, "fp32:2000": 1.0}, 9,
                                     {**res, "shape": {"layers": 6, "hidden": 384, "intermediate": 1536}})
    flops = (6 * 1e6 * 9_000 + 12 * 6 * 384 * 700_000) / 4.0
    assert shaped["tokens_per_forward"] == 2_000
    assert shaped["gflop_s"] == pytest.approx(flops / 1e9)
    assert shaped["pct_shape_peak"] == pytest.approx(100 * flops / 100e9)
    rows = [
        bench_trainer.phase_row("ours-fp32", "ours", "fp32", "phase1", _rec(64, 2.0, 10, 10, 64), 1, peaks, 1, res),
        bench_trainer.phase_row("ours-fp32", "ours", "fp32", "phase2", _rec(16, 8.0, 10, 10, 144), 1, peaks, 9, res),
        bench_trainer.phase_row("st-fp32", "st", "fp32", "phase1", _rec(64, 4.0, 10, 20, 64), 1, peaks, 1, res),
        bench_trainer.phase_row("st-fp32", "st", "fp32", "phase2", _rec(16, 8.0, 10, 20, 144), 1, peaks, 9, res),
    ]
    ratios = bench_trainer.compare(rows)["ratios"]
    assert ratios["ours/st fp32 phase1"] == pytest.approx(2.0)
    assert ratios["ours/st fp32 phase2"] == pytest.approx(1.0)
    assert ratios["ours/st fp32 both"] == pytest.approx((80 / 10) / (80 / 12))  # total samples / total seconds
    assert ratios["ours/st bf16 phase1"] is None and ratios["ours cached/plain InfoNCE phase2"] is None
    assert ratios["ours compile/eager fp32 phase1"] is None
    assert row["page_faults_per_step"] is None  # not counted
    counted = bench_trainer.phase_row("ours-fp32-faulting", "ours", "fp32", "phase1",
                                      {**_rec(64, 4.0, 10, 10, 64), "minor_faults": 3_000}, 1, peaks, 1, res)
    assert counted["page_faults_per_step"] == 1_500  # 2 steps
    ratios = bench_trainer.compare(rows + [counted])["ratios"]
    assert ratios["ours page reuse/faulting fp32 phase1"] == pytest.approx(2.0)  # 32 vs 16 samples/s
    assert ratios["ours page reuse/faulting fp32 both"] is None  # no phase-2 row of the faulting variant
    exact = bench_trainer.phase_row("ours-fp32-exactpad", "ours", "fp32", "phase1", _rec(64, 8.0, 10, 10, 64), 1,
                                    peaks, 1, res)
    assert bench_trainer.compare(rows + [exact])["ratios"]["ours grid/exact padding fp32 phase1"] == pytest.approx(4.0)


def test_the_peak_is_the_fastest_square_matmul_of_the_run() -> None:
    runs = [{"fp32": 180e9, "bf16": 650e9, "wall_s": 3.0}, {"fp32": 200e9, "bf16": 880e9},
            {"fp32": 175e9, "bf16": 745e9, "bf16:637": 790e9}]
    assert bench_trainer.best_peaks(runs) == {"fp32": 200e9, "bf16": 880e9}


def test_steady_rate_leaves_out_the_first_step_and_compile_ratios() -> None:
    rec = {**_rec(80, 10.0, 100, 100, 80, steps=5), "first_step_s": 6.0}
    assert bench_trainer.steady_samples_per_s(rec) == pytest.approx(64 / 4.0)  # 4 of 5 steps' samples in 4 s
    assert bench_trainer.steady_samples_per_s({**rec, "first_step_s": None}) is None
    assert bench_trainer.steady_samples_per_s({**rec, "steps": 1}) is None
    peaks, res = {"fp32": 100e9, "bf16": 400e9}, {"peak_rss_mb": 1.0}
    eager = bench_trainer.phase_row("ours-bf16", "ours", "bf16", "phase1", {**rec, "first_step_s": 1.0}, 1, peaks, 1,
                                    res)
    compiled = bench_trainer.phase_row("ours-bf16-compile", "ours", "bf16", "phase1", rec, 1, peaks, 1, res)
    assert eager["first_step_s"] == 1.0 and compiled["steady_samples_per_s"] == pytest.approx(16.0)
    ratios = bench_trainer.compare([eager, compiled])["ratios"]
    assert ratios["ours compile/eager bf16 phase1"] == pytest.approx(1.0)  # same samples in the same loop time
    assert ratios["ours compile/eager bf16 phase1 after step 1"] == pytest.approx(16.0 / (64 / 9.0))


def test_token_counter_counts_training_forwards_only(tiny_student_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_student_dir), device="cpu")
    feats = model.preprocess(["a short text", "a somewhat longer text with more words in it"])
    mask = feats["attention_mask"]
    counter = bench_trainer.TokenCounter()
    counter.install()
    try:
        model({k: v for k, v in feats.items()})  # no window open: not counted
        counter.begin("phase1")
        model.train()
        model({k: v for k, v in feats.items()})  # counted
        counter.step_done()
        counter.step_done()  # only the first step's end is kept
        with torch.no_grad():
            model({k: v for k, v in feats.items()})  # GradCache's first pass: not counted
        model.eval()
        model({k: v for k, v in feats.items()})  # eval mode (a teacher): not counted
        counter.end(steps=1, samples=2)
    finally:
        counter.uninstall()
    rec = counter.phases["phase1"]
    assert rec["forwards"] == 1 and rec["rows"] == 2
    assert rec["real_tokens"] == int(mask.sum()) and rec["padded_tokens"] == mask.numel()
    assert rec["sq_tokens"] == sum(int(n) ** 2 for n in mask.sum(dim=1))
    assert rec["real_tokens"] < rec["padded_tokens"]
    assert (rec["steps"], rec["samples"]) == (1, 2) and rec["loop_s"] >= 0
    assert 0 <= rec["first_step_s"] <= rec["loop_s"]
    auto = model[0].auto_model
    assert counter.non_embedding_params == C.non_embedding_params(auto, exclude=("pooler",))
    assert 0 < counter.non_embedding_params < sum(p.numel() for p in auto.parameters())
    assert counter.shape == {"layers": auto.config.num_hidden_layers, "hidden": auto.config.hidden_size,
                             "intermediate": auto.config.intermediate_size}


# ---- profile breakdown ----


def test_op_category_sorts_profiled_ops() -> None:
    assert C.op_category("aten::addmm") == C.op_category("aten::bmm") == "matmul"
    assert C.op_category("aten::bernoulli_") == C.op_category("aten::random_") == "dropout RNG"
    assert C.op_category("aten::_to_copy") == C.op_category("aten::copy_") == "dtype casts"
    assert C.op_category("aten::_fused_adamw_") == C.op_category("aten::_foreach_sqrt") == "optimizer"
    assert C.op_category("aten::mmx") == "other ops"  # an exact name, not a prefix
    assert C.op_category("aten::gelu_backward") == "other ops"
    assert C.op_category("Optimizer.step#AdamW.step") == C.op_category("AddmmBackward0") == "framework"


def test_profile_breakdown_and_rows_from_a_real_profile() -> None:
    from torch.profiler import ProfilerActivity, profile

    lin = nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            out = nn.functional.dropout(lin(torch.randn(32, 64)), 0.1, training=True)
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    ms = C.profile_breakdown(prof.key_averages())
    for cat in ("matmul", "dropout RNG", "optimizer", "other ops"):
        assert ms.get(cat, 0.0) > 0, cat
    total_ms = sum(ms.values())
    rows = bench_trainer.profile_rows({"ours-fp32": {"phase1": {"loop_s": 2 * total_ms / 1000.0, "profile_ms": ms}}})
    assert len(rows) == 1 and rows[0]["config"] == "ours-fp32"
    assert sum(rows[0][c] for c in bench_trainer.PROFILE_COLUMNS[3:-1]) == pytest.approx(50.0)
    assert rows[0]["outside ops"] == pytest.approx(50.0)


# ---- allocator ----


def test_malloc_preload_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert C.malloc_preload("glibc") is None
    assert "LD_PRELOAD" not in C.bench_env(2)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(SystemExit, match=r"--malloc tcmalloc: libtcmalloc_minimal not found; install it "
                                         r"\(Debian/Ubuntu: apt-get install libtcmalloc-minimal4\)"):
        C.malloc_preload("tcmalloc")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    assert C.malloc_preload("tcmalloc") == "libtcmalloc_minimal.so.4"
    env = C.bench_env(3, "libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and env["OMP_NUM_THREADS"] == "3"
    assert bench_trainer.parse_args(["--malloc", "jemalloc"]).malloc == "jemalloc"
    with pytest.raises(SystemExit):
        bench_trainer.parse_args(["--malloc", "mimalloc"])


def test_bench_dropout_times_all_three_methods_on_both_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    bench_dropout.main(["--texts", "2", "--length", "6", "--hidden", "8", "--heads", "2", "--calls", "1",
                        "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert len(rows) == 2 * 2 * len(bench_dropout.METHODS)
    assert "hidden states [12, 8]" in out and "attention probs [2, 2, 6, 6]" in out
    assert out.count("lanes / torch.rand") == 4


def test_bench_dropout_methods_drop_at_rate_p() -> None:
    """The three methods the script compares all compute dropout (keep rate 1 - p, kept values scaled)."""
    x = torch.ones(200_000)
    for name, fn in bench_dropout.METHODS.items():
        torch.manual_seed(0)
        y = fn(x, 0.25)
        assert abs((y > 0).float().mean().item() - 0.75) < 0.005, name
        assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.75), rtol=1e-4), name


def test_bench_compile_eager_ways_and_argument_errors(tiny_student_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The eager ways on the tiny student (the compiled ways cost minutes of compiling: the script, not the tests,
    runs them); lanes swap the student's dropout, the stock way keeps it; unknown names are errors."""
    from distill.dropout import RandDropout

    stock, _ = bench_compile.load_student(tiny_student_dir, "eager-bernoulli")
    lanes, _ = bench_compile.load_student(tiny_student_dir, "eager-lanes")
    assert not any(isinstance(m, RandDropout) for m in stock.modules())
    assert any(isinstance(m, RandDropout) for m in lanes.modules()) and lanes.training
    rows = bench_compile.main(["--student", str(tiny_student_dir), "--ways", "eager-bernoulli,eager-lanes",
                               "--dtypes", "fp32,bf16", "--texts", "2", "--length", "6", "--steps", "1",
                               "--repeats", "1"])
    assert [(r["dtype"], r["way"]) for r in rows] == [("fp32", "eager-bernoulli"), ("fp32", "eager-lanes"),
                                                      ("bf16", "eager-bernoulli"), ("bf16", "eager-lanes")]
    assert all(r["ms / step"] > 0 and r["first step s"] > 0 for r in rows)
    assert {r["speed vs eager-lanes"] for r in rows if r["way"] == "eager-lanes"} == {"1.00x"}
    assert "| bf16 | eager-bernoulli |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--ways: unknown \\['compile'\\]"):
        bench_compile.main(["--student", str(tiny_student_dir), "--ways", "eager-lanes,compile"])
    with pytest.raises(SystemExit, match="--dtypes: unknown \\['fp16'\\]"):
        bench_compile.main(["--student", str(tiny_student_dir), "--dtypes", "fp16"])
