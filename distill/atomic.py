"""Crash-safe file system writes: fsync, then rename into place, so readers see the old or the new, never half."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move the finished folder ``tmp`` to ``final``, replacing an existing one; fsync the parent.

    An existing ``final`` is first renamed aside, so at every instant one complete version exists on disk.
    """
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def fresh_tmp_dir(final: Path) -> Path:
    """An empty ``.tmp-<name>`` sibling of ``final`` (a leftover of a killed write is removed first)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp
