"""Dropout for CPU training whose mask comes from 15-bit slices of ``random_`` integers instead of ``bernoulli_``.

On CPU, ``torch.nn.functional.dropout`` draws its mask with ``Tensor.bernoulli_(1 - p)``: one call of the Mersenne
Twister (torch's CPU generator, not multithreaded) per element plus a float conversion and compare. With a student's
0.1 dropout on every hidden state and attention matrix, that alone was 11-21 % of a training step on this project's
2-core CPU machines (docs/PERFORMANCE.md). Here each 64-bit draw of ``random_`` on int64 (uniform on [0, 2^63))
gives four masks: its four 16-bit lanes, each cut to its low 15 bits (the top lane's 16th bit is always 0), are four
independent uniform integers L on [0, 2^15). Forward + backward of a dropout runs 1.9-2.7x faster than with a
``torch.rand(...) >= p`` mask and 2.2-3.6x faster than ``F.dropout`` (``benchmarks/bench_dropout.py``, student-sized
tensors, fp32 and bf16). The maths is ``nn.Dropout``'s with p on a 2^-15 grid:

    t = round(p * 2^15),  keep = L >= t   (P(keep) = q = 1 - t / 2^15, |q - (1 - p)| <= 2^-16)
    y = x * keep / q                      dy/dx = keep / q      (so E[y] = x exactly)

with a different random stream (still ``torch``'s default generator, so ``torch.manual_seed`` per rank decides it,
checkpoints restore it and GradCache replays it).

Two places carry a student's dropout: ``nn.Dropout`` modules (hidden states, and attention probabilities in models
with their own attention code, e.g. MPNet), and the ``dropout`` argument transformers' SDPA attention passes into
``F.scaled_dot_product_attention`` (BERT, RoBERTa, Qwen2, ...). :func:`use_rand_dropout` swaps the first for
:class:`RandDropout` and points the second at :func:`sdpa_rand_dropout_attention`, a registered transformers
attention function that computes attention with this dropout when training on CPU and calls transformers' SDPA
otherwise. On GPUs the native kernels already draw the mask inside one fused kernel, so nothing is swapped there.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

ATTENTION_NAME = "sdpa_rand_dropout"


LANE_BITS = 15  # bits of each uniform lane; p is rounded to a multiple of 2^-15


def keep_noise(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The dropout noise ``keep / q`` of ``shape`` in ``dtype``: each element is 0 with probability ``t / 2^15``
    (``t = round(p * 2^15)``) and ``1 / q`` otherwise, ``q = 1 - t / 2^15``; ``0 < p < 1``.

    One int64 ``random_`` draw per four elements; its 16-bit lanes, masked to 15 bits, are compared in place.
    """
    t = round(p * (1 << LANE_BITS))
    if t >= 1 << LANE_BITS:
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # uniform on [0, 2^63)
    lanes = words.view(torch.int16)[:n].view(shape)
    keep = lanes.bitwise_and_((1 << LANE_BITS) - 1).ge_(t)  # 1 / 0 in int16, in place
    scale = (1 << LANE_BITS) / ((1 << LANE_BITS) - t)
    if dtype.itemsize == 2 and dtype.is_floating_point:
        # bf16 / fp16: keep * (the 16 bits of the scale) is the noise's bit pattern, built in place with no conversion.
        return keep.mul_(_bits16(scale, dtype)).view(dtype)
    return keep.to(dtype).mul_(scale)


@functools.lru_cache(maxsize=64)
def _bits16(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` rounded to the 16-bit float ``dtype``, as an int16 value."""
    return int(torch.tensor(value, dtype=dtype).view(torch.int16).item())


def rand_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask of :func:`keep_noise`; ``x`` of any shape and float dtype.

    The noise ``keep / q`` is built in x's dtype and is what autograd saves for the backward (``dx = dy * noise``),
    as ``F.dropout`` does on CPU: one multiplication each way.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return x * keep_noise(x.shape, p, x.dtype, x.device)


class RandDropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`rand_dropout` (same ``p``, same train/eval behaviour, no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rand_dropout(x, self.p, self.training)


def sdpa_rand_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, except that training with dropout on CPU takes the maths path with
    :func:`rand_dropout` on the probabilities (SDPA's CPU flash kernel has no dropout, so PyTorch takes the same
    maths path there, with ``bernoulli_``).

    query [B, H, Q, D], key / value [B, H_kv, K, D]; ``attention_mask`` boolean (True = attend) or additive, broadcast
    to [B, H, Q, K]. Returns ([B, Q, H, D], None) like every transformers attention function:

        A = softmax(Q K^T * scaling + mask) ,  out = dropout(A) V
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # transformers' default
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if not (module.training and dropout > 0.0 and query.device.type == "cpu" and plain) \
            or (causal and query.shape[2] > 1 and attention_mask is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Scaling the [.., Q, D] query costs less than scaling the [.., Q, K] scores; the matmul's backward needs its
    # inputs, not its output, so the mask may be applied to the scores in place.
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill_(attention_mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            scores = scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(rand_dropout(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sdpa_rand_dropout_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # without it, transformers builds no padding mask


def use_rand_dropout(model: nn.Module) -> int:
    """Swap ``model``'s ``nn.Dropout`` modules for :class:`RandDropout` and, if it runs transformers' SDPA attention,
    point it at :func:`sdpa_rand_dropout_attention`; returns the number of dropout modules swapped. Parameters,
    state dict and saved config are unchanged (``_attn_implementation`` is not written to config.json)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, RandDropout(child.p, child.inplace))
                swapped += 1
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(sub, "set_attn_implementation"):
            _register_attention()
            sub.set_attn_implementation(ATTENTION_NAME)
            break
    return swapped
