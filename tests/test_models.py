"""How distill.models reads a Hub teacher's sentence-transformers files when the Hub cannot be reached, or answers
that a file does not exist (no network here: the Hub client is driven offline or replaced)."""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub.errors import EntryNotFoundError

from distill.errors import ConfigError
from distill.models import _read_model_file, resolve_teacher_spec

HUB_ID = "infly/inf-retriever-v1-pro"


def test_unreachable_uncached_hub_teacher_is_named_not_mistaken_for_a_plain_model() -> None:
    """Offline (conftest sets HF_HUB_OFFLINE before huggingface_hub is imported) and not in the HF cache: the error
    names the file and the model. huggingface_hub >= 1.0 makes LocalEntryNotFoundError a subclass of
    EntryNotFoundError; caught as "no such file", it read as "ships no modules.json" and blamed the pooling."""
    with pytest.raises(ConfigError, match=f"cannot read modules.json of '{HUB_ID}': not a local folder and not "
                                          "reachable on the Hub .*HF_HUB_OFFLINE=1"):
        resolve_teacher_spec(HUB_ID, pooling="last_token")


def test_a_file_the_hub_does_not_have_reads_as_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_file(repo_id: str, filename: str, **kwargs: object) -> str:
        # the base class of RemoteEntryNotFoundError (the Hub's 404 for a file), which needs an HTTP response
        raise EntryNotFoundError(f"404 Entry Not Found: {repo_id}/{filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_file)
    assert _read_model_file(HUB_ID, "modules.json", None) is None
    with pytest.raises(ConfigError, match="ships no sentence-transformers config .*set teacher_pooling"):
        resolve_teacher_spec(HUB_ID)
