"""Crash-safe training checkpoints: a kill, a preemption or a full disk never corrupts the last good one.

Layout of one checkpoint, ``{run_dir}/checkpoints/phase{p}-step{s:08d}/``::

    model.safetensors      student (+ head) weights
    optimizer.pt           AdamW state        (torch.save; loaded with weights_only=True)
    scheduler.pt           LR scheduler state
    scaler.pt              fp16 grad scaler state (only with fp16)
    rng.pt                 every rank's torch (and CUDA) RNG state, in rank order
    state.json             phase, step, epoch, next micro-batch, counters, the resolved config
    COMPLETE               written last: a checkpoint without it is ignored

Rank 0 writes everything into ``.tmp-<name>/`` (each file flushed and fsynced), renames the folder into place,
fsyncs the parent, and only then deletes checkpoints beyond ``keep_last``. Loading walks checkpoints newest first and
skips (with a warning) any that is incomplete or unreadable.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distill.atomic import fresh_tmp_dir, fsync_file, replace_dir
from distill.errors import CheckpointError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped."""

    phase: int
    step: int = 0  # optimizer steps done in this phase
    epoch: int = 0
    micro: int = 0  # index of the next micro-batch of ``epoch``
    phase_done: bool = False
    nonfinite_skipped: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors that share storage (tied weights) are stored once per name, cloned."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    root: Path,
    name: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    rng_states: list[dict[str, torch.Tensor]],
    state: TrainState,
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Atomically write checkpoint ``root/name`` (rank 0 only) and prune old ones beyond ``keep_last``."""
    final = root / name
    tmp = fresh_tmp_dir(final)
    save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump({"state": state.__dict__, "config": config}, f, indent=2)
    (tmp / COMPLETE).write_text("ok\n")
    fsync_file(tmp / COMPLETE)
    replace_dir(tmp, final)  # the same step saved again (a phase end right after a periodic save) replaces it
    prune(root, keep_last)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (by phase then step, as encoded in the name)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("phase"))


def prune(root: Path, keep_last: int) -> None:
    complete = [p for p in list_checkpoints(root) if (p / COMPLETE).is_file()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():  # leftovers of a save that was killed half-way
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    scaler_state: dict[str, Any] | None
    rng_states: list[dict[str, torch.Tensor]]
    state: TrainState
    config: dict[str, Any]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read one checkpoint; raises :class:`CheckpointError` when it is incomplete or unreadable."""
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker)")
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        scaler_path = path / "scaler.pt"
        return LoadedCheckpoint(
            path=path,
            model_state=load_file(str(path / "model.safetensors")),
            optimizer_state=torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            scheduler_state=torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
            scaler_state=torch.load(scaler_path, weights_only=True) if scaler_path.exists() else None,
            rng_states=torch.load(path / "rng.pt", weights_only=True, map_location="cpu"),
            state=TrainState(**meta["state"]),
            config=meta["config"],
        )
    except Exception as e:  # noqa: BLE001 - any unreadable part makes the whole checkpoint unusable
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None


def load_latest(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that loads; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def capture_rng() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
