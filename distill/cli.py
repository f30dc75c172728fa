"""Command line of ``train_ddp.py``: parse, validate, then plan (``--dry-run``) or train."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from distill.errors import DistillError, Preempted


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_ddp.py",
        description="Distill a large embedding teacher into a small student (run under torchrun for DDP).",
    )
    p.add_argument("--config", required=True, help="YAML config (sections model, phase1, phase2, training, paths, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set phase2.temperature=0.05; repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no weights, train nothing")
    p.add_argument("--overwrite", action="store_true", help="retrain an experiment that already finished")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume from a checkpoint even though the config changed since it was written")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from distill.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from distill.plan import print_plan

            print_plan(cfg)
            return 0
        from distill.trainer import run

        out = run(cfg, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"model: {out}")
        return 0
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return 0
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from distill.distributed import shutdown

        shutdown()
