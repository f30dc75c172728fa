"""Process-group setup and the few collectives the trainer needs.

In a plain process (no ``torchrun``) rank is 0 of 1 and every collective is the identity; under ``torchrun`` its
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) select the group.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distill.errors import DistillError

T = TypeVar("T")


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
_TIMEOUT_S = 1800.0  # init_distributed's timeout_s, named by collective_error


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun prepared, pick the device, and return this rank's :class:`DistInfo`.

    ``backend=None`` picks ``cuda:nccl,cpu:gloo`` when CUDA is available (NCCL for GPU tensors, gloo for the few CPU
    tensors some collectives carry, such as pickled objects and counters; an NCCL-only group raises on those) and
    gloo otherwise. ``timeout_s`` bounds how long a collective waits for a dead peer before raising, so a killed rank
    makes the others exit instead of hanging.
    """
    global _INFO, _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend or default_backend(device), timeout=timeout,
                                device_id=device if device.type == "cuda" else None,
                                **_restart_safe_store(rank, world_size, timeout))
    _INFO = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    return _INFO


def default_backend(device: torch.device) -> str:
    """The process-group backend for ``device``: every collective must work on CPU tensors as well as on the device."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """After a torchrun restart, a store namespace of this attempt's own.

    torchrun's agent keeps one TCPStore for the whole job and every worker generation writes its bootstrap keys under
    the same names, so workers restarted by ``--max-restarts`` would read the dead generation's addresses and hang in
    ``init_process_group``. Prefixing the keys with the agent's restart count keeps generations apart.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"distill/attempt-{attempt}", store), "rank": rank, "world_size": world_size}


def collective_error(error: BaseException) -> DistillError | None:
    """The one-line error for a failed process-group start or collective (a torch.distributed error or a gloo
    RuntimeError), naming ``training.dist_timeout_s`` when it timed out; None for any other error."""
    text = str(error)
    if not isinstance(error, dist.DistError) and not (isinstance(error, RuntimeError) and "/gloo/" in text):
        return None
    detail = " ".join(re.sub(r"^\[[^\]]*\] ", "", text).split())[:200]
    if re.search(r"timed out|timeout", detail, re.IGNORECASE):
        return DistillError(f"a collective timed out after training.dist_timeout_s={_TIMEOUT_S:g} s (a rank died or "
                            f"is stuck, or the timeout is shorter than a step, a save or data preparation): {detail}")
    return DistillError(f"a collective failed, probably because another rank stopped (see its error): {detail}")


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank and return it everywhere."""
    if not is_distributed():
        return obj
    holder = [obj if _INFO.rank == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def on_main(fn: Callable[[], T], failed: str, keep: tuple[type[Exception], ...] = ()) -> T:
    """``fn()`` run by rank 0 alone, its result returned on every rank (collective; ``fn`` must call no collective).
    If it raises, rank 0 re-raises the error and every other rank raises it too when it is one of ``keep``, else a
    one-line DistillError ``{failed}: {type}: {message}``: a rank-0 failure stops every rank instead of a hang."""
    outcome: tuple[bool, Any] = (True, None)
    error: Exception | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:  # noqa: BLE001 - any rank-0 failure must reach the other ranks
            error = e
            message = f"{failed}: {type(e).__name__}: {' '.join(str(e).split())}"
            outcome = (False, e if isinstance(e, keep) else DistillError(message))
    ok, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the *sum over ranks* of the gradient of its slice.

    Every rank's loss uses every rank's rows, so a local row's gradient sums what all ranks' losses send it: an
    all-reduce of the full gradient, then the local slice (unlike reduce-scatter, gloo supports it).
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
