"""Process-group setup and the few collectives the trainer needs.

Everything here works in a plain single process too (no ``torchrun``): then rank is 0, world size 1,
and every collective is the identity. Under ``torchrun`` the usual environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) select the process group;
multi-node rendezvous is torchrun's job, not ours.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def env_world_size() -> int:
    """World size announced by torchrun (1 when launched as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun prepared, pick the device, and return this rank's :class:`DistInfo`.

    ``backend=None`` picks NCCL when CUDA is available and gloo otherwise. ``timeout_s`` bounds how long a
    collective waits for a dead peer before raising, so a killed rank makes the others exit instead of hanging.
    """
    global _INFO
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **_restart_safe_store(rank, world_size, timeout),
        )
    _INFO = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    return _INFO


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """After a torchrun restart, a store namespace of this attempt's own.

    torchrun's agent keeps one TCPStore for the whole job, and with the static rendezvous every worker generation
    writes its process-group bootstrap keys under the same names; workers restarted by ``--max-restarts`` then read
    the dead generation's addresses and hang in ``init_process_group`` (seen with torch 2.13 + gloo). Prefixing the
    keys with the agent's restart count (the same for every worker it starts) keeps generations apart. The first
    attempt keeps torch's default path.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"distill/attempt-{attempt}", store), "rank": rank, "world_size": world_size}


def get_info() -> DistInfo:
    """The :class:`DistInfo` of this process (rank 0 of 1 on CPU before :func:`init_distributed`)."""
    return _INFO


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return _INFO.rank == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` over ranks (returned as a new tensor; the input is untouched)."""
    out = value.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    out = value.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank and return it everywhere."""
    if not is_distributed():
        return obj
    holder = [obj if _INFO.rank == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the *sum over ranks* of the gradient of its slice.

    Every rank's loss uses every rank's rows, so the gradient of a local row is the sum of the gradients
    that all ranks' losses send to it; an all-reduce of the full gradient followed by taking the local
    slice computes exactly that (and, unlike reduce-scatter, is supported by gloo).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n, ...] of every rank along dim 0 -> [world*n, ...]; gradients flow back to every rank.

    All ranks must pass the same shape. Note that DDP then *averages* parameter gradients over ranks, so a
    loss that is a mean over the local rows gives the same gradients as one process on the whole batch.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX; Arm's BF16 extension).

    Without it bf16 matmuls are emulated and run *slower* than fp32 ones: see :func:`emulated_bf16_cost`.
    """
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 1 << 30


def is_glibc_linux() -> bool:
    """Whether this process runs on Linux with glibc, whose ``mallopt`` :func:`keep_freed_memory` calls."""
    import platform
    import sys

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of giving it back to the OS; True if it could.

    A training step allocates and frees the same activations every time. By default glibc serves blocks above a
    dynamic threshold (128 KB at first) with ``mmap`` and unmaps them on ``free``, and trims the top of its heap, so
    a later step can get fresh pages again: one page fault per 4 KB touched. With ``mmap`` only above 32 MB and no
    trimming below 1 GB free, steps reuse the heap's pages: in a micro-benchmark of the CPU demo student's step
    (with ``sparse_table_grad``) 1,200 faults per step instead of 17,600-23,100; in the whole trainer 20-40 % fewer,
    the rest being oneDNN's JIT code for new shapes (docs/PERFORMANCE.md). Linux with glibc only; a no-op returning
    False elsewhere (macOS, musl) or when the environment already sets ``MALLOC_*`` / ``GLIBC_TUNABLES`` values (the
    user's choice).
    """
    import ctypes

    if not is_glibc_linux():
        return False
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(mmap_set and trim_set)


def emulated_bf16_cost() -> str:
    """How much slower than fp32 bf16 runs on a CPU without native bf16, by the vector unit torch uses, as measured
    (torch 2.13, 2 cores): AVX-512 3-4x (Ice Lake Xeon: 2048^2 matmul fp32 227, bf16 61 GFLOP/s; training 0.32-0.36x
    as fast as fp32), AVX2 only ~30x for a training step and ~400x for a large matmul (EPYC without AVX-512: matmul
    fp32 125, bf16 0.3 GFLOP/s; all-MiniLM-L6-v2 training step 1.03 s fp32, 29.3 s bf16)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "3-4x slower than fp32"
    if capability == "AVX2":
        return "~30x slower than fp32 for a training step (~400x for a large matmul)"
    return "slower than fp32"


def resolve_precision(requested: str, device: torch.device, *, cached_infonce: bool = False) -> tuple[str, str]:
    """The autocast precision to train in, and why: ``(precision, reason)``.

    ``auto`` picks bf16 where the hardware multiplies it (CUDA GPUs with bf16, i.e. Ampere and newer; CPUs with
    AVX512-BF16 / AMX), fp16 with a grad scaler on older GPUs (fp32 when ``cached_infonce``, which refuses fp16),
    and fp32 on other CPUs. An explicit value is kept; the reason then says when it will be slow.
    """
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested != "auto":
            return requested, "" if bf16 or requested != "bf16" else "this GPU has no native bf16"
        if bf16:
            return "bf16", "the GPU supports bf16"
        return ("fp32", "no bf16 on this GPU, and cached_infonce refuses fp16") if cached_infonce else \
            ("fp16", "no bf16 on this GPU: fp16 with a grad scaler")
    native = cpu_has_native_bf16()
    if requested == "auto":
        return ("bf16", "the CPU has AVX512-BF16 / AMX") if native else \
            ("fp32", f"the CPU has no AVX512-BF16 / AMX, where bf16 matmuls run emulated, {emulated_bf16_cost()}")
    if requested == "bf16" and not native:
        return "bf16", (f"the CPU has no AVX512-BF16 / AMX: bf16 matmuls run emulated, {emulated_bf16_cost()}; "
                        "set training.precision to auto or fp32")
    return requested, ""
