"""Stand-in for the ``mteb`` package (mteb 2's ``get_tasks`` / ``evaluate`` surface) for the tests: each evaluate call
is recorded in ``CALLS`` and, when ``$FAKE_MTEB_LOG`` is set, appended to that file; a task's main score is the
model's embedding dimension plus a tenth of its position, so the results prove which model was scored."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

CALLS: list[dict[str, Any]] = []


def get_tasks(tasks: list[str]) -> list[SimpleNamespace]:
    """The tasks whose names do not start with ``Unknown`` (the real one leaves out what it does not know, too)."""
    return [SimpleNamespace(metadata=SimpleNamespace(name=t)) for t in tasks if not t.startswith("Unknown")]


def evaluate(model: Any, tasks: list[SimpleNamespace], *, encode_kwargs: dict | None = None,
             cache: Any = "default") -> SimpleNamespace:
    if os.environ.get("FAKE_MTEB_FAIL"):
        raise RuntimeError(os.environ["FAKE_MTEB_FAIL"])
    dim = len(model.encode(["a probe sentence"])[0])
    call = {"tasks": [t.metadata.name for t in tasks], "model": type(model).__name__, "dim": dim,
            "encode_kwargs": encode_kwargs, "cache": cache, "rank": os.environ.get("RANK", "0")}
    CALLS.append(call)
    if os.environ.get("FAKE_MTEB_LOG"):
        with open(os.environ["FAKE_MTEB_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps(call) + "\n")
    results = [SimpleNamespace(task_name=t.metadata.name, get_score=lambda s=dim + i / 10: s,
                               scores={"test": [{"main_score": dim + i / 10, "hf_subset": "default"}]})
               for i, t in enumerate(tasks)]
    return SimpleNamespace(task_results=results)
