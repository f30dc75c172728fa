"""scripts/gpu_check.sh and benchmarks/gpu_check.py: one line and exit 0 without CUDA; the pure arithmetic."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import common as C
from benchmarks import gpu_check as G

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path needs a machine without CUDA")


@no_cuda
def test_script_prints_one_line_and_exits_0_without_cuda(tmp_path):
    """As the acceptance check runs it: no PYTHON, so python3 then .venv/bin/python (neither sees CUDA here; python3
    may have no torch at all), from another folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).splitlines() == res.stdout.splitlines() == [res.stdout.strip()]
    assert res.stdout.startswith(G.NO_CUDA_LINE)


@no_cuda
def test_python_entry_point_prints_one_line_and_exits_0_without_cuda(tmp_path, capsys):
    assert G.main(["--out", str(tmp_path / "x.json"), "--work", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out.splitlines() == [G.NO_CUDA_LINE]
    assert not (tmp_path / "x.json").exists()


def test_spec_peaks():
    assert G.spec_peak_bf16("NVIDIA H100 80GB HBM3") == (989e12, "H100 SXM")
    assert G.spec_peak_bf16("NVIDIA H100 PCIe") == (756e12, "H100 PCIe")
    assert G.spec_peak_bf16("NVIDIA H100 NVL") == (835e12, "H100 NVL")
    assert G.spec_peak_bf16("NVIDIA H200") == (989e12, "H200")
    assert G.spec_peak_bf16("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert G.spec_peak_bf16("NVIDIA GeForce RTX 4090") is None  # -> measured matmul, stated as such


def test_teacher_flops_on_a_known_config():
    """Qwen2-7B shape: embeddings 152064 x 3584 left out; per layer q/o 3584^2 (+ q bias), k/v 3584 x 512 (+ bias),
    MLP 3 x 3584 x 18944, two RMSNorm weights; plus the final norm."""
    h, kv, ffn, layers = 3584, 512, 18944, 28
    per_layer = 2 * h * h + h + 2 * (h * kv + kv) + 3 * h * ffn + 2 * h
    n = layers * per_layer + h
    from transformers import Qwen2Config, Qwen2Model

    with torch.device("meta"):
        model = Qwen2Model(Qwen2Config(**G.QWEN2_7B))
    assert C.non_embedding_params(model) == n  # ~6.5e9
    lengths = [512] * 32
    expected = 2 * n * 512 * 32 + 4 * layers * h * 512**2 * 32
    assert G.teacher_forward_flops(n, lengths, layers, h) == pytest.approx(expected)
    assert G.mfu(expected, 1.0, 989e12) == pytest.approx(expected / 989e12)
    assert G.mfu(expected, 0.0, 989e12) is None and G.mfu(expected, 1.0, None) is None


def test_student_shape_is_mpnet_base():
    from transformers import MPNetConfig, MPNetModel

    with torch.device("meta"):
        model = MPNetModel(MPNetConfig(**G.MPNET_BASE))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(109.5e6, rel=0.01)  # all-mpnet-base-v2


def test_workloads_follow_default_config():
    from distill.config import load_config

    cfg = load_config(REPO / "configs" / "default.yaml")
    w = G.student_workloads(cfg, tiny=False)
    p2 = w[2]["realistic"]
    assert len(p2["queries"]) == cfg.phase2.batch_size == 64
    assert len(p2["documents"]) == 64 * (1 + cfg.phase2.num_negatives) == 512
    assert len(w[1]["max_length_512"]["documents"]) == cfg.phase1.batch_size
    t = G.teacher_workloads(512, cfg.model.teacher_batch_size, tiny=False)
    assert t["fixed_32x512"][0] == [512] * 32
    budget = t["token_budget_65536_mixed_64_512"]
    assert all(len(b) * max(b) <= 65536 for b in budget)
    sorted_ = t["sorted_32_mixed_64_512"]
    assert [len(b) for b in sorted_] == [32] * 16  # 512 texts of 64-512 tokens
    firsts = [b[0] for b in sorted_ + budget]
    assert all(b[0] == max(b) for b in sorted_ + budget)  # longest first within each batch ...
    assert firsts[:16] == sorted(firsts[:16], reverse=True)  # ... and across batches
    assert sorted(x for b in budget for x in b) == sorted(x for b in sorted_ for x in b)  # the same texts


def test_e2e_config_is_valid(tmp_path):
    import yaml

    from distill.config import load_config

    files = {k: tmp_path / k for k in ("phase1", "phase2", "beir")}
    raw = G.e2e_config(tmp_path, tmp_path / "t", tmp_path / "s", files, teacher_dim=512, student_dim=768)
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = load_config(path)
    assert cfg.training.precision == "auto"
    assert cfg.phase1.max_steps == cfg.phase2.max_steps == 3
    assert cfg.model.projection_hidden_dim >= 2 * cfg.model.student_dim  # least-squares head start
