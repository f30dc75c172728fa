"""Dropout on CPU three ways, side by side in one run: torch's ``F.dropout`` (``bernoulli_``), a mask from
``torch.rand(...) >= p`` (this project's first ``rand_dropout``), and ``distill.hardware.rand_dropout`` (15-bit lanes
of int64 ``random_`` draws, four masks per 64-bit draw).

Each is timed forward + backward (``y = dropout(x); y.backward(g)``) on the two tensors a MiniLM student drops per
layer: the hidden states ``[tokens, 384]`` and the attention probabilities ``[texts, 12, length, length]``, in fp32
and bf16, best of ``--repeats`` timing windows. Prints milliseconds per call and the ratios to ``F.dropout``.

    python benchmarks/bench_dropout.py                   # the shapes of the benchmark's phase 2 forwards
    python benchmarks/bench_dropout.py --texts 32 --length 36
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import format_table, machine_line  # noqa: E402
from distill.hardware import rand_dropout  # noqa: E402


def torch_rand_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The previous version: ``keep = torch.rand(...) >= p`` (one Mersenne Twister draw per element)."""
    return x * torch.rand(x.shape, dtype=torch.float32).ge_(p).to(x.dtype).div_(1.0 - p)


METHODS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "F.dropout (bernoulli_)": lambda x, p: F.dropout(x, p, training=True),
    "torch.rand >= p": torch_rand_dropout,
    "rand_dropout (lanes)": rand_dropout,
}


def time_fwd_bwd(fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, p: float, *, calls: int,
                 repeats: int) -> float:
    """Best-of-``repeats`` seconds per call of forward + backward through ``fn``."""
    grad = torch.ones_like(x)
    best = float("inf")
    for _ in range(repeats + 1):  # the first window warms up allocator and caches
        start = time.perf_counter()
        for _ in range(calls):
            leaf = x.detach().requires_grad_()
            fn(leaf, p).backward(grad)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=8, help="texts per forward (default 8: one phase-2 document chunk)")
    ap.add_argument("--length", type=int, default=80, help="padded length of each text (default 80)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--calls", type=int, default=20, help="calls per timing window")
    ap.add_argument("--repeats", type=int, default=5, help="timing windows; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(torch.get_num_threads()))
    shapes = {"hidden states": (args.texts * args.length, args.hidden),
              "attention probs": (args.texts, args.heads, args.length, args.length)}
    rows, ratios = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for what, shape in shapes.items():
            torch.manual_seed(0)
            x = torch.randn(shape, dtype=dtype)
            ms = {name: 1e3 * time_fwd_bwd(fn, x, args.p, calls=args.calls, repeats=args.repeats)
                  for name, fn in METHODS.items()}
            base = ms["F.dropout (bernoulli_)"]
            dt = str(dtype).removeprefix("torch.")
            for name, value in ms.items():
                rows.append({"dtype": dt, "tensor": f"{what} {list(shape)}", "method": name, "ms": round(value, 3),
                             "speed vs F.dropout": f"{base / value:.2f}x"})
            ratios.append(f"{dt} {what}: lanes / torch.rand {ms['torch.rand >= p'] / ms['rand_dropout (lanes)']:.2f}x"
                          f", lanes / F.dropout {base / ms['rand_dropout (lanes)']:.2f}x")
    print(format_table(rows, ["dtype", "tensor", "method", "ms", "speed vs F.dropout"]))
    print("\n".join(ratios))
    print(f"forward + backward per call, p = {args.p}, best of {args.repeats} windows of {args.calls} calls")


if __name__ == "__main__":
    main()
