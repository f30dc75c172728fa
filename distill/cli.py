"""The one command line of the project: ``python -m distill COMMAND`` (installed as ``distill``).

    python -m distill train --config configs/default.yaml [--set SECTION.KEY=VALUE] [--overwrite] [--resume-from P]
    python -m distill plan --config configs/default.yaml            # = train --dry-run: validate, print the plan
    python -m distill cache --config configs/default.yaml [--dry-run]  # fill (or count) the teacher cache
    python -m distill evaluate --model PATH --data BEIR_FOLDER_OR_HUB_ID [--teacher ID] [--dims 768,256,64]
    python -m distill evaluate --model PATH --mteb-tasks NFCorpus,SciFact   # MTEB (pip install 'distill[mteb]')
    torchrun --nproc-per-node=8 -m distill train --config configs/default.yaml   # any command under torchrun

``train_ddp.py`` is ``train`` with its own program name (:func:`train_main`). Every command shares the logging
setup and the error handling of :func:`run_guarded`: a :class:`~distill.errors.DistillError` prints one
``error: ...`` line and exits 2, a preemption exits 0 after its checkpoint. Heavy modules (the trainer, models,
data) are imported inside the commands, after the arguments and the config were checked, so a mistake fails fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, DistillError, Preempted

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "bm25s")


def setup_logging(level: str) -> None:
    """Log ``level`` and up on rank 0, warnings and up on the other ranks, each line tagged with the rank."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in NOISY_LOGGERS:  # bm25s sets its own logger to DEBUG
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_guarded(command: Callable[[], int]) -> int:
    """Run ``command`` the way every CLI entry does: expected failures become one ``error:`` line and status 2,
    a preemption (checkpoint saved) status 0; the process group, if any, is always torn down."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return command()
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return 0
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from distill.distributed import collective_error

        if (error := collective_error(e)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        from distill.distributed import shutdown

        shutdown()


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _load(args: argparse.Namespace) -> Any:
    from distill.config import load_config

    return load_config(args.config, args.overrides)


def _plan(args: argparse.Namespace) -> int:
    from distill.plan import print_plan

    print_plan(_load(args), nproc=args.nproc, gpu=args.gpu)
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _plan(args)
    cfg = _load(args)
    from distill.trainer import run

    out = run(cfg, overwrite=args.overwrite, allow_config_change=args.allow_config_change, resume_from=args.resume_from)
    if _is_rank0():
        print(f"model: {out}")
    return 0


def format_cache_report(cache_dir: Path, report: dict[str, dict[str, Any]], dry_run: bool) -> str:
    """The table ``cache`` prints: per phase and role the cached / missing texts (dry run), else forward passes."""
    lines = [f"teacher cache {cache_dir}"]
    for phase, row in report.items():
        if dry_run:
            lines += [f"  {phase:7s} {role:9s} {n['texts']:>9,} texts  {n['cached']:>9,} cached  "
                      f"{n['missing']:>9,} to compute" for role, n in row.items()]
        else:
            lines.append(f"  {phase:7s} teacher forward passes: {row['teacher_forward_passes']:,}")
    return "\n".join(lines)


def _cache(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from distill.teacher_targets import precompute

    report = precompute(cfg, dry_run=args.dry_run)
    if _is_rank0():
        print(format_cache_report(cfg.cache_root / "teacher", report, args.dry_run))
    return 0


def parse_dims(text: str | None) -> list[int] | None:
    """``--dims 768,256,64`` -> [768, 256, 64]; None when not given."""
    if not text:
        return None
    try:
        dims = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--dims {text!r}: expected comma-separated integers such as 768,256,64") from None
    if any(d < 1 for d in dims):
        raise ConfigError(f"--dims {text!r}: dims must be positive")
    return dims or None


def _evaluate(args: argparse.Namespace) -> int:
    from distill import report
    from distill.evaluate import evaluate_model

    results, out_dir = evaluate_model(args.model, args.data, teacher=args.teacher, dims=parse_dims(args.dims),
                                      split=args.split, batch_size=args.batch_size, out=args.out,
                                      trust_remote_code=args.trust_remote_code, max_tokens=args.max_tokens_per_batch,
                                      mteb_tasks=[t.strip() for t in (args.mteb_tasks or "").split(",") if t.strip()])
    if results.get("rows"):
        print(report.format_eval_table(results))
    if results.get("mteb"):
        print(report.format_mteb_table(results["mteb"]))
    print(f"\nwrote {out_dir / 'eval.json'} and {out_dir / 'report.md'}")
    return 0


def _logging_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p


def _config_parent() -> argparse.ArgumentParser:
    """--config and --set, shared by the commands that read a config (plus --log-level)."""
    p = argparse.ArgumentParser(add_help=False, parents=[_logging_parent()])
    p.add_argument("--config", required=True, help="YAML config (sections model, phase1, phase2, training, paths, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set phase2.temperature=0.05; repeatable")
    return p


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    from distill.plan import GPU_PEAK_BF16

    p.add_argument("--nproc", type=int, default=None,
                   help="GPUs to plan for (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--gpu", default="H100", choices=sorted(GPU_PEAK_BF16), help="GPU type to plan for")
    p.set_defaults(func=_plan)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (with --nproc / --gpu); load no weights, train nothing")
    _add_plan_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="retrain an experiment that already finished")
    p.add_argument("--resume-from", default=None, metavar="PATH",
                   help="resume from this checkpoint folder ({run}/checkpoints/phase{P}-step{S}, or another run's of "
                   "the same model) instead of the newest; this run folder's later checkpoints move to superseded/")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume from a checkpoint even though the config changed since it was written")
    p.set_defaults(func=_train)


def _add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="count cached and missing texts; load no model")
    p.set_defaults(func=_cache)


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="student folder (sentence-transformers format)")
    p.add_argument("--data", default=None, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/{split}.tsv) or a "
                   "Hub dataset in BEIR layout (mteb/scifact, BeIR/scifact, zeta-alpha-ai/NanoSciFact)")
    p.add_argument("--mteb-tasks", default=None, help="comma-separated MTEB tasks, e.g. NFCorpus,SciFact (needs mteb)")
    p.add_argument("--teacher", default=None, help="teacher hub id or folder (adds reference and drop-in rows)")
    p.add_argument("--dims", default=None, help="comma-separated student dims to evaluate, e.g. 768,256,64")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encode batch (the most, with a token budget)")
    p.add_argument("--max-tokens-per-batch", type=int, default=None, metavar="N",
                   help="length-sorted encode batches of <= N padded tokens (default: --batch-size texts a batch)")
    p.add_argument("--out", default=None, help="output folder (default: the model folder)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """``python -m distill`` with one sub-parser per command."""
    p = argparse.ArgumentParser(prog="python -m distill",
                                description="Distill a large text-embedding teacher into a small student.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (
        ("train", "distill the teacher into the student (run under torchrun for DDP)", _config_parent,
         _add_train_arguments),
        ("plan", "validate a config and print what training would do (= train --dry-run)", _config_parent,
         _add_plan_arguments),
        ("cache", "fill the teacher embedding cache ahead of training (also under torchrun)", _config_parent,
         _add_cache_arguments),
        ("evaluate", "retrieval metrics of a student (and its teacher) on a BEIR set, and MTEB", _logging_parent,
         _add_evaluate_arguments),
    )
    for name, summary, parent, add_arguments in commands:
        add_arguments(sub.add_parser(name, parents=[parent()], help=summary, description=summary))
    return p


def _dispatch(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    return run_guarded(lambda: args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill COMMAND ...``; returns the exit status."""
    return _dispatch(build_parser().parse_args(argv))


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train_ddp.py --config X [--set ...] [--dry-run] [--overwrite] [--resume-from PATH] [--allow-config-change]``:
    ``train``."""
    p = argparse.ArgumentParser(
        prog="train_ddp.py", parents=[_config_parent()],
        description="Distill a large embedding teacher into a small student (run under torchrun for DDP).",
    )
    _add_train_arguments(p)
    return _dispatch(p.parse_args(argv))
