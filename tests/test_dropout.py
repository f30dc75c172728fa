"""training.cpu_tuning's dropout (distill.hardware): masks from 15-bit lanes of int64 ``random_`` draws, with
nn.Dropout's maths; a student whose dropout modules and SDPA attention use it computes what the stock student
computes; apply_cpu_tuning swaps it in on CPU only and turns a failure into a warning."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from tiny_models import build_tiny_student
from torch import nn

from distill import hardware
from distill.hardware import (
    ATTENTION_NAME,
    RandDropout,
    apply_cpu_tuning,
    keep_noise,
    rand_dropout,
    sdpa_rand_dropout_attention,
    use_rand_dropout,
)

TEXTS = ["a short one", "somewhat longer text with several more words in it", "x",
         "the longest of them all by a clear margin, with many words and some punctuation too!"]


def _lane_keep(shape: tuple[int, ...], p: float, seed: int) -> tuple[torch.Tensor, float]:
    """The keep mask and keep probability of seed ``seed``, from the int64 draws by shifts (no tensor views)."""
    torch.manual_seed(seed)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    lanes = torch.stack([(words >> (16 * i)) & 0x7FFF for i in range(4)], dim=1).flatten()[:n]
    t = round(p * 32768)
    return (lanes >= t).view(shape), 1 - t / 32768


def test_rand_dropout_is_mask_times_scale_with_the_mask_of_the_lanes() -> None:
    x = torch.randn(3, 5, 7, requires_grad=True)
    torch.manual_seed(7)
    y = rand_dropout(x, 0.25)
    keep, q = _lane_keep((3, 5, 7), 0.25, 7)
    assert q == 0.75 and 0 < keep.sum() < keep.numel()
    assert torch.equal(y == 0, ~keep)
    assert torch.allclose(y, x.detach() * keep / q, rtol=1e-6, atol=0)
    y.backward(torch.full_like(y, 2.0))
    assert torch.allclose(x.grad, 2.0 * keep / q)


def test_p_is_rounded_to_the_lane_grid_and_the_scale_keeps_the_mean_exact() -> None:
    torch.manual_seed(2)
    noise = keep_noise((10,), 0.1, torch.float64)
    t = round(0.1 * 32768)  # 3277: P(drop) = 0.100006
    assert set(noise.unique().tolist()) <= {0.0, 32768 / (32768 - t)}
    keep, _ = _lane_keep((10,), 0.1, 2)
    assert torch.equal(noise > 0, keep)
    assert torch.equal(keep_noise((3,), 0.99999, torch.float32), torch.zeros(3))  # rounds to p = 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_noise_in_every_dtype_is_keep_times_the_rounded_scale(dtype: torch.dtype) -> None:
    """16-bit noise is built from the scale's bit pattern; it must equal keep * scale rounded to the dtype."""
    torch.manual_seed(4)
    noise = keep_noise((6, 50), 0.1, dtype)
    keep, q = _lane_keep((6, 50), 0.1, 4)
    assert noise.dtype == dtype and noise.shape == (6, 50)
    assert torch.equal(noise, keep.to(dtype) * torch.tensor(1 / q, dtype=dtype))


def test_every_lane_is_uniform() -> None:
    """The four 16-bit lanes of the 63-bit draws, masked to 15 bits, are each uniform on [0, 2^15) (the top lane's
    16th bit is the one that is always 0)."""
    torch.manual_seed(0)
    words = torch.empty(400_000, dtype=torch.int64).random_()
    assert (words >= 0).all() and (words >= 2**62).any()  # 63 random bits, not 31
    lanes = words.view(torch.int16).view(-1, 4)
    for i in range(4):
        lane = lanes[:, i].bitwise_and(0x7FFF).double()
        assert abs(lane.mean().item() / 16383.5 - 1) < 0.005, i  # ~8 standard deviations
        assert abs((lane >= 3277).double().mean().item() - 0.9) < 0.004, i
        counts = torch.bincount(lanes[:, i].bitwise_and(0x7FFF).long() >> 11, minlength=16).double()
        assert (counts / counts.mean() - 1).abs().max() < 0.03, i  # 16 buckets of the top bits, each ~25,000


def test_rand_dropout_keeps_one_minus_p_and_the_mean() -> None:
    torch.manual_seed(0)
    y = rand_dropout(torch.ones(1_000_000), 0.1)
    assert abs((y > 0).float().mean().item() - 0.9) < 0.002  # 6 standard deviations
    assert abs(y.mean().item() - 1.0) < 0.003


def test_rand_dropout_bf16_input_keeps_dtype_and_exact_scale() -> None:
    x = torch.ones(1000, dtype=torch.bfloat16)
    torch.manual_seed(1)
    y = rand_dropout(x, 0.5)
    assert y.dtype == torch.bfloat16
    assert set(y.float().unique().tolist()) == {0.0, 2.0}  # p = 0.5 is on the grid: q = 0.5 exactly


def test_rand_dropout_edge_cases() -> None:
    x = torch.randn(4, 4)
    assert rand_dropout(x, 0.3, training=False) is x
    assert rand_dropout(x, 0.0) is x
    assert torch.equal(rand_dropout(x, 1.0), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="between 0 and 1"):
        rand_dropout(x, 1.5)
    module = RandDropout(0.4).eval()
    assert module(x) is x and module.p == 0.4


def _attention_inputs(heads: int = 4, kv_heads: int = 4, b: int = 2, q: int = 5, d: int = 8):
    torch.manual_seed(3)
    return torch.randn(b, heads, q, d), torch.randn(b, kv_heads, q, d), torch.randn(b, kv_heads, q, d)


class _Attn(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.is_causal = False
        self.num_key_value_groups = groups


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_maths_path_matches_sdpa(mask_kind: str, kv_heads: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _attention_inputs(kv_heads=kv_heads)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, :, :, 3:] = False  # first text padded after 3 tokens
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    module = _Attn(groups=4 // kv_heads).train()
    want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.manual_seed(0)  # p = 1e-12 drops nothing here: the maths path, not the fallback, with scale 1
    got, none = sdpa_rand_dropout_attention(module, q, k, v, mask, dropout=1e-12, scaling=0.3)
    assert none is None and got.shape == want.shape == (2, 5, 4, 8)
    assert torch.allclose(got, want, atol=1e-5)


def test_attention_drops_probabilities_with_the_lane_mask() -> None:
    q, k, v = _attention_inputs()
    module = _Attn().train()
    torch.manual_seed(5)
    got, _ = sdpa_rand_dropout_attention(module, q, k, v, None, dropout=0.2, scaling=0.5)
    keep, keep_p = _lane_keep((2, 4, 5, 5), 0.2, 5)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) * keep / keep_p
    assert torch.allclose(got, (probs @ v).transpose(1, 2), atol=1e-6)
    eval_out, _ = sdpa_rand_dropout_attention(module.eval(), q, k, v, None, dropout=0.0, scaling=0.5)
    assert not torch.allclose(eval_out, got, atol=1e-3)


def _load(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def _set_dropout(student, p: float) -> None:
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_swapped_student_computes_what_the_stock_student_computes(tmp_path, kind: str) -> None:
    path = build_tiny_student(tmp_path / kind, kind=kind)
    stock, swapped = _load(path), _load(path)
    n_dropout = sum(type(m) is nn.Dropout for m in stock.modules())
    assert use_rand_dropout(swapped) == n_dropout > 0
    assert not any(type(m) is nn.Dropout for m in swapped.modules())
    want_attention = ATTENTION_NAME if kind == "bert" else stock[0].model.config._attn_implementation  # MPNet: eager
    assert swapped[0].model.config._attn_implementation == want_attention
    features = stock.tokenize(TEXTS)  # padded: the attention mask matters

    stock.eval(), swapped.eval()
    with torch.no_grad():
        assert torch.equal(stock(dict(features))["sentence_embedding"], swapped(dict(features))["sentence_embedding"])

    # Training mode with p = 1e-12: both keep every element (seeded), so the maths path of the attention and the
    # swapped modules must reproduce the stock training forward and backward.
    stock.train(), swapped.train()
    _set_dropout(stock, 1e-12), _set_dropout(swapped, 1e-12)
    grads = []
    for st in (stock, swapped):
        torch.manual_seed(0)
        st(dict(features))["sentence_embedding"].pow(3).sum().backward()
        grads.append({n: p.grad for n, p in st.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5), name

    # Saved the same: same state dict, no custom attention name in config.json.
    assert stock.state_dict().keys() == swapped.state_dict().keys()
    swapped.save(str(tmp_path / "saved"))
    assert ATTENTION_NAME not in (tmp_path / "saved" / "config.json").read_text()
    json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = _load(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(dict(features))["sentence_embedding"],
                              stock.eval()(dict(features))["sentence_embedding"], atol=1e-6)


def test_causal_attention_without_a_mask_is_left_to_sdpa() -> None:
    """A decoder's causal attention with no mask tensor (transformers passes is_causal instead) keeps its causality."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _attention_inputs()
    module = _Attn().train()
    module.is_causal = True
    want, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.3)
    torch.manual_seed(0)
    got, _ = sdpa_rand_dropout_attention(module, q, k, v, None, dropout=1e-12, scaling=0.3)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[:, 0], (v[:, :, 0]), atol=1e-5)  # the first query sees only the first key


def test_apply_cpu_tuning_swaps_dropout_on_cpu_only(tmp_path) -> None:
    path = build_tiny_student(tmp_path / "bert", kind="bert")
    on_cpu, on_other = _load(path), _load(path)
    assert apply_cpu_tuning(on_cpu, torch.device("cpu")) is True
    assert any(isinstance(m, RandDropout) for m in on_cpu.modules())
    assert not any(type(m) is nn.Dropout for m in on_cpu.modules())
    assert on_cpu[0].model.config._attn_implementation == ATTENTION_NAME
    # GPUs draw the mask inside their fused kernels: nothing is swapped.
    assert apply_cpu_tuning(on_other, torch.device("meta")) is False
    assert not any(isinstance(m, RandDropout) for m in on_other.modules())
    assert on_other[0].model.config._attn_implementation != ATTENTION_NAME


def test_apply_cpu_tuning_failure_is_a_warning_not_an_error(monkeypatch, caplog) -> None:
    def broken(model: nn.Module) -> int:
        raise ImportError("cannot import name 'AttentionInterface'\nsecond line")

    monkeypatch.setattr(hardware, "use_rand_dropout", broken)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    with caplog.at_level(logging.WARNING, logger="distill.hardware"):
        assert apply_cpu_tuning(model, torch.device("cpu")) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cpu_tuning" in warnings[0].getMessage() and "ImportError" in warnings[0].getMessage()
    assert "AttentionInterface" in warnings[0].getMessage() and "second line" not in warnings[0].getMessage()
    assert type(model[1]) is nn.Dropout  # the stock dropout stays
