"""Teacher inference speed levers: token-budget batches, the pipelined fill (background tokenisation and shard
writes, one read-back per shard), the teacher's own attention setting and the optional vLLM backend."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.teacher_cache as tc
from distill.config import load_config
from distill.errors import CacheError, ConfigError
from distill.models import check_teacher_runtime, teacher_spec_from_config
from distill.teacher_cache import TeacherCache, token_budget_batches
from distill.teacher_targets import LazyTeacher, fill_roles, open_cache
from test_teacher_cache import NS, FakeEncoder, expected, make_texts

CPU = torch.device("cpu")
TEXTS = [f"how do I {w} a file" + " with care" * (i % 7) for i, w in enumerate(
    ["copy", "move", "parse", "open", "read", "write", "zip", "hash", "sort", "split", "join", "lock", "find"] * 2)]


class TokenFake(FakeEncoder):
    """FakeEncoder with ``lengths`` (words) and ``prepare`` (records the batches, can fail at one)."""

    def __init__(self, fail_prepare_at: int | None = None) -> None:
        super().__init__()
        self.fail_prepare_at, self.prepared = fail_prepare_at, 0

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def prepare(self, texts: list[str]) -> list[str]:
        if self.prepared == self.fail_prepare_at:
            raise ValueError("tokenizer failed")
        self.prepared += 1
        return texts


def cfg_for(teacher: Path, tmp_path: Path, *sets: str):
    return load_config(None, [f"model.teacher={teacher}", "model.teacher_dtype=float32", "cache.dtype=float32",
                              f"paths.cache_dir={tmp_path}", *sets])


def test_token_budget_batches_cover_every_text_once_longest_first_within_budget() -> None:
    lengths = np.random.default_rng(0).integers(1, 300, 500)
    batches = token_budget_batches(lengths, max_rows=64, max_tokens=1024)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))  # every text exactly once
    assert (np.diff(lengths[flat]) <= 0).all() and lengths[batches[0][0]] == lengths.max()  # longest first
    for b in batches:
        assert len(b) <= 64 and (len(b) * lengths[b].max() <= 1024 or len(b) == 1)
        assert len(b) == 64 or len(b) == 1024 // lengths[b[0]] or b is batches[-1]  # full: no budget left unused
    assert [len(b) for b in token_budget_batches(lengths, 64)] == [64] * 7 + [52]  # no budget: fixed rows
    alone = token_budget_batches(np.array([5000, 3, 3]), max_rows=8, max_tokens=100)
    assert [b.tolist() for b in alone] == [[0], [1, 2]]  # a text over the budget goes alone


def test_fill_with_a_budget_stores_the_same_vectors(tmp_path: Path) -> None:
    texts = make_texts(60)
    enc = TokenFake()
    cache = TeacherCache(tmp_path, dtype="float32", shard_size=16)
    assert cache.fill(NS, texts, enc, batch_size=32, progress=False, max_tokens=12) == 60
    words = [len(b[0].split()) for b in enc.batches]
    assert all(len(b) * w <= 12 for b, w in zip(enc.batches, words)) and words == sorted(words, reverse=True)
    assert sorted(enc.texts) == sorted(texts) and enc.prepared == len(enc.batches)
    torch.testing.assert_close(cache.lookup(NS, texts)[list(range(60))], expected(texts), atol=0, rtol=0)


def test_token_counts_run_chunk_by_chunk_while_the_teacher_encodes(tmp_path: Path, monkeypatch) -> None:
    """The fill does not tokenise a rank's whole share before the first forward: the first chunk (longest texts by
    characters) is counted, encoding starts, and each later chunk is counted meanwhile (here a later count waits for
    the first encode call, which a count-everything-first fill would never make: the wait would time out)."""
    import threading

    monkeypatch.setattr(tc, "_MEASURE_CHUNKS", (4, 8))
    texts = make_texts(40)
    encoding = threading.Event()

    class Chunked(TokenFake):
        def __init__(self) -> None:
            super().__init__()
            self.counted: list[list[str]] = []

        def lengths(self, texts: list[str]) -> list[int]:
            if self.counted and not encoding.wait(timeout=10):
                raise AssertionError("a later chunk was counted before the teacher encoded anything")
            self.counted.append(list(texts))
            return super().lengths(texts)

        def __call__(self, batch: list[str]) -> torch.Tensor:
            encoding.set()
            return super().__call__(batch)

    enc = Chunked()
    cache = TeacherCache(tmp_path, dtype="float32", shard_size=16)
    assert cache.fill(NS, texts, enc, batch_size=1, progress=False) == 40
    assert [len(c) for c in enc.counted] == [4, 8, 8, 8, 8, 4]  # small first, doubling up to the cap
    longest = [max(map(len, c)) for c in enc.counted]
    assert longest == sorted(longest, reverse=True) and longest[0] == max(map(len, texts))
    torch.testing.assert_close(cache.lookup(NS, texts)[list(range(40))], expected(texts), atol=0, rtol=0)


def test_first_counted_chunk_holds_at_least_four_batches(monkeypatch) -> None:
    """A big batch (e.g. a token budget's 1,024-row cap) widens the first chunk, so the fill's look-ahead never waits
    for the second chunk's count before the first forward."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(tc, "_MEASURE_CHUNKS", (4, 8))
    texts, counted = make_texts(50), []

    def measure(chunk: list[str]) -> list[int]:
        counted.append(len(chunk))
        return [len(t) for t in chunk]

    with ThreadPoolExecutor(1) as pool:
        batches = list(tc._measured_batches(texts, measure, 5, None, pool))
    assert counted == [20, 20, 10] and [len(b) for b in batches] == [5] * 10
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))


def test_background_write_error_surfaces_and_other_shards_stay(tmp_path: Path, monkeypatch) -> None:
    calls, real = [], tc._write_shard

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "_write_shard", flaky)
    texts, enc = make_texts(40), FakeEncoder()
    with pytest.raises(OSError, match="disk full"):  # raised in the encoding thread, at the next shard or the end
        TeacherCache(tmp_path, shard_size=8).fill(NS, texts, enc, batch_size=4, progress=False)
    assert len(calls) == -(-len(enc.texts) // 8)  # every encoded row went to a write, the ones after the failure too
    missing = TeacherCache(tmp_path, shard_size=8).count_missing(NS, texts)
    assert missing == 8 + 40 - len(enc.texts)  # only the failed shard's rows and the ones never encoded


def test_prepare_error_surfaces_and_encoded_rows_stay(tmp_path: Path) -> None:
    texts = make_texts(30)
    enc = TokenFake(fail_prepare_at=3)
    with pytest.raises(ValueError, match="tokenizer failed"):
        TeacherCache(tmp_path, shard_size=100).fill(NS, texts, enc, batch_size=4, progress=False)
    assert len(enc.texts) == 12  # three batches were encoded before the failing one
    fresh = TeacherCache(tmp_path)
    assert fresh.count_missing(NS, texts) == 18
    torch.testing.assert_close(fresh.lookup(NS, enc.texts)[list(range(12))], expected(enc.texts), atol=1e-3, rtol=0)


def test_nan_batch_is_dropped_at_the_shard_read_back_and_the_others_kept(tmp_path: Path) -> None:
    texts, calls = make_texts(12), []

    def encode(batch: list[str]) -> torch.Tensor:
        calls.append(batch)
        out = expected(batch)
        return out.fill_(float("nan")) if len(calls) == 2 else out

    with pytest.raises(CacheError, match="NaN/inf .* in 1 batch"):
        TeacherCache(tmp_path, shard_size=100).fill(NS, texts, encode, batch_size=4, progress=False)
    assert len(calls) == 3  # no per-batch check: the bad batch is found when the rows are read back
    assert TeacherCache(tmp_path).count_missing(NS, texts) == 4


@pytest.mark.parametrize("fixture", ["tiny_teacher_dir", "tiny_teacher_hf_dir"])
def test_pipelined_budget_fill_matches_the_serial_path(fixture: str, request, tmp_path: Path) -> None:
    teacher = request.getfixturevalue(fixture)
    sets = [] if fixture == "tiny_teacher_dir" else ["model.teacher_pooling=last_token"]
    cfg = cfg_for(teacher, tmp_path, "model.teacher_max_tokens_per_batch=96", "model.teacher_batch_size=16", *sets)
    spec = teacher_spec_from_config(cfg.model, 32, CPU)
    serial = LazyTeacher(spec, CPU).load()
    cache = open_cache(cfg)
    assert fill_roles(cfg, cache, spec, {"query": TEXTS}, CPU) == len(set(TEXTS))
    got = cache.lookup(spec.fingerprint("query"), TEXTS)[list(range(len(TEXTS)))]
    torch.testing.assert_close(got, serial.encode(TEXTS, "query", batch_size=4), atol=1e-5, rtol=0)
    if fixture == "tiny_teacher_dir":  # and sentence-transformers' own encode, prompt and all
        want = serial.st.encode(TEXTS, prompt=spec.query_prompt, convert_to_tensor=True, normalize_embeddings=True)
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)
    lengths = serial.lengths(TEXTS, "query")
    batches = token_budget_batches(lengths, 16, 96)
    assert len({len(b) for b in batches}) > 1 and all(len(b) * lengths[b].max() <= 96 for b in batches)
    # encode() (the evaluate command's teacher) batches by the same budget and returns the same vectors in order
    shapes, forward = [], serial.forward
    serial.forward = lambda feats: shapes.append(tuple(feats["attention_mask"].shape)) or forward(feats)
    torch.testing.assert_close(serial.encode(TEXTS, "query", 16, max_tokens=96), got, atol=1e-5, rtol=0)
    assert sorted(rows for rows, _ in shapes) == sorted(len(b) for b in batches)
    assert all(rows * width <= 96 for rows, width in shapes)


def test_teacher_attention_key_reaches_the_teacher_only(tiny_teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import distill.teacher_targets as tt
    from distill.models import TeacherEncoder

    made = []
    monkeypatch.setattr(tt, "TeacherEncoder", lambda *a: made.append(TeacherEncoder(*a)) or made[-1])
    for attn, want in (("eager", "eager"), ("auto", "sdpa")):  # auto: transformers' choice, SDPA for Qwen2
        cfg = cfg_for(tiny_teacher_dir, tmp_path / attn, f"model.teacher_attn_implementation={attn}",
                      "model.attn_implementation=eager")
        spec = teacher_spec_from_config(cfg.model, 32, CPU)
        fill_roles(cfg, open_cache(cfg), spec, {"document": TEXTS[:3]}, CPU)
        assert made[-1].st[0].auto_model.config._attn_implementation == want
        assert cfg.model.attn_implementation == "eager"  # the student's own key is untouched
    with pytest.raises(ConfigError, match="model.teacher_attn_implementation: flash_attention_2 needs a CUDA GPU"):
        monkeypatch.setitem(sys.modules, "flash_attn", None)
        check_teacher_runtime(cfg_for(tiny_teacher_dir, tmp_path, "model.teacher_attn_implementation=flash_attention_2").model)
    with pytest.raises(ConfigError, match="model.teacher_max_tokens_per_batch must be > 0"):
        cfg_for(tiny_teacher_dir, tmp_path, "model.teacher_max_tokens_per_batch=0")


def fake_vllm(calls: list) -> tuple[types.ModuleType, types.ModuleType]:
    """Stand-in ``vllm`` and ``vllm.config``: LLM records its arguments; embed returns [len(ids), sum(ids), 1]."""

    @dataclasses.dataclass
    class PoolerConfig:
        pooling_type: str | None = None
        use_activation: bool | None = None

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))
            calls.append(("visible", os.environ.get("CUDA_VISIBLE_DEVICES")))

        def embed(self, prompts, use_tqdm=True):
            calls.append(("embed", [p["prompt_token_ids"] for p in prompts]))
            out = types.SimpleNamespace
            return [out(outputs=out(embedding=[float(len(p["prompt_token_ids"])), float(sum(p["prompt_token_ids"])),
                                              1.0])) for p in prompts]

    vllm, config = types.ModuleType("vllm"), types.ModuleType("vllm.config")
    vllm.LLM, config.PoolerConfig, vllm.config = LLM, PoolerConfig, config
    return vllm, config


def test_vllm_backend_through_a_stand_in(tiny_teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = cfg_for(tiny_teacher_dir, tmp_path, "model.teacher_backend=vllm", "model.teacher_max_length=8")
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: a one-line preflight error naming key and extra
    with pytest.raises(ConfigError, match=r"model.teacher_backend: vllm is not installed; pip install 'distill\[vllm\]'"):
        check_teacher_runtime(cfg.model)
    calls: list = []
    vllm, config = fake_vllm(calls)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    check_teacher_runtime(cfg.model)
    spec = teacher_spec_from_config(cfg.model, 32, CPU)
    cache = open_cache(cfg)
    assert fill_roles(cfg, cache, spec, {"query": TEXTS}, CPU) == len(set(TEXTS))
    init = calls[0][1]
    assert (init["model"], init["runner"], init["max_model_len"], init["dtype"]) == (str(tiny_teacher_dir), "pooling", 8,
                                                                                    "float32")
    assert init["pooler_config"] == config.PoolerConfig(pooling_type="LAST", use_activation=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    ids = tok([spec.query_prompt + t for t in TEXTS], truncation=True, max_length=8)["input_ids"]
    assert calls[1] == ("visible", os.environ.get("CUDA_VISIBLE_DEVICES"))  # a CPU run leaves the GPUs alone
    sent = [x for c in calls if c[0] == "embed" for x in c[1]]
    assert sorted(map(tuple, sent)) == sorted(map(tuple, ids)) and all(len(x) <= 8 for x in sent)
    want = torch.tensor([[len(x), sum(x), 1.0] for x in ids])
    torch.testing.assert_close(cache.lookup(spec.fingerprint("query"), TEXTS)[list(range(len(TEXTS)))], want)


def test_vllm_engine_of_each_rank_sees_only_its_gpu(tiny_teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from distill.models import VllmTeacher, only_visible_gpu

    calls: list = []
    vllm, config = fake_vllm(calls)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    spec = teacher_spec_from_config(cfg_for(tiny_teacher_dir, tmp_path).model, 32, CPU)
    for before, device, seen in (("4,5,6", torch.device("cuda", 1), "5"), (None, torch.device("cuda", 3), "3"),
                                 ("2,7", "cpu", "2,7")):
        if before is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", before)
        VllmTeacher(spec, device)
        assert calls[-1] == ("visible", seen)  # the engine process starts with only this rank's GPU visible
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # and the trainer's view is restored
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match="engine failed"), only_visible_gpu(torch.device("cuda", 1)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        raise RuntimeError("engine failed")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_bench_teacher_runs_the_three_ways_on_the_tiny_teacher(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from benchmarks import bench_teacher

    rows = bench_teacher.run(tiny_teacher_dir, tmp_path, n_texts=60, max_length=32, batch_size=8, max_tokens=256,
                             rows=32, shard_size=16)
    by = {r["way"]: r for r in rows}
    assert list(by) == ["serial", "overlap", "budget"] and all(r["texts"] == 60 for r in rows)
    assert all(r["max_abs_diff_vs_serial"] < 2e-3 for r in rows)  # the same vectors (float16 storage)
    assert all(0.5 < r["padding_efficiency"] <= 1 for r in rows)
    assert by["overlap"]["batches"] == by["serial"]["batches"] == 8
