"""training.precision and model.teacher_dtype (distill.hardware): what ``auto`` picks on each kind of hardware, the
CPU's bf16 detection (only with training.cpu_tuning), and the warning for emulated bf16."""

from __future__ import annotations

import builtins
import io

import pytest
import torch

from distill import hardware as H
from distill.config import TrainingConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def cpu(monkeypatch):
    """Pretend CPU: ``cpu(amx=..., avx512_bf16=..., cpuinfo=...)`` sets what the detection reads."""

    def set_cpu(amx: bool = False, avx512_bf16: bool = False, cpuinfo: str = "flags\t\t: fpu avx512f\n") -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(cpuinfo)
                            if path == "/proc/cpuinfo" else real_open(path, *a, **k))

    return set_cpu


@pytest.fixture
def native(monkeypatch):
    """``native(True / False)``: what :func:`cpu_has_native_bf16` answers."""
    return lambda value: monkeypatch.setattr(H, "cpu_has_native_bf16", lambda: value)


@pytest.fixture
def no_detection(monkeypatch):
    """Fail the test if anything asks the CPU about bf16."""

    def detect() -> bool:
        raise AssertionError("cpu_has_native_bf16 called with training.cpu_tuning off")

    monkeypatch.setattr(H, "cpu_has_native_bf16", detect)


def test_defaults_are_auto_without_cpu_tuning():
    assert TrainingConfig().precision == "auto"
    assert TrainingConfig().cpu_tuning is False


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_on_x86_cpus(cpu, amx, avx512_bf16, want):
    cpu(amx=amx, avx512_bf16=avx512_bf16)
    assert H.cpu_has_native_bf16() is want


def test_native_bf16_on_arm_is_the_bf16_feature_word(cpu):
    cpu(cpuinfo="processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert H.cpu_has_native_bf16() is True
    cpu(cpuinfo="processor\t: 0\nFeatures\t: fp asimd svebf16 bf16x\n")  # only whole words count
    assert H.cpu_has_native_bf16() is False


def test_cpu_without_tuning_is_fp32_and_never_detects(no_detection):
    precision, why = H.resolve_precision("auto", CPU)
    assert precision == "fp32" and "cpu_tuning off" in why
    assert H.resolve_precision("auto", CPU, cpu_tuning=False, cached_infonce=True)[0] == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit value is kept as it is
        assert H.resolve_precision(explicit, CPU) == (explicit, "")


@pytest.mark.parametrize("has_bf16, want", [(True, "bf16"), (False, "fp32")])
def test_cpu_with_tuning_follows_native_bf16(native, has_bf16, want):
    native(has_bf16)
    precision, why = H.resolve_precision("auto", CPU, cpu_tuning=True)
    assert precision == want
    assert ("no AVX512-BF16" in why) is (want == "fp32")


def test_explicit_bf16_on_cpu_with_tuning_and_without_native_bf16_is_kept_with_a_warning(native):
    native(False)
    precision, why = H.resolve_precision("bf16", CPU, cpu_tuning=True)
    assert precision == "bf16" and "emulated" in why and "training.precision" in why
    assert H.resolve_precision("fp32", CPU, cpu_tuning=True) == ("fp32", "")
    native(True)
    assert H.resolve_precision("bf16", CPU, cpu_tuning=True) == ("bf16", "")


@pytest.mark.parametrize("bf16, cached, want", [(True, False, "bf16"), (True, True, "bf16"), (False, False, "fp16"),
                                                (False, True, "fp32")])
@pytest.mark.parametrize("cpu_tuning", [False, True])
def test_auto_on_gpus(monkeypatch, no_detection, bf16, cached, want, cpu_tuning):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert H.resolve_precision("auto", CUDA, cpu_tuning=cpu_tuning, cached_infonce=cached)[0] == want
    assert H.resolve_precision("fp32", CUDA) == ("fp32", "")


@pytest.mark.parametrize("bf16", [True, False])
def test_explicit_values_on_gpus_are_kept(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    precision, why = H.resolve_precision("bf16", CUDA)
    assert precision == "bf16" and ("no native bf16" in why) is (not bf16)
    assert H.resolve_precision("fp16", CUDA) == ("fp16", "")


def test_teacher_dtype_on_cpu(native, monkeypatch):
    native(True)
    assert H.teacher_dtype("auto", CPU, cpu_tuning=True) == "bfloat16"
    native(False)
    assert H.teacher_dtype("auto", CPU, cpu_tuning=True) == "float32"
    for explicit in ("float32", "bfloat16", "float16"):
        assert H.teacher_dtype(explicit, CPU, cpu_tuning=True) == explicit
    native(True)
    monkeypatch.setattr(H, "cpu_has_native_bf16", lambda: pytest.fail("detection with cpu_tuning off"))
    assert H.teacher_dtype("auto", CPU) == "float32"


@pytest.mark.parametrize("bf16, want", [(True, "bfloat16"), (False, "float16")])
def test_teacher_dtype_on_gpus(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert H.teacher_dtype("auto", CUDA) == want
    assert H.teacher_dtype("float32", CUDA) == "float32"


@pytest.mark.parametrize("has_bf16, cpu_tuning, want", [(True, True, "bfloat16"), (False, True, "float32"),
                                                        (True, False, "float32")])
def test_teacher_spec_resolves_auto_with_the_same_rule(native, tiny_teacher_dir, has_bf16, cpu_tuning, want):
    from distill.models import resolve_teacher_spec

    native(has_bf16)
    spec = resolve_teacher_spec(str(tiny_teacher_dir), dtype="auto", device=CPU, cpu_tuning=cpu_tuning)
    assert spec.dtype == want
    assert resolve_teacher_spec(str(tiny_teacher_dir), dtype="float32", device=CPU).dtype == "float32"


def test_autocast_is_disabled_in_fp32_and_casts_otherwise():
    x = torch.randn(4, 4)
    with H.autocast(CPU, "fp32"):
        assert (x @ x).dtype == torch.float32
    with H.autocast(CPU, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
