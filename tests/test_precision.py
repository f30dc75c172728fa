"""training.precision: what ``auto`` picks on each kind of hardware, and the warning for emulated bf16."""

from __future__ import annotations

import builtins
import io

import pytest
import torch

from distill import distributed as D
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


def test_default_is_auto():
    assert TrainingConfig().precision == "auto"


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, "bf16"), (False, True, "bf16"),
                                                     (False, False, "fp32")])
def test_auto_on_x86_cpus(cpu, amx, avx512_bf16, want):
    cpu(amx=amx, avx512_bf16=avx512_bf16)
    assert D.cpu_has_native_bf16() is (want == "bf16")
    precision, why = D.resolve_precision("auto", CPU)
    assert precision == want
    assert ("no AVX512-BF16" in why) is (want == "fp32")


def test_auto_on_arm_with_bf16_feature(cpu):
    cpu(cpuinfo="processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert D.resolve_precision("auto", CPU)[0] == "bf16"
    cpu(cpuinfo="processor\t: 0\nFeatures\t: fp asimd svebf16 bf16x\n")  # only whole words count
    assert D.resolve_precision("auto", CPU)[0] == "fp32"


def test_explicit_bf16_on_cpu_without_it_is_kept_with_a_warning(cpu):
    cpu()
    precision, why = D.resolve_precision("bf16", CPU)
    assert precision == "bf16" and "emulated" in why and "training.precision" in why
    assert D.resolve_precision("fp32", CPU) == ("fp32", "")
    cpu(amx=True)
    assert D.resolve_precision("bf16", CPU) == ("bf16", "")


@pytest.mark.parametrize("capability, cost", [("AVX512", "3-4x slower"), ("AVX2", "~30x slower"),
                                              ("DEFAULT", "slower than fp32")])
def test_the_warning_states_the_cost_measured_for_this_vector_unit(cpu, monkeypatch, capability, cost):
    cpu()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert D.emulated_bf16_cost().startswith(cost)
    assert cost in D.resolve_precision("bf16", CPU)[1] and cost in D.resolve_precision("auto", CPU)[1]
    cpu(avx512_bf16=True)
    assert D.resolve_precision("bf16", CPU) == ("bf16", "")


@pytest.mark.parametrize("bf16, cached, want", [(True, False, "bf16"), (True, True, "bf16"), (False, False, "fp16"),
                                                (False, True, "fp32")])
def test_auto_on_gpus(monkeypatch, bf16, cached, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert D.resolve_precision("auto", CUDA, cached_infonce=cached)[0] == want
    assert D.resolve_precision("fp32", CUDA) == ("fp32", "")


@pytest.mark.parametrize("native, want", [(True, "bfloat16"), (False, "float32")])
def test_teacher_dtype_auto_on_cpu_follows_native_bf16(cpu, tiny_teacher_dir, native, want):
    from distill.models import resolve_teacher_spec

    cpu(amx=native)
    assert resolve_teacher_spec(str(tiny_teacher_dir), dtype="auto", device=CPU).dtype == want
    assert resolve_teacher_spec(str(tiny_teacher_dir), dtype="float32", device=CPU).dtype == "float32"


@pytest.mark.parametrize("bf16, want", [(True, "bfloat16"), (False, "float16")])
def test_teacher_dtype_auto_on_gpus(monkeypatch, tiny_teacher_dir, bf16, want):
    from distill.models import resolve_teacher_spec

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_teacher_spec(str(tiny_teacher_dir), dtype="auto", device=CUDA).dtype == want
