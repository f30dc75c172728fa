#!/usr/bin/env python
"""Distill a large text-embedding teacher into a small student.

    torchrun --nproc_per_node=8 train_ddp.py --config configs/default.yaml
    python train_ddp.py --config configs/quick_test.yaml              # one process works too
    python train_ddp.py --config configs/my.yaml --dry-run            # validate + print the plan

The same as ``python -m distill train ...`` (``distill/cli.py``). See README.md and README_DDP.md; every option
lives in the config (``configs/README.md``).
"""

import sys

from distill.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
