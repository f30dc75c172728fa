"""Retrieval evaluation of a student (and its teacher) on a BEIR set: exact cosine search, nDCG@10, MRR@10,
Recall@10/100 (``pytrec_eval``) per setting, with retention against the teacher. CLI: ``python -m distill evaluate``.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import sys
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytrec_eval
import torch
import torch.nn.functional as F

from distill import distributed
from distill.batches import token_budget_batches
from distill.errors import ConfigError, DataError, DistillError

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[str], str], torch.Tensor]
"""(texts, role "query" | "document") -> float32 embeddings [len(texts), d]."""

Qrels = dict[str, dict[str, int]]
TREC_NAMES = {"ndcg@10": "ndcg_cut_10", "mrr@10": "recip_rank", "recall@10": "recall_10", "recall@100": "recall_100"}
METRICS: tuple[str, ...] = tuple(TREC_NAMES)
SEARCH_DEPTH = 100  # the deepest cut-off among METRICS
CHUNK = 16384  # documents (or texts) moved to the computing device at a time
T = TypeVar("T")


@dataclass
class BeirData:
    """A BEIR split: ``queries`` keeps only the queries that have qrels (in ``queries.jsonl`` order)."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines of a UTF-8 text file; a bad byte is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte {err.start} of the line)") from None
            if line.strip():
                yield line_no, line.rstrip("\r\n")


def _read_jsonl(path: Path, text_keys: Sequence[str]) -> dict[str, str]:
    """``{_id: text}`` (``title + " " + text`` when there is a title); a bad line is a DataError naming it."""
    rows: dict[str, str] = {}
    for line_no, line in _lines(path):
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        doc_id = obj.get("_id")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) == "":
            raise DataError(f"{where}: missing or invalid '_id'")
        doc_id = str(doc_id)
        if doc_id in rows:
            raise DataError(f"{where}: duplicate _id {doc_id!r}")
        fields = {key: "" if obj.get(key) is None else obj[key] for key in text_keys}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        title = fields.get("title", "").strip()
        rows[doc_id] = f"{title} {fields['text']}".strip() if title else fields["text"]
        if re.search("[\ud800-\udfff]", doc_id + rows[doc_id]):
            raise DataError(f"{where}: not valid UTF-8 (lone surrogate escape \\ud800-\\udfff in a string)")
    return rows


def _read_qrels(path: Path, queries_path: Path, query_ids: Container[str]) -> Qrels:
    """``{query_id: {corpus_id: score}}`` from a BEIR qrels TSV whose query-ids are all in ``query_ids``."""
    qrels: Qrels = {}
    for line_no, line in _lines(path):
        parts = [p.strip() for p in line.split("\t")]
        if line_no == 1 and parts[0].lower() in ("query-id", "query_id", "qid"):
            continue  # header
        where = f"{path}:{line_no}"
        if len(parts) != 3:
            raise DataError(f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}")
        qid, did, score = parts
        if not qid or not did:
            raise DataError(f"{where}: empty query-id or corpus-id")
        if qid not in query_ids:
            raise DataError(f"{where}: query-id {qid!r} is not in {queries_path}")
        try:
            qrels.setdefault(qid, {})[did] = int(score)
        except ValueError:
            raise DataError(f"{where}: score {score!r} is not an integer") from None
    return qrels


def _beir_data(corpus: dict[str, str], queries: dict[str, str], qrels: Qrels, where: str) -> BeirData:
    """The split, its queries cut to those with qrels; judged ids missing from the corpus or queries are logged."""
    if not qrels:
        raise DataError(f"{where}: no qrels")
    judged = {d for docs in qrels.values() for d in docs}
    for what, ids, known in (("corpus", judged, corpus), ("query", qrels.keys(), queries)):
        if missing := len(ids - known.keys()):
            logger.warning("%s: %d judged %s-ids are not in the %s set", where, missing, what, what)
    return BeirData(corpus=corpus, queries={q: t for q, t in queries.items() if q in qrels}, qrels=qrels)


def read_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv``; only queries with qrels are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found")
    corpus = _read_jsonl(folder / "corpus.jsonl", ("title", "text"))
    queries = _read_jsonl(folder / "queries.jsonl", ("text",))
    qrels_path = folder / "qrels" / f"{split}.tsv"
    return _beir_data(corpus, queries, _read_qrels(qrels_path, folder / "queries.jsonl", queries), str(qrels_path))


def _hub(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` of ``datasets``; any failure (offline and not cached, unknown id, auth) is one line."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - network, missing config or split, auth: all reported the same way
        raise DataError(f"eval.data {name}: cannot load ({type(err).__name__}: {' '.join(str(err).split())})") from None


def hub_parts(data: str, split: str = "test") -> dict[str, tuple[str, str | None, str]]:
    """``{"corpus" | "queries" | "qrels": (dataset, config, split)}`` of a BEIR set in the Hub layout, from config and
    split names only (nothing downloaded): configs ``corpus`` and ``queries``; the qrels in config ``qrels``
    (NanoBEIR), else ``default`` (MTEB), else the dataset ``{data}-qrels`` (BeIR). Each part's split is ``split``,
    else one named after the part (``corpus``, ``queries``), else its only split (NanoBEIR's ``train``)."""
    import datasets

    data = data.rstrip("/")
    configs = _hub(data, datasets.get_dataset_config_names, data)
    if not {"corpus", "queries"} <= set(configs):
        raise DataError(f"eval.data {data}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/{split}.tsv) nor "
                        f"a dataset with configs corpus and queries (it has {', '.join(configs) or 'none'})")
    qrels = next(((data, c) for c in ("qrels", "default") if c in configs), (f"{data}-qrels", None))
    parts = {}
    for role, (name, config) in {"corpus": (data, "corpus"), "queries": (data, "queries"), "qrels": qrels}.items():
        names = _hub(name, datasets.get_dataset_split_names, name, config)
        chosen = next((s for s in (split, role) if s in names), names[0] if len(names) == 1 else None)
        if chosen is None:
            raise DataError(f"eval.split: {name} ({config or 'default'}) has no split {split!r} (it has "
                            f"{', '.join(names)})")
        if role == "qrels" and chosen != split:
            logger.warning("eval.data %s: no qrels split %r, using its only split %r", name, split, chosen)
        parts[role] = (name, config, chosen)
    return parts


def _hub_columns(table: Any, where: str, needed: Sequence[str]) -> dict[str, list[Any]]:
    """The columns of a loaded split, as lists; a missing needed column is a DataError naming the part."""
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} (it has {', '.join(table.column_names)})")
    return table.to_dict()


def read_hub_beir(data: str, split: str = "test") -> BeirData:
    """A BEIR set in the Hub layout (see :func:`hub_parts`), a Hub id or a local copy, read with ``datasets``: corpus
    ``_id, title, text`` (title optional), queries ``_id, text``, qrels ``query-id, corpus-id[, score]`` (score 1
    when absent; a list of corpus-ids is read as one qrel each)."""
    import datasets

    tables = {role: (_hub(name, datasets.load_dataset, name, config, split=s), f"eval.data {name} ({config}, {s})")
              for role, (name, config, s) in hub_parts(data, split).items()}
    texts = {}
    for role in ("corpus", "queries"):
        cols = _hub_columns(*tables[role], ("_id", "text"))
        titles = cols.get("title") or [None] * len(cols["_id"])
        texts[role] = {str(i): f"{t.strip()} {x or ''}".strip() if t and t.strip() else x or ""
                       for i, t, x in zip(cols["_id"], titles, cols["text"])}
    cols = _hub_columns(*tables["qrels"], ("query-id", "corpus-id"))
    qrels: Qrels = {}
    for qid, dids, score in zip(cols["query-id"], cols["corpus-id"], cols.get("score") or [1] * len(cols["query-id"])):
        for did in dids if isinstance(dids, list) else [dids]:
            qrels.setdefault(str(qid), {})[str(did)] = int(1 if score is None else score)
    return _beir_data(texts["corpus"], texts["queries"], qrels, tables["qrels"][1])


def _is_beir_folder(data: str | Path) -> bool:
    """A local BEIR folder (``qrels/*.tsv``), or a path that must be one (starts with ``.``, ``/``, ``~``)."""
    path = Path(data).expanduser()
    return any((path / "qrels").glob("*.tsv")) or (not path.exists() and str(data).startswith((".", "/", "~")))


def load_eval_set(data: str | Path, split: str = "test") -> BeirData:
    """``eval.data``: a BEIR folder (:func:`read_beir`), else a BEIR set in the Hub layout (:func:`read_hub_beir`),
    read by rank 0 first (one download) and then by the other ranks (from the cache): a collective under DDP."""
    if _is_beir_folder(data):
        return read_beir(data, split)
    done: list[BeirData] = []
    run_eval_distributed(lambda: done.append(read_hub_beir(str(data), split)))
    return done[0] if done else read_hub_beir(str(data), split)


def check_eval_set(data: str | Path, split: str = "test") -> None:
    """The preflight of ``eval.data``: a BEIR folder is read, a Hub-layout set located (:func:`hub_parts`)."""
    if _is_beir_folder(data):
        read_beir(data, split)
    else:
        hub_parts(str(data), split)


@torch.no_grad()
def exact_search(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    k: int,
    chunk_size: int = CHUNK,
    query_chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-``k`` per query: ``(scores, indices)`` [q, min(k, n)], descending, at least float32, on the
    queries' device; chunked with a running top-k, so ``doc_emb`` may be large and live elsewhere."""
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(
            f"exact_search needs [q, d] and [n, d], got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}"
        )
    device = query_emb.device
    dtype = torch.promote_types(torch.promote_types(query_emb.dtype, doc_emb.dtype), torch.float32)
    k = min(k, doc_emb.shape[0])
    all_scores, all_indices = [], []
    for q_start in range(0, query_emb.shape[0], query_chunk_size):
        q = F.normalize(query_emb[q_start : q_start + query_chunk_size].to(dtype), dim=-1)
        scores = torch.empty((q.shape[0], 0), dtype=dtype, device=device)
        indices = torch.empty((q.shape[0], 0), dtype=torch.long, device=device)
        for d_start in range(0, doc_emb.shape[0], chunk_size):
            d = F.normalize(doc_emb[d_start : d_start + chunk_size].to(device=device, dtype=dtype), dim=-1)
            top = torch.topk(q @ d.T, min(k, d.shape[0]), dim=1)
            scores = torch.cat([scores, top.values], dim=1)
            indices = torch.cat([indices, top.indices + d_start], dim=1)
            keep = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            scores, indices = keep.values, torch.gather(indices, 1, keep.indices)
        all_scores.append(scores)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def per_query_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """``{query_id: {metric: value}}`` for every query of ``qrels`` (0 when absent from ``run``); MRR@10 is
    ``recip_rank`` on the run cut to its top 10 (ties as trec_eval: doc id descending)."""
    qrels = {q: dict(d) for q, d in qrels.items()}
    top10 = {
        q: dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:10]) for q, docs in run.items()
    }
    deep = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10,100"}).evaluate(dict(run))
    shallow = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    out = {}
    for qid in qrels:
        values = {**deep.get(qid, {}), **shallow.get(qid, {})}
        out[qid] = {m: float(values.get(name, 0.0)) for m, name in TREC_NAMES.items()}
    return out


def compute_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """:func:`per_query_metrics` averaged over the queries of ``qrels``."""
    per_query = per_query_metrics(qrels, run)
    return {m: sum(v[m] for v in per_query.values()) / len(per_query) for m in METRICS}


@dataclass
class Embeddings:
    """``queries`` [q, d] in ``query_ids`` order, ``documents`` [n, d] in ``doc_ids`` order (any dtype, device)."""

    query_ids: list[str]
    doc_ids: list[str]
    queries: torch.Tensor
    documents: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.queries.shape[1])


def retrieval_metrics(
    emb: Embeddings, qrels: Mapping[str, Mapping[str, int]], dim: int | None = None
) -> dict[str, float]:
    """Metrics of cosine retrieval with the first ``dim`` coordinates (all when None), renormalised (MRL)."""
    scores, indices = exact_search(emb.queries[:, :dim], emb.documents[:, :dim], SEARCH_DEPTH)
    run = {
        qid: {emb.doc_ids[j]: s for s, j in zip(row_scores, row_indices)}
        for qid, row_scores, row_indices in zip(emb.query_ids, scores.cpu().tolist(), indices.cpu().tolist())
    }
    return compute_metrics({q: qrels[q] for q in emb.query_ids}, run)


def _eval_ids(
    queries: Mapping[str, str], corpus: Mapping[str, str], qrels: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """Ids evaluated: the queries that have qrels (in ``queries`` order) and the whole corpus."""
    query_ids = [q for q in queries if q in qrels]
    if not query_ids:
        raise DataError("no queries with qrels to evaluate")
    if not corpus:
        raise DataError("the corpus is empty")
    return query_ids, list(corpus)


def _checked(emb: torch.Tensor, n: int, who: str) -> torch.Tensor:
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DistillError(f"{who} returned {tuple(emb.shape)}, expected a [{n}, dim] tensor")
    return emb.float()


@torch.no_grad()
def encode_eval_set(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    qrels: Mapping[str, Any],
    encode_query: EncodeFn,
    encode_doc: EncodeFn | None = None,
) -> Embeddings:
    """Encode the evaluated queries (role "query") and the whole corpus (role "document") once."""
    encode_doc = encode_doc or encode_query
    query_ids, doc_ids = _eval_ids(queries, corpus, qrels)
    q = _checked(encode_query([queries[i] for i in query_ids], "query"), len(query_ids), "query encoder")
    d = _checked(encode_doc([corpus[i] for i in doc_ids], "document"), len(doc_ids), "document encoder")
    if q.shape[1] != d.shape[1]:
        raise DistillError(f"query embeddings have dim {q.shape[1]} but document embeddings dim {d.shape[1]}")
    return Embeddings(query_ids=query_ids, doc_ids=doc_ids, queries=q, documents=d)


def _row(setting: str, dim: int, metrics: dict[str, float], reference: dict[str, float] | None) -> dict[str, Any]:
    retention = None
    if reference is not None:
        retention = {m: (metrics[m] / reference[m] if reference[m] > 0 else None) for m in METRICS}
    return {"setting": setting, "dim": dim, "metrics": metrics, "retention": retention}


def _mean_cosine(student: Embeddings, teacher: Embeddings) -> dict[str, float]:
    """Mean cos(student_i, teacher_i) over queries, documents and all texts, one chunk at a time."""

    def cosines(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            F.cosine_similarity(s[i : i + CHUNK].float(), t[i : i + CHUNK].to(s.device, torch.float32))
            for i in range(0, s.shape[0], CHUNK)
        ])

    cos_q = cosines(student.queries, teacher.queries)
    cos_d = cosines(student.documents, teacher.documents)
    return {
        "queries": float(cos_q.mean()),
        "documents": float(cos_d.mean()),
        "all": float(torch.cat([cos_q, cos_d]).mean()),
    }


def evaluate_settings(
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    student: EncodeFn | Embeddings,
    teacher: EncodeFn | Embeddings | None = None,
    dims: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The settings table (JSON-serialisable): rows ``{"setting", "dim", "metrics", "retention"}`` of
    ``teacher->teacher``, ``student->student`` per dim of ``dims`` (MRL truncation) and, when the dims agree
    ("projection" mode), ``student->teacher`` (student queries, teacher documents) plus ``mean_cosine``."""
    query_ids, doc_ids = _eval_ids(queries, corpus, qrels)

    def embeddings(source: EncodeFn | Embeddings, who: str) -> Embeddings:
        if not isinstance(source, Embeddings):
            return encode_eval_set(queries, corpus, qrels, source)
        if source.query_ids != query_ids or source.doc_ids != doc_ids:
            raise DistillError(f"precomputed {who} embeddings were made for a different eval set (ids differ)")
        return source

    student_emb = embeddings(student, "student")
    teacher_emb = None if teacher is None else embeddings(teacher, "teacher")
    rows: list[dict[str, Any]] = []
    reference = None
    if teacher_emb is not None:
        reference = retrieval_metrics(teacher_emb, qrels)
        rows.append(_row("teacher->teacher", teacher_emb.dim, reference, reference))
    bad = [d for d in dims or [] if not 1 <= int(d) <= student_emb.dim]
    if bad:
        raise ConfigError(f"eval dims {bad} are outside 1..{student_emb.dim} (the student's embedding dimension)")
    for dim in sorted({int(d) for d in dims}, reverse=True) if dims else [student_emb.dim]:
        rows.append(_row("student->student", dim, retrieval_metrics(student_emb, qrels, dim), reference))
    same_dim = teacher_emb is not None and teacher_emb.dim == student_emb.dim
    if same_dim:
        drop_in = retrieval_metrics(replace(student_emb, documents=teacher_emb.documents), qrels)
        rows.append(_row("student->teacher", student_emb.dim, drop_in, reference))
    return {
        "mode": "student_only" if teacher_emb is None else ("projection" if same_dim else "mrl"),
        "num_queries": len(query_ids),
        "num_documents": len(doc_ids),
        "student_dim": student_emb.dim,
        "teacher_dim": None if teacher_emb is None else teacher_emb.dim,
        "metrics": list(METRICS),
        "rows": rows,
        "mean_cosine": _mean_cosine(student_emb, teacher_emb) if same_dim else None,
    }


@dataclass(frozen=True)
class BestMetric:
    """``eval.select_best``: ``[SETTING[@DIM]/]METRIC``, one number of :func:`evaluate_settings`' rows, e.g.
    ``ndcg@10`` (student->student at its largest evaluated dim), ``student->teacher/ndcg@10`` (drop-in, projection
    mode) or ``student->student@256/mrr@10`` (an evaluated MRL dim)."""

    text: str
    setting: str
    dim: int | None
    metric: str

    @classmethod
    def from_config(cls, cfg: Any) -> BestMetric | None:
        """``cfg.eval.select_best`` checked against the rows this config's evaluations have; a ConfigError names the
        key, suggests the closest valid name and lists the valid forms."""
        text, m = cfg.eval.select_best, cfg.model
        if text is None:
            return None
        dims = cfg.eval.dims or ([m.output_dim] if m.use_projection else m.matryoshka_dims)
        settings = ["student->student", *(f"student->student@{d}" for d in dims)]
        settings += ["student->teacher"] if m.use_projection else []
        valid = [*METRICS, *(f"{s}/{metric}" for s in settings for metric in METRICS)]
        if text not in valid:
            close = difflib.get_close_matches(text, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            forms = "student->student[@DIM]/METRIC" + (", student->teacher/METRIC" if m.use_projection else "")
            raise ConfigError(f"eval.select_best: {text!r} is not an evaluated metric; {hint}valid: METRIC, {forms} "
                              f"with METRIC one of {', '.join(METRICS)} and DIM one of {', '.join(map(str, dims))}")
        setting, _, metric = text.rpartition("/")
        setting, _, dim = (setting or "student->student").partition("@")
        return cls(text, setting, int(dim) if dim else None, metric)

    def score(self, results: Mapping[str, Any]) -> float:
        """This metric in ``results`` (an :func:`evaluate_settings` dict); without a dim, the largest dim's row."""
        rows = [r for r in results["rows"] if r["setting"] == self.setting and self.dim in (None, r["dim"])]
        if not rows:
            raise DistillError(f"eval.select_best: no {self.setting} row in the evaluation results")
        return float(max(rows, key=lambda r: r["dim"])["metrics"][self.metric])


def run_eval_distributed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0, its result on every rank (an error: re-raised on rank 0, a DistillError on
    the others). ``fn`` must not call collectives (encode with the unwrapped module, not the DDP wrapper)."""
    return distributed.on_main(lambda: fn(*args, **kwargs), "evaluation failed on rank 0")


def _load_student(path: str, trust_remote_code: bool, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    if not Path(path).exists():
        raise ConfigError(f"--model {path}: folder not found")
    return SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)


def student_encoder(model: Any, batch_size: int, trust_remote_code: bool = False, device: str = "cpu",
                     to_cpu: bool = False, max_tokens: int | None = None) -> EncodeFn:
    """Queries via ``encode_query`` and documents via ``encode_document`` so prompts saved with the model apply;
    ``model``: a SentenceTransformer or its folder; embeddings on the model's device, or the CPU with ``to_cpu``.
    With ``max_tokens`` a batch holds at most that many padded tokens (of the text, truncated at the model's
    ``max_seq_length``; the prompt is not counted) and at most ``batch_size`` texts."""
    if isinstance(model, (str, Path)):
        model = _load_student(str(model), trust_remote_code, device)

    def encode(texts: list[str], role: str) -> torch.Tensor:
        method = model.encode_query if role == "query" else model.encode_document
        if max_tokens and texts:
            ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
            batches = token_budget_batches(np.array([len(i) for i in ids]), batch_size, max_tokens)
            parts = [method([texts[i] for i in idx], batch_size=len(idx), convert_to_tensor=True,
                            show_progress_bar=False) for idx in batches]
            back = torch.from_numpy(np.argsort(np.concatenate(batches)))  # row of each text in the batches' order
            out = torch.cat(parts)[back.to(parts[0].device)]
        else:
            out = method(texts, batch_size=batch_size, convert_to_tensor=True)
        return out.float().cpu() if to_cpu else out.float()

    return encode


def run_mteb(model: Any, tasks: Sequence[str], batch_size: int, keep_going: bool = False) -> list[dict[str, Any]]:
    """The MTEB ``tasks`` on ``model`` (a SentenceTransformer) through ``mteb.evaluate``, without mteb's result cache
    (a retrained model must not be scored from an old file): ``[{"task", "main_score", "scores"}]``. A failure is a
    one-line DistillError, or with ``keep_going`` logged and returned as ``[{"error": message}]``."""
    try:
        import mteb

        found = mteb.get_tasks(tasks=list(tasks))
        unknown = sorted(set(tasks) - {t.metadata.name for t in found})
        if unknown:
            raise ConfigError(f"eval.mteb_tasks: unknown MTEB task(s) {', '.join(unknown)}")
        result = mteb.evaluate(model, found, encode_kwargs={"batch_size": batch_size}, cache=None)
        rows = [{"task": r.task_name, "main_score": float(r.get_score()), "scores": r.scores}
                for r in result.task_results]
    except Exception as err:  # noqa: BLE001 - mteb's own errors (downloads, tasks) become one line
        error = err if isinstance(err, DistillError) else \
            DistillError(f"MTEB evaluation failed ({type(err).__name__}: {' '.join(str(err).split())})")
        if not keep_going:
            raise error from None
        logger.error("%s", error)
        return [{"error": str(error)}]
    for row in rows:
        logger.info("MTEB %s: main score %.4f", row["task"], row["main_score"])
    return rows


def evaluate_model(
    model: str,
    data: str | None = None,
    *,
    teacher: str | None = None,
    dims: Sequence[int] | None = None,
    split: str = "test",
    batch_size: int = 64,
    out: str | None = None,
    trust_remote_code: bool = False,
    mteb_tasks: Sequence[str] | None = None,
    max_tokens: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """``python -m distill evaluate``: write ``eval.json`` and the report of ``model`` (and ``teacher``) on the eval
    set ``data`` (:func:`load_eval_set`) and/or the MTEB ``mteb_tasks`` into ``out`` (default: the model folder);
    returns the results and that folder. ``max_tokens``: padded tokens per encode batch (at most ``batch_size``
    texts), for the teacher and the student; None: ``batch_size`` texts a batch."""
    from distill import report
    from distill.config import check_mteb

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens-per-batch must be positive, got {max_tokens}")
    if not data and (teacher or not mteb_tasks):
        raise ConfigError("evaluate needs --data (a BEIR folder or Hub dataset; also for --teacher) or --mteb-tasks")
    if mteb_tasks:
        check_mteb("--mteb-tasks")
    beir = load_eval_set(data, split) if data else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_emb = None
    if teacher and beir is not None:
        from distill.models import TeacherEncoder, resolve_teacher_spec

        encoder = TeacherEncoder(resolve_teacher_spec(teacher, trust_remote_code=trust_remote_code), device)
        teacher_emb = encode_eval_set(beir.queries, beir.corpus, beir.qrels,
                                      lambda texts, role: encoder.encode(texts, role, batch_size, max_tokens))
        del encoder  # free the teacher before the student loads
        torch.cuda.empty_cache()
    student = _load_student(model, trust_remote_code, str(device))
    results: dict[str, Any] = {}
    if beir is not None:
        encode = student_encoder(student, batch_size, max_tokens=max_tokens)
        results = evaluate_settings(beir.queries, beir.corpus, beir.qrels, encode, teacher_emb, dims)
    if mteb_tasks:
        results["mteb"] = run_mteb(student, mteb_tasks, batch_size)
    results.update(model=str(model), data=data and str(data), split=split, teacher=teacher)
    out_dir = Path(out or model)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    extra = {key: results[key] for key in ("model", "data", "split", "teacher") if results[key]}
    report.write_report(out_dir, results, None, None, extra)
    return results, out_dir


if __name__ == "__main__":
    from distill.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
