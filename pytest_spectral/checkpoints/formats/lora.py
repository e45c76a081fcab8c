"""PEFT LoRA adapters: ``adapter_config.json`` with ``adapter_model.safetensors``.

A LoRA adapter stores, for each module it adapts, two small matrices: ``lora_A`` (r x in) and
``lora_B`` (out x r). The update it makes to the module's weight is

    ΔW = s · B·A,   s = lora_alpha / r   (rsLoRA, ``use_rslora``: lora_alpha / √r)

transposed when the base stores the weight ``in x out`` (``fan_in_fan_out``, GPT-2's
``Conv1D``), with ``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` and
``alpha_pattern`` when they name it (PEFT's ``LoraLayer.update_layer``, ``get_delta_weight``).
Two things can be analysed (``--spectral-adapter``):

* ``merged`` (default): the weights the adapted model computes with, W + ΔW, where W comes from
  the base model (``--spectral-base-model``, or the adapter's ``base_model_name_or_path`` when
  it is a hub id already in the local hub cache);
* ``delta``: ΔW alone, for the adapted modules only; the config (the head geometry) still
  comes from the base model's config.json, or ``--spectral-config``.

Which modules are adapted follows PEFT: the adapter's tensors, for modules ``target_modules``
matches (a list of names matched as whole name or ``.name`` suffix, or a regular expression
matched in full), outside ``exclude_modules``, in ``layers_to_transform`` if given. The
patterns come from the adapter, so they are matched with a time limit (:data:`PATTERN_TIMEOUT_S`).
A local path in ``base_model_name_or_path`` is never followed on the adapter's word (it could
name any file on the machine): pass it with ``--spectral-base-model``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_spectral.checkpoints.formats import ADAPTER_CONFIG
from pytest_spectral.checkpoints.formats.base import Format, TensorMap, read_config
from pytest_spectral.checkpoints.formats.huggingface import read_weight_file
from pytest_spectral.checkpoints.formats.shards import check_inside
from pytest_spectral.checkpoints.formats.sources import TensorSource
from pytest_spectral.errors import CheckpointError

if TYPE_CHECKING:
    import torch

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: What PEFT puts before a module's name in the adapter's state dict.
STATE_PREFIX = "base_model.model."
#: A pattern from the adapter that takes longer than this on one module name is refused.
PATTERN_TIMEOUT_S = 0.2
MODES = ("merged", "delta")
#: The largest LoRA rank taken from an adapter (a rank is a matrix side: 2**31 is beyond any).
MAX_RANK = 2**31
#: A layer number in a module name beyond this many digits is refused (``int`` of thousands of
#: digits raises).
MAX_LAYER_DIGITS = 18


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` that decide ΔW, validated."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    target_modules: str | tuple[str, ...] | None
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    base_model: str | None

    @classmethod
    def read(cls, path: Path) -> LoraSettings:
        document = read_config(path, "adapter config")

        def fail(key: str, expected: str) -> CheckpointError:
            return CheckpointError(
                f"{path}: {key!r} must be {expected}, got {document.get(key)!r:.60}"
            )

        def names(key: str) -> str | tuple[str, ...] | None:
            value = document.get(key)
            if value is None or isinstance(value, str):
                return value
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise fail(key, "a string, a list of strings or null")

        def flag(key: str) -> bool:
            value = document.get(key, False)
            if not isinstance(value, bool):
                raise fail(key, "true or false")
            return value

        def finite(value: object) -> bool:
            """A JSON number a float can hold (an integer of 400 digits cannot)."""
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False
            try:
                return math.isfinite(float(value))
            except OverflowError:
                return False

        def rank(value: object) -> bool:
            return type(value) is int and 1 <= value <= MAX_RANK

        kind = document.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(
                f"{path}: peft_type {kind!r:.40}; only LoRA adapters (peft_type LORA) can be "
                "analysed"
            )
        if flag("use_dora"):
            raise CheckpointError(
                f"{path}: a DoRA adapter (use_dora); its merged weights rescale every column, "
                "which is not supported: merge it with PEFT and analyse the merged model"
            )
        r = document.get("r")
        if not rank(r):
            raise fail("r", f"a positive integer up to {MAX_RANK}")
        alpha = document.get("lora_alpha", 8)
        if not finite(alpha):
            raise fail("lora_alpha", "a finite number")
        layers = document.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and not (
            isinstance(layers, list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in layers)
        ):
            raise fail("layers_to_transform", "an integer, a list of integers or null")
        pattern = names("layers_pattern")
        ranks, alphas = document.get("rank_pattern") or {}, document.get("alpha_pattern") or {}
        if not isinstance(ranks, dict) or not all(rank(v) for v in ranks.values()):
            raise fail("rank_pattern", f"an object of positive integers up to {MAX_RANK}")
        if not isinstance(alphas, dict) or not all(finite(v) for v in alphas.values()):
            raise fail("alpha_pattern", "an object of finite numbers")
        base = document.get("base_model_name_or_path")
        return cls(
            r=r,
            alpha=float(alpha),
            rslora=flag("use_rslora"),
            fan_in_fan_out=flag("fan_in_fan_out"),
            target_modules=names("target_modules"),
            exclude_modules=names("exclude_modules"),
            layers_to_transform=tuple(layers) if layers else None,
            layers_pattern=(pattern,) if isinstance(pattern, str) else pattern,
            rank_pattern=ranks,
            alpha_pattern=alphas,
            base_model=base if isinstance(base, str) and base else None,
        )

    def targets(self, module: str, where: Path) -> bool:
        """Whether PEFT would have adapted ``module`` (``check_target_module_exists``)."""
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                if _fullmatch(self.exclude_modules, module, where, "exclude_modules"):
                    return False
            elif any(_named(module, name) for name in self.exclude_modules):
                return False
        if self.target_modules is None:
            return True  # the adapter's tensors say which modules it adapts
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return True
            return _fullmatch(self.target_modules, module, where, "target_modules")
        if module in self.target_modules:
            return True
        if not any(module.endswith(f".{name}") for name in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        index = _layer_index(module, self.layers_pattern, where)
        return index is not None and index in self.layers_to_transform

    def scale(self, module: str, where: Path) -> tuple[int, float]:
        """``(r, s)`` for ``module``: its rank and the factor ΔW = s · B·A carries."""
        r = _pattern_value(self.rank_pattern, module, self.r, where, "rank_pattern")
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha, where, "alpha_pattern")
        return int(r), float(alpha) / (math.sqrt(r) if self.rslora else r)


def _named(module: str, name: str) -> bool:
    return module == name or module.endswith(f".{name}")


def _fullmatch(pattern: str, text: str, where: Path, key: str) -> bool:
    return _match(pattern, text, where, key, full=True)


def _match(pattern: str, text: str, where: Path, key: str, *, full: bool = False) -> bool:
    """A pattern from the adapter, matched as PEFT does with ``re``, but with a time limit:
    a pattern that backtracks without end is refused instead of hanging the run."""
    import regex

    try:
        found = (regex.fullmatch if full else regex.match)(pattern, text, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise CheckpointError(
            f"{where}: {key} pattern {pattern!r:.80} takes over {PATTERN_TIMEOUT_S} s to match "
            f"{text!r}; refused"
        ) from None
    except regex.error as exc:
        raise CheckpointError(
            f"{where}: {key} pattern {pattern!r:.80} is not a regular expression ({exc})"
        ) from None
    return found is not None


def _layer_index(module: str, patterns: tuple[str, ...] | None, where: Path) -> int | None:
    """The layer number PEFT reads from a module name, for ``layers_to_transform``."""
    import regex

    candidates = [r".*?\.[^.]*\.(?P<idx>\d+)\."] if not patterns else [
        rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in patterns
    ]  # fmt: skip
    for candidate in candidates:
        try:
            match = regex.match(candidate, module, timeout=PATTERN_TIMEOUT_S)
        except (TimeoutError, regex.error):
            raise CheckpointError(
                f"{where}: layers_pattern {patterns!r:.80} cannot be matched; refused"
            ) from None
        if match is not None:
            digits = match["idx"]
            if len(digits) > MAX_LAYER_DIGITS:
                raise CheckpointError(
                    f"{where}: module {module:.80}... has a layer number of {len(digits)} "
                    "digits; refused"
                )
            return int(digits)
    return None


def _pattern_value(
    patterns: Mapping[str, float], module: str, default: float, where: Path, key: str
) -> float:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module's name."""
    for pattern, value in patterns.items():
        if _match(rf"(.*\.)?({pattern})$", module, where, key):
            return value
    return default


@dataclass(frozen=True)
class LoraUpdate:
    """ΔW of one module (``base`` None), or the base weight W + ΔW, computed in float64."""

    a: TensorSource
    b: TensorSource
    rank: int
    scale: float
    fan_in_fan_out: bool
    base: TensorSource | None = None

    @property
    def name(self) -> str:
        return self.base.name if self.base is not None else self.b.name

    @property
    def file(self) -> Path:
        return self.base.file if self.base is not None else self.b.file

    @property
    def dtype(self) -> str:
        return self.base.dtype if self.base is not None else self.b.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        if self.base is not None:
            return self.base.shape
        rows, columns = self.b.shape[0], self.a.shape[-1]
        return (columns, rows) if self.fan_in_fan_out else (rows, columns)

    @property
    def files(self) -> tuple[Path, ...]:
        files = (*self.a.files, *self.b.files)
        return tuple(dict.fromkeys((*self.base.files, *files) if self.base else files))

    @property
    def key(self) -> object:
        return ("lora", self.a.key, self.b.key, self.base.key if self.base else None)

    @property
    def problem(self) -> str:
        parts = (self.a, self.b) if self.base is None else (self.base, self.a, self.b)
        for part in parts:
            if part.problem:
                return f"({part.name}) {part.problem}" if part is not self.base else part.problem
        a, b = self.a.shape, self.b.shape
        if len(a) != 2 or len(b) != 2 or a[0] != self.rank or b[1] != self.rank:
            return (
                f"has LoRA factors A {list(a)} and B {list(b)} ({self.a.name}, {self.b.name}); "
                f"rank {self.rank} needs A [{self.rank}, in] and B [out, {self.rank}]"
            )
        delta = (a[1], b[0]) if self.fan_in_fan_out else (b[0], a[1])
        if self.base is not None and tuple(self.base.shape) != delta:
            return (
                f"has shape {list(self.base.shape)} but its LoRA update B·A "
                f"({self.b.name} {list(b)} x {self.a.name} {list(a)}"
                f"{', transposed' if self.fan_in_fan_out else ''}) is {list(delta)}: the adapter "
                "was not trained on this base model"
            )
        return ""

    def on(self, base: TensorSource) -> LoraUpdate:
        """This update merged into the base weight ``base``: W + ΔW."""
        return LoraUpdate(self.a, self.b, self.rank, self.scale, self.fan_in_fan_out, base)

    def cache_material(self) -> list[object]:
        return [
            "lora",
            self.rank,
            repr(self.scale),
            self.fan_in_fan_out,
            self.a.cache_material(),
            self.b.cache_material(),
            self.base.cache_material() if self.base is not None else None,
        ]

    def load(self) -> torch.Tensor:
        import torch

        delta = self.b.load().to(torch.float64) @ self.a.load().to(torch.float64)
        if self.fan_in_fan_out:
            delta = delta.T
        delta = delta.mul_(self.scale) if delta.is_contiguous() else delta * self.scale
        if self.base is None:
            return delta.contiguous()
        return self.base.load().to(torch.float64).add_(delta)


class LoraAdapter(Format):
    """A PEFT LoRA adapter directory, with or without its base model."""

    def __init__(self, root: Path, *, mode: str, base: Format | None) -> None:
        self.root = root
        self.config_path = root / ADAPTER_CONFIG
        self.settings = LoraSettings.read(self.config_path)
        self.mode = mode
        self.base = base
        self.partial = mode == "delta"
        if mode == "merged" and base is None:
            raise CheckpointError(
                f"{self.config_path}: the merged weights need the base model "
                f"{self.settings.base_model or '(not named)'!r}, which is not "
                f"{'in the local hub cache' if self.settings.base_model else 'named'}: give it "
                "with --spectral-base-model=PATH_OR_HUB_ID, or analyse the update alone with "
                "--spectral-adapter=delta (and --spectral-config=BASE_CONFIG.json)"
            )

    def config(self) -> tuple[dict[str, object], Path]:
        if self.base is None:
            raise CheckpointError(
                f"{self.config_path}: the head geometry comes from the base model's config, and "
                "the base model is not available: give --spectral-config=BASE_CONFIG.json or "
                "--spectral-base-model=PATH_OR_HUB_ID"
            )
        return self.base.config()

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        updates = self._updates()
        if self.mode == "delta":
            return {f"{module}.weight": update for module, update in updates.items()}
        assert self.base is not None
        base = self.base.tensors(wanted, head_dim)
        merged: dict[str, TensorSource] = dict(base)
        pending = dict(updates)
        for name, source in base.items():
            module = _module_for(name, updates)
            if module is not None:
                merged[name] = pending.pop(module).on(source)
        for name, module in self._text_names(base, pending).items():
            merged[name] = pending.pop(module).on(base[name])
        if updates and len(pending) == len(updates):
            raise CheckpointError(
                f"{self.adapter_file()}: none of the adapter's {len(updates)} modules (e.g. "
                f"{next(iter(updates))!r}) is a weight of the base model; the adapter was not "
                "trained on this base model"
            )
        return merged

    def _text_names(
        self, base: TensorMap, pending: Mapping[str, LoraUpdate]
    ) -> dict[str, str]:
        """Base weight name -> the module of ``pending`` (updates no base weight matched by
        name) that adapts it, found by the text model's layer prefix of each: PEFT names a
        wrapper's modules as transformers holds them (``model.language_model.layers...``),
        while checkpoints transformers saves may name them as it once did
        (``language_model.model.layers...``, Qwen2-VL's ``model.layers...``); below those
        prefixes the names are the same."""
        if not pending or self.text_prefix is None:
            return {}
        try:
            ours = self.text_prefix(base)
            theirs = self.text_prefix({f"{module}.weight": u for module, u in pending.items()})
        except CheckpointError:  # no text layer on one side: nothing to match
            return {}
        names = {}
        for module in pending:
            name = f"{ours}{module.removeprefix(theirs)}.weight"
            if module.startswith(theirs) and name in base and name not in names:
                names[name] = module
        return names

    def adapter_file(self) -> Path:
        for name in ADAPTER_FILES:
            if os.path.lexists(self.root / name):
                path = self.root / name
                check_inside(self.root, path, str(path))
                return path
        raise CheckpointError(
            f"{self.root}: an adapter directory without {' or '.join(ADAPTER_FILES)}"
        )

    def _updates(self) -> dict[str, LoraUpdate]:
        """Module name -> its update, for the modules PEFT would adapt."""
        path = self.adapter_file()
        entries = read_weight_file(path, lambda name: ".lora_" in name).entries
        factors: dict[str, dict[str, TensorSource]] = {}
        for name, entry in entries.items():
            stem, _, factor = name.removesuffix(".weight").rpartition(".lora_")
            if factor in ("A", "B") and name.endswith(".weight"):
                factors.setdefault(stem.removeprefix(STATE_PREFIX), {})[factor] = entry
        updates = {}
        for module, pair in factors.items():
            if not self.settings.targets(module, self.config_path):
                continue
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise CheckpointError(f"{path}: module {module!r} has no {missing} weight")
            rank, scale = self.settings.scale(module, self.config_path)
            updates[module] = LoraUpdate(
                pair["A"], pair["B"], rank, scale, self.settings.fan_in_fan_out
            )
        return updates


def _module_for(name: str, updates: Mapping[str, LoraUpdate]) -> str | None:
    """The adapted module a base weight belongs to: the same name, or the same name below a
    different prefix (a base saved from ``LlamaModel`` has no ``model.``)."""
    if not name.endswith(".weight"):
        return None
    module = name.removesuffix(".weight")
    if module in updates:
        return module
    matches = [m for m in updates if m.endswith(f".{module}") or module.endswith(f".{m}")]
    return matches[0] if len(matches) == 1 else None
