"""Models on the Hugging Face Hub: `resolve_model_dir` turns a local directory or a Hub repo id ("owner/name") into a
local directory (`resolve_adapter_dir` does the same for a PEFT LoRA adapter), and `push_to_hub` uploads a model
directory.

Downloads go through huggingface_hub's cache and fetch only what Cheers reads: config.json and the shard index
first, then the shards the index names (or model.safetensors), the tokenizer files, generation_config.json and
preprocessor_config.json. huggingface_hub itself reads HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and
HF_TOKEN, and shows its own progress bars; nothing here overrides them.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cheers.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError

if TYPE_CHECKING:  # huggingface_hub is imported only when a repo id is actually resolved
    from huggingface_hub import CommitInfo

CONFIG_NAME = "config.json"
# CheersTokenizer.from_dir reads tokenizer.json when present, else vocab.json + merges.txt (+ tokenizer_config.json).
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_BPE = ("vocab.json", "merges.txt")
TOKENIZER_CONFIG = "tokenizer_config.json"
OPTIONAL_FILES = ("generation_config.json", "preprocessor_config.json")


class HubError(CheckpointError):
    """A model cannot be fetched from (or pushed to) the Hub; the message names the repo id and the cause."""


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                      token: str | bool | None = None) -> Path:
    """A local model directory for `name_or_path`: an existing local directory as given (it wins over a repo id of
    the same name; the other arguments are then unused), otherwise the Hub repo `name_or_path` at `revision`
    (default: the main branch), downloaded into huggingface_hub's cache (`cache_dir` overrides HF_HUB_CACHE) and
    returned as its snapshot directory. `local_files_only=True` (or HF_HUB_OFFLINE=1) uses the cache only."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or not isinstance(name_or_path, str) or not _is_repo_id(name_or_path):
        raise CheckpointError(f"{path}: not a directory")
    return _download_model(name_or_path, revision, cache_dir, local_files_only, token)


def resolve_adapter_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> Path:
    """A local PEFT adapter directory for `name_or_path`: an existing directory as given, otherwise the Hub repo
    of that id, of which only adapter_config.json and adapter_model.safetensors are downloaded (arguments as in
    `resolve_model_dir`)."""
    from cheers.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or not isinstance(name_or_path, str) or not _is_repo_id(name_or_path):
        raise CheckpointError(f"{path}: not a directory")
    snap = _snapshot(name_or_path, [ADAPTER_CONFIG, ADAPTER_WEIGHTS], revision, cache_dir, local_files_only, token,
                     revision)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (snap / f).is_file()]
    if missing:
        raise HubError(f"{_where(name_or_path, revision)}: no {' or '.join(missing)} in the repo (not a PEFT LoRA "
                       "adapter)")
    return snap


def push_to_hub(local_dir: str | os.PathLike, repo_id: str, token: str | bool | None = None,
                revision: str | None = None, private: bool | None = None,
                commit_message: str = "Upload Cheers model") -> "CommitInfo":
    """Upload every file of the model directory `local_dir` to the Hub repo `repo_id` with huggingface_hub's
    `upload_folder` (creating the repo, and the branch `revision` when given, if missing; unchanged files are not
    sent again). Returns huggingface_hub's CommitInfo (a str: the commit's URL; `.oid` is its hash)."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(local_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (not a Cheers model directory)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=directory, revision=revision,
                                 commit_message=commit_message)
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as err:
        raise HubError(f"{repo_id}: upload to {_endpoint()} failed ({_one_line(err)})") from None


# ---- internals --------------------------------------------------------------------------------------------------
def _is_repo_id(name: str) -> bool:
    """Shaped like a Hub repo id ("name" or "owner/name"), so not an absolute or dotted relative path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if "\\" in name or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cache(cache_dir: str | os.PathLike | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)


def _one_line(err: BaseException) -> str:
    """huggingface_hub's messages span lines (URL, hints); keep their first line."""
    text = str(err).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


def _where(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id} (revision '{revision}')"


def _snapshot(repo_id: str, patterns: list[str], revision: str | None, cache_dir: str | os.PathLike | None,
              local_files_only: bool, token: str | bool | None, shown_revision: str | None) -> Path:
    """snapshot_download of the files named in `patterns`, its errors turned into one-line HubErrors."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = _where(repo_id, shown_revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token,
                                      allow_patterns=[glob.escape(p) for p in patterns]))
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision '{shown_revision}' not found on the Hub ({_endpoint()})") from None
    except GatedRepoError:
        raise HubError(f"{repo_id}: gated repo on {_endpoint()}; accept its conditions on the Hub and log in "
                       "(HF_TOKEN or token=)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: not a local directory, and no such repo on the Hub ({_endpoint()}); a private "
                       "repo needs a token (HF_TOKEN or token=)") from None
    except LocalEntryNotFoundError as err:
        # raised when nothing could be fetched: offline by choice, or the Hub unreachable, and the cache lacks files
        if local_files_only or constants.is_offline_mode():
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
            raise HubError(f"{where}: not in the Hub cache {_cache(cache_dir)} (complete), and downloads are off "
                           f"({why})") from None
        cause = err.__cause__ or err
        raise HubError(f"{where}: the Hub ({_endpoint()}) cannot be reached ({_one_line(cause)}) and the model is "
                       f"not in the Hub cache {_cache(cache_dir)}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubError(f"{where}: not authorized on {_endpoint()} (HTTP {status}); check the token "
                           "(HF_TOKEN or token=)") from None
        raise HubError(f"{where}: download from {_endpoint()} failed ({_one_line(err)})") from None
    except (OSError, ValueError, httpx2.HTTPError) as err:  # connection lost for good, disk full, bad size, ...
        raise HubError(f"{where}: download failed ({_one_line(err)})") from None


def _repo_files(repo_id: str, commit: str, cache_dir: str | os.PathLike | None) -> set[str] | None:
    """The repo's file names at `commit` from the listing huggingface_hub caches, or None when not cached."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)}
    except CachedRepoTreeNotFoundError:
        return None


def _download_model(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool,
                    token: str | bool | None) -> Path:
    where = _where(repo_id, revision)
    # Step 1: config.json and the index, which say what else is needed.
    first = _snapshot(repo_id, [CONFIG_NAME, INDEX_NAME], revision, cache_dir, local_files_only, token, revision)
    if not (first / CONFIG_NAME).is_file():
        raise HubError(f"{where}: no {CONFIG_NAME} in the repo (not a Cheers model); snapshot {first}")
    commit = first.name  # the snapshot directory is named by its commit: step 2 reads the very same revision
    weights = [SINGLE_NAME]
    index = first / INDEX_NAME
    if index.is_file():
        try:
            weights = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise HubError(f"{where}: {INDEX_NAME} is not a valid safetensors index ({err})") from None
    files = _repo_files(repo_id, commit, cache_dir)
    tokenizer = [TOKENIZER_JSON, TOKENIZER_CONFIG]
    if files is None or TOKENIZER_JSON not in files:
        tokenizer += list(TOKENIZER_BPE)
    # Step 2: weights, tokenizer and the optional configs; names the repo lacks are simply not matched.
    snap = _snapshot(repo_id, weights + tokenizer + list(OPTIONAL_FILES), commit, cache_dir, local_files_only,
                     token, revision)
    missing = [w for w in weights if not (snap / w).is_file()]
    if missing:
        if files is None:  # offline without the cached listing: cannot tell "not in the repo" from "not fetched"
            raise HubError(f"{where}: {', '.join(missing)} missing from the cached snapshot {snap} (not in the repo, "
                           "or never downloaded)")
        if index.is_file():
            raise HubError(f"{where}: {INDEX_NAME} names shard(s) the repo lacks: {', '.join(missing)}")
        raise HubError(f"{where}: no model weights in the repo (expected {SINGLE_NAME} or {INDEX_NAME})")
    return snap
