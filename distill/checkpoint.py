"""Crash-safe training checkpoints, the resume policy over a run folder, and one run per run folder.

A checkpoint ``{run_dir}/checkpoints/phase{p}-step{s:08d}/`` holds ``model.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt`` (fp16 only), ``rng.pt`` (every rank's RNG states) and ``state.json`` (where training
stands, the resolved config); ``MANIFEST.json`` (size and sha256 of each, :mod:`distill.manifest`) is written last.
Rank 0 writes into ``.tmp-<name>/``, renames it into place, then prunes beyond ``keep_last``: a kill or a full disk
never corrupts the last good checkpoint. Loading verifies the manifest before reading; :func:`load_latest` skips,
with one warning line each, any checkpoint that is incomplete, corrupt or does not load. ``--resume-from`` names the
checkpoint instead (never a fallback); ``{run_dir}/best`` holds the best evaluated state (``eval.select_best``).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distill import distributed as D
from distill.atomic import fresh_tmp_dir, replace_dir, write_json_atomic
from distill.errors import CheckpointError, DistillError
from distill.export import save_model_atomic
from distill.manifest import MANIFEST, ManifestError, verify_manifest, write_manifest

log = logging.getLogger(__name__)

# Parts every checkpoint has (scaler.pt only with fp16).
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
DONE_MARKER = "DONE"  # in the run folder: the phases a finished run trained and exported
BEST_JSON = "best.json"  # in {run_dir}/best (eval.select_best): which evaluation it is, its score and results
# Keys that may change between a run and its resume without changing what is trained.
RESUME_TOLERANT = {("training", k) for k in ("save_steps", "keep_last", "logging_steps", "dist_timeout_s",
                                             "num_threads", "precision", "cpu_tuning", "skip_phase1", "skip_phase2",
                                             "save_to_artifacts", "report_to", "push_to_hub", "hub_model_id",
                                             "hub_private")}


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
    write_manifest(tmp)  # last, fsynced: the checkpoint is complete once it exists
    replace_dir(tmp, final)  # the same step saved again (a phase end right after a periodic save) replaces it
    prune(root, keep_last)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (by phase then step, as encoded in the name)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("phase"))


def prune(root: Path, keep_last: int) -> None:
    complete = [p for p in list_checkpoints(root) if (p / MANIFEST).is_file()]
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


def _torch_load(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


def _load_rng(path: Path) -> list[dict[str, torch.Tensor]]:
    states = _torch_load(path)
    if not isinstance(states, list) or not states or not all(
        isinstance(s, dict) and isinstance(s.get("torch"), torch.Tensor) and s["torch"].dtype == torch.uint8
        for s in states
    ):
        raise TypeError("not a list of per-rank RNG states")
    return states


def _load_meta(path: Path) -> tuple[TrainState, dict[str, Any]]:
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta.get("config"), dict):
        raise TypeError("no config")
    return TrainState(**meta["state"]), meta["config"]


def _load_part(path: Path, load: Callable[[Path], Any]) -> Any:
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable part makes the whole checkpoint unusable
        raise CheckpointError(f"{path.parent}: {path.name} is unreadable ({type(e).__name__}: {e})"
                              .splitlines()[0]) from None


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify one checkpoint against its manifest, then read it.

    Raises :class:`CheckpointError` (one line naming the checkpoint and the file) when the manifest is missing or
    malformed, a file is missing or does not match its size or sha256, or a part does not load.
    """
    try:
        listed = verify_manifest(path, REQUIRED)["files"]
    except ManifestError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state, config = _load_part(path / "state.json", _load_meta)
    return LoadedCheckpoint(
        path=path,
        model_state=_load_part(path / "model.safetensors", lambda p: load_file(str(p))),
        optimizer_state=_load_part(path / "optimizer.pt", _torch_load),
        scheduler_state=_load_part(path / "scheduler.pt", _torch_load),
        scaler_state=_load_part(path / "scaler.pt", _torch_load) if "scaler.pt" in listed else None,
        rng_states=_load_part(path / "rng.pt", _load_rng),
        state=state,
        config=config,
    )


def load_latest(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies and loads; each broken newer one is skipped with one warning line."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s; falling back to the previous one", e)
    return None


def check_resume_path(path: str | Path | None) -> Path | None:
    """``--resume-from PATH``: ``path`` if it is a complete checkpoint folder (None if None), else a one-line
    CheckpointError naming it (cheap: its files are verified against the manifest when it is loaded)."""
    if path is None:
        return None
    if not (path := Path(path)).is_dir():
        raise CheckpointError(f"--resume-from {path}: no such checkpoint folder")
    if not (path / MANIFEST).is_file():
        inside = [p.name for p in list_checkpoints(path / "checkpoints")]
        hint = f"; its checkpoints: {', '.join(inside)}" if inside else ""
        raise CheckpointError(f"--resume-from {path}: not a complete checkpoint folder (no {MANIFEST}){hint}")
    return path


def load_model_state(model: torch.nn.Module, ckpt: LoadedCheckpoint) -> None:
    """``ckpt``'s weights into ``model``; a checkpoint of another model shape is a one-line CheckpointError."""
    mine, theirs = model.state_dict(), ckpt.model_state
    bad = sorted(k for k in mine.keys() | theirs.keys() if k not in mine or k not in theirs
                 or mine[k].shape != theirs[k].shape)
    if bad:
        raise CheckpointError(f"{ckpt.path}: a checkpoint of another model shape ({len(bad)} tensors differ, e.g. "
                              f"{bad[0]}); resume from a checkpoint of this model")
    model.load_state_dict(theirs)


def capture_rng() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def config_diff(old: dict[str, Any], new: dict[str, Any], state: TrainState) -> list[str]:
    """Keys whose change would make the resumed run differ from an uninterrupted one.

    A checkpoint taken at the end of a phase only fixes the model's shape; one taken mid-phase also fixes that phase's
    hyper-parameters, the data, the teacher targets' dtype and the training settings.
    """
    sections = ["model"] if state.phase_done else ["model", f"phase{state.phase}", "data", "cache", "training"]
    out = []
    for section in sections:
        for key, value in (new.get(section) or {}).items():
            if (section, key) not in RESUME_TOLERANT and old.get(section, {}).get(key) != value:
                out.append(f"{section}.{key}")
    return out


def truncate_metrics(path: Path, phase: int, step: int) -> None:
    """Drop log records written after a checkpoint of ``phase`` at ``step`` (the run died after them), so the resumed
    log continues from the checkpoint's step without duplicates or a jump."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        p = {"phase1": 1, "phase2": 2}.get(rec.get("phase"), 0)
        if p < phase or (p == phase and rec.get("step", 0) <= step):
            keep.append(line)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    tmp.replace(path)


def provenance(cfg: Any) -> dict[str, str]:
    """What made a model: the hash of its config (without the keys that do not change the result) and its run."""
    settings = {section: {k: v for k, v in values.items() if (section, k) not in RESUME_TOLERANT}
                for section, values in cfg.to_dict().items()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return {"config_sha256": digest, "run_dir": str(cfg.run_dir.resolve())}


def check_artifact(cfg: Any) -> None:
    """Refuse to replace a published artifact that another config or run made (``--overwrite`` does)."""
    summary = cfg.artifact_dir / "distill_summary.json"
    if not cfg.artifact_dir.exists():
        return
    try:
        theirs = json.loads(summary.read_text(encoding="utf-8")).get("provenance")
    except (OSError, ValueError):
        theirs = None
    if theirs != provenance(cfg):
        made_by = f"run {theirs['run_dir']}" if isinstance(theirs, dict) and "run_dir" in theirs else "an unknown run"
        raise DistillError(f"{cfg.artifact_dir} holds a model made by {made_by} with another config; pass "
                           "--overwrite to replace it, or set model.model_name or paths.artifacts_dir")


class CheckpointManager:
    """A run folder's checkpoints, phase results and DONE marker, and the resume policy over them.

    Collective methods (every rank calls them) are marked so; rank 0 alone reads the folder to choose and writes.
    """

    def __init__(self, run_dir: Path, keep_last: int):
        self.run_dir = run_dir
        self.ckpt_dir, self.best_dir = run_dir / "checkpoints", run_dir / "best"
        self.keep_last = keep_last

    def resume_point(self, config: dict[str, Any], *, allow_config_change: bool = False,
                     named: str | Path | None = None) -> LoadedCheckpoint | None:
        """The checkpoint to resume from, or None to start afresh (collective: rank 0 chooses, every rank loads it).

        ``named`` (``--resume-from``): that checkpoint folder (of this run folder or of another run of the same
        model) instead of the newest; one that is missing, not a checkpoint or fails its manifest is an error, never
        a fallback. This run folder's checkpoints after it (by phase and step) and a best/ evaluated after it move to
        ``{run_dir}/superseded/``: the resumed run numbers its steps as the uninterrupted run would, and an automatic
        resume after a crash continues it, not the abandoned steps. Raises :class:`CheckpointError` (on every rank)
        for those and when the config changed in a way that would change the result.
        """
        ckpt, error = None, None
        if D.is_main():
            try:
                ckpt = load_checkpoint(check_resume_path(named)) if named else load_latest(self.ckpt_dir)
            except CheckpointError as e:
                error = str(e) if str(e).startswith("--resume-from") else f"--resume-from {e}"
        path, error = D.broadcast_object((str(ckpt.path) if ckpt else None, error))
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            if D.is_main():  # a best/ left by a run that is not continued must not become this run's final model
                self.set_aside([self.best_dir], "a new run starts in this folder")
            return None
        if ckpt is None:
            ckpt = load_checkpoint(Path(path))
        changed = config_diff(ckpt.config, config, ckpt.state)
        if changed and not allow_config_change:
            raise CheckpointError(
                f"{ckpt.path}: the config changed since this checkpoint ({', '.join(changed[:5])}); resume with the "
                "original config, pass --allow-config-change, or --overwrite to start afresh"
            )
        if D.is_main():
            truncate_metrics(self.run_dir / "metrics.jsonl", ckpt.state.phase, ckpt.state.step)
            if named:
                later = [p for p in list_checkpoints(self.ckpt_dir) if p.name >= ckpt.path.name
                         and p.resolve() != ckpt.path.resolve()]
                best = self.read_best()
                if best and (best["phase"], best["step"]) > (f"phase{ckpt.state.phase}", ckpt.state.step):
                    later.append(self.best_dir)
                self.set_aside(later, f"the run resumes from {ckpt.path.name}")
        return ckpt

    def set_aside(self, paths: list[Path], why: str) -> None:
        """Move the existing ``paths`` into ``{run_dir}/superseded/`` (replacing older ones of the same name)."""
        paths = [p for p in paths if p.exists()]
        aside = self.run_dir / "superseded"
        for p in paths:
            aside.mkdir(exist_ok=True)
            shutil.rmtree(aside / p.name, ignore_errors=True)
            os.replace(p, aside / p.name)
        if paths:
            log.warning("moved %s to %s: %s", ", ".join(p.name for p in paths), aside, why)

    def read_best(self) -> dict[str, Any] | None:
        """``best/best.json``: the best evaluation so far (metric, score, phase, step, results), or None."""
        try:
            return json.loads((self.best_dir / BEST_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def offer_best(self, cfg: Any, results: dict[str, Any], phase: str, step: int, export: Callable[[], Any]) -> None:
        """``eval.select_best`` (rank 0, no collectives): when ``results`` score higher than the best so far (its
        results rescored, so a changed metric compares like with like), save ``export()`` to ``best/`` atomically,
        with ``best.json`` inside."""
        from distill.evaluate import BestMetric

        select, best = BestMetric.from_config(cfg), self.read_best()
        if select is None or (best is not None and not select.score(results) > select.score(best["results"])):
            return
        record = {"metric": select.text, "score": select.score(results), "phase": phase, "step": step}
        save_model_atomic(export(), self.best_dir, extra_files={BEST_JSON: json.dumps({**record, "results": results})})
        log.info("eval.select_best: new best %s %.4f at %s step %d, saved to %s", select.text, record["score"], phase,
                 step, self.best_dir)

    def final_model(self, cfg: Any, export: Callable[[], Any],
                    results: dict[str, Any] | None) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
        """(model, its eval results, best record) for the final export (rank 0): with ``eval.select_best`` the best
        evaluated state, loaded from ``best/``, and its record (metric, score, phase, step); else ``export()``."""
        from distill.evaluate import BestMetric

        select, best = BestMetric.from_config(cfg), self.read_best()
        if select is None or best is None:
            if select is not None:
                log.warning("eval.select_best: nothing saved in %s; the final model is the last step", self.best_dir)
            return export(), results, None
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(self.best_dir), device="cpu", trust_remote_code=cfg.model.trust_remote_code)
        results = best.pop("results")
        best.update(metric=select.text, score=select.score(results))
        log.info("final model: the best evaluated state by %s (%.4f), %s step %d, not the last step", select.text,
                 best["score"], best["phase"], best["step"])
        return model, results, best

    def save(self, name: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scaler: Any | None, state: TrainState, config: dict[str, Any]) -> None:
        """Checkpoint ``name`` with every rank's RNG state (collective)."""
        rng, error = D.all_gather_object(capture_rng()), None
        if D.is_main():
            try:
                save_checkpoint(self.ckpt_dir, name, model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, rng_states=rng, state=state, config=config, keep_last=self.keep_last)
            except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its zip writer
                error = (f"{self.ckpt_dir / name}: cannot write the checkpoint (disk full, read-only or no "
                         f"permission?): {type(e).__name__}: {e}").splitlines()[0]
        if (error := D.broadcast_object(error)) is not None:  # every rank stops, the previous checkpoints stay
            raise CheckpointError(error)

    def phase_weights(self, phase: int) -> Path:
        return self.run_dir / f"phase{phase}" / "model.safetensors"

    def save_phase_weights(self, phase: int, model: torch.nn.Module) -> None:
        """The weights at the end of ``phase``, which a later phase-2-only run starts from (collective)."""
        if D.is_main():
            out = self.phase_weights(phase)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".tmp-{out.name}")
            save_file(state_dict_for_save(model), str(tmp))
            tmp.replace(out)
        D.barrier()

    def find_phase1(self, output_dir: Path, model_name: str, phase1_from: str | None) -> Path:
        """The phase-1 weights a phase-2-only run starts from.

        ``phase1_from`` names an experiment in ``output_dir``, a run folder or a weights file. Without it: this run's
        own phase-1 result, else the only one of another experiment of the same model (``{model_name}-*``) in
        ``output_dir``; several are an error that lists them.
        """
        if phase1_from:
            given = Path(phase1_from)
            for path in (given, given / "phase1" / "model.safetensors", given / "model.safetensors",
                         output_dir / phase1_from / "phase1" / "model.safetensors"):
                if path.is_file():
                    return path
            raise CheckpointError(f"training.phase1_from: '{phase1_from}' is neither a phase-1 weights file, a run "
                                  f"folder with phase1/model.safetensors, nor an experiment in {output_dir}")
        if self.phase_weights(1).is_file():
            return self.phase_weights(1)
        found = sorted(output_dir.glob(f"{glob.escape(model_name)}-*/phase1/model.safetensors"))
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.parent.parent.name for p in found)
            raise CheckpointError(f"training.skip_phase1: several phase-1 results of {model_name} in {output_dir} "
                                  f"({names}); set training.phase1_from to one of them")
        raise CheckpointError(f"training.skip_phase1 is true but no phase-1 result exists at {self.phase_weights(1)} "
                              f"nor in another experiment of {model_name} in {output_dir}; run phase 1 first or set "
                              "training.phase1_from")

    @staticmethod
    def load_weights(path: Path, model: torch.nn.Module) -> None:
        try:
            model.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot load into this model ({e})".splitlines()[0]) from None

    def finished_phases(self) -> list[int]:
        """Phases a previous run of this experiment completed and exported (read from its DONE marker)."""
        try:
            return list(json.loads((self.run_dir / DONE_MARKER).read_text(encoding="utf-8"))["phases"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def mark_done(self, phases: list[int]) -> None:
        write_json_atomic(self.run_dir / DONE_MARKER, {"phases": sorted(set(self.finished_phases()) | set(phases))})


class RunLock:
    """One run per run folder: rank 0 holds an exclusive ``fcntl.flock`` on ``{output_dir}/.{experiment}.lock``
    (beside the run folder, which ``--overwrite`` replaces), recording the holder (pid, host, start time) for a second
    run's one-line error. The kernel drops the lock when the holder dies, SIGKILL included: no stale locks. On NFS it
    holds across hosts with NFSv4; elsewhere only against runs on the same host.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self._file: Any = None

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock on rank 0 (collective: every rank calls it, only rank 0 locks).

        Raises :class:`DistillError` on every rank when another run holds it; release the returned lock when the run
        ends.
        """
        lock = cls(run_dir)
        D.on_main(lock.take, "cannot lock the run folder", keep=(DistillError,))
        return lock

    def take(self) -> None:
        """Lock now (this process only) or raise :class:`DistillError` naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = " ".join(f.read().split()) or "another process"
            f.close()
            raise DistillError(f"run folder {self.run_dir} is in use by {holder}; wait for that run to end or use "
                               "another paths.output_dir") from None
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
