"""Multimodal wrappers: a text decoder (analysed) beside a vision tower (not analysed).

A wrapper's ``config.json`` describes its text model in ``text_config``, built by transformers
with the wrapper's text config class: a fixed class (Gemma 3, Qwen2-VL), or the class the
nested ``model_type`` names with a default (LLaVA: ``llama``). transformers writes only the
nested keys that differ from that class's defaults (LLaVA-1.5 as published has no hidden size,
heads or layers in its ``text_config``), and Qwen2-VL as published writes its text keys at the
top level, with no ``text_config`` at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Wrapper:
    """How one multimodal ``model_type`` nests its text model's config."""

    #: the model_type of the text config class
    text_type: str
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


WRAPPERS: Mapping[str, Wrapper] = {
    "llava": Wrapper("llama", nested_type_chooses=True),
    "llava_next": Wrapper("llama", nested_type_chooses=True),
    "gemma3": Wrapper("gemma3_text"),
    "qwen2_vl": Wrapper("qwen2_vl_text", flat=True),
    "qwen2_5_vl": Wrapper("qwen2_5_vl_text", flat=True),
}
