"""``distributed.keep_freed_memory``: glibc keeps freed memory for the next step instead of returning it to the OS,
so a training step's reallocated activations reuse mapped pages instead of page-faulting on fresh ones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tiny_models import REPO_ROOT

from distill.distributed import is_glibc_linux

# Two rounds of a step's memory traffic: 40 activation-sized blocks (6 MB each) freed, then one 48 MB
# gradient-sized buffer (above glibc's largest mmap threshold) allocated and freed. By default glibc unmaps and trims
# what is freed until its dynamic thresholds catch up with the sizes seen, so each early round faults on fresh pages
# (a training step's shapes change with every batch, so they rarely catch up); kept, the second round reuses them.
ROUNDS = """
import resource, sys, torch
from distill.distributed import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1_500_000) for _ in range(40)]
    del blocks
    grad = torch.zeros(12_000_000)
    del grad
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[1])
"""

glibc_only = pytest.mark.skipif(not is_glibc_linux(), reason="mallopt is glibc's")


def _rounds(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
    res = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=REPO_ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    kept, faults = res.stdout.split()
    return kept, int(faults)


@glibc_only
def test_freed_memory_is_reused_without_page_faults() -> None:
    kept, faults_kept = _rounds("keep")
    default, faults_default = _rounds("default")
    assert kept == "True" and default == "None"
    assert faults_default > 40_000  # 288 MB a round = 70,000 pages of 4 KB
    assert faults_kept < faults_default / 5, (faults_kept, faults_default)


@glibc_only
def test_the_users_own_malloc_settings_are_left_alone() -> None:
    kept, faults = _rounds("keep", GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert kept == "False"
    assert faults > 40_000  # glibc's defaults, as the user left them
