"""Hugging Face hub ids: resolved to a local snapshot once, before anything else runs.

Resolution goes through ``huggingface_hub`` (the ``hub`` extra), so its cache and its
environment are respected: ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``. Only what the
plugin reads is downloaded: ``config.json`` and the safetensors weights with their index, or,
for a repository without safetensors, the ``pytorch_model*.bin`` files; never optimizer states,
other formats or tokenizers. Under pytest-xdist the controller resolves and hands the local
path to the workers.
"""

from __future__ import annotations

import re
from pathlib import Path

from pytest_spectral.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]


def looks_like_hub_id(argument: str) -> bool:
    return bool(_HUB_ID.match(argument)) and not Path(argument).expanduser().exists()


def resolve_hub_model(repo_id: str, revision: str | None) -> Path:
    """The local snapshot directory of ``repo_id``, downloading what is missing if allowed."""
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such file or directory, and reading hub ids needs huggingface_hub: "
            "pip install 'pytest-spectral[hub]'"
        ) from None
    where = f"hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline_mode = bool(constants.HF_HUB_OFFLINE)
    try:
        if offline_mode:
            patterns = SAFETENSORS_FILES + BIN_FILES  # whatever the cache holds
        else:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            patterns = SAFETENSORS_FILES if has_safetensors else BIN_FILES
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises a dozen types; all mean "not available"
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if offline_mode else ""
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{where}: cannot resolve{offline}: {type(exc).__name__}: {detail.rstrip('.')}; "
            f"{_advice(exc, offline_mode, revision)}"
        ) from None


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
        "the hub could not be reached: check the network, set HF_HUB_OFFLINE=1 to use a "
        "snapshot already in the cache, or pass a local checkpoint directory."
    )


def hub_cache_directory() -> Path | None:
    """The resolved hub cache directory hub ids are read from (``HF_HUB_CACHE``), or ``None``
    without ``huggingface_hub``."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE).expanduser().resolve()
