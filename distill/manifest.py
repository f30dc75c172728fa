"""Checksummed folders: ``MANIFEST.json`` (byte size and sha256 of every file) is written last and verified before use.

A folder without a readable manifest is incomplete; a listed file that is missing, of another size or of another
sha256 is corrupt. Training checkpoints (:mod:`distill.checkpoint`) and the tokenized-data cache
(:func:`distill.data.tokenize_table`) use it. Files are hashed in 4 MiB blocks, so a model of several GB never sits in
memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
_BLOCK = 4 << 20


class ManifestError(Exception):
    """A folder is incomplete or corrupt; the message is one line naming the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Record every file below ``folder`` (relative POSIX paths) in ``folder/MANIFEST.json``, fsynced; call it last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    out = folder / MANIFEST
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"version": 1, **(extra or {}), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest; :class:`ManifestError` when it is missing or malformed."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST} (incomplete)") from None
    except (OSError, ValueError) as err:
        raise ManifestError(f"{MANIFEST} is unreadable ({type(err).__name__})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise ManifestError(f"{MANIFEST} is malformed")
    return manifest


def verify_manifest(folder: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every listed file's size, then its sha256 (sizes first: a truncation costs no hashing).

    ``required`` names files the manifest must list. Returns the manifest; raises :class:`ManifestError`.
    """
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name in required:
        if name not in files:
            raise ManifestError(f"{name} is not in {MANIFEST}")
    for name, meta in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            raise ManifestError(f"{name} is missing") from None
        if size != meta["bytes"]:
            raise ManifestError(f"{name} has {size} bytes, {MANIFEST} says {meta['bytes']} (truncated or replaced)")
    for name, meta in files.items():
        try:
            digest = sha256_file(folder / name)
        except OSError as err:
            raise ManifestError(f"{name} is unreadable ({type(err).__name__})") from None
        if digest != meta["sha256"]:
            raise ManifestError(f"{name} does not match its sha256 in {MANIFEST} (corrupted)")
    return manifest
