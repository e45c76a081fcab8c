"""Reading a baseline report: what is matched, and which reports are refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

from pytest_spectral.checkpoints.checkpoint import Checkpoint, open_checkpoint
from pytest_spectral.judging.baseline import BaselineError, load_baseline
from pytest_spectral.judging.metrics import MetricRegistry, default_request
from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint
from pytest_spectral.untrusted import MAX_REPORT_BYTES

#: the tiny_checkpoint fixture's layout (conftest.py)
MODEL = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_size": 64,
}


def report(**changes: object) -> dict:
    items = [
        {
            "nodeid": "spectral::layer00::head00-q",
            "metrics": {"spectral_norm": 1.5, "alpha": "nan"},
        },
        {"nodeid": "spectral::layer01::k", "metrics": {"first_last_ratio": "inf", "rank": 3}},
    ]
    document = {
        "schema": "pytest-spectral-report",
        "schema_version": 1,
        "model": dict(MODEL),
        "items": items,
    }
    document.update(changes)
    return document


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return open_checkpoint(tiny_checkpoint)


def test_metrics_by_node_id(tmp_path, checkpoint) -> None:
    path = write(tmp_path, report())
    baseline = load_baseline(path, checkpoint)
    assert baseline.path == path
    head = baseline.for_item("spectral::layer00::head00-q")
    assert head["spectral_norm"] == 1.5
    assert math.isnan(head["alpha"])  # "nan" as the report writes it
    assert baseline.for_item("spectral::layer01::k") == {"first_last_ratio": math.inf, "rank": 3.0}
    assert baseline.for_item("spectral::layer01::head00-q") is None


@pytest.mark.parametrize(("field", "other"), [(f, "x" if f == "model_type" else 7) for f in MODEL])
def test_another_layout_is_refused_naming_the_field(tmp_path, checkpoint, field, other) -> None:
    path = write(tmp_path, report(model={**MODEL, field: other}))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    message = str(info.value)
    assert message.startswith(
        f"{path}: baseline is for a different model layout: model.{field} is "
    )
    assert f"{other!r} there and {MODEL[field]!r} here" in message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (report(schema_version=True), "report schema version True; this plugin reads"),
        (report(items=[{"nodeid": "x"}]), r"items\[0\]\.metrics must be an object, got NoneType"),
        (
            report(items=[{"nodeid": "x", "metrics": {"a": "high"}}]),
            re.escape(
                'items[0].metrics.a must be a number (or "nan", "inf", "-inf"), got str \'high\''
            ),
        ),
        (report(items=None), "key 'items' must be a list, got NoneType None"),
    ],
)
def test_what_is_not_a_usable_report(tmp_path, checkpoint, document, message) -> None:
    path = write(tmp_path, document)
    with pytest.raises(BaselineError, match=message) as info:
        load_baseline(path, checkpoint)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "not a pytest-spectral report (no schema 'pytest-spectral-report')"),
        (
            {"schema": "something-else"},
            "not a pytest-spectral report (no schema 'pytest-spectral-report')",
        ),
        (  # a report of another version of this plugin: it says what to do
            report(schema_version=5),
            "report schema version 5; this plugin reads versions 1, 2, 3, 4: "
            "regenerate the baseline with this version",
        ),
        (report(model="llama"), "key 'model' must be an object, got str 'llama'"),
        (report(items={"x": 1}), "key 'items' must be a list, got dict {'x': 1}"),
        (report(items=[3]), "items[0] must be an object, got int 3"),
        (
            report(items=[{"nodeid": 5, "metrics": {}}]),
            "items[0].nodeid must be a string, got int 5",
        ),
        (
            report(items=[{"nodeid": "x", "metrics": {}}, {"nodeid": "x", "metrics": {}}]),
            "items[1].nodeid 'x' appears twice",
        ),
        (
            report(items=[{"nodeid": "x", "metrics": []}]),
            "items[0].metrics must be an object, got list []",
        ),
    ],
    ids=[
        "a-list",
        "another-schema",
        "another-version",
        "model-not-an-object",
        "items-not-a-list",
        "item-not-an-object",
        "nodeid-not-a-string",
        "nodeid-twice",
        "metrics-not-an-object",
    ],
)
def test_what_is_wrong_with_a_report_in_full(tmp_path, checkpoint, document, message) -> None:
    path = write(tmp_path, document)
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    assert str(info.value) == f"{path}: {message}"


def test_a_report_over_the_size_cap_is_refused_unread(tmp_path, checkpoint) -> None:
    """A sparse file one byte over the cap: refused from its size, naming what it is."""
    path = tmp_path / "huge.json"
    with path.open("wb") as sparse:
        sparse.truncate(MAX_REPORT_BYTES + 1)
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    assert str(info.value) == (
        f"{path}: {MAX_REPORT_BYTES + 1} bytes, over the 1024 MiB cap "
        "for this baseline report; refused unparsed"
    )


def test_the_baseline_records_the_reports_sha256(tmp_path, checkpoint) -> None:
    path = write(tmp_path, report())
    baseline = load_baseline(path, checkpoint)
    assert baseline.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_unreadable_and_non_json_files(tmp_path, checkpoint) -> None:
    with pytest.raises(BaselineError, match=r"absent\.json: no such file or directory"):
        load_baseline(tmp_path / "absent.json", checkpoint)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff\xfe not json")
    with pytest.raises(BaselineError, match=r"garbage\.json: baseline report is not valid JSON"):
        load_baseline(garbage, checkpoint)


def test_messages_in_full(tmp_path, checkpoint) -> None:
    absent = tmp_path / "absent.json"
    with pytest.raises(BaselineError) as info:
        load_baseline(absent, checkpoint)
    assert str(info.value) == f"{absent}: no such file or directory"
    path = write(tmp_path, report(items=[{"nodeid": "x"}]))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    assert str(info.value) == f"{path}: items[0].metrics must be an object, got NoneType None"


def test_a_report_without_model_is_refused(tmp_path, checkpoint) -> None:
    document = report()
    del document["model"]
    path = write(tmp_path, document)
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    assert str(info.value) == f"{path}: key 'model' must be an object, got NoneType None"


#: the vision tower of the ``llava`` fixture, as its vision_config gives it (CLIP: no K/V
#: sharing, head_dim = hidden_size / num_attention_heads)
TOWER = {
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "hidden_size": 32,
}
TEXT_ITEM = {"nodeid": "spectral::layer00::head00-q", "metrics": {"spectral_norm": 1.5}}
TOWER_ITEM = {
    "nodeid": "spectral::vision::layer00::head00-q",
    "stack": "vision",
    "metrics": {"spectral_norm": 2.5},
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Checkpoint:
    """A LLaVA wrapper whose text model has the tiny_checkpoint's layout (MODEL) and whose
    CLIP tower has another (TOWER), read with its tower (``--spectral-vision``)."""
    text = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64)
    tensors = {
        name.replace("model.", "model.language_model.", 1): tensor
        for name, tensor in random_llama_weights(text, attention_only=True).items()
    }
    generator = torch.Generator().manual_seed(1)
    for layer in range(TOWER["num_hidden_layers"]):
        for matrix in ("q", "k", "v", "out"):
            name = f"model.vision_tower.vision_model.encoder.layers.{layer}.self_attn.{matrix}_proj"
            tensors[f"{name}.weight"] = torch.randn(32, 32, generator=generator)
    config = {
        "model_type": "llava",
        "text_config": text.config(),
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
        },
    }
    directory = tmp_path_factory.mktemp("llava") / "model"
    return open_checkpoint(write_checkpoint(directory, tensors, config), vision=True)


def tower_report(items: list[dict], **geometry: object) -> dict:
    """A report of the llava fixture; ``geometry``: its ``model.stack_geometry``."""
    return report(model={**MODEL, **geometry}, items=items)


def test_a_tower_recorded_with_the_same_heads_is_compared(tmp_path, llava) -> None:
    path = write(tmp_path, tower_report([TEXT_ITEM, TOWER_ITEM], stack_geometry={"vision": TOWER}))
    baseline = load_baseline(path, llava)
    assert baseline.for_item("spectral::vision::layer00::head00-q") == {"spectral_norm": 2.5}
    assert baseline.for_item("spectral::layer00::head00-q") == {"spectral_norm": 1.5}


def test_a_tower_only_this_run_analyses_has_no_counterpart_and_no_check(tmp_path, llava) -> None:
    """A baseline recorded without --spectral-vision: its text items are compared, the
    tower's items simply have no baseline."""
    path = write(tmp_path, tower_report([TEXT_ITEM]))
    baseline = load_baseline(path, llava)
    assert baseline.for_item("spectral::layer00::head00-q") == {"spectral_norm": 1.5}
    assert baseline.for_item("spectral::vision::layer00::head00-q") is None


@pytest.mark.parametrize(
    ("items", "geometry", "message"),
    [
        (
            [TEXT_ITEM],
            {"stack_geometry": []},
            "key 'model.stack_geometry' must be an object, got list []",
        ),
        (
            [TEXT_ITEM],
            {"stack_geometry": {"vision": "clip"}},
            "key 'model.stack_geometry.vision' must be an object, got str 'clip'",
        ),
        (
            [TEXT_ITEM, TOWER_ITEM],
            {},
            "baseline has items of the vision stack but no model.stack_geometry.vision: its "
            "head layout cannot be compared; regenerate the baseline with this version",
        ),
        (
            [TEXT_ITEM, TOWER_ITEM],
            {"stack_geometry": {"vision": {**TOWER, "num_attention_heads": 8}}},
            "baseline is for a different model layout: "
            "model.stack_geometry.vision.num_attention_heads is 8 there and 4 here",
        ),
        (  # a hostile value is cut to 40 characters
            [TOWER_ITEM],
            {"stack_geometry": {"vision": {**TOWER, "head_dim": "8" * 100}}},
            "baseline is for a different model layout: "
            f"model.stack_geometry.vision.head_dim is '{'8' * 39} there and 8 here",
        ),
    ],
    ids=[
        "not-an-object",
        "tower-not-an-object",
        "tower-items-without-layout",
        "other-heads",
        "long-value",
    ],
)
def test_a_baseline_of_another_tower_layout_is_refused_naming_the_key(
    tmp_path, llava, items, geometry, message
) -> None:
    path = write(tmp_path, tower_report(items, **geometry))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, llava)
    assert str(info.value) == f"{path}: {message}"


def test_every_stack_with_heads_of_its_own_is_compared(tmp_path, llava) -> None:
    """A wrapper with two towers: the first, absent from the baseline, does not stop the
    check of the second."""
    (tower,) = llava.stacks
    two = dataclasses.replace(llava, stacks=(dataclasses.replace(tower, name="audio"), tower))
    other = {"vision": {**TOWER, "num_hidden_layers": 2}}
    path = write(tmp_path, tower_report([TEXT_ITEM], stack_geometry=other))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, two)
    assert str(info.value) == (
        f"{path}: baseline is for a different model layout: "
        "model.stack_geometry.vision.num_hidden_layers is 2 there and 3 here"
    )


def item(nodeid: str, **fields: object) -> dict:
    return {"nodeid": nodeid, "metrics": {}, **fields}


def test_a_metric_the_report_lacks_is_computed_from_the_items_singular_values(
    tmp_path, checkpoint
) -> None:
    """numerical_rank counts sigma > sigma_1 max(m, n) eps64 (numpy's matrix_rank): for a
    64 x 8 slice, and for an 8 x 64 one, the tolerance is 64 eps = 1.42e-14, so 5e-15 is not
    counted (with 8 eps = 1.8e-15, either side alone, it would be). An item that has the
    metric keeps its recorded value; one without singular values (a crashed item) stays
    without."""
    items = [
        item("recorded", metrics={"numerical_rank": 7.0}),
        item("crashed", shape=[64, 8], singular_values=[]),
        item("tall", shape=[64, 8], singular_values=[1.0, 5e-15]),
        item("wide", shape=[8, 64], singular_values=[1.0, 5e-15]),
    ]
    path = write(tmp_path, report(items=items))
    baseline = load_baseline(path, checkpoint, [default_request("numerical_rank")])
    assert baseline.for_item("recorded") == {"numerical_rank": 7.0}
    assert baseline.for_item("tall") == {"numerical_rank": 1.0}
    assert baseline.for_item("wide") == {"numerical_rank": 1.0}
    assert baseline.for_item("crashed") == {}
    assert baseline.computed == ("numerical_rank",)


def test_the_storage_floor_of_a_computed_metric_is_the_reports_dtype(tmp_path, checkpoint) -> None:
    """first_last_ratio of sigma = (1, 0) on a 2 x 2 slice stored in bfloat16: sigma_min is
    below the floor u rms(W) (sqrt(m) + sqrt(n)) = 2^-8 * 0.5 * 2 sqrt(2), so the ratio is
    1 / floor = 2^7.5."""
    values = {"shape": [2, 2], "singular_values": [1.0, 0.0]}
    path = write(tmp_path, report(model={**MODEL, "dtype": "BF16"}, items=[item("x", **values)]))
    baseline = load_baseline(path, checkpoint, [default_request("first_last_ratio")])
    assert baseline.for_item("x")["first_last_ratio"] == pytest.approx(2**7.5, rel=1e-12)
    assert baseline.computed == ("first_last_ratio",)


def test_a_dtype_that_is_no_name_is_no_storage_dtype(tmp_path, checkpoint) -> None:
    """A hostile ``model.dtype`` (a list) is ignored: the floor is float64's numerical one,
    sigma_1 max(m, n) eps64 = 2^-51 for sigma = (1, 0) on 2 x 2, so the ratio is 2^51."""
    values = {"shape": [2, 2], "singular_values": [1.0, 0.0]}
    document = report(model={**MODEL, "dtype": ["BF16"]}, items=[item("x", **values)])
    baseline = load_baseline(
        write(tmp_path, document), checkpoint, [default_request("first_last_ratio")]
    )
    assert baseline.for_item("x")["first_last_ratio"] == 2.0**51


def custom_requests(**functions):
    """Requests of metrics a conftest registers (``pytest_spectral_register_metrics``)."""
    registry = MetricRegistry()
    for name, function in functions.items():
        registry.add(name, function)
    return registry.user_requests()


def test_a_conftest_metric_is_computed_as_float_values(tmp_path, checkpoint) -> None:
    """A metric returning one boolean per slice is stored as 1.0 or 0.0, as a run records it
    (a JSON ``true`` would be no number in a report)."""
    items = [
        item("full", shape=[2, 2], singular_values=[2.0, 1.0]),
        item("deficient", shape=[2, 2], singular_values=[2.0, 0.0]),
    ]
    requests = custom_requests(deficient=lambda sv: sv[..., -1] == 0)
    baseline = load_baseline(write(tmp_path, report(items=items)), checkpoint, requests)
    values = [baseline.for_item(nodeid)["deficient"] for nodeid in ("full", "deficient")]
    assert values == [0.0, 1.0]
    assert all(type(value) is float for value in values)


def test_a_failing_conftest_metric_is_an_error_naming_it(tmp_path, checkpoint) -> None:
    def broken(sv):
        raise ZeroDivisionError("no spectrum")

    items = [item("x", shape=[2, 2], singular_values=[2.0, 1.0])]
    path = write(tmp_path, report(items=items))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint, custom_requests(broken=broken))
    assert str(info.value) == (
        f"{path}: computing broken from its singular values failed: ZeroDivisionError: no spectrum"
    )


def test_a_conftest_metric_with_a_value_too_many_is_an_error_naming_it(
    tmp_path, checkpoint
) -> None:
    """Two values per slice where one is due: an error, not values paired at random."""
    items = [item(n, shape=[2, 2], singular_values=[2.0, 1.0]) for n in ("x", "y")]
    path = write(tmp_path, report(items=items))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint, custom_requests(doubled=lambda sv: sv.ravel()))
    assert str(info.value).startswith(
        f"{path}: computing doubled from its singular values failed: ValueError: "
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"shape": [8, 32], "singular_values": "high"},
            "items[0].singular_values must be a list, got str 'high'",
        ),
        (
            {"shape": [8, 32], "singular_values": [1.0, "x"]},
            'items[0].singular_values[1] must be a number (or "nan", "inf", "-inf"), got str \'x\'',
        ),
        ({"shape": [8], "singular_values": [1.0]}, "got list [8]"),
        ({"shape": [8, 32, 4], "singular_values": [1.0]}, "got list [8, 32, 4]"),
        ({"shape": [8, -1], "singular_values": [1.0]}, "got list [8, -1]"),
        ({"shape": [8, 0], "singular_values": [1.0]}, "got list [8, 0]"),
        ({"shape": [True, 8], "singular_values": [1.0]}, "got list [True, 8]"),
        ({"shape": [8.0, 32], "singular_values": [1.0]}, "got list [8.0, 32]"),
        ({"shape": "8x32", "singular_values": [1.0]}, "got str '8x32'"),
        ({"singular_values": [1.0]}, "got NoneType None"),
    ],
)
def test_values_to_compute_from_are_checked_naming_the_key(
    tmp_path, checkpoint, fields, message
) -> None:
    path = write(tmp_path, report(items=[item("x", **fields)]))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint, [default_request("numerical_rank")])
    if message.startswith("got "):
        message = f"items[0].shape must be two positive integers, {message}"
    assert str(info.value) == f"{path}: {message}"
