"""The vision towers of multimodal models (``--spectral-vision``), verified against transformers.

For a tiny random model of each wrapper in ``architecture_matrix.VISION_CASES`` (built and
saved by transformers; skipped, with the reason, when the installed transformers lacks it),
whose tower differs from its text model in every dimension (layers, heads, head size, width),
the slice the plugin analyses for a head of the tower is perturbed in the model's own
parameters, an image is fed through the model's own vision tower, and exactly that head's
attention output (its segment of the output projection's input, the segment the attention
module reshapes into that head) must change; an O slice must be exactly what multiplies that
segment. The plugin's singular values of every head of every tower layer equal numpy's
(float64 LAPACK) of the model's own slices. The counts of layers and heads come from the
model transformers builds, never from the plugin.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from architecture_matrix import CASES, VISION_CASES
from safetensors import safe_open
from test_architectures import perturbed

from pytest_spectral.checkpoints.checkpoint import (
    MATRICES,
    Checkpoint,
    Geometry,
    interpret_vision_config,
    open_checkpoint,
)
from pytest_spectral.checkpoints.families import FAMILIES, VISION_FAMILIES, WRAPPERS
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.compute.spectra import head_blocks
from pytest_spectral.errors import CheckpointError
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
from pytest_spectral.judging.rules import load_rules
from pytest_spectral.testing.synthetic import write_random_llama

transformers = pytest.importorskip("transformers")
try:  # imported once: pytester forgets the modules a test imports
    import peft
except ImportError:
    peft = None
SOURCE = Path("config.json")


def build(model_type: str, directory) -> object:
    """A tiny random model of the wrapper ``model_type``, saved as transformers saves it."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **CASES[model_type].config)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    model = transformers.AutoModelForImageTextToText.from_config(config)
    model.eval()
    model.save_pretrained(directory)
    return model


def tower_of(model) -> torch.nn.Module:
    """The model's own vision tower (LLaVA's and Gemma 3's ``vision_tower``, Qwen2-VL's
    ``visual``)."""
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def tower_layers(tower) -> torch.nn.ModuleList:
    """The tower's transformer layers, as its modeling code holds them."""
    return tower.encoder.layers if hasattr(tower, "encoder") else tower.blocks


def tower_heads(model) -> int:
    """Query heads of the tower's attention modules, as transformers built them."""
    attention = next(m for m in tower_of(model).modules() if type(m).__name__.endswith("Attention"))
    return int(getattr(attention, "num_heads", None) or attention.config.num_attention_heads)


def tower_inputs(model) -> dict[str, torch.Tensor]:
    """One image of fixed random pixels, as the tower's forward takes it: ``pixel_values`` of
    the image size (CLIP, SigLIP), or Qwen2-VL's flattened patches of a 4 x 4 patch grid."""
    pixels = torch.Generator().manual_seed(0)
    vision = model.config.vision_config
    if hasattr(vision, "image_size"):
        shape = (1, vision.num_channels, vision.image_size, vision.image_size)
        return {"pixel_values": torch.randn(shape, generator=pixels)}
    grid = torch.tensor([[1, 4, 4]])
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {"hidden_states": torch.randn(16, features, generator=pixels), "grid_thw": grid}


#: towers whose attention ignores a ``head_dim`` in their vision_config (CLIPAttention and
#: SiglipAttention use hidden_size // num_attention_heads): the same checks with one saved
HEAD_DIM_IGNORED = ("llava+head_dim", "gemma3+head_dim")


@pytest.fixture(scope="module", params=VISION_CASES + HEAD_DIM_IGNORED)
def wrapper(request, tmp_path_factory) -> tuple[object, Checkpoint]:
    model_type, _, variant = request.param.partition("+")
    directory = tmp_path_factory.mktemp(model_type) / "model"
    model = build(model_type, directory)
    if variant == "head_dim":
        config = json.loads((directory / "config.json").read_text())
        config["vision_config"]["head_dim"] = 4
        (directory / "config.json").write_text(json.dumps(config))
        reloaded = transformers.AutoModelForImageTextToText.from_pretrained(directory)
        assert tower_heads(reloaded) == tower_heads(model)  # transformers built the same tower
    return model, open_checkpoint(directory, vision=True)


def parameter_name(checkpoint: Checkpoint, model, block: int, matrix: str) -> str:
    """The model's own name for the tensor the plugin reads, found by its values (so that a
    plugin reading the wrong tensor is caught by what the model does with it)."""
    entry = checkpoint.tensors[(block, matrix)]
    with safe_open(entry.file, "pt") as weights:
        saved = weights.get_tensor(entry.name)
    return next(
        name
        for name, parameter in model.named_parameters()
        if parameter.shape == saved.shape and torch.equal(parameter.detach(), saved)
    )


def slice_view(checkpoint: Checkpoint, block: int, matrix: str, index: int) -> torch.Tensor:
    """Which elements of the stored tensor the plugin takes as slice ``index`` of ``block``,
    as the slice's ``[m, n]`` matrix of positions."""
    entry = checkpoint.tensors[(block, matrix)]
    positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
    geometry, layout = checkpoint.geometry_at(block), checkpoint.layout_at(block)
    return head_blocks(positions, matrix, geometry, layout)[index]


def slice_positions(checkpoint: Checkpoint, block: int, matrix: str, index: int) -> torch.Tensor:
    return slice_view(checkpoint, block, matrix, index).flatten()


def o_input(model, o_name: str) -> torch.Tensor:
    """The input of the tower's output projection ``o_name`` (``[tokens, heads x head_dim]``)
    for one image through the model's own tower."""
    captured = {}
    module = model.get_submodule(o_name.removesuffix(".weight"))

    def hook(_module, args, _output) -> None:
        captured["input"] = args[0].detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            tower_of(model)(**tower_inputs(model))
    finally:
        handle.remove()
    return captured["input"].reshape(-1, module.in_features)


def vision_blocks(checkpoint: Checkpoint) -> list[int]:
    return [b for b in checkpoint.layer_numbers if checkpoint.position(b)[0] == "vision"]


def test_the_vision_stack_has_the_towers_layers_and_the_text_model_keeps_its_own(wrapper):
    model, checkpoint = wrapper
    text_layers = model.config.text_config.num_hidden_layers
    assert checkpoint.stack_layers() == {
        None: text_layers,
        "vision": len(tower_layers(tower_of(model))),
    }
    assert [checkpoint.position(b) for b in range(text_layers)] == [
        (None, layer) for layer in range(text_layers)
    ]
    block = vision_blocks(checkpoint)[0]
    assert checkpoint.geometry_at(block).heads == tower_heads(model)
    assert checkpoint.geometry.heads == model.config.text_config.num_attention_heads


def test_each_vision_head_slice_drives_exactly_its_heads_attention_output(wrapper):
    """In the first and the last layer of the tower, for the first and last head: the
    plugin's Q, K and V slices change that head's attention output and no other's."""
    model, checkpoint = wrapper
    blocks = vision_blocks(checkpoint)
    heads = tower_heads(model)
    for block in (blocks[0], blocks[-1]):
        o_name = parameter_name(checkpoint, model, block, "o")
        base = o_input(model, o_name)
        d = base.shape[1] // heads
        for matrix in ("q", "k", "v"):
            name = parameter_name(checkpoint, model, block, matrix)
            for head in (0, heads - 1):
                with perturbed(model, name, slice_positions(checkpoint, block, matrix, head)):
                    after = o_input(model, o_name)
                changed = {
                    h
                    for h in range(heads)
                    if not torch.allclose(
                        base[:, h * d : (h + 1) * d], after[:, h * d : (h + 1) * d], atol=1e-6
                    )
                }
                assert changed == {head}, (block, matrix, head)


def test_each_vision_o_slice_is_what_multiplies_its_heads_segment(wrapper):
    model, checkpoint = wrapper
    heads = tower_heads(model)
    for block in vision_blocks(checkpoint):
        o_name = parameter_name(checkpoint, model, block, "o")
        module = model.get_submodule(o_name.removesuffix(".weight"))
        inputs = o_input(model, o_name)
        d = inputs.shape[1] // heads
        for head in range(heads):
            without = inputs.clone()
            without[:, head * d : (head + 1) * d] = 0
            with torch.no_grad():
                expected = module(without)
                zeroed = slice_positions(checkpoint, block, "o", head)
                with perturbed(model, o_name, zeroed, factor=0.0):
                    actual = module(inputs)
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_vision_spectra_equal_numpy_on_the_models_own_slices(wrapper):
    """Every head of every tower layer, every matrix, against numpy in float64; the slices of
    a tensor partition it (none misses a head's rows or reads another's)."""
    model, checkpoint = wrapper
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    heads = tower_heads(model)
    compared = 0
    for block in vision_blocks(checkpoint):
        owned: dict[str, list[torch.Tensor]] = {}
        for matrix in MATRICES:
            name = parameter_name(checkpoint, model, block, matrix)
            flat = model.get_parameter(name).detach().double().flatten().numpy()
            for head in range(heads):
                view = slice_view(checkpoint, block, matrix, head)
                owned.setdefault(name, []).append(view.flatten())
                reference = np.linalg.svd(flat[view.numpy()], compute_uv=False)
                values = engine.head(block, matrix, head).singular_values
                np.testing.assert_allclose(values, reference, rtol=1e-9, atol=1e-12)
                compared += 1
        for name, parts in owned.items():
            size = model.get_parameter(name).numel()
            torch.testing.assert_close(torch.cat(parts).sort().values, torch.arange(size))
    assert compared == len(vision_blocks(checkpoint)) * heads * len(MATRICES)


#: the config attributes each tower's attention modules and layer list read, from their
#: modeling code: (layers, heads, width)
TOWER_KEYS = {
    "clip_vision_model": ("num_hidden_layers", "num_attention_heads", "hidden_size"),
    "siglip_vision_model": ("num_hidden_layers", "num_attention_heads", "hidden_size"),
    "qwen2_vl_vision": ("depth", "num_heads", "embed_dim"),  # VisionAttention(embed_dim)
    "qwen2_5_vl_vision": ("depth", "num_heads", "hidden_size"),
}


def reference_tower_geometry(vision) -> Geometry:
    """The tower geometry transformers' modules build from its ``vision_config`` object."""
    layers, heads, width = (getattr(vision, key) for key in TOWER_KEYS[vision.model_type])
    return Geometry(layers, heads, heads, width // heads, width)


@pytest.mark.parametrize("model_type", VISION_CASES)
def test_each_vision_config_key_left_out_reads_as_transformers_reads_it(model_type) -> None:
    """Each key of ``vision_config`` left out in turn, and ``vision_config`` left out (the
    wrapper's own default tower: LLaVA's is CLIP ViT-L/14, not CLIP's class defaults)."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    config_class = transformers.CONFIG_MAPPING[model_type]
    full = config_class(**CASES[model_type].config).to_dict()
    nested = full["vision_config"]
    cases = [
        ("(none)", full),
        ("vision_config", {k: v for k, v in full.items() if k != "vision_config"}),
    ]
    cases += [
        (
            f"vision_config.{key}",
            {**full, "vision_config": {k: v for k, v in nested.items() if k != key}},
        )
        for key in nested
        if key != "model_type"
    ]
    compared = 0
    for key, config in cases:
        try:
            vision = config_class.from_dict(dict(config)).vision_config
        except Exception:  # transformers refuses this config too: nothing to compare
            continue
        expected = reference_tower_geometry(vision)
        if expected.hidden % expected.heads:
            with pytest.raises(CheckpointError):
                interpret_vision_config(config, SOURCE)
            continue
        try:
            geometry = interpret_vision_config(config, SOURCE)[1]
        except CheckpointError as exc:
            pytest.fail(f"without {key}: refused ({exc}), transformers reads {expected}")
        assert geometry == expected, f"without {key}"
        compared += 1
    assert compared > len(nested) // 2


# Through pytest: the option, ids, rules, report, cache and refusals.


def tower_counts(model) -> tuple[int, int]:
    """(layers, heads) of the model's own vision tower, as transformers built it."""
    return len(tower_layers(tower_of(model))), tower_heads(model)


def collected(result) -> list[str]:
    return [line for line in result.stdout.lines if line.startswith("spectral::")]


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[object, object]:
    directory = tmp_path_factory.mktemp("llava") / "model"
    return build("llava", directory), directory


@pytest.mark.parametrize("model_type", VISION_CASES)
def test_the_tower_is_collected_when_asked_and_the_text_ids_are_unchanged(
    model_type, pytester, tmp_path
) -> None:
    model = build(model_type, tmp_path / "model")
    text = model.config.text_config
    layers, heads = tower_counts(model)
    default = pytester.runpytest(f"--spectral-model={tmp_path / 'model'}", "--collect-only", "-q")
    assert default.ret == pytest.ExitCode.OK
    text_ids = collected(default)
    assert len(text_ids) == text.num_hidden_layers * text.num_attention_heads * 4
    assert all(i.startswith("spectral::layer") for i in text_ids)
    notice = f"spectral: the vision tower of this {model_type} model is not analysed*"
    default.stdout.fnmatch_lines([notice + "--spectral-vision adds it*"])
    asked = pytester.runpytest(
        f"--spectral-model={tmp_path / 'model'}", "--spectral-vision", "--collect-only", "-q"
    )
    ids = collected(asked)
    vision = [i for i in ids if i.startswith("spectral::vision::")]
    assert [i for i in ids if i not in vision] == text_ids
    assert len(vision) == layers * heads * 4
    assert vision[:4] == [f"spectral::vision::layer00::head00-{m}" for m in "qkvo"]
    assert vision[-1] == f"spectral::vision::layer{layers - 1:02d}::head{heads - 1:02d}-o"
    assert "vision tower of this" not in asked.stdout.str()


def test_a_vision_rule_fails_only_the_towers_items_sized_by_its_geometry(llava, pytester):
    model, directory = llava
    layers, heads = tower_counts(model)
    vision = model.config.vision_config
    head_dim = vision.hidden_size // vision.num_attention_heads
    text = model.config.text_config
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["vision"]\n'
        'suggest = "low_rank"\n',
    )
    report = pytester.path / "report.json"
    result = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", f"--spectral-thresholds={rules}",
        f"--spectral-report={report}", "-p", "no:cacheprovider",
    )  # fmt: skip
    text_items = text.num_hidden_layers * text.num_attention_heads * 4
    result.assert_outcomes(failed=layers * heads * 4, passed=text_items)
    document = json.loads(report.read_text())
    items = document["items"]
    assert {i["stack"] for i in items if i["outcome"] == "failed"} == {"vision"}
    assert {i["stack"] for i in items if i["outcome"] == "passed"} == {None}
    assert all(
        i["nodeid"].startswith("spectral::vision::") == (i["stack"] == "vision") for i in items
    )
    shapes = {i["matrix"]: tuple(i["shape"]) for i in items if i["stack"] == "vision"}
    assert shapes == {
        "q": (head_dim, vision.hidden_size),
        "k": (head_dim, vision.hidden_size),
        "v": (head_dim, vision.hidden_size),
        "o": (vision.hidden_size, head_dim),
    }
    assert document["model"]["stacks"] == {"vision": layers}
    assert document["model"]["num_hidden_layers"] == text.num_hidden_layers
    assert document["model"]["stack_geometry"]["vision"] == {
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "hidden_size": vision.hidden_size,
    }
    candidates = document["candidates"]
    assert {c["stack"] for c in candidates} == {"vision"}
    assert {c["params"] for c in candidates} == {head_dim * vision.hidden_size}
    assert document["settings"]["layers"] == {
        "text": list(range(text.num_hidden_layers)),
        "vision": list(range(layers)),
    }


def test_a_vision_rule_without_the_option_says_how_to_collect_the_tower(llava, pytester):
    _, directory = llava
    rules = pytester.makefile(
        ".toml", rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["vision"]\n'
    )
    result = pytester.runpytest(
        f"--spectral-model={directory}", f"--spectral-thresholds={rules}", "-p", "no:cacheprovider"
    )
    result.stdout.fnmatch_lines(["*vision tower, collected with --spectral-vision*"])
    assert "failed" not in result.stdout.lines[-1]


def test_a_rerun_is_served_from_the_cache_with_the_same_values(pytester, tmp_path) -> None:
    """Qwen2-VL: a fused tower; the cache keys carry the tower's own geometry."""
    directory = tmp_path / "model"
    build("qwen2_vl", directory)
    args = (f"--spectral-model={directory}", "--spectral-vision", "-v")
    first = pytester.runpytest(*args, "--spectral-report=first.json")
    second = pytester.runpytest(*args, "--spectral-report=second.json")
    first.stdout.fnmatch_lines(["spectral: vision layer 0: *; 0 of 4 matrices from the cache*"])
    second.stdout.fnmatch_lines(["spectral: vision layer 0: *; 4 of 4 matrices from the cache*"])
    values = [
        {
            i["nodeid"]: i["singular_values"]
            for i in json.loads((pytester.path / name).read_text())["items"]
        }
        for name in ("first.json", "second.json")
    ]
    assert values[0] == values[1]
    assert any(nodeid.startswith("spectral::vision::") for nodeid in values[0])


def test_the_option_on_a_text_only_model_is_a_usage_error(pytester, tmp_path) -> None:
    model = write_random_llama(tmp_path / "llama")
    result = pytester.runpytest(f"--spectral-model={model}", "--spectral-vision")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*--spectral-vision: model_type 'llama' has no vision tower (no multimodal wrapper);*"
            "Run without --spectral-vision"
        ]
    )


@pytest.mark.parametrize(
    ("vision_config", "message"),
    [
        (
            {"model_type": "pixtral"},
            "*'vision_config.model_type' is 'pixtral': no vision tower layout the plugin knows*",
        ),
        (
            {"num_hidden_layers": 5},
            "*--spectral-vision: the vision tower: tensor "
            "'*vision_tower.encoder.layers.3.self_attn.q_proj.weight' is missing*",
        ),
        (
            {"num_attention_heads": 3},
            "*vision_config*hidden size 32 ('hidden_size') is not divisible by 3 attention "
            "heads ('num_attention_heads')",
        ),
    ],
)
def test_a_tower_the_plugin_cannot_lay_out_is_refused_naming_the_key_or_tensor(
    llava, pytester, tmp_path, vision_config, message
) -> None:
    _, directory = llava
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"].update(vision_config)
    (copy / "config.json").write_text(json.dumps(config))
    result = pytester.runpytest(f"--spectral-model={copy}", "--spectral-vision")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()
    default = pytester.runpytest(f"--spectral-model={copy}", "--collect-only", "-q")
    assert default.ret == pytest.ExitCode.OK  # the text model alone, as before


# stable rank is at least 1 (||W||_F^2 >= sigma_max^2), so every item breaks max = 0.5
EVERY_ITEM_BREAKS = '[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["text"]\n'


def test_a_text_rule_fails_exactly_the_text_models_items_beside_the_tower(llava, pytester):
    model, directory = llava
    layers, heads = tower_counts(model)
    text = model.config.text_config
    text_items = text.num_hidden_layers * text.num_attention_heads * 4
    rules = pytester.makefile(".toml", rules=EVERY_ITEM_BREAKS)
    report = pytester.path / "report.json"
    result = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", f"--spectral-thresholds={rules}",
        f"--spectral-report={report}", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(failed=text_items, passed=layers * heads * 4)
    items = json.loads(report.read_text())["items"]
    assert {i["stack"] for i in items if i["outcome"] == "failed"} == {None}
    assert all(i["nodeid"].startswith("spectral::layer") for i in items if i["stack"] is None)
    assert "applies to no item" not in result.stdout.str()


def test_a_text_rule_without_the_tower_judges_every_item(llava, pytester):
    model, directory = llava
    text = model.config.text_config
    rules = pytester.makefile(".toml", rules=EVERY_ITEM_BREAKS)
    result = pytester.runpytest(
        f"--spectral-model={directory}", f"--spectral-thresholds={rules}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=text.num_hidden_layers * text.num_attention_heads * 4)


def test_calibration_with_the_tower_writes_rules_per_stack_that_pass_it(llava, pytester):
    model, directory = llava
    layers, heads = tower_counts(model)
    text = model.config.text_config
    calibrate = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "--spectral-calibrate=cal.toml",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    assert calibrate.ret == pytest.ExitCode.OK
    written = load_rules(pytester.path / "cal.toml").rules
    assert {rule.stacks for rule in written} == {frozenset({"text"}), frozenset({"vision"})}
    rerun = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "--spectral-thresholds=cal.toml",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    text_items = text.num_hidden_layers * text.num_attention_heads * 4
    rerun.assert_outcomes(passed=text_items + layers * heads * 4)
    assert "applies to no item" not in rerun.stdout.str()


def test_a_cached_tower_spectrum_is_stale_when_the_towers_heads_change(
    llava, pytester, tmp_path
) -> None:
    """The same tower tensors read as 2 heads of 16 instead of 4 heads of 8: the cache keys
    carry the tower's own geometry, so nothing cached for 4 heads serves the 2."""
    _, directory = llava
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    args = (f"--spectral-model={copy}", "--spectral-vision", "-v", "--spectral-layers=0")
    assert pytester.runpytest(*args).ret == pytest.ExitCode.OK
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    again = pytester.runpytest(*args, "--spectral-report=again.json")
    again.stdout.fnmatch_lines(["spectral: layer 0: *; 4 of 4 matrices from the cache*"])
    again.stdout.fnmatch_lines(["spectral: vision layer 0: *; 0 of 4 matrices from the cache*"])
    items = json.loads((pytester.path / "again.json").read_text())["items"]
    vision_q = [i for i in items if i["stack"] == "vision" and i["matrix"] == "q"]
    assert [tuple(i["shape"]) for i in vision_q] == [(16, 32), (16, 32)]
    assert all(len(i["singular_values"]) == 16 for i in vision_q)


def test_the_readme_table_of_towers_matches_the_declarations() -> None:
    """Every wrapper in one row, with its tower's model_type and the tensors its family
    declares; the rows are the wrappers this file verifies."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Vision towers of multimodal models", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("| wrapper |"))
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    listed = [t for row in rows for t in re.findall(r"`([^`]+)`", row[0])]
    assert sorted(listed) == sorted(WRAPPERS) == sorted(VISION_CASES)
    for row in rows:
        tower = re.fullmatch(r"`([^`]+)`", row[1]).group(1)
        for wrapper in re.findall(r"`([^`]+)`", row[0]):
            assert WRAPPERS[wrapper].tower.vision_type == tower
        family = next(f for f in (*FAMILIES, *VISION_FAMILIES) if tower in f.model_types)
        assert family.note.strip("`") in row[2], tower


def test_the_heatmap_draws_the_text_model_and_the_tower_apart(llava, pytester) -> None:
    model, directory = llava
    layers = tower_counts(model)[0]
    result = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "--spectral-heatmap=stable_rank",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    out = result.stdout.str()
    assert "\ntext model:\n" in out
    assert "\nvision stack:\n" in out
    assert "None" not in out
    tower = out.split("\nvision stack:\n", 1)[1]
    assert f"\n  {layers - 1}  " in tower  # the tower's last layer has a row of its own


@pytest.mark.parametrize(
    ("argument", "why"),
    [
        ("spectral::vision::layer09", "the vision stack has 3 layers (0-2)"),
        ("spectral::vision::layer0", "layer numbers are zero-padded: spectral::vision::layer00"),
        (
            "spectral::encoder::layer00",
            "'encoder' is not a stack of this model; its stacks are vision",
        ),
        ("spectral::layer05", "the text model has 2 layers (0-1)"),
        ("spectral::vision::layer01::head04-q", "the vision stack has 4 query heads (0-3)"),
        ("spectral::layer01::head04-q", "the text model has 4 query heads (0-3)"),
        (
            "spectral::vision::layer01::gate",
            "the vision stack's MLP is fc1, fc2; gate is the text model's: "
            "spectral::layer01::gate",
        ),
        (
            "spectral::layer01::fc1",
            "the text model's MLP is gate, up, down; fc1 is the vision stack's: "
            "spectral::vision::layer01::fc1",
        ),
    ],
)
def test_vision_ids_as_arguments_say_what_is_wrong(llava, pytester, argument, why) -> None:
    """LLaVA of tests/architecture_matrix.py: a Llama text model of 2 layers of 4 heads, a
    CLIP tower of 3 layers of 4 heads (fc1, fc2)."""
    model, directory = llava
    assert tower_counts(model) == (3, 4)
    assert model.config.text_config.num_attention_heads == 4
    result = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "--spectral-scope=both", argument
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{argument}: no such spectral item in this run: {why}*"])


@pytest.mark.parametrize(
    ("options", "rules", "message"),
    [
        (
            ["--spectral-vision"],
            'stacks = ["encoder"]',
            "*applies to no item of this run: its stacks (encoder) do not exist in this run, "
            "whose layers are the text model's (stacks = ?\"text\"?) and the vision stack's*",
        ),
        (
            ["--spectral-vision"],
            'stacks = ["vision"]\nheads = "4"',
            "*applies to no item of this run: its heads 4 do not exist: the vision stack has 4 "
            "query heads (0-3)*",
        ),
    ],
)
def test_a_rule_that_judges_nothing_in_a_vision_run_names_the_stack(
    llava, pytester, options, rules, message
) -> None:
    _, directory = llava
    path = pytester.makefile(
        ".toml", rules=f'[[rules]]\nmetric = "stable_rank"\nmax = 100.0\n{rules}\n'
    )
    result = pytester.runpytest(
        f"--spectral-model={directory}", f"--spectral-thresholds={path}", "--collect-only",
        *options,
    )  # fmt: skip
    result.stdout.fnmatch_lines([message])
    assert "do not exist: \n" not in result.stdout.str()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--spectral-vision", "--spectral-layers=5"],
            "*--spectral-layers 5: layer(s) 5 do not exist; the text model has 2 layers (0-1), "
            "the vision stack has 3 layers (0-2)*",
        ),
        (
            ["--spectral-scope=matrix", "--spectral-matrices=fc1"],
            "*--spectral-matrices: this checkpoint has no fc1 (it has q, k, v, o, qk, ov, gate, "
            "up, down); fc1 is the vision tower's, collected with --spectral-vision*",
        ),
    ],
)
def test_options_that_select_nothing_name_each_stack(llava, pytester, options, message) -> None:
    _, directory = llava
    result = pytester.runpytest(f"--spectral-model={directory}", "--collect-only", *options)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_ids_select_the_tower_and_layers_of_both(llava, pytester) -> None:
    model, directory = llava
    layers, heads = tower_counts(model)
    text = model.config.text_config
    tower = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "spectral::vision"
    )
    tower.assert_outcomes(passed=layers * heads * 4)
    last = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", f"--spectral-layers={layers - 1}"
    )
    # the tower has more layers than the text model: only the tower has its last
    assert layers - 1 >= text.num_hidden_layers
    last.assert_outcomes(passed=heads * 4)


def test_the_tower_is_not_an_id_without_the_option(llava, pytester) -> None:
    _, directory = llava
    result = pytester.runpytest(f"--spectral-model={directory}", "spectral::vision")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*collected with --spectral-vision*"])


def test_a_vision_config_that_is_no_object_is_refused(llava, pytester, tmp_path) -> None:
    _, directory = llava
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"] = "clip"
    (copy / "config.json").write_text(json.dumps(config))
    result = pytester.runpytest(f"--spectral-model={copy}", "--spectral-vision")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'vision_config' must be an object*got 'clip'*"])


def test_vision_circuits_equal_numpy_products_of_the_models_own_slices(wrapper) -> None:
    """QK and OV circuits (``W_Q_h^T W_K_h``, ``W_O_h W_V_h``) of every tower head against
    numpy's singular values of the product of the model's own slices, in float64."""
    model, checkpoint = wrapper
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    heads = tower_heads(model)
    for block in vision_blocks(checkpoint):
        own = {}
        for matrix in MATRICES:
            name = parameter_name(checkpoint, model, block, matrix)
            flat = model.get_parameter(name).detach().double().flatten().numpy()
            own[matrix] = [
                flat[slice_view(checkpoint, block, matrix, h).numpy()] for h in range(heads)
            ]
        for head in range(heads):
            products = {
                "qk": own["q"][head].T @ own["k"][head],
                "ov": own["o"][head] @ own["v"][head],
            }
            for circuit, product in products.items():
                values = engine.head(block, circuit, head).singular_values
                reference = np.linalg.svd(product, compute_uv=False)[: len(values)]
                np.testing.assert_allclose(values, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("option", "window", "message"),
    [
        (
            "--spectral-baseline=base.json",
            "",
            "*base.json: baseline is for a different model layout: "
            "model.stack_geometry.vision.num_attention_heads is {before} there and {after} here*",
        ),
        (
            "--spectral-history=history",
            "window = 2\n",
            "*base.json: a report of another model layout: "
            "model.stack_geometry.vision.head_dim is '{before_dim}' (expected '{after_dim}');*"
            "model.stack_geometry.vision.num_attention_heads is '{before}' (expected '{after}')*",
        ),
    ],
)
def test_a_report_of_a_tower_with_other_heads_is_no_baseline_or_history(
    llava, pytester, tmp_path, option, window, message
) -> None:
    """The same tower tensors read with twice the heads: a report of the first layout would
    compare each id's slice with a slice of other rows, so it is refused naming the key."""
    model, directory = llava
    vision = model.config.vision_config
    before, after = vision.num_attention_heads, vision.num_attention_heads * 2
    history = pytester.mkdir("history")
    first = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "--spectral-layers=0",
        f"--spectral-report={history / 'base.json'}",
    )  # fmt: skip
    assert first.ret == pytest.ExitCode.OK
    shutil.copy(history / "base.json", pytester.path / "base.json")
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = after
    (copy / "config.json").write_text(json.dumps(config))
    rules = pytester.makefile(
        ".toml", rules=f'[[rules]]\nmetric = "spectral_norm"\nmax_change = 0.5\n{window}'
    )
    result = pytester.runpytest(
        f"--spectral-model={copy}", "--spectral-vision", "--spectral-layers=0",
        f"--spectral-thresholds={rules}", option,
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    head_dim = vision.hidden_size // before
    result.stderr.fnmatch_lines(
        [
            message.format(
                before=before, after=after, before_dim=head_dim, after_dim=head_dim // 2
            )
        ]
    )
    same = pytester.runpytest(
        f"--spectral-model={directory}", "--spectral-vision", "--spectral-layers=0",
        f"--spectral-thresholds={rules}", option, "-p", "no:cacheprovider",
    )  # fmt: skip
    assert same.ret == pytest.ExitCode.OK  # the tower it was recorded from is compared


@pytest.mark.parametrize("vision", [False, True], ids=["text-model", "with-the-tower"])
def test_a_lora_adapter_of_the_wrapper_merges_into_the_text_model_and_the_tower(
    pytester, tmp_path, vision
) -> None:
    """PEFT names the wrapper's modules as transformers holds them
    (``model.language_model.layers...``), the saved base model as transformers saves them
    (``language_model.model.layers...``): each q item is a head slice of peft's own merge."""
    if peft is None:
        pytest.skip("peft is not installed")
    model = build("llava", tmp_path / "base")
    settings = peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False
    )
    adapted = peft.get_peft_model(model, settings)
    adapted.save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    text_layers = merged.model.language_model.layers
    weights = {
        (None, layer): module.self_attn.q_proj.weight for layer, module in enumerate(text_layers)
    }
    if vision:
        tower = tower_layers(tower_of(merged))
        weights.update({("vision", n): m.self_attn.q_proj.weight for n, m in enumerate(tower)})
    vision_config = model.config.vision_config
    head_dims = {
        None: model.config.text_config.head_dim,
        "vision": vision_config.hidden_size // vision_config.num_attention_heads,
    }
    report = pytester.path / "report.json"
    result = pytester.runpytest(
        f"--spectral-model={tmp_path / 'adapter'}", f"--spectral-base-model={tmp_path / 'base'}",
        f"--spectral-report={report}", "-p", "no:cacheprovider", "--spectral-matrices=q",
        *(["--spectral-vision"] if vision else []),
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.OK
    items = json.loads(report.read_text())["items"]
    assert {(i["stack"], i["layer"]) for i in items} == set(weights)
    for item in items:
        weight = weights[(item["stack"], item["layer"])].detach().double().numpy()
        head_dim = head_dims[item["stack"]]
        head = weight[item["head"] * head_dim : (item["head"] + 1) * head_dim]
        expected = np.linalg.svd(head, compute_uv=False)
        # peft merges in float32: agreement to float32 rounding
        np.testing.assert_allclose(item["singular_values"], expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_the_towers_tensors_says_so(llava, pytester, tmp_path) -> None:
    """The text model saved alone under a LLaVA config: the tower's layout is named as its
    vision_config announces it, and a run without the option does not offer the tower."""
    from safetensors.torch import load_file, save_file

    model, directory = llava
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    weights = load_file(copy / "model.safetensors")
    text_only = {name: t for name, t in weights.items() if "vision" not in name}
    assert len(text_only) < len(weights)
    save_file(text_only, copy / "model.safetensors", metadata={"format": "pt"})
    tower_type = model.config.vision_config.model_type
    asked = pytester.runpytest(f"--spectral-model={copy}", "--spectral-vision")
    assert asked.ret == pytest.ExitCode.USAGE_ERROR
    asked.stderr.fnmatch_lines(
        [f"*--spectral-vision: the vision tower: *does not have the {tower_type} layout its "
         "vision_config announces*"]
    )  # fmt: skip
    default = pytester.runpytest(f"--spectral-model={copy}", "--collect-only", "-q")
    assert default.ret == pytest.ExitCode.OK
    assert "--spectral-vision" not in default.stdout.str()


def test_a_qwen2_vl_tower_whose_width_does_not_split_names_embed_dim(pytester, tmp_path) -> None:
    """Qwen2-VL's tower is ``embed_dim`` wide (its ``hidden_size`` is the merger's output)."""
    model = build("qwen2_vl", tmp_path / "model")
    embed_dim = model.config.vision_config.embed_dim
    heads = next(n for n in range(3, embed_dim) if embed_dim % n)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["vision_config"]["num_heads"] = heads
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    result = pytester.runpytest(f"--spectral-model={tmp_path / 'model'}", "--spectral-vision")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*vision_config*hidden size {embed_dim} ('embed_dim') is not divisible by {heads} "
         "attention heads ('num_heads')"]
    )  # fmt: skip
