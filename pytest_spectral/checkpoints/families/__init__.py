"""Every architecture the plugin knows: one declarative entry per family, in modules by kind.

:func:`text_model` reads a ``config.json`` as transformers would (wrappers unwrapped, aliases
and class defaults applied) and names the family whose layout its checkpoints have.
"""

from __future__ import annotations

from collections.abc import Mapping

from pytest_spectral.checkpoints.families.custom import custom_family
from pytest_spectral.checkpoints.families.decoders import DECODERS
from pytest_spectral.checkpoints.families.encoder_decoder import ENCODER_DECODERS
from pytest_spectral.checkpoints.families.encoders import ENCODERS
from pytest_spectral.checkpoints.families.family import (
    DENSE_MLP_MATRICES,
    FUSED_LAYOUTS,
    LATENT_MATRICES,
    RULE_STACK_NAMES,
    STACK_NAMES,
    STACKS,
    TEXT,
    VISION,
    ArchitectureError,
    ConfigClass,
    Family,
    Latent,
    Stack,
    Variant,
)
from pytest_spectral.checkpoints.families.moe import (
    EXPERT_MATRICES,
    ROUTER,
    SHARED_MATRICES,
    ExpertMatrix,
    Moe,
    expert_item,
    matrix_kind,
    split_expert_item,
)
from pytest_spectral.checkpoints.families.multimodal import (
    VISION_FAMILIES,
    WRAPPERS,
    Tower,
    Wrapper,
)

#: names of whole-matrix MLP items (for experts, their kinds), across families
MLP_MATRICES: tuple[str, ...] = DENSE_MLP_MATRICES + EXPERT_MATRICES + SHARED_MATRICES + (ROUTER,)
#: matrices that exist as whole matrices only: multi-head latent attention's and the MLP's
WHOLE_ONLY_MATRICES: tuple[str, ...] = LATENT_MATRICES + MLP_MATRICES

FAMILIES: tuple[Family, ...] = DECODERS + ENCODERS + ENCODER_DECODERS
#: the model types a wrapper's vision tower may have (its ``vision_config.model_type``)
VISION_TOWER_TYPES: tuple[str, ...] = (
    "clip_vision_model",
    "siglip_vision_model",
    *(t for f in VISION_FAMILIES for t in f.model_types),
)
#: model types analysed as themselves, then the multimodal wrappers (their text model analysed)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    *(t for f in FAMILIES for t in f.model_types),
    *WRAPPERS,
)
#: model types without attention (state-space and recurrent models): refused as such
NO_ATTENTION: tuple[str, ...] = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
#: a model_type nobody declared, whose tensors follow the most common layout, is read as this
GENERIC = next(f for f in FAMILIES if f.name == "llama")


def family_for(model_type: object) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def vision_model(config: Mapping[str, object]) -> tuple[dict[str, object], Family]:
    """The config of a multimodal wrapper's vision tower, as transformers' config class sees
    it (class defaults and aliases applied), and the family of its layers.

    Raises :class:`ArchitectureError` naming the key: a ``model_type`` that is no wrapper the
    plugin declares (a text-only model has no tower to analyse), or a ``vision_config`` whose
    ``model_type`` has no layout the plugin knows.
    """
    model_type = config.get("model_type")
    wrapper = WRAPPERS.get(model_type) if isinstance(model_type, str) else None
    if wrapper is None:
        return _no_tower(config)
    nested = config.get("vision_config")
    if nested is not None and not isinstance(nested, Mapping):
        raise ArchitectureError(
            f"'vision_config' must be an object (the vision tower's config), got "
            f"{printable_type(nested)}"
        )
    vision = wrapper.tower.vision_config(config)
    tower_type = vision["model_type"]
    family = next(
        (f for f in (*FAMILIES, *VISION_FAMILIES) if tower_type in f.model_types), None
    )
    if family is None or tower_type not in VISION_TOWER_TYPES:
        known = ", ".join(VISION_TOWER_TYPES)
        raise ArchitectureError(
            f"'vision_config.model_type' is {printable_type(tower_type)}: no vision tower layout "
            f"the plugin knows (known: {known}); run without --spectral-vision to analyse the "
            "text model alone"
        )
    return family.configs[str(tower_type)].resolve(vision), family


def _no_tower(config: Mapping[str, object]) -> tuple[dict[str, object], Family]:
    """Refuse --spectral-vision for a model without a declared tower, saying why."""
    model_type = printable_type(config.get("model_type"))
    wrappers = ", ".join(WRAPPERS)
    if isinstance(config.get("vision_config"), Mapping):
        why = "has a vision_config, but is no multimodal wrapper the plugin declares"
    else:
        why = "has no vision tower (no multimodal wrapper)"
    raise ArchitectureError(
        f"--spectral-vision: model_type {model_type} {why}; vision towers are analysed for "
        f"{wrappers}. Run without --spectral-vision"
    )


def printable_type(value: object) -> str:
    """A model_type as messages quote it (any JSON value, shortened)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def text_model(config: Mapping[str, object]) -> tuple[dict[str, object], Family | None]:
    """The config of the model to analyse, as transformers' config class sees it, and its
    family (``None`` for a ``model_type`` no entry declares: the config is returned as is).

    A multimodal wrapper gives its text model's config; an unknown ``model_type`` with a
    ``text_config`` (a wrapper not declared here) gives that ``text_config``. Raises
    :class:`ArchitectureError` for a ``text_config`` that is no JSON object.
    """
    model_type = config.get("model_type")
    nested = config.get("text_config")
    if nested is not None and not isinstance(nested, Mapping):
        raise ArchitectureError(
            f"'text_config' must be an object (the text model's config), got "
            f"{printable_type(nested)}"
        )
    wrapper = WRAPPERS.get(model_type) if isinstance(model_type, str) else None
    if wrapper is not None:
        config = wrapper.text_config(config)
    elif family_for(model_type) is None and isinstance(config.get("text_config"), Mapping):
        config = dict(config["text_config"])  # type: ignore[call-overload]
    family = family_for(config.get("model_type"))
    if family is None:
        return dict(config), None
    return family.configs[str(config["model_type"])].resolve(config), family


__all__ = [
    "EXPERT_MATRICES",
    "FAMILIES",
    "FUSED_LAYOUTS",
    "GENERIC",
    "LATENT_MATRICES",
    "MLP_MATRICES",
    "NO_ATTENTION",
    "RULE_STACK_NAMES",
    "STACKS",
    "STACK_NAMES",
    "SUPPORTED_MODEL_TYPES",
    "TEXT",
    "VISION",
    "VISION_FAMILIES",
    "VISION_TOWER_TYPES",
    "WHOLE_ONLY_MATRICES",
    "WRAPPERS",
    "ArchitectureError",
    "ConfigClass",
    "ExpertMatrix",
    "Family",
    "Latent",
    "Moe",
    "Stack",
    "Tower",
    "Variant",
    "Wrapper",
    "custom_family",
    "expert_item",
    "family_for",
    "matrix_kind",
    "split_expert_item",
    "text_model",
    "vision_model",
]
