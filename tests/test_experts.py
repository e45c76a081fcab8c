"""Mixtures of experts at matrix scope, end to end: items per expert and kind, dense and
sparse layers, rules and --spectral-matrices by kind, node ids, calibration, bad input.

The checkpoint is written here by hand (a Qwen3-MoE layout: layer 0 dense through
``mlp_only_layers``, layers 1 and 2 sparse with three experts each), so that each test can
break one thing in it; the conformance matrix (``test_architectures.py``) checks the same
items against models transformers builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, INTERMEDIATE = 32, 4, 2, 8, 3, 16
CONFIG = {
    "model_type": "qwen3_moe",
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "num_hidden_layers": 3,
    "num_experts": EXPERTS,
    "moe_intermediate_size": INTERMEDIATE,
    "intermediate_size": 48,
    "mlp_only_layers": [0],
}


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64).float()

    out: dict[str, torch.Tensor] = {}
    for layer in range(3):
        attention = f"model.layers.{layer}.self_attn."
        out[attention + "q_proj.weight"] = weight(HEADS * HEAD_DIM, HIDDEN)
        out[attention + "k_proj.weight"] = weight(KV_HEADS * HEAD_DIM, HIDDEN)
        out[attention + "v_proj.weight"] = weight(KV_HEADS * HEAD_DIM, HIDDEN)
        out[attention + "o_proj.weight"] = weight(HIDDEN, HEADS * HEAD_DIM)
        mlp = f"model.layers.{layer}.mlp."
        if layer == 0:
            out[mlp + "gate_proj.weight"] = weight(48, HIDDEN)
            out[mlp + "up_proj.weight"] = weight(48, HIDDEN)
            out[mlp + "down_proj.weight"] = weight(HIDDEN, 48)
            continue
        out[mlp + "gate.weight"] = weight(EXPERTS, HIDDEN)
        for expert in range(EXPERTS):
            prefix = f"{mlp}experts.{expert}."
            out[prefix + "gate_proj.weight"] = weight(INTERMEDIATE, HIDDEN)
            out[prefix + "up_proj.weight"] = weight(INTERMEDIATE, HIDDEN)
            out[prefix + "down_proj.weight"] = weight(HIDDEN, INTERMEDIATE)
    return out


def write(directory: Path, weights: dict[str, torch.Tensor], **config: object) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**CONFIG, **config}))
    save_file(weights, directory / "model.safetensors")
    return directory


@pytest.fixture
def moe(tmp_path: Path) -> Path:
    return write(tmp_path / "moe", tensors())


def run(pytester: pytest.Pytester, model: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest(f"--spectral-model={model}", "-p", "no:cacheprovider", *args)


def test_dense_and_sparse_layers_have_their_own_items(pytester, moe: Path) -> None:
    result = run(pytester, moe, "--spectral-scope=matrix", "--collect-only", "-q")
    ids = [line for line in result.stdout.lines if line.startswith("spectral::")]
    layer = lambda n: [i.split("::")[2] for i in ids if i.startswith(f"spectral::layer0{n}::")]  # noqa: E731
    assert layer(0) == ["q", "k", "v", "o", "gate", "up", "down"]
    experts = [f"expert{e:02d}-{kind}" for kind in ("gate", "up", "down") for e in range(EXPERTS)]
    assert layer(1) == ["q", "k", "v", "o", *experts, "router"]
    assert layer(2) == layer(1)


def test_a_rule_names_every_experts_matrix_by_kind(pytester, moe: Path) -> None:
    """``matrices = ["expert-down"]`` judges each expert's down matrix (here of layer 2);
    the JSON records name the expert."""
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nscope = "matrix"\n'
        'matrices = ["expert-down"]\nlayers = "2"\n',
    )
    report = pytester.path / "report.json"
    result = run(
        pytester, moe, "--spectral-scope=matrix", f"--spectral-thresholds={rules}",
        f"--spectral-report={report}",
    )  # fmt: skip
    result.assert_outcomes(failed=EXPERTS, passed=7 + 2 * (4 + 3 * EXPERTS + 1) - EXPERTS)
    result.stdout.fnmatch_lines(
        [
            "layer 2, expert 1, down: model.layers.2.mlp.experts.1.down_proj.weight (32x16)",
        ],
        consecutive=False,
    )
    records = {r["nodeid"]: r for r in json.loads(report.read_text())["items"]}
    record = records["spectral::layer02::expert01-down"]
    assert (record["matrix"], record["scope"], record["head"]) == ("expert01-down", "matrix", None)
    assert record["outcome"] == "failed"
    assert records["spectral::layer01::expert01-down"]["outcome"] == "passed"


def test_a_rule_on_experts_of_a_dense_layer_says_it_judges_nothing(pytester, moe: Path) -> None:
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nname = "r"\nmetric = "stable_rank"\nmin = 1e9\nscope = "matrix"\n'
        'matrices = ["expert-down"]\nlayers = "0"\n',
    )
    result = run(pytester, moe, "--spectral-scope=matrix", f"--spectral-thresholds={rules}")
    result.assert_outcomes(passed=7 + 2 * (4 + 3 * EXPERTS + 1))
    result.stdout.fnmatch_lines(
        [f"spectral: rule 'r' ({rules}:1) applies to no item of this run: the layers it judges "
         "have no expert-down (they have q, k, v, o, gate, up, down): layer 0 is dense; the "
         "layers with expert-down: 1, 2"]
    )  # fmt: skip


def test_expert_values_are_numpys_of_each_experts_own_matrix(moe: Path) -> None:
    from pytest_spectral.checkpoints.checkpoint import open_checkpoint
    from pytest_spectral.compute.engine import SpectraEngine
    from pytest_spectral.judging.metrics import DEFAULT_REQUESTS

    weights = tensors()
    engine = SpectraEngine(open_checkpoint(moe), DEFAULT_REQUESTS)
    for expert in range(EXPERTS):
        own = weights[f"model.layers.2.mlp.experts.{expert}.up_proj.weight"].double().numpy()
        values = engine.whole(2, f"expert{expert:02d}-up").singular_values
        np.testing.assert_allclose(values, np.linalg.svd(own, compute_uv=False), rtol=1e-9)
    engine.close()


def test_spectral_matrices_selects_a_kind(pytester, moe: Path) -> None:
    result = run(
        pytester, moe, "--spectral-scope=matrix", "--spectral-matrices=expert-gate,router",
        "--collect-only", "-q",
    )  # fmt: skip
    ids = [line for line in result.stdout.lines if line.startswith("spectral::")]
    assert ids == [
        f"spectral::layer0{layer}::{name}"
        for layer in (1, 2)
        for name in [f"expert{e:02d}-gate" for e in range(EXPERTS)] + ["router"]
    ]


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (("--spectral-layers=0", "--spectral-matrices=expert-gate"), "layer 0 is dense; the "
         "layers with expert-gate: 1, 2"),
        (("--spectral-layers=1-2", "--spectral-matrices=gate"), "layers 1, 2 are sparse; the "
         "layers with gate: 0"),
    ],
)  # fmt: skip
def test_a_selection_with_no_item_is_a_usage_error_that_says_why(
    pytester, moe: Path, options: tuple[str, ...], why: str
) -> None:
    result = run(pytester, moe, "--spectral-scope=matrix", *options)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    matrix = options[1].partition("=")[2]
    result.stderr.fnmatch_lines(
        [f"*--spectral-matrices {matrix}: no item to collect ({matrix}: {why})"]
    )


def test_a_matrix_the_selected_layers_lack_is_named_in_the_header(pytester, moe: Path) -> None:
    result = run(
        pytester, moe, "--spectral-scope=both", "--spectral-layers=0",
        "--spectral-matrices=q,expert-gate",
    )  # fmt: skip
    result.assert_outcomes(passed=HEADS + 1)
    result.stdout.fnmatch_lines(
        [
            "spectral: --spectral-matrices: expert-gate has no item in this run: layer 0 is "
            "dense; the layers with expert-gate: 1, 2"
        ]
    )


def test_a_rule_for_experts_of_a_dense_layer_applies_to_no_item_and_says_why(
    pytester, moe: Path
) -> None:
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nname = "eg"\nmetric = "stable_rank"\nmin = 1\nscope = "matrix"\n'
        'matrices = ["expert-gate"]\nlayers = "0"\n',
    )
    result = run(pytester, moe, "--spectral-scope=matrix", f"--spectral-thresholds={rules}")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "spectral: rule 'eg' (*rules.toml:1) applies to no item of this run: the layers it "
            "judges have no expert-gate (they have q, k, v, o, gate, up, down): layer 0 is "
            "dense; the layers with expert-gate: 1, 2"
        ]
    )


@pytest.mark.parametrize(
    ("node", "why"),
    [
        ("spectral::layer01::expert07-gate", "layer 1 has 3 experts (0-2)"),
        ("spectral::layer00::expert00-gate", "layer 0 has no experts"),
        ("spectral::layer01::gate", "layer 1 has no gate"),
    ],
)
def test_an_expert_id_that_names_nothing_says_why(pytester, moe: Path, node, why) -> None:
    result = run(pytester, moe, "--spectral-scope=matrix", node)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{node}: no such spectral item in this run: {why}*"])


def test_calibration_bounds_each_kind_once(pytester, moe: Path) -> None:
    written = pytester.path / "calibrated.toml"
    result = run(pytester, moe, "--spectral-scope=matrix", f"--spectral-calibrate={written}")
    assert result.ret == 0
    text = written.read_text()
    assert 'matrices = ["expert-gate"]' in text
    assert "expert00" not in text
    again = run(pytester, moe, "--spectral-scope=matrix", f"--spectral-thresholds={written}")
    again.assert_outcomes(passed=7 + 2 * (4 + 3 * EXPERTS + 1))


def test_a_schedule_key_of_the_wrong_type_is_a_usage_error(pytester, tmp_path: Path) -> None:
    model = write(tmp_path / "bad", tensors(), mlp_only_layers="0")
    result = run(pytester, model)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*config.json: 'mlp_only_layers' must be a list of layer numbers, got '0'*"]
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # layer 0 stores a dense MLP, but the config makes it sparse
        (
            {"mlp_only_layers": []},
            "*tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' is missing: layer 0 is "
            "sparse by the config's decoder_sparse_step=1, mlp_only_layers=[[]], num_experts=3*",
        ),
        # layer 1 stores experts, but the config makes it dense
        (
            {"mlp_only_layers": [1]},
            "*tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' is missing: layer 0 is "
            "sparse by the config's *mlp_only_layers=[[]1]*",
        ),
        (
            {"mlp_only_layers": [0, 1]},
            "*tensor 'model.layers.1.mlp.gate_proj.weight' is missing (layer 0 has its gate, "
            "and layer 1 is dense by the config's *mlp_only_layers=[[]0, 1]*",
        ),
    ],
)
def test_a_config_that_misplaces_the_sparse_layers_is_refused(
    pytester, tmp_path: Path, config: dict, message: str
) -> None:
    """Not an MLP item collected: attention alone would pass for a healthy model."""
    model = write(tmp_path / "misplaced", tensors(), decoder_sparse_step=1, **config)
    result = run(pytester, model, "--spectral-scope=matrix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_config_that_makes_a_layer_of_experts_dense_is_refused(pytester, tmp_path: Path) -> None:
    weights = {k: v for k, v in tensors().items() if not k.startswith("model.layers.0.mlp.")}
    weights.update(
        {k.replace(".1.", ".0.", 1): v.clone() for k, v in weights.items() if ".1.mlp." in k}
    )
    result = run(pytester, write(tmp_path / "all_sparse", weights), "--spectral-scope=matrix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*tensor 'model.layers.0.mlp.gate_proj.weight' is missing: layer 0 is dense by the "
            "config's decoder_sparse_step=1, mlp_only_layers=[[]0], num_experts=3, and the "
            "checkpoint has MLP tensors elsewhere*"
        ]
    )


def test_a_checkpoint_without_mlp_weights_has_attention_items_and_says_so(
    pytester, tmp_path: Path
) -> None:
    weights = {k: v for k, v in tensors().items() if ".mlp." not in k}
    result = run(pytester, write(tmp_path / "attention", weights), "--spectral-scope=matrix")
    result.assert_outcomes(passed=3 * 4)
    result.stdout.fnmatch_lines(
        [
            "spectral: matrix scope analyses attention only: the checkpoint has no MLP weights "
            "where a qwen3_moe model keeps them, so only the attention matrices have items"
        ]
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_experts": 5}, "'num_experts' is 5, but layer 1 stores 3 experts' gate matrices"),
        # aliases: one of them must be the stored count
        ({"num_experts": 2, "n_routed_experts": 4}, "'num_experts' is 2, but layer 1 stores 3"),
        ({"num_local_experts": "x"}, "'num_local_experts' must be an integer >= 0, got 'x'"),
        ({"num_experts": [3, 3]}, "'num_experts' must be an integer >= 0, got [[]3, 3]"),
    ],
)
def test_the_configs_expert_count_must_be_the_stored_one(
    pytester, tmp_path: Path, config: dict, message: str
) -> None:
    model = write(tmp_path / "count", tensors(), **config)
    result = run(pytester, model, "--spectral-scope=matrix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*config.json: {message}*"])


def test_a_missing_expert_is_named(pytester, tmp_path: Path) -> None:
    weights = tensors()
    del weights["model.layers.2.mlp.experts.1.up_proj.weight"]
    result = run(pytester, write(tmp_path / "missing", weights))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*tensor 'model.layers.2.mlp.experts.1.up_proj.weight' is missing (layer 1 has its *"]
    )


def test_experts_of_different_shapes_refuse_only_a_run_that_reads_them(
    pytester, tmp_path: Path
) -> None:
    weights = tensors()
    weights["model.layers.1.mlp.experts.2.gate_proj.weight"] = torch.ones(8, HIDDEN)
    model = write(tmp_path / "ragged", weights)
    run(pytester, model).assert_outcomes(passed=3 * HEADS * 4)  # head scope reads no expert
    result = run(pytester, model, "--spectral-scope=matrix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*tensor 'model.layers.1.mlp.experts.2.gate_proj.weight' has shape ?8, 32?, expert 0's*"]
    )


def test_a_flood_of_tiny_stacked_experts_is_refused(tmp_path: Path) -> None:
    """A 3-D tensor of 5000 experts of 2 x 2 weights would make 10,000 items from 80 kB."""
    from pytest_spectral.checkpoints.checkpoint import open_checkpoint
    from pytest_spectral.errors import CheckpointError

    weights = {k: v for k, v in tensors().items() if "experts" not in k}
    for layer in (1, 2):
        weights[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.ones(5000, 4, 2)
        weights[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.ones(5000, 2, 2)
    with pytest.raises(CheckpointError, match="implausible expert tensors"):
        open_checkpoint(write(tmp_path / "flood", weights))


def test_heatmaps_leave_the_experts_out_and_say_so(pytester, moe: Path) -> None:
    """A column per expert matrix would be hundreds wide in a real model."""
    pytest.importorskip("matplotlib")
    page = pytester.path / "report.html"
    result = run(
        pytester, moe, "--spectral-scope=matrix", "--spectral-heatmap=stable_rank",
        f"--spectral-html={page}",
    )  # fmt: skip
    assert result.ret == 0
    result.stdout.fnmatch_lines(["expert matrices (expertNN-gate, -up, -down) are not drawn"])
    html = page.read_text()
    assert "Expert matrices (expertNN-gate, -up, -down) are not drawn" in html
    assert "expert02-down" in html  # in the table of whole matrices


def test_an_expert_number_far_beyond_the_others_names_the_first_missing(tmp_path: Path) -> None:
    """A header naming expert 10**15 (and not the ones below) neither allocates 10**15 names
    nor hangs: the first missing expert is named."""
    from pytest_spectral.checkpoints.checkpoint import open_checkpoint
    from pytest_spectral.errors import CheckpointError

    weights = tensors()
    weights["model.layers.1.mlp.experts.1000000000000000.gate_proj.weight"] = torch.ones(2, 2)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.3\.gate_proj"):
        open_checkpoint(write(tmp_path / "far", weights))
