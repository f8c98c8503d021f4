"""Where a model or tokenizer comes from — a local directory or a Hugging Face hub id — checked
before anything loads.

``from_pretrained`` turns a missing local directory into a hub lookup (``Repo id must be in the
form ...``) and, without network, retries for tens of seconds before failing without naming the
setting that asked for the model. :func:`resolve_source` answers at once instead:

* a directory that exists must hold ``config.json`` (models) or tokenizer files (tokenizers);
* a name that can only be a path (absolute, ``./``, ``../``, ``~``, several ``/``) must exist;
* anything else is a hub id: it is used from the local Hugging Face cache when the hub cannot be
  reached (one connection attempt with a few seconds' timeout, or ``HF_HUB_OFFLINE=1``) and
  refused, naming the setting and how to give a local directory, when it is not cached either.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mta.errors import UserError

__all__ = ["ModelSource", "hub_reachable", "load_pretrained", "resolve_source"]

Kind = Literal["model", "tokenizer"]

HUB_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What a saved fast or slow tokenizer leaves in its folder (any one is enough to try loading).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class ModelSource:
    """A checked source: ``name`` as given, and whether ``from_pretrained`` must stay offline
    (``local_files_only``: a local directory, or a hub id used from the cache)."""

    key: str
    name: str
    local_files_only: bool


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``) answers, in at most a few seconds: one TCP
    connection, or, behind a proxy (``HTTPS_PROXY``/``ALL_PROXY``, which a direct connection
    would bypass), one HTTP request through huggingface_hub's own client. No retries."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        from huggingface_hub.utils import get_session

        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
        except Exception:  # any failure to get an answer means: not reachable from here
            return False
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _cached(name: str, kind: Kind) -> bool:
    from huggingface_hub import try_to_load_from_cache

    files = ("config.json",) if kind == "model" else _TOKENIZER_FILES
    return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_source(key: str, name: str, kind: Kind = "model") -> ModelSource:
    """Check the model or tokenizer ``name`` given by the setting ``key`` (no weights load).

    Raises:
        UserError: naming ``key``: a local path that does not exist or holds no model/tokenizer,
            a malformed hub id, or a hub id that is neither cached nor reachable.
    """
    path = Path(name).expanduser()
    what = (
        "config.json (or a PEFT adapter's adapter_config.json)"
        if kind == "model"
        else "tokenizer files (tokenizer.json, ...)"
    )
    if path.is_dir():
        # an adapter folder loads with its base model through transformers' PEFT integration
        wanted = ("config.json", "adapter_config.json") if kind == "model" else _TOKENIZER_FILES
        if not any((path / f).is_file() for f in wanted):
            raise UserError(
                f"{key}: directory {name!r} holds no {what}; give the folder a "
                f"{'model' if kind == 'model' else 'tokenizer'} was saved to "
                "(save_pretrained)"
            )
        return ModelSource(key, str(path), local_files_only=True)
    if path.exists():
        raise UserError(f"{key}: {name!r} is a file; give the directory of a saved {kind}")
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise UserError(
            f"{key}: local directory {name!r} does not exist (check the path; a hub id looks "
            "like 'gpt2' or 'org/name')"
        )
    if not _offline_env() and hub_reachable():
        return ModelSource(key, name, local_files_only=False)
    if _cached(name, kind):
        return ModelSource(key, name, local_files_only=True)
    reason = (
        "HF_HUB_OFFLINE is set"
        if _offline_env()
        else "the Hugging Face hub cannot be reached from this machine"
    )
    raise UserError(
        f"{key}: {name!r} is not a local directory, {reason} and the {kind} is not in the local "
        f"Hugging Face cache; download it where there is network (huggingface-cli download "
        f"{name} --local-dir DIR) and set {key}=DIR"
    )


def load_pretrained(loader: Any, source: ModelSource, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` (``AutoTokenizer``, ``AutoModelForCausalLM``, ...) of a checked
    source, offline where it must be.

    Raises:
        UserError: naming the setting, when the files cannot be read or describe something the
            loader cannot build (``OSError``/``ValueError`` from ``from_pretrained``).
    """
    try:
        return loader.from_pretrained(
            source.name, local_files_only=source.local_files_only, **kwargs
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{source.key} {source.name!r}: {err}") from None
