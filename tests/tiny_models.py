"""Tiny, random-init, fully offline stand-ins for the real teacher and student, plus a torchrun helper.

The real teacher (infly/inf-retriever-v1-pro) is a Qwen2 decoder whose tokenizer appends ``<|endoftext|>``
to every input and whose sentence-transformers pipeline is Transformer -> Pooling(lasttoken) -> Normalize,
with a query prompt and no document prompt. The real student (all-mpnet-base-v2) is an MPNet encoder with a
lowercase WordPiece tokenizer and Transformer -> Pooling(mean) -> Normalize. These builders reproduce those
shapes at toy size (teacher dim 48, student dim 32) so tests exercise the same code paths in seconds.

Builds are deterministic: the tokenizers are trained on a fixed corpus (docstrings of a fixed list of stdlib
modules, read with ``ast``) and the weights are drawn under a fixed torch seed.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

TEACHER_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
TEACHER_EOS = "<|endoftext|>"

# Fixed, always-present stdlib modules: the tokenizer training corpus must not depend on what else is installed.
_CORPUS_MODULES = (
    "json/__init__.py", "textwrap.py", "shutil.py", "tempfile.py", "argparse.py", "pathlib/__init__.py",
    "pathlib.py", "functools.py", "collections/__init__.py", "string.py", "random.py", "csv.py",
)
_SEED = 1234


@functools.lru_cache(maxsize=1)
def training_lines() -> tuple[str, ...]:
    """A few hundred non-empty docstring lines of fixed stdlib modules (deterministic for a Python version)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for rel in _CORPUS_MODULES:
        path = stdlib / rel
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    lines.extend(line.strip() for line in doc.splitlines() if line.strip())
        if len(lines) >= 600:
            break
    if len(lines) < 100:  # pragma: no cover - only on a broken Python install
        raise RuntimeError(f"too few stdlib docstring lines under {stdlib} to train a tokenizer")
    return tuple(lines[:600])


def _teacher_tokenizer(vocab_size: int = 500):
    """Byte-level BPE (Qwen2-like) whose post-processor appends ``<|endoftext|>`` to every sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TEACHER_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer=trainer)
    eos_id = tok.token_to_id(TEACHER_EOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"$A:0 {TEACHER_EOS}:0",
            pair=f"$A:0 {TEACHER_EOS}:0 $B:1 {TEACHER_EOS}:1",
            special_tokens=[(TEACHER_EOS, eos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=TEACHER_EOS,
        pad_token=TEACHER_EOS,
        unk_token=None,
        model_max_length=512,
        padding_side="right",
    )


def _wordpiece_vocab(normalizer, pre_tokenizer, specials: list[str], vocab_size: int) -> dict[str, int]:
    """Specials, every character (plain and ``##``-continuation), then the most frequent whole words.

    Built by counting rather than with ``WordPieceTrainer``, whose tie-breaking follows hash order and so
    changes from run to run; ties here are broken alphabetically.
    """
    words: Counter[str] = Counter()
    for line in training_lines():
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    tokens = specials + chars + [f"##{c}" for c in chars]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    tokens += frequent[: max(0, vocab_size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def _student_tokenizer(kind: Literal["mpnet", "bert"], vocab_size: int = 400):
    """Lowercase WordPiece with MPNet (``<s> … </s>``) or BERT (``[CLS] … [SEP]``) special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "mpnet":  # ids match MPNetConfig defaults: bos 0, pad 1, eos 2
        specials = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "[UNK]", "mask": "<mask>"}
        order = ["cls", "pad", "sep", "unk", "mask"]
    else:  # ids match BertConfig default pad 0
        specials = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
        order = ["pad", "unk", "cls", "sep", "mask"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = Tokenizer(models.WordPiece(vocab=_wordpiece_vocab(normalizer, pre_tokenizer, [specials[k] for k in order],
                                                         vocab_size), unk_token=specials["unk"]))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = specials["cls"], specials["sep"]
    ids = [(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    pair = f"{cls} $A {sep} {sep} $B:1 {sep}:1" if kind == "mpnet" else f"{cls} $A {sep} $B:1 {sep}:1"
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=pair, special_tokens=ids)
    extra = {"bos_token": cls, "eos_token": sep} if kind == "mpnet" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=cls,
        sep_token=sep,
        pad_token=specials["pad"],
        unk_token=specials["unk"],
        mask_token=specials["mask"],
        model_max_length=128,
        **extra,
    )


def _save_as_sentence_transformer(
    hf_dir: Path, out_dir: Path, pooling_mode: str, prompts: dict[str, str] | None = None
) -> None:
    """Wrap a saved HF folder as Transformer -> Pooling(pooling_mode) -> Normalize and ``save`` it to ``out_dir``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(hf_dir))
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode)
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], prompts=prompts, device="cpu")
    model.save(str(out_dir))


def _atomic_build(out_dir: Path, build) -> Path:
    """Run ``build(tmp_dir)`` then move ``tmp_dir`` to ``out_dir`` (replacing it) so a crash leaves no half folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block (new parameters are made in ``dtype``), restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_tiny_teacher(
    out_dir: str | os.PathLike, *, hidden: int = 48, layers: int = 2, with_st_config: bool = True,
    shape: dict[str, int] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> Path:
    """Random-init Qwen2 decoder (``hidden``-d, ``layers`` layers, 4 heads, 2 KV heads) with its own BPE tokenizer.

    With ``with_st_config`` the folder is a sentence-transformers model (lasttoken pooling + L2 normalisation,
    prompts ``query``=inf-retriever instruction, ``document``=""); otherwise a plain transformers folder.
    ``SentenceTransformer(out_dir).encode(texts)`` returns ``[len(texts), hidden]`` unit vectors.
    ``shape`` overrides ``Qwen2Config`` fields (e.g. Qwen2-7B's layer shape, for benchmarks); the weights are made on
    ``device`` in ``dtype`` (a big shape then needs no fp32 copy on the host) and saved in ``dtype``.
    """
    from transformers import Qwen2Config, Qwen2Model

    def build(tmp: Path) -> None:
        tokenizer = _teacher_tokenizer()
        eos_id = tokenizer.convert_tokens_to_ids(TEACHER_EOS)
        fields = dict(  # noqa: C408 - keyword form, as Qwen2Config reads
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            tie_word_embeddings=False,
        )
        config = Qwen2Config(**{**fields, **(shape or {})})
        torch.manual_seed(_SEED)
        with default_dtype(dtype), torch.device(device):
            model = Qwen2Model(config).eval()
        hf_dir = tmp / "hf" if with_st_config else tmp
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        if with_st_config:
            st_dir = tmp / "st"
            prompts = {"query": TEACHER_QUERY_PROMPT, "document": ""}
            _save_as_sentence_transformer(hf_dir, st_dir, "lasttoken", prompts)
            shutil.rmtree(hf_dir)
            for child in st_dir.iterdir():
                child.rename(tmp / child.name)
            st_dir.rmdir()

    return _atomic_build(Path(out_dir), build)


def build_tiny_student(
    out_dir: str | os.PathLike, *, hidden: int = 32, layers: int = 2, kind: Literal["mpnet", "bert"] = "mpnet",
    dropout: float = 0.1,
) -> Path:
    """Random-init MPNet (or BERT) encoder with a lowercase WordPiece tokenizer, saved as a sentence-transformers
    folder (Transformer -> Pooling(mean) -> Normalize); ``encode`` returns ``[n, hidden]`` unit vectors.
    ``dropout``: hidden and attention dropout (0 for runs that must agree whatever the batch shapes)."""
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

    if kind not in ("mpnet", "bert"):
        raise ValueError(f"kind must be 'mpnet' or 'bert', got {kind!r}")

    def build(tmp: Path) -> None:
        tokenizer = _student_tokenizer(kind)
        common = {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
            "pad_token_id": tokenizer.pad_token_id,
            "hidden_dropout_prob": dropout,
            "attention_probs_dropout_prob": dropout,
        }
        torch.manual_seed(_SEED + 1)
        if kind == "mpnet":
            # MPNet position ids start at pad_token_id + 1, hence the +2 over the tokenizer's max length.
            model = MPNetModel(MPNetConfig(max_position_embeddings=130, bos_token_id=0, eos_token_id=2, **common))
        else:
            model = BertModel(BertConfig(max_position_embeddings=128, **common))
        hf_dir = tmp.parent / f"{tmp.name}.hf"
        try:
            model.eval().save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            _save_as_sentence_transformer(hf_dir, tmp, "mean")
        finally:
            shutil.rmtree(hf_dir, ignore_errors=True)

    return _atomic_build(Path(out_dir), build)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    script_path: str | os.PathLike,
    nproc: int = 2,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc_per_node=nproc --master_port=<free> script *args``.

    cwd is the repo root; the repo root and tests/ are prepended to PYTHONPATH; ``env`` entries override
    ``os.environ``. Output is captured as text; the caller checks ``returncode``.
    """
    full_env = dict(os.environ)
    full_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    paths = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
    if full_env.get("PYTHONPATH"):
        paths.append(full_env["PYTHONPATH"])
    full_env["PYTHONPATH"] = os.pathsep.join(paths)
    if env:
        full_env.update(env)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script_path), *map(str, args),
    ]
    return subprocess.run(
        cmd, check=False, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
