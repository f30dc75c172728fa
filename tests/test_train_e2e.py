"""End to end: train_ddp.py under real torchrun (2 ranks, gloo, CPU) on tiny models and real docstring text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_data import tiny_config_yaml, write_hub_beir, write_training_files
from tiny_models import REPO_ROOT, run_torchrun

from distill.hardware import resolve_precision
from distill.report import read_metrics, record_scalars


def train_single(config: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "train_ddp.py", "--config", str(config), *extra], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_records(run_dir: Path, phase: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "train" and r["phase"] == phase]


def train_each_setting(tmp_path: Path, teacher: Path, student: Path, files: dict[str, Path], key: str,
                       values: list[str], *extra: str) -> dict[str, Path]:
    """One single-process run per value of the ``--set`` key ``key`` (each in its own folder, same data and models);
    returns each value's run folder, for tests that compare runs differing in one setting."""
    runs = {}
    for value in values:
        (tmp_path / value).mkdir()
        cfg = tiny_config_yaml(tmp_path / value, teacher, student, files)
        res = train_single(cfg, *extra, "--set", f"{key}={value}")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[value] = tmp_path / value / "out" / f"distilled-{student.name}-48d-tiny"
    return runs


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def assert_loss_falls(records: list[dict]) -> None:
    losses = [r["loss"] for r in records]
    k = max(2, len(losses) // 4)
    assert mean(losses[-k:]) < mean(losses[:k]), losses


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    return write_training_files(tmp_path_factory.mktemp("data"))


def _ddp_run(tmp: Path, teacher: Path, student: Path, files, use_projection: bool, *args: str,
             env: dict[str, str] | None = None) -> tuple[Path, str]:
    cfg = tiny_config_yaml(tmp, teacher, student, files, use_projection=use_projection)
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, args=["--config", str(cfg), *args], env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    name = "distilled-model-48d-tiny" if use_projection else "distilled-model-32d-tiny"
    return tmp / "out" / name, res.stdout + res.stderr


@pytest.fixture(scope="module")
def projection_run(tmp_path_factory, tiny_teacher_dir, tiny_student_dir, data_files):
    """The projection run; its eval set read in a Hub layout (a local NanoBEIR-style copy) and the MTEB task
    FakeRetrieval run through the stand-in tests/fake_mteb/mteb.py (calls in {tmp}/mteb_calls.jsonl)."""
    tmp = tmp_path_factory.mktemp("proj")
    hub = write_hub_beir(data_files["beir"], tmp / "hub_eval", "nanobeir")
    env = {"FAKE_MTEB_LOG": str(tmp / "mteb_calls.jsonl"), "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT / "tests" / "fake_mteb"), str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    return _ddp_run(tmp, tiny_teacher_dir, tiny_student_dir, data_files, True, "--set", "training.cpu_tuning=true",
                    "--set", f"eval.data={hub}", "--set", "eval.mteb_tasks=[FakeRetrieval]", env=env)


# A stand-in wandb package: every call appended to $FAKE_WANDB_LOG as [RANK, call, ...].
FAKE_WANDB = """import json, os
def _rec(*call):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps([os.environ.get("RANK"), *call]) + "\\n")
class _Run:
    def define_metric(self, name, step_metric=None): _rec("define_metric", name, step_metric)
    def log(self, data): _rec("log", data)
    def finish(self): _rec("finish")
def init(project, name, config, dir): _rec("init", project, name, config["training"]["report_to"]); return _Run()
"""


@pytest.fixture(scope="module")
def mrl_run(tmp_path_factory, tiny_teacher_dir, tiny_student_dir, data_files):
    """The MRL run, reporting to the stand-in wandb (training.report_to: [wandb]); calls in {tmp}/wandb_calls.jsonl.
    Its final model is the best evaluated state by eval.select_best (student->student@16/ndcg@10)."""
    tmp = tmp_path_factory.mktemp("mrl")
    (tmp / "fakes" / "wandb").mkdir(parents=True)
    (tmp / "fakes" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    env = {"FAKE_WANDB_LOG": str(tmp / "wandb_calls.jsonl"), "WANDB_PROJECT": "distill-e2e",
           "PYTHONPATH": os.pathsep.join([str(tmp / "fakes"), str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    return _ddp_run(tmp, tiny_teacher_dir, tiny_student_dir, data_files, False, "--set", "training.report_to=[wandb]",
                    "--set", "eval.select_best=student->student@16/ndcg@10", env=env)


def test_projection_two_ranks_trains_both_phases(projection_run):
    run_dir, log = projection_run
    for phase in ("phase1", "phase2"):
        records = train_records(run_dir, phase)
        assert records, f"no {phase} records"
        assert_loss_falls(records)
    assert (run_dir / "phase1" / "model.safetensors").is_file()
    assert json.loads((run_dir / "DONE").read_text()) == {"phases": [1, 2]}
    # Two ranks: the global batch is twice the per-rank batch.
    assert "global batch 16" in log
    # training.cpu_tuning on a CPU: dropout masks from random_ bit lanes, every nn.Dropout of the student swapped.
    swapped = re.search(r"cpu_tuning: dropout from random_ bit lanes \((\d+) dropout modules swapped\)", log)
    assert swapped and int(swapped.group(1)) > 0


def test_mrl_run_without_cpu_tuning_keeps_stock_dropout(mrl_run):
    _, log = mrl_run
    assert "cpu_tuning" not in log


def test_projection_artifact_encodes_teacher_dim(projection_run):
    from sentence_transformers import SentenceTransformer

    run_dir, _ = projection_run
    model = SentenceTransformer(str(run_dir / "final"), device="cpu")
    emb = model.encode(["How do I copy a file?", "shutil.copy copies a file"], convert_to_tensor=True)
    assert emb.shape == (2, 48)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)  # final Normalize after the head
    kinds = [type(m).__name__ for m in model]
    assert kinds[-3:] == ["Dense", "Dense", "Normalize"]
    for f in ("report.md", "report.json", "metrics.jsonl", "distill_config.yaml", "loss_phase1.png"):
        assert (run_dir / "final" / f).stat().st_size > 0, f


def test_projection_run_evaluates_a_hub_eval_set_and_mteb_on_rank0(projection_run, data_files):
    """eval.data in a Hub layout gives the folder's rows (24 queries); MTEB ran once, on rank 0, on the final model
    (48-d: the head included), without mteb's result cache; report.json and report.md carry its result."""
    run_dir, _ = projection_run
    report = json.loads((run_dir / "final" / "report.json").read_text())
    assert report["eval"]["num_queries"] == 24 and report["eval"]["mode"] == "projection"
    assert report["eval"]["mteb"] == [{"task": "FakeRetrieval", "main_score": 48.0,
                                       "scores": {"test": [{"main_score": 48.0, "hf_subset": "default"}]}}]
    calls = [json.loads(x) for x in (run_dir.parent.parent / "mteb_calls.jsonl").read_text().splitlines()]
    assert calls == [{"tasks": ["FakeRetrieval"], "model": "SentenceTransformer", "dim": 48,
                      "encode_kwargs": {"batch_size": 64}, "cache": None, "rank": "0"}]
    assert "| FakeRetrieval | 48.0000 |" in (run_dir / "final" / "report.md").read_text()


def test_teacher_forwards_equal_unique_texts(projection_run, data_files):
    run_dir, _ = projection_run
    summary = json.loads((run_dir / "final" / "distill_summary.json").read_text())
    p1 = [json.loads(x) for x in data_files["phase1"].read_text().splitlines()]
    unique = len({r["query"] for r in p1}) + len({r["positive"] for r in p1})
    # Phase 1 embeds every query and passage once; phase 2 reuses them (its negatives are phase-1 passages too).
    assert summary["teacher_forward_passes"] == {"phase1": unique, "phase2": 0}
    assert summary["padding_efficiency"]["phase1"] >= 0.8


def test_mrl_two_ranks(mrl_run):
    from sentence_transformers import SentenceTransformer

    run_dir, _ = mrl_run
    for phase in ("phase1", "phase2"):
        assert_loss_falls(train_records(run_dir, phase))
    model = SentenceTransformer(str(run_dir / "final"), device="cpu")
    assert model.encode(["a query"]).shape == (1, 32)
    assert not any(type(m).__name__ == "Dense" for m in model)
    small = SentenceTransformer(str(run_dir / "final"), device="cpu", truncate_dim=8)
    assert small.encode(["a query"]).shape == (1, 8)
    report = json.loads((run_dir / "final" / "report.json").read_text())
    dims = sorted(r["dim"] for r in report["eval"]["rows"] if r["setting"].startswith("student"))
    assert dims == [8, 16, 32]


def test_mrl_run_reports_to_wandb_from_rank0_only(mrl_run):
    run_dir, _ = mrl_run
    calls = [json.loads(line) for line in (run_dir.parent.parent / "wandb_calls.jsonl").read_text().splitlines()]
    assert {c[0] for c in calls} == {"0"}  # rank 1 opens no tracker
    assert calls[0] == ["0", "init", "distill-e2e", run_dir.name, ["wandb"]] and calls[-1] == ["0", "finish"]
    records = read_metrics(run_dir / "metrics.jsonl")  # every record's scalars, at its phase's step
    assert [c[2] for c in calls if c[1] == "log"] == [{**record_scalars(r), f"{r['phase']}/step": r["step"]}
                                                      for r in records]
    assert {r["event"] for r in records} == {"train", "eval"} and {r["phase"] for r in records} >= {"phase1", "phase2"}
    for phase in ("phase1", "phase2"):
        assert ["0", "define_metric", f"train/{phase}/*", f"{phase}/step"] in calls


def test_mrl_run_exports_the_best_evaluated_state(mrl_run):
    """eval.select_best: the final model is the evaluation with the highest student->student@16 nDCG@10 (the first
    of equals), named with its score in the log, distill_summary.json and the report, with that state's weights."""
    run_dir, log = mrl_run

    def score(record: dict) -> float:
        return next(r["metrics"]["ndcg@10"] for r in record["results"]["rows"] if r["setting"] == "student->student"
                    and r["dim"] == 16)

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "eval"]
    top = max(evals, key=score)
    best = {"metric": "student->student@16/ndcg@10", "score": score(top), "phase": top["phase"], "step": top["step"]}
    assert json.loads((run_dir / "final" / "distill_summary.json").read_text())["best"] == best
    report = json.loads((run_dir / "final" / "report.json").read_text())
    assert report["extra"]["best"] == best and report["eval"]["rows"] == top["results"]["rows"]
    assert f"the best evaluated state by {best['metric']} ({best['score']:.4f}), {top['phase']} step {top['step']}" in log
    trained = load_file(str(run_dir / top["phase"] / "model.safetensors"))  # evaluated at phase ends: those weights
    backbone = {k.split(".", 3)[3]: v for k, v in trained.items() if k.startswith("student.0.")}  # student.0.model.*
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert final.keys() == backbone.keys() and all(torch.equal(v, backbone[k]) for k, v in final.items())


def model_card(run_dir: Path) -> tuple[dict, str]:
    """The final folder's README.md: its YAML front matter (parsed) and the whole text."""
    import yaml

    text = (run_dir / "final" / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1]), text


def assert_common_card(run_dir: Path, student: Path, teacher: Path) -> str:
    from distill.report import format_eval_table

    meta, card = model_card(run_dir)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "distillation" in meta["tags"] and "base_model" not in meta  # a local student is no Hub base model
    assert f"- **Student (base model):** `{student}` (32-d)" in card and f"- **Teacher:** `{teacher}` (48-d)" in card
    assert "- **Phase 1** (embedding distillation): 192 examples from docs-p1 (96 rows)" in card
    assert "`phase1.mse_weight` 0.4, `phase1.cosine_weight` 0.6" in card
    assert "7 hard negatives" not in card and "3 hard negatives): 96 examples from docs-p2 (96 rows)" in card
    assert "`phase2.infonce_weight` 0.8, `phase2.mse_weight` 0.2, `phase2.temperature` 0.02" in card
    assert "- `phase1.learning_rate`: 0.001" in card and "* Size: 96 training samples" in card
    report = json.loads((run_dir / "final" / "report.json").read_text())  # the final eval, table by table
    assert card.index("### After phase 1") < card.index("### After phase 2") < card.index("## Usage")
    assert format_eval_table(report["eval"]) in card[card.index("### After phase 2"):]
    return card


def test_projection_model_card(projection_run, tiny_student_dir, tiny_teacher_dir):
    card = assert_common_card(projection_run[0], tiny_student_dir, tiny_teacher_dir)
    assert "queries embedded by this model can search an index built by the teacher" in card
    assert "the output is 48-d (`model.teacher_dim`)" in card and "| student->teacher (drop-in) | 48 |" in card


def test_mrl_model_card(mrl_run, tiny_student_dir, tiny_teacher_dir):
    run_dir, _ = mrl_run
    card = assert_common_card(run_dir, tiny_student_dir, tiny_teacher_dir)
    assert "matryoshka" in model_card(run_dir)[0]["tags"] and "Matryoshka (MRL)" in card and "for D in 32, 16, 8" in card
    assert f'SentenceTransformer("{run_dir / "final"}", truncate_dim=8)' in card
    assert "`model.matryoshka_dims` [32, 16, 8]" in card and "| student->student | 8 |" in card


def test_skip_phase1_reuses_phase1_result(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files,
                           extra="")
    res = train_single(cfg, "--set", "training.skip_phase2=true", "--set", "phase1.num_epochs=1",
                       "--set", "training.precision=auto")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "out" / "distilled-model-48d-tiny"
    # precision auto: the choice for this machine is logged and is what the run dir's config records.
    chosen, _ = resolve_precision("auto", torch.device("cpu"))
    assert f"training.precision auto -> {chosen} (" in res.stderr
    assert f"precision: {chosen}" in (run_dir / "config.yaml").read_text()
    phase1 = load_file(str(run_dir / "phase1" / "model.safetensors"))
    # Phase 2 alone, with a learning rate so small the weights cannot move: the result must be phase 1's weights.
    res = train_single(cfg, "--set", "training.skip_phase1=true", "--set", "phase2.learning_rate=1.0e-12",
                       "--set", "phase1.num_epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "phase 2 starts from the phase-1 weights" in res.stderr
    final = load_file(str(run_dir / "phase2" / "model.safetensors"))
    assert final.keys() == phase1.keys()
    for k in phase1:
        assert torch.allclose(final[k], phase1[k], atol=1e-6), k
    assert json.loads((run_dir / "DONE").read_text()) == {"phases": [1, 2]}
    # Both phases done: a rerun refuses to overwrite the finished experiment.
    res = train_single(cfg, "--set", "training.skip_phase1=true", "--set", "phase1.num_epochs=1")
    assert res.returncode == 2 and "already finished" in res.stderr and "--overwrite" in res.stderr


def test_skip_phase1_without_phase1_result_names_the_path(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--set", "training.skip_phase1=true")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert str(tmp_path / "out" / "distilled-model-48d-tiny" / "phase1" / "model.safetensors") in err[0]


def test_dim_mismatch_is_reported(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--set", "model.student_dim=64", "--set", "model.projection_hidden_dim=128")
    assert res.returncode == 2
    assert "model.student_dim is 64 but" in res.stderr and "outputs 32-d embeddings" in res.stderr
    res = train_single(cfg, "--set", "model.teacher_dim=50")
    assert res.returncode == 2
    assert "model.teacher_dim is 50 but" in res.stderr and "48-d" in res.stderr


def test_dry_run_prints_the_plan_and_loads_no_weights(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("experiment   distilled-model-48d-tiny", "projection: student 32-d -> head 32->64->48",
                   "examples   192", "examples   96", "8/rank, 8 global, x2 accumulation = 16 per optimizer step",
                   "24 optimizer steps", "final model", str(tmp_path / "out")):
        assert needle in out, needle
    assert not (tmp_path / "out").exists()  # nothing written, no weights loaded
    assert "Loading SentenceTransformer" not in res.stderr


def test_head_only_steps_leave_the_student_untouched(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files):
    """LP-FT: during phase1.head_only_fraction of the steps only the projection head learns."""
    from sentence_transformers import SentenceTransformer

    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    res = train_single(cfg, "--set", "training.skip_phase2=true", "--set", "phase1.head_only_fraction=0.99",
                       "--set", "eval.data=null")
    assert res.returncode == 0, res.stderr[-3000:]
    trained = load_file(str(tmp_path / "out" / "distilled-model-48d-tiny" / "phase1" / "model.safetensors"))
    base = {f"student.{k}": v for k, v in SentenceTransformer(str(tiny_student_dir), device="cpu").state_dict().items()}
    student_keys = [k for k in trained if k.startswith("student.")]
    assert student_keys and all(torch.equal(trained[k], base[k]) for k in student_keys)
    records = train_records(tmp_path / "out" / "distilled-model-48d-tiny", "phase1")
    assert_loss_falls(records)  # the head alone still learns


def test_phase2_only_config_starts_from_another_experiments_phase1(projection_run):
    """The spec's use case 3 under 2-rank torchrun: after the two-rank run above, a phase2_only config (its own
    experiment name, same output_dir) finds that run's phase-1 result and starts phase 2 from it."""
    run_dir, _ = projection_run
    phase1_path = run_dir / "phase1" / "model.safetensors"
    phase1 = load_file(str(phase1_path))
    phase2_only = run_dir.parent.parent / "phase2_only.yaml"
    phase2_only.write_text((run_dir.parent.parent / "tiny.yaml").read_text())
    res = run_torchrun(REPO_ROOT / "train_ddp.py", nproc=2, timeout=600,
                       args=["--config", str(phase2_only), "--set", "training.skip_phase1=true", "--set",
                             "phase2.learning_rate=1.0e-12", "--set", "phase2.num_epochs=1", "--set", "eval.data=null"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"phase 2 starts from the phase-1 weights in {phase1_path}" in res.stderr
    new_dir = run_dir.parent / "distilled-model-48d-phase2_only"
    final = load_file(str(new_dir / "phase2" / "model.safetensors"))
    assert final.keys() == phase1.keys()
    assert all(torch.allclose(final[k], phase1[k], atol=1e-6) for k in phase1)
    assert json.loads((new_dir / "DONE").read_text()) == {"phases": [2]}
    assert load_file(str(phase1_path)).keys() == phase1.keys()  # the phase-1 experiment is untouched


def test_find_phase1_picks_the_only_result_or_asks(tmp_path) -> None:
    from distill.checkpoint import CheckpointManager
    from distill.errors import CheckpointError

    out = tmp_path / "out"
    manager = CheckpointManager(out / "m-phase2_only", keep_last=1)
    with pytest.raises(CheckpointError, match="no phase-1 result exists at"):
        manager.find_phase1(out, "m", None)
    first = out / "m-default" / "phase1" / "model.safetensors"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    (out / "other-default" / "phase1").mkdir(parents=True)
    (out / "other-default" / "phase1" / "model.safetensors").write_bytes(b"x")  # another model: not a candidate
    assert manager.find_phase1(out, "m", None) == first
    second = out / "m-ablation" / "phase1" / "model.safetensors"
    second.parent.mkdir(parents=True)
    second.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"several phase-1 results of m .*\(m-ablation, m-default\); set "
                                              r"training.phase1_from"):
        manager.find_phase1(out, "m", None)
    assert manager.find_phase1(out, "m", "m-ablation") == second
    assert manager.find_phase1(out, "m", str(first)) == first
    assert manager.find_phase1(out, "m", str(out / "m-default")) == first
    with pytest.raises(CheckpointError, match="training.phase1_from: 'nope'"):
        manager.find_phase1(out, "m", "nope")


def test_overwrite_replaces_at_the_end_and_artifacts_know_their_run(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                    data_files):
    cfg = tiny_config_yaml(tmp_path, tiny_teacher_dir, tiny_student_dir, data_files)
    quick = ["--set", "training.skip_phase2=true", "--set", "phase1.num_epochs=1", "--set", "eval.data=null",
             "--set", "training.save_to_artifacts=true"]
    res = train_single(cfg, *quick)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir, artifact = tmp_path / "out" / "distilled-model-48d-tiny", tmp_path / "artifacts" / "distilled-model-48d-tiny"
    made = json.loads((artifact / "distill_summary.json").read_text())["provenance"]
    assert made["run_dir"] == str(run_dir.resolve()) and len(made["config_sha256"]) == 64
    # The same config with another output_dir would replace the published artifact: refused before any work.
    res = train_single(cfg, *quick, "--set", f"paths.output_dir={tmp_path / 'other'}")
    assert res.returncode == 2 and f"{artifact} holds a model made by run {run_dir.resolve()}" in res.stderr
    assert not (tmp_path / "other").exists()
    # --overwrite that fails (a wrong teacher_dim, found after the models load) leaves the finished run intact.
    before = (run_dir / "final" / "model.safetensors").read_bytes()
    res = train_single(cfg, *quick, "--overwrite", "--set", "model.teacher_dim=50")
    assert res.returncode == 2 and "model.teacher_dim is 50" in res.stderr
    assert (run_dir / "final" / "model.safetensors").read_bytes() == before
    assert json.loads((run_dir / "DONE").read_text()) == {"phases": [1]}
    # --overwrite that succeeds swaps the new run in at the end; no staging folder is left.
    res = train_single(cfg, *quick, "--overwrite", "--set", "phase1.learning_rate=2.0e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() != before
    assert not (tmp_path / "out" / ".distilled-model-48d-tiny.overwrite").exists()
    assert "learning_rate: 0.002" in (run_dir / "config.yaml").read_text()
    assert json.loads((artifact / "distill_summary.json").read_text())["provenance"]["config_sha256"] != \
        made["config_sha256"]
