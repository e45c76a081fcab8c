"""Hugging Face hub ids: recognised without guessing, resolved to a local snapshot once.

**Which arguments are hub ids.** ``hf://ORG/NAME`` (or ``hf://NAME``) always is. A bare argument
is one only when it cannot be a local path the user meant: it names nothing on disk, does not
start with ``.``, ``/`` or ``~``, has at most one ``/`` and no file extension of a weight file,
and, for ``ORG/NAME``, ``ORG`` is not an existing local directory. So ``gpt2`` and
``meta-llama/Meta-Llama-3-8B`` are hub ids, while a mistyped ``examples/tiny-lama`` (where
``examples/`` exists), ``out/final`` (where ``out/`` exists), ``./model`` or ``~/ckpt`` is a
local path that does not exist, refused at once as such.

**Resolution**, as transformers does it, through ``huggingface_hub`` (the ``hub`` extra), so
its cache and environment apply (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``HF_ENDPOINT``, ``HF_TOKEN``): the repository's file list is fetched in one request (no
retries); when the hub cannot be reached, or ``HF_HUB_OFFLINE`` is set, the snapshot already in
the cache is used. Only the files a run reads are downloaded (:func:`files_to_fetch`): the
config, the index and the shards it lists (never ``consolidated.*`` or ``original/`` beside
them), or another layout's own files. Under pytest-xdist the controller resolves the id and
hands the local path to the workers.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pytest_spectral.errors import CheckpointError

HUB_SCHEME = "hf://"
#: A repository name as the hub allows it: letters, digits, '-', '_', '.'; no '--' or '..',
#: not starting or ending with '-' or '.'; at most 96 characters.
_NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?:{_NAME}/)?{_NAME}$")
#: Extensions of files people pass as checkpoints: such an argument is always a local path.
_FILE_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".distcp")
INSTALL = "pip install 'pytest-spectral[hub]'"


def hub_id_of(argument: str) -> str | None:
    """The hub id ``argument`` names, or None when it is a local path (see the module doc).

    Raises :class:`CheckpointError` for an ``hf://`` argument that is no valid id.
    """
    if argument.startswith(HUB_SCHEME):
        repo_id = argument.removeprefix(HUB_SCHEME).strip("/")
        if not _HUB_ID.match(repo_id):
            raise CheckpointError(
                f"{argument}: not a hub id; write hf://ORG/NAME or hf://NAME (letters, digits, "
                "'-', '_' and '.')"
            )
        return repo_id
    if argument.startswith((".", "/", "~")) or os.path.lexists(argument):
        return None
    if argument.lower().endswith(_FILE_SUFFIXES) or not _HUB_ID.match(argument):
        return None
    owner = argument.rpartition("/")[0]
    if owner and os.path.isdir(owner):
        return None
    return argument


def local_hint(argument: str) -> str:
    """What a missing local path's message adds when it could also be meant as a hub id."""
    if not _HUB_ID.match(argument):
        return ""
    return f" (for the model {argument!r} on the Hugging Face hub, write hf://{argument})"


def _hub():  # the optional dependency, typed as a module
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def resolve_hub_model(repo_id: str, revision: str | None) -> Path:
    """The local snapshot directory of ``repo_id``, downloading what a run reads if the hub
    is reachable, else the snapshot already in the cache."""
    hub = _hub()
    if hub is None:
        raise CheckpointError(
            f"{repo_id}: no such file or directory, and reading hub ids needs huggingface_hub: "
            f"{INSTALL}"
        )
    from huggingface_hub import constants

    where = f"hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline_mode = bool(constants.HF_HUB_OFFLINE)
    try:
        if offline_mode:
            return Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
        try:
            info = hub.HfApi().model_info(repo_id, revision=revision)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            cached = cached_snapshot(repo_id, revision)
            if cached is None:
                raise
            return cached
        files = [sibling.rfilename for sibling in info.siblings or []]
        return _download(hub, repo_id, info.sha, files)
    except CheckpointError:
        raise
    except Exception as exc:  # the hub client raises a dozen types; all mean "not available"
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if offline_mode else ""
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{where}: cannot resolve{offline}: {type(exc).__name__}: {detail.rstrip('.')}; "
            f"{_advice(exc, offline_mode, revision)}"
        ) from None


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot of ``repo_id`` already in the local hub cache, or None (never a download)."""
    hub = _hub()
    if hub is None:
        return None
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, or a cache it cannot read: either way, not available
        return None


def _unreachable(exc: Exception) -> bool:
    """Whether a failure means the hub could not be reached (as opposed to an answer such as
    'no such repository'), judged by class name: the client's classes move between versions."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    answered = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}
    if kinds & answered:
        return False
    network = {"ConnectError", "ConnectionError", "TimeoutException", "Timeout", "NetworkError"}
    network |= {"TransportError", "OfflineModeIsEnabled", "ProxyError", "SSLError"}
    return bool(kinds & network)


def _download(hub: object, repo_id: str, commit: str | None, files: list[str]) -> Path:
    """Fetch what a run reads of the repository at ``commit``; return its snapshot."""
    index = next((name for name in _INDEXES if name in files), None)
    listed: list[str] = []
    if index is not None:
        first = hub.snapshot_download(  # type: ignore[attr-defined]
            repo_id, revision=commit, allow_patterns=[glob.escape(index)]
        )
        listed = _index_shards(Path(first) / index)
    chosen = files_to_fetch(files, listed)
    if not chosen:
        raise CheckpointError(
            f"hub model {repo_id!r}: holds none of the layouts pytest-spectral reads "
            f"(its files: {', '.join(sorted(files)[:12])}); for a GGUF repository, download the "
            ".gguf file and pass its path"
        )
    snapshot = hub.snapshot_download(  # type: ignore[attr-defined]
        repo_id, revision=commit, allow_patterns=[glob.escape(name) for name in chosen]
    )
    return Path(snapshot)


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _index_shards(index: Path) -> list[str]:
    """The shard names an index lists (checked again, like any index, when it is read)."""
    from pytest_spectral.untrusted import MAX_INDEX_BYTES, UntrustedFileError, load_json

    try:
        document = load_json(index, MAX_INDEX_BYTES, "weight index")
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return sorted({shard for shard in weight_map.values() if isinstance(shard, str)})


def files_to_fetch(files: Iterable[str], index_shards: Iterable[str] = ()) -> list[str]:
    """Which of a repository's ``files`` a run reads, in the order transformers prefers
    layouts: an index with the shards it lists (``index_shards``), a single safetensors file,
    the ``.bin`` equivalents, a PEFT adapter, Mistral's native files; with ``config.json``."""
    present = set(files)
    config = ["config.json"] if "config.json" in present else []
    for index in _INDEXES:
        if index in present:
            shards = [s for s in index_shards if s in present]
            return [*config, index, *shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if single in present:
            return [*config, single]
    if "adapter_config.json" in present:
        weights = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if f in present]
        return ["adapter_config.json", *weights[:1]]
    if "params.json" in present:
        native = sorted(f for f in present if fnmatch.fnmatch(f, "consolidated*.safetensors"))
        index = [f for f in present if f == "consolidated.safetensors.index.json"]
        if native:
            return ["params.json", *index, *native]
    return []


def _advice(exc: Exception, offline_mode: bool, revision: str | None) -> str:
    """What to do about a failed resolution, by the kind of failure (matched by class name,
    since the hub client's exception classes move between its versions)."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    if "GatedRepoError" in kinds:
        return (
            "the repository is gated: accept its licence on the hub, then log in "
            "(huggingface-cli login, or set HF_TOKEN)."
        )
    if "RevisionNotFoundError" in kinds:
        return f"the repository has no revision {revision!r}: check --spectral-revision."
    if "RepositoryNotFoundError" in kinds:
        return (
            "no such repository, or it is private: check the id, or log in "
            "(huggingface-cli login, or set HF_TOKEN)."
        )
    if offline_mode:
        return (
            "it is not in the local cache (HF_HUB_CACHE): unset HF_HUB_OFFLINE to download it, "
            "or pass a local checkpoint directory."
        )
    return (
        "the hub could not be reached and the model is not in the local cache (HF_HUB_CACHE): "
        "check the network (HF_ENDPOINT), or pass a local checkpoint directory."
    )


def hub_cache_directory() -> Path | None:
    """The resolved hub cache directory hub ids are read from (``HF_HUB_CACHE``), or ``None``
    without ``huggingface_hub``."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def describe_missing(argument: str) -> str:
    """The message for a local path that does not exist."""
    return f"{argument}: no such file or directory{local_hint(argument)}"
