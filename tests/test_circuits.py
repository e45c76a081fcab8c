"""Per-head QK and OV circuits: values against numpy, planted circuits end to end, reports.

The reference takes each head's weights from a tiny transformers model with the layout
transformers' own attention code uses (written out here by hand, per family), forms the
hidden x hidden products ``W_Q_h^T W_K_g`` and ``W_O_h W_V_g`` explicitly in float64 and
decomposes them with numpy's LAPACK SVD: nothing of the plugin's slicing or QR route is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

transformers = pytest.importorskip("transformers")

RELATIVE_CONTRACT = 1e-9
EPS64 = float(np.finfo(np.float64).eps)
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}


def _split_rows(weight: torch.Tensor, count: int, d: int) -> np.ndarray:
    """``[count, d, in]``: consecutive blocks of ``d`` output rows (nn.Linear orientation)."""
    return weight.detach().double().numpy().reshape(count, d, -1)


def _o_columns(weight: torch.Tensor, heads: int, d: int) -> np.ndarray:
    """``[heads, hidden, d]``: consecutive blocks of ``d`` input columns of an nn.Linear."""
    w = weight.detach().double().numpy()
    return w.reshape(w.shape[0], heads, d).transpose(1, 0, 2)


def llama_heads(model, layer: int, c) -> tuple[np.ndarray, ...]:
    attention = model.model.layers[layer].self_attn
    d = c.hidden_size // c.num_attention_heads
    return (
        _split_rows(attention.q_proj.weight, c.num_attention_heads, d),
        _split_rows(attention.k_proj.weight, c.num_key_value_heads, d),
        _split_rows(attention.v_proj.weight, c.num_key_value_heads, d),
        _o_columns(attention.o_proj.weight, c.num_attention_heads, d),
    )


def gpt2_heads(model, layer: int, c) -> tuple[np.ndarray, ...]:
    """Conv1D computes ``x @ W``: the nn.Linear weight is ``W.T``; c_attn's output is
    ``[q | k | v]``, each split into heads of ``d`` features."""
    block = model.transformer.h[layer].attn
    heads, hidden = c.n_head, c.n_embd
    d = hidden // heads
    qkv = block.c_attn.weight.T
    q, k, v = qkv[:hidden], qkv[hidden : 2 * hidden], qkv[2 * hidden :]
    o = block.c_proj.weight.T
    return (
        _split_rows(q, heads, d),
        _split_rows(k, heads, d),
        _split_rows(v, heads, d),
        _o_columns(o, heads, d),
    )


def neox_heads(model, layer: int, c) -> tuple[np.ndarray, ...]:
    """``qkv.view(..., heads, 3 * d).chunk(3, -1)``: per head, d rows each of q, k, v."""
    attention = model.gpt_neox.layers[layer].attention
    heads = c.num_attention_heads
    d = c.hidden_size // heads
    grid = attention.query_key_value.weight.detach().double().numpy().reshape(heads, 3, d, -1)
    return grid[:, 0], grid[:, 1], grid[:, 2], _o_columns(attention.dense.weight, heads, d)


def falcon_mqa_heads(model, layer: int, c) -> tuple[np.ndarray, ...]:
    """Multi-query: ``fused.view(..., heads + 2, d)``: the query heads, one K head, one V."""
    attention = model.transformer.h[layer].self_attention
    heads = c.num_attention_heads
    d = c.hidden_size // heads
    grid = _split_rows(attention.query_key_value.weight, heads + 2, d)
    return (
        grid[:heads],
        grid[heads : heads + 1],
        grid[heads + 1 :],
        _o_columns(attention.dense.weight, heads, d),
    )


def falcon_grouped_heads(model, layer: int, c) -> tuple[np.ndarray, ...]:
    """``new_decoder_architecture``: ``fused.view(..., kv_heads, heads / kv_heads + 2, d)``:
    per K/V head, its query heads, then its K, then its V."""
    attention = model.transformer.h[layer].self_attention
    heads, kv_heads = c.num_attention_heads, c.num_kv_heads
    d, n = c.hidden_size // heads, heads // kv_heads
    w = attention.query_key_value.weight.detach().double().numpy()
    grid = w.reshape(kv_heads, n + 2, d, -1)
    q = grid[:, :n].reshape(heads, d, -1)
    return q, grid[:, n], grid[:, n + 1], _o_columns(attention.dense.weight, heads, d)


FAMILIES = {
    "llama (GQA)": (
        "llama",
        {**SMALL, "num_key_value_heads": 2, "intermediate_size": 96},
        llama_heads,
    ),
    "gpt2 (Conv1D)": (
        "gpt2",
        {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128},
        gpt2_heads,
    ),
    "gpt_neox (interleaved)": ("gpt_neox", {**SMALL, "intermediate_size": 96}, neox_heads),
    "falcon (multi-query)": ("falcon", {**SMALL, "multi_query": True}, falcon_mqa_heads),
    "falcon (grouped)": (
        "falcon",
        {**SMALL, "new_decoder_architecture": True, "num_kv_heads": 2},
        falcon_grouped_heads,
    ),
}


def assert_matches_explicit_product(values: list[float], left: np.ndarray, right: np.ndarray):
    """``values`` against numpy's SVD of ``left @ right`` (hidden x hidden, formed explicitly):
    1e-9 relative above the product's floor ``||L||_2 ||R||_2 max(m, n) eps64``, absolute
    below it; the explicit product's other singular values (beyond head_dim) lie below it."""
    reference = np.linalg.svd(left @ right, compute_uv=False)
    floor = (
        np.linalg.norm(left, 2) * np.linalg.norm(right, 2) * max(*left.shape, *right.shape) * EPS64
    )
    rank = len(values)
    assert rank == min(left.shape[1], left.shape[0])
    assert reference[rank:].max(initial=0.0) <= floor
    ours, expected = np.asarray(values), reference[:rank]
    above = expected > floor
    assert above.sum() >= 1
    relative = np.abs(ours - expected)[above] / expected[above]
    assert relative.max() < RELATIVE_CONTRACT, relative.max()
    assert np.all(np.abs(ours - expected)[~above] <= floor)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_type, options, heads_of = FAMILIES[request.param]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **options)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    directory = tmp_path_factory.mktemp(model_type) / "model"
    model.save_pretrained(directory)
    return model, config, heads_of, directory


def test_circuits_match_numpy_svd_of_the_explicit_products(family) -> None:
    model, config, heads_of, directory = family
    checkpoint = open_checkpoint(directory)
    g = checkpoint.geometry
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    for layer in range(2):
        q, k, v, o = heads_of(model, layer, config)
        assert q.shape[0] == g.heads
        assert k.shape[0] == g.kv_heads
        for head in range(g.heads):
            kv = head * k.shape[0] // g.heads  # the K/V head transformers gives this head
            qk = engine.head(layer, "qk", head)
            ov = engine.head(layer, "ov", head)
            assert qk.method == ov.method == "qr_core"
            assert_matches_explicit_product(qk.singular_values, q[head].T, k[kv])
            assert_matches_explicit_product(ov.singular_values, o[head], v[kv])


SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, mlp=False)
PLANTED_LAYER, PLANTED_HEAD = 1, 1  # query head 1 shares K/V head 0 with head 0


def plant_rank_2_qk_circuit(tensors: dict[str, torch.Tensor], seed: int = 5) -> None:
    """Query head 1 and its K head 0 get full-rank slices whose product has rank 2 above a
    1e-4 tail: ``W_Q = diag(s_q) A^T``, ``W_K = diag(s_k) B^T`` (A, B orthonormal columns)
    give ``W_Q^T W_K = A diag(s_q s_k) B^T``. s_q and s_k are 1 on two shared directions and
    on complementary halves of the others, 0.01 elsewhere: each slice keeps 9 of 16
    directions at 1 (condition number 100), the product only two."""
    d, hidden = SHAPE.head_dim, SHAPE.hidden
    generator = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(hidden, d, generator=generator)).Q
    b = torch.linalg.qr(torch.randn(hidden, d, generator=generator)).Q
    s_q, s_k = torch.full((d,), 0.01), torch.full((d,), 0.01)
    s_q[:9], s_k[:2], s_k[9:] = 1.0, 1.0, 1.0
    q = tensors[attention_name(PLANTED_LAYER, "q")]
    k = tensors[attention_name(PLANTED_LAYER, "k")]
    q[PLANTED_HEAD * d : (PLANTED_HEAD + 1) * d] = s_q[:, None] * a.T
    k[0:d] = s_k[:, None] * b.T


def write_planted(directory: Path, **kwargs) -> Path:
    tensors = random_llama_weights(SHAPE, seed=3, attention_only=True)
    plant_rank_2_qk_circuit(tensors)
    return write_checkpoint(
        directory, tensors, SHAPE.config("float32"), dtype=torch.float32, **kwargs
    )


def test_an_ill_conditioned_planted_circuit_meets_the_contract(tmp_path: Path) -> None:
    directory = write_planted(tmp_path / "model")
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    tensors = random_llama_weights(SHAPE, seed=3, attention_only=True)
    plant_rank_2_qk_circuit(tensors)
    d = SHAPE.head_dim
    q = tensors[attention_name(PLANTED_LAYER, "q")].double().numpy()
    k = tensors[attention_name(PLANTED_LAYER, "k")].double().numpy()
    values = engine.head(PLANTED_LAYER, "qk", PLANTED_HEAD).singular_values
    assert values[:2] == pytest.approx([1.0, 1.0], rel=1e-6)
    assert max(values[2:]) == pytest.approx(0.01, rel=1e-5)  # 1 x 0.01 on the other 14
    assert_matches_explicit_product(values, q[d : 2 * d].T, k[:d])


@pytest.mark.parametrize("scale", [1e-170, 1e300])
def test_circuits_of_extreme_float64_factors_neither_underflow_nor_overflow(
    tmp_path: Path, scale: float
) -> None:
    """Query head 1's Q slice scaled (float64 storage): its QK core would be ~1e-340 or
    ~1e600 unscaled; the values match numpy's SVD of the scaled explicit product."""
    tensors = {n: t.double() for n, t in random_llama_weights(SHAPE, seed=3).items()}
    d = SHAPE.head_dim
    tensors[attention_name(0, "q")][d : 2 * d] *= scale
    directory = write_checkpoint(
        tmp_path / "model", tensors, SHAPE.config("float64"), dtype=torch.float64
    )
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    head = engine.head(0, "qk", 1)
    assert head.nonfinite == 0
    assert np.isfinite(head.singular_values).all()
    q = tensors[attention_name(0, "q")].numpy()
    k = tensors[attention_name(0, "k")].numpy()
    g = SHAPE.heads // SHAPE.kv_heads
    # numpy's SVD of the product of the unscaled slice, scaled: the product itself would
    # under- or overflow in float64 too
    values = np.asarray(head.singular_values) / scale
    assert_matches_explicit_product(list(values), q[d : 2 * d].T / scale, k[(1 // g) * d :][:d])


def test_non_finite_and_zero_factors_reach_exactly_their_circuits(tmp_path: Path) -> None:
    tensors = random_llama_weights(SHAPE, seed=3, attention_only=True)
    d = SHAPE.head_dim
    tensors[attention_name(0, "v")][d + 2, 5] = float("nan")  # V of K/V head 1: heads 2, 3
    tensors[attention_name(0, "q")][0:d] = 0.0  # query head 0
    directory = write_checkpoint(
        tmp_path / "model", tensors, SHAPE.config("float32"), dtype=torch.float32
    )
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    ov = [engine.head(0, "ov", head) for head in range(4)]
    assert [h.nonfinite for h in ov] == [0, 0, 1, 1]
    assert all(np.isnan(h.singular_values).all() for h in ov[2:])
    assert all(np.isfinite(h.singular_values).all() for h in ov[:2])
    qk = [engine.head(0, "qk", head) for head in range(4)]
    assert qk[0].singular_values == [0.0] * d
    assert all(min(h.singular_values) > 0 for h in qk[1:])


RANK_RULES = """
[[rules]]
name = "few-directions"
metric = "energy_rank"
min = 4
matrices = ["q", "k", "qk"]
"""


def run_planted(pytester: pytest.Pytester, *arguments: str):
    model = pytester.path / "model"
    if not model.exists():
        write_planted(model)
    pytester.makefile(".toml", rules=RANK_RULES)
    return pytester.runpytest(
        f"--spectral-model={model}", "--spectral-thresholds=rules.toml", *arguments
    )


def test_a_rank_2_qk_circuit_fails_while_its_q_and_k_slices_pass(pytester) -> None:
    result = run_planted(
        pytester, "--spectral-matrices=q,k,qk,ov", "--spectral-report=report.json", "-rf"
    )
    result.assert_outcomes(failed=1, passed=2 * 4 * 4 - 1)
    result.stdout.fnmatch_lines(
        [
            "layer 1, head 1 (K/V head 0), qk = W_Q?h?^T W_K?g?: q rows 16:32 of "
            "model.layers.1.self_attn.q_proj.weight; k rows 0:16 of "
            "model.layers.1.self_attn.k_proj.weight (64x64, rank <= 16)",
            "*L1 H1 qk *few-*2 (0.03)*16*none*",
            "*needs H0-1 (K/V head 0)*",
            "FAILED spectral::layer01::head01-qk - few-directions: energy_rank = 2 < min 4",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    items = {item["nodeid"]: item for item in report["items"]}
    for matrix in ("q", "k"):
        item = items[f"spectral::layer01::head01-{matrix}"]
        assert item["outcome"] == "passed"
        assert item["metrics"]["energy_rank"] == 9
    circuit = items["spectral::layer01::head01-qk"]
    assert (circuit["kv_head"], circuit["shape"], circuit["method"]) == (0, [64, 64], "qr_core")
    assert circuit["metrics"]["energy_rank"] == 2
    # K/V head 0 is shared with query head 0, which is no candidate: the cut is unpriced.
    (candidate,) = report["candidates"]
    assert candidate["matrix"] == "qk"
    assert candidate["heads"] == [1]
    assert candidate["needs_heads"] == [0, 1]
    assert candidate["params_saved"] == 0
    assert candidate["break_even_rank"] == 16


def test_circuits_are_collected_only_when_named(pytester) -> None:
    result = run_planted(pytester, "--collect-only", "-q")
    assert "-qk" not in result.stdout.str()
    assert "-ov" not in result.stdout.str()
    result = run_planted(pytester, "--collect-only", "-q", "--spectral-matrices=qk,ov")
    result.stdout.fnmatch_lines(["spectral::layer00::head00-qk", "spectral::layer00::head00-ov"])
    assert "head00-q\n" not in result.stdout.str()


def test_circuits_as_whole_matrices_are_a_usage_error(pytester) -> None:
    result = run_planted(pytester, "--spectral-matrices=q,qk", "--spectral-scope=matrix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--spectral-matrices qk: circuits exist per head only*"])


def test_a_cached_rerun_serves_circuits_and_their_floor(pytester) -> None:
    first = run_planted(pytester, "--spectral-matrices=qk,ov", "--spectral-report=a.json")
    second = run_planted(pytester, "--spectral-matrices=qk,ov", "--spectral-report=b.json", "-v")
    first.assert_outcomes(failed=1, passed=15)
    second.assert_outcomes(failed=1, passed=15)
    second.stdout.fnmatch_lines(["*2 of 2 matrices from the cache*"])
    a, b = (json.loads((pytester.path / n).read_text())["items"] for n in ("a.json", "b.json"))
    assert [(i["singular_values"], i["floor_limited"], i["metrics"]) for i in a] == [
        (i["singular_values"], i["floor_limited"], i["metrics"]) for i in b
    ]


def test_baseline_calibration_and_heatmap_cover_circuits(pytester) -> None:
    model = write_planted(pytester.path / "model")
    common = [f"--spectral-model={model}", "--spectral-matrices=q,qk,ov", "-p", "no:cacheprovider"]
    result = pytester.runpytest(
        *common, "--spectral-report=good.json", "--spectral-calibrate=calibrated.toml"
    )
    result.assert_outcomes(passed=3 * 4 * 2)
    calibrated = (pytester.path / "calibrated.toml").read_text()
    assert 'name = "calibrated-qk-effective_rank"' in calibrated
    assert 'name = "calibrated-ov-stable_rank"' in calibrated
    # Calibrated on itself, every item passes.
    pytester.runpytest(*common, "--spectral-thresholds=calibrated.toml").assert_outcomes(passed=24)

    # A drift rule against the report fails exactly the circuits a scaled K slice moves: the
    # QK circuits of the query heads sharing K/V head 1 (heads 2 and 3) in layer 0.
    tensors = random_llama_weights(SHAPE, seed=3, attention_only=True)
    plant_rank_2_qk_circuit(tensors)
    d = SHAPE.head_dim
    tensors[attention_name(0, "k")][d : 2 * d] *= 3
    moved = write_checkpoint(
        pytester.path / "moved", tensors, SHAPE.config("float32"), dtype=torch.float32
    )
    pytester.makefile(
        ".toml",
        drift='[[rules]]\nname = "drift"\nmetric = "spectral_norm"\nmax_change = 0.5\n',
    )
    result = pytester.runpytest(
        f"--spectral-model={moved}",
        *common[1:],
        "--spectral-baseline=good.json",
        "--spectral-thresholds=drift.toml",
        "--spectral-heatmap=spectral_norm",
        "-rf",
    )
    result.assert_outcomes(failed=2, passed=22)
    failed = sorted(line for line in result.stdout.lines if line.startswith("FAILED"))
    assert [line.split(" - ")[0] for line in failed] == [
        "FAILED spectral::layer00::head02-qk",
        "FAILED spectral::layer00::head03-qk",
    ]
    result.stdout.fnmatch_lines(["*(+200.0%)*", "q *qk *ov*", "qk: *furthest: L0 H2*"])


def test_the_html_report_has_circuit_panels(pytester) -> None:
    # Imported before the in-process run, which drops the modules it imported afterwards.
    pytest.importorskip("matplotlib.pyplot")
    from pytest_spectral.reporting.html_report import _cells, _heatmaps, _panels, _scales

    result = run_planted(
        pytester,
        "--spectral-matrices=q,k,v,o,qk,ov",
        "--spectral-html=report.html",
        "--spectral-report=report.json",
    )
    result.assert_outcomes(failed=1, passed=6 * 4 * 2 - 1)
    page = (pytester.path / "report.html").read_text()
    assert "<td>qk</td>" in page  # the candidate's row
    records = json.loads((pytester.path / "report.json").read_text())["items"]
    cells = _cells(records, "top_k_ratio")
    scales = _scales("top_k_ratio", cells, ())
    figure = _heatmaps(cells, scales, 2, 4, _panels(records))
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == ["q", "k", "v", "o", "qk", "ov"]
