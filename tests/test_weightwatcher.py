"""Parity with WeightWatcher 0.7.7 on the same full matrices (runs weightwatcher itself).

WeightWatcher reports eigenvalues lambda = sigma^2 where pytest-spectral reports sigma, so its
``spectral_norm`` is our spectral_norm squared and its ``norm`` our frobenius_norm squared.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from references import gavish_donoho_spikes, marchenko_pastur_spikes

from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint

weightwatcher = pytest.importorskip("weightwatcher")

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=96, mlp=True)


def heavy_tailed(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Give every matrix a power-law spectrum, as trained weights have, so alpha is meaningful."""
    generator = torch.Generator().manual_seed(seed)
    shaped = {}
    for name, tensor in tensors.items():
        if tensor.ndim != 2 or "embed" in name or "lm_head" in name:
            shaped[name] = tensor
            continue
        u, _, vh = torch.linalg.svd(tensor.double(), full_matrices=False)
        r = u.shape[1]
        exponent = 0.3 + torch.rand((), generator=generator).item()
        spectrum = torch.arange(1, r + 1, dtype=torch.float64) ** -exponent * 3
        shaped[name] = ((u * spectrum) @ vh).float()
    return shaped


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tensors = heavy_tailed(random_llama_weights(SHAPE, seed=21), seed=5)
    directory = tmp_path_factory.mktemp("ww") / "model"
    write_checkpoint(directory, tensors, SHAPE.config(), dtype=torch.float32)
    return directory, tensors


def weightwatcher_rows(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """WeightWatcher's analysis of each layer matrix, keyed by tensor name."""
    names = [n for n in tensors if n.startswith("model.layers.") and n.endswith("proj.weight")]
    modules = torch.nn.ModuleList()
    for name in names:
        rows, cols = tensors[name].shape
        linear = torch.nn.Linear(cols, rows, bias=False)
        linear.weight.data.copy_(tensors[name])
        modules.append(linear)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    frame = weightwatcher.WeightWatcher(model=modules).analyze(plot=False)
    frame = frame.sort_values("layer_id").reset_index(drop=True)
    return {name: frame.iloc[i].to_dict() for i, name in enumerate(names)}


def test_full_matrix_metrics_agree_with_weightwatcher(model, pytester) -> None:
    directory, tensors = model
    pytester.runpytest(
        f"--spectral-model={directory}",
        "--spectral-scope",
        "matrix",
        "--spectral-report=r.json",
        "-p",
        "no:cacheprovider",
    ).assert_outcomes(passed=SHAPE.layers * 7)
    ours_items = {
        (item["layer"], item["matrix"]): item
        for item in json.loads((pytester.path / "r.json").read_text())["items"]
    }
    ours = {key: item["metrics"] for key, item in ours_items.items()}
    theirs = weightwatcher_rows(tensors)
    assert len(theirs) == SHAPE.layers * 7
    compared = 0
    for name, row in theirs.items():
        layer = int(name.split(".")[2])
        matrix = name.split(".")[-2].removesuffix("_proj")
        metrics = ours[(layer, matrix)]
        assert metrics["alpha"] == pytest.approx(row["alpha"], abs=1e-3), name
        assert metrics["alpha_weighted"] == pytest.approx(row["alpha_weighted"], abs=1e-3), name
        assert metrics["alpha_xmin"] == pytest.approx(row["xmin"], rel=1e-6), name
        assert metrics["alpha_ks_distance"] == pytest.approx(row["D"], rel=1e-6), name
        assert metrics["stable_rank"] == pytest.approx(row["stable_rank"], rel=1e-6), name
        assert metrics["spectral_norm"] ** 2 == pytest.approx(row["spectral_norm"], rel=1e-6), name
        assert metrics["frobenius_norm"] ** 2 == pytest.approx(row["norm"], rel=1e-6), name
        # shape-dependent metrics: the whole matrix's shape, never a head slice's
        item = ours_items[(layer, matrix)]
        assert sorted(item["shape"]) == [row["M"], row["N"]], name
        assert len(item["singular_values"]) == row["num_evals"], name
        assert metrics["numerical_rank"] == row["matrix_rank"], name
        assert len(item["singular_values"]) - metrics["numerical_rank"] == row["rank_loss"], name
        assert metrics["spectral_entropy"] == pytest.approx(row["entropy"], rel=1e-6), name
        assert not item["floor_limited"], name
        ratio = row["sv_max"] / row["sv_min"]
        assert metrics["first_last_ratio"] == pytest.approx(ratio, rel=1e-6), name
        values = np.linalg.svd(tensors[name].double().numpy(), compute_uv=False)
        assert metrics["gd_spikes"] == gavish_donoho_spikes(values, row["M"], row["N"]), name
        assert metrics["mp_spikes"] == marchenko_pastur_spikes(values, row["M"], row["N"]), name
        compared += 1
    assert compared == 14
    assert np.isfinite([m["alpha"] for m in ours.values()]).all()
