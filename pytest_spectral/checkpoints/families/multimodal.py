"""Multimodal wrappers: a text decoder (analysed) beside a vision tower (analysed when asked).

A wrapper's ``config.json`` describes its text model in ``text_config``, built by transformers
with the wrapper's text config class: a fixed class (Gemma 3, Qwen2-VL), or the class the
nested ``model_type`` names with a default (LLaVA: ``llama``). transformers writes only the
nested keys that differ from that class's defaults (LLaVA-1.5 as published has no hidden size,
heads or layers in its ``text_config``), and Qwen2-VL as published writes its text keys at the
top level, with no ``text_config`` at all.

Its vision tower is described the same way in ``vision_config`` (:class:`Tower`): a class the
nested ``model_type`` may choose (LLaVA: ``clip_vision_model`` by default), whose class
defaults fill in what the file leaves out; a wrapper without any ``vision_config`` builds the
tower its own ``__init__`` names (LLaVA's CLIP ViT-L/14-336 geometry, not CLIP's class
defaults). Only the tower's transformer layers are analysed (``--spectral-vision``): its patch
embedding and the projector into the text model's width are no attention and no per-layer MLP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pytest_spectral.checkpoints.families.family import ConfigClass, Family


@dataclass(frozen=True)
class Tower:
    """How one multimodal ``model_type`` nests its vision tower's config."""

    #: the model_type of the vision config class (when ``vision_config`` names none, or the
    #: class is fixed)
    vision_type: str
    #: whether ``vision_config.model_type`` chooses the class (``vision_type`` when absent)
    nested_type_chooses: bool = False
    #: the keys the wrapper's ``__init__`` gives the tower when ``vision_config`` is absent
    #: (over the class defaults)
    when_absent: Mapping[str, object] = field(default_factory=dict)

    def vision_config(self, config: Mapping[str, object]) -> dict[str, object]:
        """The tower's config, with its ``model_type`` set to the class it builds."""
        nested = config.get("vision_config")
        vision = dict(nested) if isinstance(nested, Mapping) else dict(self.when_absent)
        chosen = vision.get("model_type") if self.nested_type_chooses else None
        vision["model_type"] = chosen if chosen is not None else self.vision_type
        return vision


@dataclass(frozen=True)
class Wrapper:
    """How one multimodal ``model_type`` nests its text model's config, and its tower's."""

    #: the model_type of the text config class
    text_type: str
    #: the vision tower
    tower: Tower
    #: whether ``text_config.model_type`` chooses the class (``text_type`` when absent)
    nested_type_chooses: bool = False
    #: whether a config without ``text_config`` holds the text keys at its top level
    flat: bool = False

    def text_config(self, config: Mapping[str, object]) -> dict[str, object]:
        """The text model's config, with its ``model_type`` set to the class it builds."""
        nested = config.get("text_config")
        if isinstance(nested, Mapping):
            text = dict(nested)
        elif self.flat:
            text = {k: v for k, v in config.items() if k not in ("vision_config", "text_config")}
        else:
            text = {}
        chosen = text.get("model_type") if self.nested_type_chooses else None
        text["model_type"] = chosen if chosen is not None else self.text_type
        return text


#: LlavaConfig's tower without a ``vision_config``: CLIP ViT-L/14 at 336 pixels
_LLAVA_TOWER = Tower(
    "clip_vision_model",
    nested_type_chooses=True,
    when_absent={"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24},
)

WRAPPERS: Mapping[str, Wrapper] = {
    "llava": Wrapper("llama", _LLAVA_TOWER, nested_type_chooses=True),
    "llava_next": Wrapper("llama", _LLAVA_TOWER, nested_type_chooses=True),
    "gemma3": Wrapper("gemma3_text", Tower("siglip_vision_model", nested_type_chooses=True)),
    "qwen2_vl": Wrapper("qwen2_vl_text", Tower("qwen2_vl_vision"), flat=True),
    "qwen2_5_vl": Wrapper("qwen2_5_vl_text", Tower("qwen2_5_vl_vision"), flat=True),
}

_QWEN_VISION_NOTE = "`visual.blocks.N.attn.qkv` (fused: all Q heads, then K, then V), `attn.proj`"

#: vision towers that exist only inside a wrapper (CLIP's and SigLIP's towers are families of
#: their own, :mod:`~pytest_spectral.checkpoints.families.encoders`). Qwen2-VL's tower is
#: ``embed_dim`` wide (its ``hidden_size`` is the merger's output); Qwen2.5-VL's is
#: ``hidden_size`` wide. Both fuse Q, K and V as ``reshape(tokens, 3, heads, head_dim)``.
VISION_FAMILIES: tuple[Family, ...] = (
    Family(
        "qwen2_vl_vision",
        {"qwen2_vl_vision": ConfigClass({"depth": 32, "embed_dim": 1280, "num_heads": 16})},
        layer="blocks.{layer}.attn.",
        tensors={"qkv": "qkv.weight", "o": "proj.weight"},
        mlp_prefix="blocks.{layer}.mlp.",
        mlp={"fc1": "fc1.weight", "fc2": "fc2.weight"},
        fused="concat",
        layers_keys=("depth",),
        heads_keys=("num_heads",),
        hidden_keys=("embed_dim",),
        kv_heads_keys=(),
        head_dim_keys=(),
        note=_QWEN_VISION_NOTE,
    ),
    Family(
        "qwen2_5_vl_vision",
        {"qwen2_5_vl_vision": ConfigClass({"depth": 32, "hidden_size": 3584, "num_heads": 16})},
        layer="blocks.{layer}.attn.",
        tensors={"qkv": "qkv.weight", "o": "proj.weight"},
        mlp_prefix="blocks.{layer}.mlp.",
        mlp={"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"},
        fused="concat",
        layers_keys=("depth",),
        heads_keys=("num_heads",),
        kv_heads_keys=(),
        head_dim_keys=(),
        note=_QWEN_VISION_NOTE,
    ),
)
