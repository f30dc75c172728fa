"""The teacher (frozen encoder), the student (a SentenceTransformer) and the projection head.

Models know nothing of the training loop: the trainer calls :class:`DistillModel` on tokenized chunks and
:class:`TeacherEncoder` on raw texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from distill.batches import token_budget_batches
from distill.errors import ConfigError
from distill.hardware import teacher_dtype

log = logging.getLogger(__name__)

Role = Literal["query", "document"]
_POOLING_FROM_ST = {"lasttoken": "last_token", "mean": "mean", "cls": "cls"}


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines the teacher's vectors; resolved from the model's own files without loading weights."""

    name: str
    revision: str | None
    backend: Literal["sentence-transformers", "transformers"]
    pooling: Literal["mean", "cls", "last_token"]
    normalize: bool
    query_prompt: str
    document_prompt: str
    max_length: int
    dtype: Literal["float32", "bfloat16", "float16"]
    trust_remote_code: bool
    weights_id: str  # local folder: sizes and mtimes of its files; Hub id: the revision

    def prompt(self, role: Role) -> str:
        return self.query_prompt if role == "query" else self.document_prompt

    def fingerprint(self, role: Role) -> str:
        """Hex key of everything that changes the vectors of ``role`` texts (the teacher cache's namespace)."""
        skip = {"query_prompt", "document_prompt", "backend", "trust_remote_code"}
        fields = {k: v for k, v in asdict(self).items() if k not in skip}
        fields["role_prompt"] = self.prompt(role)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _read_model_file(name: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    """A small JSON file of a local model folder or a Hub repo (from the HF cache when offline); None if absent."""
    local = Path(name)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(name, filename, revision=revision)
    except LocalEntryNotFoundError as e:  # first: in huggingface_hub >= 1.0 it subclasses EntryNotFoundError
        raise ConfigError(
            f"model: cannot read {filename} of '{name}': not a local folder and not reachable on the Hub "
            f"(offline, not in the HF cache? set HF_HUB_OFFLINE=1 on machines without internet): {e}".splitlines()[0]
        ) from None
    except EntryNotFoundError:  # the Hub answered: the repo has no such file
        return None
    except Exception as e:  # noqa: BLE001 - the Hub client raises many types; the user needs the message
        raise ConfigError(f"model: cannot read {filename} of '{name}': {type(e).__name__}: {e}".splitlines()[0]) from None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _weights_id(name: str, revision: str | None) -> str:
    local = Path(name)
    if not local.is_dir():
        return f"hub:{name}@{revision or 'main'}"
    h = hashlib.sha256()
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".model", ".txt"}:
            st = p.stat()
            h.update(f"{p.relative_to(local)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"local:{h.hexdigest()[:16]}"


def resolve_teacher_spec(
    name: str, *, revision: str | None = None, pooling: str = "auto", normalize: bool | None = None,
    query_prompt: str | None = None, document_prompt: str | None = None, max_length: int = 512, dtype: str = "auto",
    trust_remote_code: bool = False, device: torch.device | None = None, cpu_tuning: bool = False,
) -> TeacherSpec:
    """Read how the teacher embeds (pooling, normalisation, prompts) from its sentence-transformers files.

    A model that ships ``modules.json`` is run through sentence-transformers and its pooling, Normalize module and
    ``prompts['query'|'document']`` are honoured (explicit config prompts override the saved ones; an explicit pooling
    that contradicts the saved one is an error). Otherwise it is run through transformers and ``pooling`` must be given.
    """
    modules = _read_model_file(name, "modules.json", revision)
    if modules is not None:
        backend = "sentence-transformers"
        st_pool = None
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                st_pool = _st_pooling_mode(_read_model_file(name, f"{m['path']}/config.json", revision) or {})
        if st_pool is None:
            raise ConfigError(f"model.teacher: {name} has a modules.json without a supported Pooling module")
        if pooling not in ("auto", st_pool):
            raise ConfigError(
                f"model.teacher_pooling: {pooling} contradicts the teacher's own sentence-transformers pooling "
                f"({st_pool}); set it to auto or {st_pool}"
            )
        pooling = st_pool
        prompts = (_read_model_file(name, "config_sentence_transformers.json", revision) or {}).get("prompts") or {}
        query_prompt = query_prompt if query_prompt is not None else (prompts.get("query") or "")
        if document_prompt is None:
            document_prompt = next((prompts[k] for k in ("document", "passage", "corpus") if prompts.get(k)), "")
        if normalize is None:
            normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    else:
        backend = "transformers"
        if pooling == "auto":
            raise ConfigError(
                f"model.teacher_pooling: {name} ships no sentence-transformers config (modules.json), so its pooling "
                "cannot be read; set teacher_pooling to mean, cls or last_token"
            )
        normalize = True if normalize is None else normalize
        query_prompt = query_prompt or ""
        document_prompt = document_prompt or ""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = teacher_dtype(dtype, device, cpu_tuning=cpu_tuning)  # auto: the student's rule for this hardware
    return TeacherSpec(
        name=name, revision=revision, backend=backend, pooling=pooling, normalize=bool(normalize),
        query_prompt=query_prompt, document_prompt=document_prompt, max_length=max_length, dtype=dtype,
        trust_remote_code=trust_remote_code, weights_id=_weights_id(name, revision),
    )


def _st_pooling_mode(pcfg: dict[str, Any]) -> str | None:
    mode = pcfg.get("pooling_mode")
    if mode is None:  # legacy keys: pooling_mode_mean_tokens, pooling_mode_lasttoken, ...
        for key, on in pcfg.items():
            if key.startswith("pooling_mode_") and on is True:
                mode = key.removeprefix("pooling_mode_").removesuffix("_tokens")
                break
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else None
    return _POOLING_FROM_ST.get(mode) if mode else None


def teacher_spec_from_config(model_cfg: Any, max_length: int, device: torch.device | None = None, *,
                             cpu_tuning: bool = False) -> TeacherSpec:
    """:func:`resolve_teacher_spec` with the ``model`` section of the config (and ``training.cpu_tuning``)."""
    return resolve_teacher_spec(
        model_cfg.teacher, revision=model_cfg.teacher_revision, pooling=model_cfg.teacher_pooling,
        normalize=model_cfg.teacher_normalize, query_prompt=model_cfg.teacher_query_prompt,
        document_prompt=model_cfg.teacher_document_prompt, max_length=model_cfg.teacher_max_length or max_length,
        dtype=model_cfg.teacher_dtype, trust_remote_code=model_cfg.trust_remote_code, device=device,
        cpu_tuning=cpu_tuning,
    )


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states [b, L, h] with attention mask [b, L] -> [b, h].

    ``last_token`` takes the last position whose mask is 1, so it is right for left *and* right padding.
    """
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if mode == "last_token":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}")


class TeacherEncoder:
    """The frozen teacher, in eval mode, without gradients, in two steps that can overlap: :meth:`prepare` tokenises
    on the CPU (pinned memory for a CUDA teacher), :meth:`forward` embeds on the device without synchronising.
    :meth:`encode` runs both serially -> float32 [n, dim] on the CPU."""

    def __init__(self, spec: TeacherSpec, device: torch.device | str = "cpu", attn_implementation: str = "auto"):
        self.spec = spec
        self.device = torch.device(device)
        model_kwargs: dict[str, Any] = {"dtype": getattr(torch, spec.dtype), **_attn_kwargs(attn_implementation)}
        if spec.backend == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self.st = SentenceTransformer(
                spec.name, revision=spec.revision, device=str(self.device),
                trust_remote_code=spec.trust_remote_code, model_kwargs=model_kwargs,
            )
            self.st.max_seq_length = spec.max_length
            self.st.eval().requires_grad_(False)
            self.dim = int(self.st.get_embedding_dimension())
        else:
            from transformers import AutoModel

            self.st = None
            self.tokenizer = _teacher_tokenizer(spec)
            self.model = AutoModel.from_pretrained(
                spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **model_kwargs
            ).to(self.device)
            self.model.eval().requires_grad_(False)
            self.dim = int(self.model.config.hidden_size)

    def _tokenize(self, texts: list[str], role: Role) -> dict[str, Any]:
        prompt = self.spec.prompt(role)
        if self.st is not None:
            return dict(self.st.preprocess(list(texts), prompt=prompt or None))
        return dict(self.tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                                   max_length=self.spec.max_length, return_tensors="pt"))

    def lengths(self, texts: list[str], role: Role, chunk: int = 1024) -> np.ndarray:
        """Tokens of each text as the teacher reads it (prompt and special tokens in, truncated) -> int64 [n]."""
        parts = [self._tokenize(texts[i : i + chunk], role)["attention_mask"].sum(1).numpy()
                 for i in range(0, len(texts), chunk)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def prepare(self, texts: list[str], role: Role) -> dict[str, Any]:
        """The padded model inputs of ``texts`` for ``role`` (the query prompt for queries), on the CPU."""
        pin = self.device.type == "cuda"
        return {k: v.pin_memory() if pin and isinstance(v, torch.Tensor) else v
                for k, v in self._tokenize(texts, role).items()}

    @torch.inference_mode()
    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        """Embeddings of :meth:`prepare`'s inputs -> float32 [n, dim] on the device (copies are non-blocking)."""
        feats = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in features.items()}
        if self.st is not None:
            emb = self.st(feats)["sentence_embedding"].float()
        else:
            emb = pool(self.model(**feats).last_hidden_state.float(), feats["attention_mask"], self.spec.pooling)
        return nn.functional.normalize(emb, dim=-1) if self.spec.normalize else emb

    def encode(self, texts: list[str], role: Role, batch_size: int = 32, max_tokens: int | None = None) -> torch.Tensor:
        """Embed ``texts`` as the teacher does for ``role`` -> float32 [n, dim] on the CPU, in the order of ``texts``:
        longest first, ``batch_size`` texts a batch, or with ``max_tokens`` at most that many padded tokens a batch
        (:func:`~distill.batches.token_budget_batches`; long texts in big batches make eager attention memory-bound)."""
        out = torch.empty(len(texts), self.dim)
        lengths = self.lengths(texts, role) if max_tokens else np.array([len(t) for t in texts])
        for idx in token_budget_batches(lengths, batch_size, max_tokens):
            out[torch.from_numpy(idx)] = self.forward(self.prepare([texts[i] for i in idx], role)).cpu()
        return out


def _teacher_tokenizer(spec: TeacherSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_VLLM_POOLING = {"last_token": "LAST", "mean": "MEAN", "cls": "CLS"}


@contextlib.contextmanager
def only_visible_gpu(device: torch.device) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES`` narrowed to ``device``'s GPU inside the block, restored after. vLLM's engine process
    inherits the environment and takes the first visible GPU, so without this every torchrun rank would start its
    engine on GPU 0. A CPU device changes nothing."""
    if device.type != "cuda":
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in before.split(",") if d.strip()] if before else None
    index = torch.cuda.current_device() if device.index is None else device.index
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class VllmTeacher:
    """The teacher run by vLLM's pooling runner (``model.teacher_backend: vllm``), with :class:`TeacherEncoder`'s
    ``lengths`` / ``prepare`` / ``forward``: the same token ids (prompt, special tokens, truncation) go in, vLLM pools
    them with the spec's pooling and normalisation and batches them itself -> float32 [n, dim] on the CPU."""

    def __init__(self, spec: TeacherSpec, device: torch.device | str = "cpu"):
        from vllm import LLM
        from vllm.config import PoolerConfig

        self.spec, self.tokenizer = spec, _teacher_tokenizer(spec)
        # vLLM >= 0.15 names normalisation use_activation; earlier releases: normalize
        norm = "use_activation" if "use_activation" in getattr(PoolerConfig, "__dataclass_fields__", {}) else "normalize"
        pooler = PoolerConfig(**{"pooling_type": _VLLM_POOLING[spec.pooling], norm: spec.normalize})
        with only_visible_gpu(torch.device(device)):
            self.llm = LLM(model=spec.name, revision=spec.revision, runner="pooling", dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, max_model_len=spec.max_length,
                           pooler_config=pooler)

    def lengths(self, texts: list[str], role: Role) -> np.ndarray:
        return np.array([len(p["prompt_token_ids"]) for p in self.prepare(texts, role)], dtype=np.int64)

    def prepare(self, texts: list[str], role: Role) -> list[dict[str, list[int]]]:
        prompt = self.spec.prompt(role)
        ids = self.tokenizer([prompt + t for t in texts], truncation=True, max_length=self.spec.max_length)["input_ids"]
        return [{"prompt_token_ids": list(x)} for x in ids]

    def forward(self, prompts: list[dict[str, list[int]]]) -> torch.Tensor:
        return torch.tensor([o.outputs.embedding for o in self.llm.embed(prompts, use_tqdm=False)], dtype=torch.float32)


def check_teacher_runtime(model_cfg: Any) -> None:
    """Preflight of ``model.teacher_backend`` and ``model.teacher_attn_implementation`` on this machine (one-line
    ConfigError): vllm must be importable; flash_attention_2 needs the flash_attn package and CUDA."""
    from distill.config import installed

    if model_cfg.teacher_backend == "vllm":
        if not installed("vllm"):
            raise ConfigError("model.teacher_backend: vllm is not installed; pip install 'distill[vllm]' (or set it to "
                              "transformers)")
    elif model_cfg.teacher_attn_implementation == "flash_attention_2":
        if not installed("flash_attn") or not torch.cuda.is_available():
            raise ConfigError("model.teacher_attn_implementation: flash_attention_2 needs a CUDA GPU and the flash_attn "
                              "package (pip install flash-attn); use sdpa or auto here")


def _attn_kwargs(attn_implementation: str) -> dict[str, str]:
    """``auto`` lets transformers choose (SDPA where the architecture supports it, eager otherwise)."""
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


def load_student(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                 attn_implementation: str = "auto", device: torch.device | str = "cpu"):
    """The student as a ``SentenceTransformer`` in float32 (autocast handles mixed precision)."""
    from sentence_transformers import SentenceTransformer

    kwargs: dict[str, Any] = {"dtype": torch.float32, **_attn_kwargs(attn_implementation)}
    try:
        return SentenceTransformer(name, revision=revision, device=str(device), trust_remote_code=trust_remote_code,
                                   model_kwargs=kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.student: cannot load '{name}': {e}".splitlines()[0]) from None


def build_projection_head(student_dim: int, hidden_dim: int, teacher_dim: int, seed: int) -> nn.Sequential:
    """``student_dim -> hidden_dim (GELU) -> teacher_dim`` as two sentence-transformers Dense modules.

    Using ST's Dense directly means the exported model contains exactly the trained modules.
    """
    from sentence_transformers.sentence_transformer.modules import Dense

    with torch.random.fork_rng(devices=[]):  # the CPU generator is restored afterwards
        torch.manual_seed(seed)  # the head starts identical on every rank and in every run of this seed
        return nn.Sequential(
            Dense(student_dim, hidden_dim, activation_function=nn.GELU()),
            Dense(hidden_dim, teacher_dim, activation_function=nn.Identity()),
        )


def ridge_map(xtx: torch.Tensor, xty: torch.Tensor, x_sum: torch.Tensor, y_sum: torch.Tensor, n: int,
              ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ridge-regression affine map ``y ~ x @ A + c`` from sufficient statistics (so ranks can sum them).

    With ``x~ = [x, 1]``, ``G = sum x~ x~^T`` ([d+1, d+1], built from ``xtx = sum x x^T``, ``x_sum = sum x`` and ``n``)
    and ``B = sum x~ y^T`` ([d+1, D], from ``xty = sum x y^T`` and ``y_sum``), solve
    ``(G + lambda * diag(1, ..., 1, 0)) W = B`` in float64 with ``lambda = ridge * trace(xtx) / d`` (scale-free; the
    bias is not penalised). Returns ``A = W[:d]`` [d, D] and ``c = W[d]`` [D].
    """
    d = xtx.shape[0]
    g = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    g[:d, :d], g[:d, d], g[d, :d], g[d, d] = xtx.double(), x_sum.double(), x_sum.double(), float(n)
    b = torch.cat([xty.double(), y_sum.double()[None]], dim=0)
    penalty = torch.eye(d + 1, dtype=torch.float64)
    penalty[d, d] = 0.0
    w = torch.linalg.solve(g + ridge * float(torch.trace(xtx.double())) / d * penalty, b)
    return w[:d].float(), w[d].float()


def procrustes_map(xty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The orthogonal map ``y ~ x @ Q`` ([d] -> [D], d <= D) that best aligns the student with the teacher.

    With ``xty = sum x y^T`` = U S V^T (thin SVD), ``Q = U V^T`` maximises ``trace(Q^T xty)`` (equivalently minimises
    ``sum ||x Q - y||^2``) over maps with orthonormal rows, ``Q Q^T = I``. Such a map keeps every inner product:
    ``<x Q, x' Q> = <x, x'>``, so the student's own ranking through the head starts exactly as the pretrained
    student's, where the least-squares map (:func:`ridge_map`) trades it for a lower MSE. Returns ``(Q, 0)``, the
    zero bias in the shape :func:`set_head_to_affine_map` takes.
    """
    u, _, vh = torch.linalg.svd(xty.double(), full_matrices=False)
    return (u @ vh).float(), torch.zeros(xty.shape[1], device=xty.device)


@torch.no_grad()
def set_head_to_affine_map(head: nn.Sequential, a: torch.Tensor, c: torch.Tensor) -> None:
    r"""Make the GELU MLP head compute exactly ``x @ a + c`` ([d] -> [D]).

    ``GELU(x) - GELU(-x) = x*Phi(x) + x*Phi(-x) = x``, so with hidden units ``h = GELU([x; -x])`` (first layer
    ``[I; -I]``, no bias) the second layer ``[a^T, -a^T]`` with bias ``c`` gives ``a^T x + c`` for every x. This needs
    ``hidden >= 2 d``; further hidden units keep their random first-layer weights and get zero output weights, so
    they start silent but still receive gradients and can learn the non-linear part.
    """
    first, second = head[0].linear, head[1].linear
    d, hidden = first.in_features, first.out_features
    if hidden < 2 * d:
        raise ValueError(f"an exact affine start needs projection_hidden_dim >= 2 * student_dim ({2 * d}), got {hidden}")
    if tuple(a.shape) != (d, second.out_features):
        raise ValueError(f"map shape {tuple(a.shape)} does not fit the head {d} -> {second.out_features}")
    eye = torch.eye(d, dtype=first.weight.dtype, device=first.weight.device)
    first.weight[:d], first.weight[d : 2 * d] = eye, -eye
    first.bias[: 2 * d] = 0.0
    second.weight.zero_()
    at = a.t().to(second.weight)
    second.weight[:, :d], second.weight[:, d : 2 * d] = at, -at
    second.bias.copy_(c.to(second.bias))


def add_rotation(student: Any) -> nn.Module:
    """Insert a ``d x d`` linear map without bias (a sentence-transformers Dense, identity activation, started as the
    identity) into ``student`` after its pooling, before its Normalize module if it has one (else at the end), and
    return it. It changes nothing until :func:`set_rotation`; as a module of the student it is trained, saved,
    checkpointed and exported with it, and ``SentenceTransformer(path)`` loads it."""
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    d = int(student.get_embedding_dimension())
    dense = Dense(d, d, bias=False, activation_function=nn.Identity(), init_weight=torch.eye(d))
    modules = list(student._modules.values())
    at = next((i for i, m in enumerate(modules) if isinstance(m, Normalize)), len(modules))
    modules.insert(at, dense.to(next(student.parameters()).device))
    student._modules.clear()
    for i, module in enumerate(modules):
        student._modules[str(i)] = module
    return dense


def pca_rotation(xtx: torch.Tensor, x_sum: torch.Tensor, n: int) -> torch.Tensor:
    r"""The principal axes of embeddings x ([d]) as an orthogonal ``Q`` [d, d], from sums ranks can all-reduce.

    With ``mu = x_sum / n`` and ``C = xtx / n - mu mu^T`` (``xtx = sum x x^T``), ``Q``'s columns are ``C``'s
    eigenvectors by decreasing eigenvalue, each signed so its largest entry is positive (deterministic). ``x @ Q`` is
    the same vector in those axes: every inner product (so full-dim retrieval) is unchanged, and its first m
    coordinates are the m-dim subspace that keeps the most variance of the texts, which is what truncation to m
    dims (Matryoshka) keeps. The rotation is not centred (no bias): cosine similarity needs the origin where it was.
    """
    mu = x_sum.double() / n
    cov = xtx.double() / n - torch.outer(mu, mu)
    _, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending eigenvalues
    q = vectors.flip(1)
    signs = torch.sign(q.gather(0, q.abs().argmax(0, keepdim=True)))
    return (q * signs).float()


@torch.no_grad()
def set_rotation(dense: nn.Module, q: torch.Tensor) -> None:
    """Make the Dense from :func:`add_rotation` compute ``x @ q`` (its weight is ``q^T``: Linear computes x W^T)."""
    dense.linear.weight.copy_(q.t().to(dense.linear.weight))


class DistillModel(nn.Module):
    """Student (+ optional projection head) as one module, so DDP wraps a single forward per step.

    ``forward(chunks)`` takes a list of tokenized chunks ({input_ids, attention_mask}, each padded to its own length)
    and returns the concatenated embeddings [sum of chunk sizes, out_dim]: the student's sentence embedding (after
    its own Normalize module, if it has one), projected by the head when there is one. Several chunks in one call
    keep padding low without calling the DDP module more than once per backward.
    """

    def __init__(self, student: nn.Module, head: nn.Sequential | None):
        super().__init__()
        self.student = student
        self.head = head

    def student_embedding(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's own sentence embedding [b, student_dim], before any head."""
        return self.student(dict(features))["sentence_embedding"]

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """The head applied to student embeddings [b, student_dim] -> [b, out_dim] (identity without a head)."""
        if self.head is None:
            return embedding
        return self.head({"sentence_embedding": embedding})["sentence_embedding"]

    def forward(self, chunks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return self.project(torch.cat([self.student_embedding(c) for c in chunks], dim=0))


def backbone(student: Any) -> nn.Module | None:
    """The transformers model inside a sentence-transformers student's first (Transformer) module."""
    return getattr(student[0], "model", None)


def check_dims(cfg_model: Any, student: Any, teacher_dim: int | None) -> None:
    """``model.student_dim`` / ``teacher_dim`` must be what the models really output."""
    real = int(student.get_embedding_dimension())
    if real != cfg_model.student_dim:
        raise ConfigError(f"model.student_dim is {cfg_model.student_dim} but {cfg_model.student} outputs {real}-d embeddings")
    if teacher_dim is not None and teacher_dim != cfg_model.teacher_dim:
        raise ConfigError(
            f"model.teacher_dim is {cfg_model.teacher_dim} but {cfg_model.teacher} outputs {teacher_dim}-d embeddings"
        )

