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
    try:
        if constants.HF_HUB_OFFLINE:
            patterns = SAFETENSORS_FILES + BIN_FILES  # whatever the cache holds
        else:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            patterns = SAFETENSORS_FILES if has_safetensors else BIN_FILES
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises a dozen types; all mean "not available"
        offline = (
            " (HF_HUB_OFFLINE is set: only the local cache is used)"
            if (constants.HF_HUB_OFFLINE)
            else ""
        )
        raise CheckpointError(
            f"{where}: cannot resolve{offline}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
