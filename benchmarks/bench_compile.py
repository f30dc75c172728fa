"""One student training step at one fixed shape, four ways, side by side in one run: would ``torch.compile``'s fused
kernels pay on this CPU?

The step is phase 1's: the student's forward on ``--texts`` x ``--length`` tokens in training mode, mean pooling,
MSE to a fixed target, backward (no optimizer: the same for every way). The four ways:

- ``eager-bernoulli``: the stock student (torch's ``bernoulli_`` dropout);
- ``eager-lanes``: what the trainer runs on CPU with ``training.cpu_tuning`` (``distill/hardware.py``);
- ``compile-static``: ``torch.compile(forward)`` specialised to this one shape (a real run sees many lengths, so it
  would compile once per length bucket);
- ``compile-dynamic``: ``torch.compile(forward, dynamic=True)``, which is what ``training.compile: true`` does.

Prints the first step's seconds (the compile, from an empty inductor cache unless ``--inductor-cache`` names one), the
steady milliseconds per step (the best of ``--repeats`` windows of ``--steps`` steps, taken in turns across the ways
after two warm-up steps each) and each way's speed against ``eager-lanes``. In bf16 the forward runs
under CPU autocast, as the trainer's ``precision: bf16``.

    python benchmarks/bench_compile.py                              # fp32, 32 texts x 64 tokens; ~6 min on 2 cores
    python benchmarks/bench_compile.py --dtypes fp32,bf16           # bf16 only means something where CPUs have it
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DEFAULT_MODELS, check_models, format_table, machine_line  # noqa: E402
from distill.hardware import use_rand_dropout  # noqa: E402

WAYS = ("eager-bernoulli", "eager-lanes", "compile-static", "compile-dynamic")
BASE = "eager-lanes"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_student(path: Path | str, way: str) -> tuple[torch.nn.Module, Callable[..., object]]:
    """The student in training mode (transformers' default attention: SDPA where the model has it) and the forward
    callable of ``way``."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).train()
    if way == BASE:
        use_rand_dropout(model)
    if way.startswith("compile"):
        return model, torch.compile(model.forward, dynamic=way == "compile-dynamic")
    return model, model.forward


def make_step(model: torch.nn.Module, forward: Callable[..., object], batch: dict[str, torch.Tensor],
              target: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One training step without the optimizer: forward (under CPU autocast unless fp32), mean pooling, MSE,
    backward, gradients dropped."""
    def step() -> None:
        with torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
            out = forward(**batch).last_hidden_state.mean(dim=1)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        model.zero_grad(set_to_none=True)

    return step


def seconds(fn: Callable[[], None], calls: int = 1) -> float:
    """Mean seconds per call of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=32, help="texts per forward (default 32: a phase-1 batch)")
    ap.add_argument("--length", type=int, default=64, help="tokens per text, no padding (default 64)")
    ap.add_argument("--dtypes", default="fp32", help="comma-separated subset of fp32, bf16 (default fp32)")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {', '.join(WAYS)} (default all)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timing window")
    ap.add_argument("--repeats", type=int, default=4, help="timing windows per way, interleaved; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--student", type=Path, default=None,
                    help="student folder (default: all-MiniLM-L6-v2 from scripts/fetch_demo_models.py)")
    ap.add_argument("--inductor-cache", type=Path, default=None,
                    help="inductor's compile cache (default: a new empty folder, so the first step is a cold compile)")
    args = ap.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",")]
    if unknown := [w for w in ways if w not in WAYS]:
        raise SystemExit(f"--ways: unknown {unknown}; choose from {list(WAYS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    student = args.student or check_models(DEFAULT_MODELS)[1]
    print(machine_line(torch.get_num_threads()))
    print(f"student {student}; {args.texts} texts x {args.length} tokens, forward + MSE + backward per step")

    rows = []
    with contextlib.ExitStack() as stack:
        cache = args.inductor_cache or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inductor-")))
        stack.enter_context(mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": str(cache)}))
        for dt in dtypes:
            torch._dynamo.reset()  # the compiled ways of each dtype compile from scratch
            steps, first = {}, {}
            for way in ways:  # build and warm up every way, then time them in turns
                torch.manual_seed(0)
                model, forward = load_student(student, way)
                vocab = model.config.vocab_size
                batch = {"input_ids": torch.randint(vocab // 10, vocab, (args.texts, args.length)),
                         "attention_mask": torch.ones(args.texts, args.length, dtype=torch.long)}
                steps[way] = make_step(model, forward, batch, torch.randn(args.texts, model.config.hidden_size),
                                       DTYPES[dt])
                first[way] = seconds(steps[way])
                seconds(steps[way], 2)
                print(f"[{dt}] {way}: first step {first[way]:.1f} s", flush=True)
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits every way alike
                for way in ways:
                    best[way] = min(best[way], seconds(steps[way], args.steps))
            base = best.get(BASE)
            for way in ways:
                print(f"[{dt}] {way}: {1e3 * best[way]:.1f} ms / step", flush=True)
                # unrounded: format_table shows 3 significant digits, and a tiny model's first step is a few ms
                rows.append({"dtype": dt, "way": way, "first step s": first[way], "ms / step": 1e3 * best[way],
                             f"speed vs {BASE}": f"{base / best[way]:.2f}x" if base else "n/a"})
    print()
    print(format_table(rows, ["dtype", "way", "first step s", "ms / step", f"speed vs {BASE}"]))
    return rows


if __name__ == "__main__":
    main()
