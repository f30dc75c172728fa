"""Everything that depends on the hardware: the training precision, and the CPU tuning behind ``training.cpu_tuning``.

* :func:`resolve_precision`: ``precision: auto`` is bf16 on GPUs that multiply bf16 natively, fp16 (grad scaler) on
  older GPUs, fp32 on CPUs, or bf16 on CPUs with AVX512-BF16 / AMX when the CPU tuning is on.
* :func:`apply_cpu_tuning`, the one call that tunes a CPU run, swaps the student's dropout for :func:`rand_dropout`.
  ``F.dropout`` on CPU draws one Mersenne Twister number per element; here each 64-bit ``random_`` draw on int64
  (uniform on [0, 2^63)) gives four masks, its 16-bit lanes cut to 15 bits. ``nn.Dropout``'s maths, p on a 2^-15 grid::

      t = round(p * 2^15),  keep = L >= t   (P(keep) = q = 1 - t / 2^15, |q - (1 - p)| <= 2^-16)
      y = x * keep / q                      dy/dx = keep / q      (so E[y] = x exactly)

  The stream is torch's default generator (seeded per rank, restored by checkpoints, replayed by GradCache).
  ``nn.Dropout`` modules are swapped, and transformers' SDPA attention is pointed at
  :func:`sdpa_rand_dropout_attention`: the only use of transformers' attention internals in the project; if they
  change, the tuning is skipped with a warning.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

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


def apply_cpu_tuning(student: nn.Module, device: torch.device) -> bool:
    """The CPU tuning of a training run (``training.cpu_tuning``): the faster dropout on a CPU device; a no-op on
    other devices, whose native kernels draw the mask inside one fused kernel. Returns whether it was applied; a
    failure (e.g. a transformers version whose attention interface moved) is a warning, not an error."""
    if device.type != "cpu":
        return False
    try:
        swapped = use_rand_dropout(student)
    except Exception as e:  # noqa: BLE001 - tuning is optional: any failure leaves the stock dropout in place
        log.warning("training.cpu_tuning: the faster CPU dropout could not be applied (%s: %s); training goes on "
                    "with the stock dropout", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    log.info("cpu_tuning: dropout from random_ bit lanes (%d dropout modules swapped)", swapped)
    return True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX; Arm's BF16 extension)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    if amx() or avx512_bf16():
        return True
    try:  # Arm (Graviton 3+, Neoverse V1/N2): the "bf16" feature of /proc/cpuinfo
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.lower().startswith("features") and "bf16" in line.split(":", 1)[-1].split()
                       for line in f)
    except OSError:
        return False


def resolve_precision(requested: str, device: torch.device, *, cpu_tuning: bool = False,
                      cached_infonce: bool = False) -> tuple[str, str]:
    """The autocast precision to train in, and why: ``(precision, reason)``.

    ``auto`` picks bf16 on CUDA GPUs with bf16 (Ampere and newer), fp16 with a grad scaler on older GPUs (fp32 when
    ``cached_infonce``, which refuses fp16), and fp32 on CPUs, or bf16 on CPUs with native bf16 when ``cpu_tuning``.
    An explicit value is kept; the reason then says when it will be slow.
    """
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested != "auto":
            return requested, "" if bf16 or requested != "bf16" else "this GPU has no native bf16"
        if bf16:
            return "bf16", "the GPU supports bf16"
        return ("fp32", "no bf16 on this GPU, and cached_infonce refuses fp16") if cached_infonce else \
            ("fp16", "no bf16 on this GPU: fp16 with a grad scaler")
    if not cpu_tuning:
        return ("fp32", "CPU (training.cpu_tuning off: no bf16 detection)") if requested == "auto" else (requested, "")
    native = cpu_has_native_bf16()
    if requested == "auto":
        return ("bf16", "the CPU has AVX512-BF16 / AMX") if native else \
            ("fp32", "the CPU has no AVX512-BF16 / AMX, where bf16 matmuls run emulated, slower than fp32")
    if requested == "bf16" and not native:
        return "bf16", ("the CPU has no AVX512-BF16 / AMX: bf16 matmuls run emulated, slower than fp32; "
                        "set training.precision to auto or fp32")
    return requested, ""


def teacher_dtype(requested: str, device: torch.device, *, cpu_tuning: bool = False) -> str:
    """``model.teacher_dtype`` resolved: ``auto`` follows :func:`resolve_precision`'s rule for the device."""
    if requested != "auto":
        return requested
    precision = resolve_precision("auto", device, cpu_tuning=cpu_tuning)[0]
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The one autocast context of a forward in ``precision`` (bf16 / fp16 / fp32 = disabled)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
