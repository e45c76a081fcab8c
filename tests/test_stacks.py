"""Encoder-decoder models through pytest: ids by stack, rules selecting stacks, usage errors,
views that keep the stacks apart, and decoder-only ids unchanged.

The checkpoint is written by hand in BART's layout (``model.encoder.layers.N.self_attn``,
``model.decoder.layers.N.{self_attn,encoder_attn}``): two encoder layers, three decoder
layers, four heads of 16 over 64 wide; the layouts themselves are verified against
transformers in ``test_encoder_decoder.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pytest_spectral.judging.rules import RulesError, load_rules
from pytest_spectral.testing.synthetic import write_checkpoint, write_random_llama

HIDDEN, HEADS, ENCODER_LAYERS, DECODER_LAYERS = 64, 4, 2, 3
HEAD_ITEMS = 4 * HEADS  # per layer


def bart_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    places = [("encoder", layer, ("self_attn",)) for layer in range(ENCODER_LAYERS)]
    places += [
        ("decoder", layer, ("self_attn", "encoder_attn")) for layer in range(DECODER_LAYERS)
    ]
    for block, layer, modules in places:
        prefix = f"model.{block}.layers.{layer}."
        for module in modules:
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                tensors[f"{prefix}{module}.{name}.weight"] = torch.randn(
                    HIDDEN, HIDDEN, generator=generator
                )
        tensors[f"{prefix}fc1.weight"] = torch.randn(128, HIDDEN, generator=generator)
        tensors[f"{prefix}fc2.weight"] = torch.randn(HIDDEN, 128, generator=generator)
    return tensors


@pytest.fixture(scope="module")
def bart(tmp_path_factory) -> Path:
    config = {
        "model_type": "bart",
        "d_model": HIDDEN,
        "encoder_layers": ENCODER_LAYERS,
        "decoder_layers": DECODER_LAYERS,
        "encoder_attention_heads": HEADS,
        "decoder_attention_heads": HEADS,
    }
    directory = tmp_path_factory.mktemp("bart") / "model"
    return write_checkpoint(directory, bart_tensors(), config, dtype=torch.float32)


def collected(result) -> list[str]:
    return [line for line in result.stdout.lines if line.startswith("spectral::")]


def test_items_are_grouped_by_stack_and_layer(bart, pytester) -> None:
    result = pytester.runpytest(f"--spectral-model={bart}", "--collect-only", "-q")
    ids = collected(result)
    assert len(ids) == (ENCODER_LAYERS + 2 * DECODER_LAYERS) * HEAD_ITEMS
    assert ids[0] == "spectral::encoder::layer00::head00-q"
    assert ids[-1] == "spectral::cross::layer02::head03-o"
    scopes = {nodeid.rsplit("::", 1)[0] for nodeid in ids}
    assert len(scopes) == ENCODER_LAYERS + 2 * DECODER_LAYERS  # one per stack and layer
    result = pytester.runpytest(f"--spectral-model={bart}", "--collect-only")
    result.stdout.fnmatch_lines(["<SpectralRoot spectral>", "  <StackCollector encoder>"])


def test_a_cross_attention_layer_has_no_mlp_of_its_own(bart, pytester) -> None:
    result = pytester.runpytest(
        f"--spectral-model={bart}", "--spectral-scope=matrix", "--collect-only", "-q"
    )
    ids = collected(result)
    assert "spectral::decoder::layer00::fc1" in ids
    assert [i for i in ids if i.startswith("spectral::cross::layer00::")] == [
        f"spectral::cross::layer00::{m}" for m in "qkvo"
    ]
    result = pytester.runpytest(
        f"--spectral-model={bart}", "--spectral-scope=matrix", "spectral::cross::layer00::fc1"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*the cross stack has no MLP of its own: its layer's fc1 is spectral::decoder::*"]
    )


@pytest.mark.parametrize(
    ("argument", "why"),
    [
        ("spectral::layer01", "an encoder-decoder model's layers are in stacks: "
         "spectral::encoder::layer01 (encoder, decoder, cross)"),
        ("spectral::encoder::layer02", "the encoder stack has 2 layers (0-1)"),
        ("spectral::cross::layer1", "layer numbers are zero-padded: spectral::cross::layer01"),
        ("spectral::cross::layer00::head04-q", "the model has 4 query heads (0-3)"),
        ("spectral::foo::layer01", "'foo' is not a stack of this model; its stacks are encoder, "
         "decoder, cross"),
        ("spectral::cross::layer01::fc1", "the cross stack has no MLP of its own: its layer's fc1 "
         "is spectral::decoder::layerNN::fc1"),
    ],
)  # fmt: skip
def test_ids_as_arguments_say_what_is_wrong(bart, pytester, argument: str, why: str) -> None:
    result = pytester.runpytest(f"--spectral-model={bart}", argument)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"{argument}: no such spectral item in this run: {why}" in result.stderr.str()
    assert "ids look like spectral::encoder::layer00::head00-q (stack, layer" in (
        result.stderr.str()
    )


def test_ids_select_stacks_layers_and_items(bart, pytester) -> None:
    result = pytester.runpytest(
        f"--spectral-model={bart}", "spectral::cross", "spectral::encoder::layer01::head02-v"
    )
    result.assert_outcomes(passed=DECODER_LAYERS * HEAD_ITEMS + 1)
    result = pytester.runpytest(
        f"--spectral-model={bart}", "-k", "cross and head01",
        "--deselect", "spectral::cross::layer00",
    )  # fmt: skip
    result.assert_outcomes(passed=(DECODER_LAYERS - 1) * 4)


def test_a_stack_on_a_model_without_stacks_is_a_usage_error(pytester, tmp_path) -> None:
    model = write_random_llama(tmp_path / "llama")
    result = pytester.runpytest(f"--spectral-model={model}", "spectral::encoder::layer00")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*'encoder' is a stack of an encoder-decoder model; this model's layers are not in "
         "stacks: spectral::layerNN*"]
    )  # fmt: skip


def test_decoder_only_ids_are_unchanged(pytester, tmp_path) -> None:
    model = write_random_llama(tmp_path / "llama")
    ids = collected(pytester.runpytest(f"--spectral-model={model}", "--collect-only", "-q"))
    assert ids[:2] == ["spectral::layer00::head00-q", "spectral::layer00::head00-k"]
    assert len(ids) == 2 * 4 * 4


def test_spectral_layers_selects_per_stack(bart, pytester) -> None:
    """``--spectral-layers 2`` is layer 2 of each stack that has one: the decoder's and the
    cross-attention's, not the encoder's (it has two)."""
    result = pytester.runpytest(
        f"--spectral-model={bart}", "--spectral-layers=2", "--collect-only", "-q"
    )
    layers = {nodeid.rsplit("::", 1)[0] for nodeid in collected(result)}
    assert layers == {"spectral::decoder::layer02", "spectral::cross::layer02"}


def test_spectral_layers_counts_per_stack(bart, pytester) -> None:
    result = pytester.runpytest(f"--spectral-model={bart}", "--spectral-layers=2-5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--spectral-layers 2-5: layer(s) 3-5 do not exist; the encoder stack has 2 layers "
         "(0-1), the decoder stack has 3 layers (0-2), the cross stack has 3 layers (0-2)*"]
    )  # fmt: skip


def test_rules_select_stacks(bart, pytester) -> None:
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["cross", "encoder"]\n'
        'matrices = ["q"]\n',
    )
    report = pytester.path / "report.json"
    result = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}", f"--spectral-report={report}"
    )
    result.assert_outcomes(
        failed=(ENCODER_LAYERS + DECODER_LAYERS) * HEADS,
        passed=(ENCODER_LAYERS + 2 * DECODER_LAYERS) * HEAD_ITEMS
        - (ENCODER_LAYERS + DECODER_LAYERS) * HEADS,
    )
    document = json.loads(report.read_text())
    assert document["schema_version"] == 4
    assert document["model"]["stacks"] == {"encoder": 2, "decoder": 3, "cross": 3}
    failed = {(i["stack"], i["matrix"]) for i in document["items"] if i["outcome"] == "failed"}
    assert failed == {("cross", "q"), ("encoder", "q")}
    regressions = {(r["stack"], r["layer"]) for r in document["regressions"]}
    assert regressions == {("encoder", 0), ("encoder", 1), ("cross", 0), ("cross", 1), ("cross", 2)}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["crosss"]', "unknown stack 'crosss'; choose from encoder, decoder, cross"),
        ("[]", "must be a non-empty list such as ['cross']"),
        ("3", "must be a non-empty list such as ['cross'], got 3"),
    ],
)
def test_a_bad_stacks_key_names_the_rule_and_the_key(tmp_path, value: str, message) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(f'[[rules]]\nmetric = "stable_rank"\nmin = 1\nstacks = {value}\n')
    with pytest.raises(RulesError, match="stacks") as caught:
        load_rules(path)
    assert message in str(caught.value)


def test_views_keep_the_stacks_apart(bart, pytester) -> None:
    """The same (layer, head, matrix) in three stacks: three heatmaps, three table rows."""
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nmatrices = ["q"]\nlayers = "0"\n'
        'heads = "0"\n',
    )
    result = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}",
        "--spectral-heatmap=stable_rank",
    )  # fmt: skip
    result.assert_outcomes(failed=3, passed=(ENCODER_LAYERS + 2 * DECODER_LAYERS) * HEAD_ITEMS - 3)
    out = result.stdout.str()
    for stack in ("encoder", "decoder", "cross"):
        assert f"\n{stack} stack:\n" in out
        assert f"{stack} L0 H0 q" in out
        assert f"{stack} layer 0, head 0, q: rows 0:16 of model." in out


def test_calibration_writes_rules_per_stack_that_pass_the_checkpoint(bart, pytester) -> None:
    """Cross-attention's spectra need not look like self-attention's: each stack is bounded
    by its own items, and the file passes the checkpoint it was written from."""
    result = pytester.runpytest(f"--spectral-model={bart}", "--spectral-calibrate=cal.toml")
    result.assert_outcomes(passed=(ENCODER_LAYERS + 2 * DECODER_LAYERS) * HEAD_ITEMS)
    rules = load_rules(pytester.path / "cal.toml").rules
    assert {rule.stacks for rule in rules} == {
        frozenset({"encoder"}),
        frozenset({"decoder"}),
        frozenset({"cross"}),
    }
    assert "calibrated-cross-q-top_k_ratio" in {rule.name for rule in rules}
    again = pytester.runpytest(f"--spectral-model={bart}", "--spectral-thresholds=cal.toml")
    again.assert_outcomes(passed=(ENCODER_LAYERS + 2 * DECODER_LAYERS) * HEAD_ITEMS)


def test_last_failed_and_loadscope_workers_take_the_stacked_ids(bart, pytester) -> None:
    rules = pytester.makefile(
        ".toml",
        rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["cross"]\nheads = "1"\n'
        'matrices = ["k"]\n',
    )
    first = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}", "-n", "2",
        "--dist", "loadscope", "--spectral-report=r.json",
    )  # fmt: skip
    first.assert_outcomes(failed=DECODER_LAYERS, passed=(ENCODER_LAYERS + 2 * DECODER_LAYERS)
                          * HEAD_ITEMS - DECODER_LAYERS)  # fmt: skip
    report = json.loads((pytester.path / "r.json").read_text())
    assert len(report["items"]) == (ENCODER_LAYERS + 2 * DECODER_LAYERS) * HEAD_ITEMS
    again = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}", "--lf", "-v"
    )
    again.assert_outcomes(failed=DECODER_LAYERS)
    again.stdout.fnmatch_lines(["*spectral::cross::layer02::head01-k FAILED*"])


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ('stacks = ["encoder"]\nlayers = "2"', "its layers 2 do not exist: the encoder stack has 2 "
         "layers (0-1)"),
        ('layers = "5"', "its layers 5 do not exist: the encoder stack has 2 layers (0-1), the "
         "decoder stack has 3 layers (0-2), the cross stack has 3 layers (0-2)"),
    ],
)  # fmt: skip
def test_a_rule_that_judges_nothing_says_why_per_stack(bart, pytester, rule, why) -> None:
    rules = pytester.makefile(
        ".toml", rules=f'[[rules]]\nmetric = "stable_rank"\nmin = 0\n{rule}\n'
    )
    result = pytester.runpytest(f"--spectral-model={bart}", f"--spectral-thresholds={rules}")
    assert why in result.stdout.str()


@pytest.mark.parametrize("scope", ["matrix", "both"])
def test_a_rule_on_the_mlp_of_cross_attention_says_it_has_none(bart, pytester, scope) -> None:
    rules = pytester.makefile(
        ".toml", rules='[[rules]]\nname = "r"\nmetric = "stable_rank"\nmin = 1000\n'
        'stacks = ["cross"]\nmatrices = ["fc1"]\nscope = "matrix"\n'
    )  # fmt: skip
    result = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}", f"--spectral-scope={scope}"
    )
    assert result.ret == pytest.ExitCode.OK  # nothing judged: no item fails
    result.stdout.fnmatch_lines(
        [f"spectral: rule 'r' ({rules}:1) applies to no item of this run: the cross stack's "
         "layers have no fc1 (they have q, k, v, o): cross-attention has no MLP of its own; "
         'the MLP after it is the decoder stack\'s: give the rule stacks = ["decoder"]']
    )  # fmt: skip
    rules.write_text(rules.read_text().replace('["cross"]', '["cross", "decoder"]'))
    result = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}", f"--spectral-scope={scope}"
    )
    assert "applies to no item" not in result.stdout.str()
    result.assert_outcomes(failed=DECODER_LAYERS, passed=result.parseoutcomes()["passed"])


def test_a_rule_on_layers_the_run_leaves_out_says_so(bart, pytester) -> None:
    rules = pytester.makefile(
        ".toml", rules='[[rules]]\nmetric = "stable_rank"\nmin = 0\nstacks = ["cross"]\n'
        'layers = "2"\n'
    )  # fmt: skip
    result = pytester.runpytest(
        f"--spectral-model={bart}", f"--spectral-thresholds={rules}", "--spectral-layers=0-1"
    )
    assert "--spectral-layers 0-1 leaves out its layers 2" in result.stdout.str()


def test_a_rule_with_stacks_on_a_model_without_them_says_so(pytester, tmp_path) -> None:
    model = write_random_llama(tmp_path / "llama")
    rules = pytester.makefile(
        ".toml", rules='[[rules]]\nmetric = "stable_rank"\nmin = 0\nstacks = ["cross"]\n'
    )
    result = pytester.runpytest(f"--spectral-model={model}", f"--spectral-thresholds={rules}")
    result.stdout.fnmatch_lines(
        ["*applies to no item of this *its stacks (cross) are those of an encoder-decoder "
         "model, and this model's layers are not in stacks: remove stacks*"]
    )  # fmt: skip


def test_a_text_rule_judges_every_item_of_a_model_of_one_stack(pytester, tmp_path) -> None:
    model = write_random_llama(tmp_path / "llama")
    config = json.loads((model / "config.json").read_text())
    rules = pytester.makefile(  # stable rank >= 1: every item it judges breaks max = 0.5
        ".toml", rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["text"]\n'
    )
    result = pytester.runpytest(
        f"--spectral-model={model}", f"--spectral-thresholds={rules}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=config["num_hidden_layers"] * config["num_attention_heads"] * 4)
    assert "applies to no item" not in result.stdout.str()


def test_a_text_rule_on_an_encoder_decoder_model_says_it_judges_nothing(bart, pytester) -> None:
    rules = pytester.makefile(
        ".toml", rules='[[rules]]\nmetric = "stable_rank"\nmax = 0.5\nstacks = ["text"]\n'
    )
    result = pytester.runpytest(f"--spectral-model={bart}", f"--spectral-thresholds={rules}")
    result.stdout.fnmatch_lines(
        ["*applies to no item of this *its stacks (text) do not exist in this run, whose "
         "layers are the encoder stack's and the decoder stack's and the cross stack's*"]
    )  # fmt: skip
    assert result.parseoutcomes().get("failed", 0) == 0
