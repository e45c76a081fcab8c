"""A family described by the user: the ``[architecture]`` table of ``--spectral-architecture``.

Everything in the file is checked for type and value before use (it may come from someone
else); the layout it describes is then checked against the checkpoint like any family's.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping

from pytest_spectral.checkpoints.families.family import (
    DENSE_MLP_MATRICES,
    FUSED_LAYOUTS,
    ArchitectureError,
    Family,
)

_TENSOR_KEYS = ("q", "k", "v", "o", "qkv")
#: [architecture] keys naming config.json keys, and the Family field each sets
_CONFIG_KEY_KEYS = {
    "layers_key": "layers_keys",
    "heads_key": "heads_keys",
    "hidden_key": "hidden_keys",
    "kv_heads_key": "kv_heads_keys",
    "head_dim_key": "head_dim_keys",
}
_CUSTOM_KEYS = {
    "layer",
    "fused",
    "conv1d",
    "mlp_layer",
    *_TENSOR_KEYS,
    *DENSE_MLP_MATRICES,
    *_CONFIG_KEY_KEYS,
}


def custom_family(table: Mapping[str, object], source: str) -> Family:
    """A family from the ``[architecture]`` table of a TOML file (see the README).

    Every key is checked for its type and value; raises :class:`ArchitectureError` naming
    ``source`` and the key.
    """

    def fail(key: str, message: str) -> ArchitectureError:
        return ArchitectureError(f"{source}: [architecture] key {key!r}: {message}")

    unknown = sorted(set(table) - _CUSTOM_KEYS)
    if unknown:
        raise ArchitectureError(
            f"{source}: unknown [architecture] keys {unknown}; allowed: {sorted(_CUSTOM_KEYS)}"
        )
    layer = _layer_template(table, "layer", "blocks.{layer}.attn.", fail)
    fused = table.get("fused")
    if fused is not None and (not isinstance(fused, str) or fused not in FUSED_LAYOUTS):
        raise fail("fused", f"must be one of {', '.join(FUSED_LAYOUTS)}, got {fused!r}")
    conv1d = table.get("conv1d", False)
    if not isinstance(conv1d, bool):
        raise fail("conv1d", f"must be true or false (not quoted), got {conv1d!r}")
    needed = ("qkv", "o") if fused else ("q", "k", "v", "o")
    for key in _TENSOR_KEYS:
        value = table.get(key)
        if key not in needed and value is not None:
            layout = "a fused layout ('fused' set)" if fused else "separate q, k, v tensors"
            raise fail(key, f"does not apply to {layout}")
        if key in needed and (not isinstance(value, str) or not value):
            raise fail(key, f"needs a tensor name (a non-empty string), got {value!r}")
    mlp = {}
    for key in DENSE_MLP_MATRICES:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise fail(key, f"needs a tensor name (a non-empty string), got {value!r}")
        if value is not None:
            mlp[key] = value
    mlp_layer = ""
    if mlp or "mlp_layer" in table:
        mlp_layer = _layer_template(table, "mlp_layer", "blocks.{layer}.mlp.", fail)
        if not mlp:
            raise fail(
                "mlp_layer", f"names no MLP tensor: add one of {', '.join(DENSE_MLP_MATRICES)}"
            )
    config_keys = {}
    for key, field_name in _CONFIG_KEY_KEYS.items():
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise fail(key, f"must name a config.json key (a non-empty string), got {value!r}")
        config_keys[field_name] = (value,)
    return Family(
        name="custom",
        configs={},
        layer=layer,
        tensors={key: table[key] for key in needed},  # type: ignore[misc]
        mlp_prefix=mlp_layer,
        mlp=mlp,
        fused=fused,  # type: ignore[arg-type]
        conv1d=conv1d,
        declared_in=source,
        **config_keys,  # type: ignore[arg-type]
    )


def _layer_template(
    table: Mapping[str, object],
    key: str,
    example: str,
    fail: Callable[[str, str], ArchitectureError],
) -> str:
    """A tensor-name prefix with the one placeholder ``{layer}``."""
    value = table.get(key)
    if not isinstance(value, str) or _placeholders(value) != ["layer"]:
        raise fail(
            key,
            "must be a string with the one placeholder '{layer}' (and no other braces), "
            f"e.g. {example!r}; got {value!r}",
        )
    return value


def _placeholders(template: str) -> list[str] | None:
    """The replacement fields of a ``str.format`` template, or ``None`` when a field has a
    conversion or format spec (``{layer!r}``, ``{layer:>9999999}``) or the braces do not
    parse."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    fields = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if spec or conversion:
            return None
        fields.append(name)
    return fields
