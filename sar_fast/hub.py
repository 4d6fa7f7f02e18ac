"""Weights named by a Hugging Face Hub id: `hf://OWNER/REPO/PATH/IN/REPO[@REVISION]`.

`resolve_weights_path` is the one place an id becomes a local file: every flag and loader
that takes weights (--init, --vae, --ckpt, `load_checkpoint`, `load_tokenizer`, the
converter) passes its argument through it; a plain path comes back unchanged.

Resolution is `huggingface_hub.hf_hub_download`: it downloads into the HF cache when the Hub
can be reached and returns the cached copy when it cannot (or when `HF_HUB_OFFLINE=1`).
Several processes resolving the same id at once (the ranks of a torchrun launch) are safe:
the library downloads each file under a lock in the cache, so one process downloads and the
others find it there. A sharded `*.safetensors.index.json` brings its shards along.
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import NamedTuple

from .safe_load import CheckpointError

__all__ = ["HubError", "HubId", "hub_cache_dir", "is_hub_id", "parse_hub_id", "resolve_weights_path"]

PREFIX = "hf://"
# the Hub's own rules: names of letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters
_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_FORM = "hf://OWNER/REPO/FILE[@REVISION], e.g. hf://jiaosiyu1999/FlexVAR/FlexVARd16-epo179.pth"


class HubError(CheckpointError):
    """A Hub id that is malformed or cannot be resolved to a local file."""


class HubId(NamedTuple):
    repo_id: str             # OWNER/REPO
    filename: str            # the file's path inside the repository
    revision: str | None     # branch, tag or commit hash; None: the default branch


def is_hub_id(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_hub_id(spec: str) -> HubId:
    """OWNER, REPO, the file's path in the repository (sub-folders allowed) and the optional
    @REVISION (a branch, tag or commit hash); HubError for anything else."""
    if not is_hub_id(spec):
        raise HubError(f"{spec!r} is not a Hub id; expected {_FORM}")
    body, at, revision = spec[len(PREFIX):].partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(f"malformed Hub id {spec!r}: expected {_FORM} (owner, repository and a file)")
    owner, repo, path = parts[0], parts[1], parts[2:]
    for what, name in (("owner", owner), ("repository", repo)):
        if not _NAME.match(name):
            raise HubError(f"malformed Hub id {spec!r}: bad {what} name {name!r} (letters, digits, '-', '_', '.')")
    if any(p in (".", "..") for p in path) or "\\" in body:
        raise HubError(f"malformed Hub id {spec!r}: the file path may not hold '.', '..' or backslashes")
    if at and not _REVISION.match(revision):
        raise HubError(f"malformed Hub id {spec!r}: bad revision {revision!r} after '@'")
    return HubId(f"{owner}/{repo}", "/".join(path), revision if at else None)


def hub_cache_dir() -> str:
    """The HF cache folder as the environment names it now (HF_HUB_CACHE, else HF_HOME/hub,
    else ~/.cache/huggingface/hub): read at each call, not at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


_resolved: dict[tuple[str, str, bool], str] = {}
_lock = threading.Lock()


def resolve_weights_path(spec: str | os.PathLike) -> str:
    """A local path for `spec`: a plain path as given (str), a Hub id through the HF cache
    (downloading when online). Each id is resolved once per process and cache folder."""
    if not is_hub_id(spec):
        return os.fspath(spec)
    hub_id = parse_hub_id(spec)
    key = (spec, hub_cache_dir(), _offline())
    with _lock:
        if key not in _resolved:
            path = _download(spec, hub_id)
            if path.endswith(".index.json"):
                _download_shards(spec, hub_id, path)
            _resolved[key] = path
        return _resolved[key]


def _download(spec: str, hub_id: HubId, filename: str | None = None) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise HubError(f"{spec}: Hub ids need huggingface_hub (pip install huggingface_hub)") from None
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    cache, offline = hub_cache_dir(), _offline()
    try:
        return hf_hub_download(hub_id.repo_id, filename or hub_id.filename, revision=hub_id.revision,
                               cache_dir=cache, local_files_only=offline)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 is set, so the Hub was not asked" if offline else \
            "the Hub could not be reached (HF_HUB_OFFLINE is not set)"
        raise HubError(f"{spec}: {filename or hub_id.filename} is not in the HF cache {cache} and {why}; download "
                       f"it while online (or point HF_HUB_CACHE / HF_HOME at a cache that holds it)") from None
    except HFValidationError as e:
        raise HubError(f"malformed Hub id {spec!r}: {e}") from None
    except Exception as e:  # the Hub answered: no such repository, file or revision; gated; ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HubError(f"{spec}: cannot fetch {filename or hub_id.filename} from {hub_id.repo_id}"
                       f"{'@' + hub_id.revision if hub_id.revision else ''}: {type(e).__name__}: {first} "
                       f"(HF cache {cache}, HF_HUB_OFFLINE {'set' if offline else 'not set'})") from None


def _download_shards(spec: str, hub_id: HubId, index_path: str) -> None:
    """The shards a downloaded index names, into the same snapshot folder (the local reader
    validates the index itself)."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{spec}: the index {index_path} is not a safetensors index with a weight_map "
                              f"({type(e).__name__}: {e})") from None
    folder = os.path.dirname(hub_id.filename)
    for shard in shards:
        if not isinstance(shard, str) or shard.startswith("/") or ".." in shard.split("/"):
            raise CheckpointError(f"{spec}: the index names a shard outside its folder: {shard!r}")
        _download(spec, hub_id, f"{folder}/{shard}" if folder else shard)
