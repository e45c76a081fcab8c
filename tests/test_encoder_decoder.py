"""The conformance matrix of encoder-decoder models: every stack verified against transformers.

For a tiny random model of each type in ``architecture_matrix.ENCODER_DECODER_CASES`` (built
and saved by transformers; skipped, with the reason, when the installed transformers lacks the
type), and for each of its three kinds of attention (the encoder's self-attention, the
decoder's self-attention and the decoder's cross-attention), the slice the plugin analyses for
a head is perturbed in the model's own parameters, and the model's own forward pass must change
for exactly that head: the attention pattern transformers returns for that kind
(``encoder_attentions``, ``decoder_attentions``, ``cross_attentions``) for a Q or K slice, the
head's segment of the output projection's input for a V slice; an O slice must be exactly
what multiplies that segment. The plugin's singular values of every head of every block equal
numpy's of the model's own slices, and a pytest run collects exactly the items each stack's
geometry implies, with ids naming the stack.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from architecture_matrix import ENCODER_DECODER_CASES, EncoderDecoderCase
from safetensors import safe_open
from test_architectures import changed_heads, perturbed

from pytest_spectral.checkpoints.checkpoint import MATRICES, Checkpoint, open_checkpoint
from pytest_spectral.checkpoints.families import STACKS, family_for
from pytest_spectral.checkpoints.slices import slice_span
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.compute.spectra import head_blocks
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS

transformers = pytest.importorskip("transformers")
#: transformers' name of each stack's attention patterns in a forward pass's output
ATTENTIONS = {
    "encoder": "encoder_attentions",
    "decoder": "decoder_attentions",
    "cross": "cross_attentions",
}


def build(case: EncoderDecoderCase, directory) -> object:
    """A tiny random model of ``case``, saved to ``directory`` as transformers saves it."""
    if case.model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {case.model_type!r}")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(case.model_type, **case.config)
    config._attn_implementation = "eager"
    loader = (
        transformers.AutoModelForSpeechSeq2Seq if case.audio else transformers.AutoModelForSeq2SeqLM
    )
    model = loader.from_config(config)
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=list(ENCODER_DECODER_CASES))
def built(request, tmp_path_factory) -> tuple[object, Checkpoint, EncoderDecoderCase]:
    case = ENCODER_DECODER_CASES[request.param]
    directory = tmp_path_factory.mktemp(case.model_type) / "model"
    model = build(case, directory)
    return model, open_checkpoint(directory), case


def model_inputs(model, case: EncoderDecoderCase) -> dict[str, torch.Tensor]:
    """Six encoder positions of token ids (or Whisper's audio features) and five decoder
    positions: cross-attention patterns are 5 x 6 (5 x 16 for Whisper), not square."""
    decoder = torch.arange(3, 8).unsqueeze(0)
    if case.audio:
        config = model.config
        shape = (1, config.num_mel_bins, 2 * config.max_source_positions)
        features = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        return {"input_features": features, "decoder_input_ids": decoder}
    return {"input_ids": torch.arange(3, 9).unsqueeze(0), "decoder_input_ids": decoder}


def parameter_name(checkpoint: Checkpoint, model, block: int, matrix: str) -> str:
    """The model's own name for the tensor the plugin reads for ``matrix`` of ``block``,
    found by its values (so that a plugin reading the wrong tensor is caught by what the
    model does with it, not trusted by its name)."""
    entry = checkpoint.tensors[(block, matrix)]
    with safe_open(entry.file, "pt") as weights:
        saved = weights.get_tensor(entry.name)
    return next(
        name
        for name, parameter in model.named_parameters()
        if parameter.shape == saved.shape and torch.equal(parameter.detach(), saved)
    )


def slice_positions(checkpoint: Checkpoint, block: int, matrix: str, index: int) -> torch.Tensor:
    """Which elements of the stored tensor the plugin takes as slice ``index``."""
    entry = checkpoint.tensors[(block, matrix)]
    positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
    return head_blocks(positions, matrix, checkpoint.geometry, checkpoint.layout)[index]


def forward(model, case, module_name: str) -> tuple[object, torch.Tensor, torch.Tensor]:
    """The model's output (with attention patterns), and the input and output of the module
    whose weight is ``module_name``."""
    captured = {}
    module = model.get_submodule(module_name.removesuffix(".weight"))

    def hook(_module, args, output) -> None:
        captured["input"], captured["output"] = args[0].detach().clone(), output.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(**model_inputs(model, case), output_attentions=True)
    finally:
        handle.remove()
    return out, captured["input"][0], captured["output"][0]


def pattern(out, stack: str) -> torch.Tensor:
    """The first layer's attention patterns of ``stack``: [heads, queries, keys]."""
    return getattr(out, ATTENTIONS[stack])[0][0]


def heads_changed_by_q_and_k(model, checkpoint: Checkpoint, case, stack: str):
    """For a Q slice of the first and last head and a K slice of the last, in the first layer
    of ``stack``: the heads whose attention pattern changes when the plugin's slice is
    perturbed in the model's own parameters."""
    g = checkpoint.geometry
    block = checkpoint.block(stack, 0)
    o_name = parameter_name(checkpoint, model, block, "o")
    base = pattern(forward(model, case, o_name)[0], stack)
    by_head = lambda attention, h: attention[h]  # noqa: E731
    found = []
    for matrix, head in (("q", 0), ("q", g.heads - 1), ("k", g.heads - 1)):
        name = parameter_name(checkpoint, model, block, matrix)
        with perturbed(model, name, slice_positions(checkpoint, block, matrix, head).flatten()):
            attention = pattern(forward(model, case, o_name)[0], stack)
        found.append((matrix, head, changed_heads(base, attention, g.heads, by_head)))
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_q_and_k_slices_drive_exactly_their_heads_attention(built, stack: str) -> None:
    model, checkpoint, case = built
    for matrix, head, changed in heads_changed_by_q_and_k(model, checkpoint, case, stack):
        assert changed == {head}, (stack, matrix, head)


@pytest.mark.parametrize("stack", STACKS)
def test_v_slice_drives_exactly_its_heads_outputs(built, stack: str) -> None:
    model, checkpoint, case = built
    g = checkpoint.geometry
    block = checkpoint.block(stack, 0)
    o_name = parameter_name(checkpoint, model, block, "o")
    _, base, _ = forward(model, case, o_name)
    segment = lambda x, h: x[:, h * g.head_dim : (h + 1) * g.head_dim]  # noqa: E731
    v_name = parameter_name(checkpoint, model, block, "v")
    with perturbed(model, v_name, slice_positions(checkpoint, block, "v", 1).flatten()):
        _, o_input, _ = forward(model, case, o_name)
    assert changed_heads(base, o_input, g.heads, segment) == {1}


@pytest.mark.parametrize("stack", STACKS)
def test_o_slice_is_what_multiplies_the_heads_segment(built, stack: str) -> None:
    model, checkpoint, case = built
    g = checkpoint.geometry
    block = checkpoint.block(stack, 0)
    o_name = parameter_name(checkpoint, model, block, "o")
    module = model.get_submodule(o_name.removesuffix(".weight"))
    _, o_input, _ = forward(model, case, o_name)
    head = g.heads - 1
    without_segment = o_input.clone()
    without_segment[:, head * g.head_dim : (head + 1) * g.head_dim] = 0
    with torch.no_grad():
        expected = module(without_segment)
        indices = slice_positions(checkpoint, block, "o", head).flatten()
        with perturbed(model, o_name, indices, factor=0.0):
            actual = module(o_input)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_cross_attention_keys_and_values_read_the_encoder_output(built) -> None:
    """The cross stack's K and V project what the encoder produced; its Q, the decoder's
    hidden states (which no encoder output equals)."""
    model, checkpoint, case = built
    block = checkpoint.block("cross", 0)
    for matrix in ("k", "v"):
        out, read, _ = forward(model, case, parameter_name(checkpoint, model, block, matrix))
        torch.testing.assert_close(read, out.encoder_last_hidden_state[0])
    out, read, _ = forward(model, case, parameter_name(checkpoint, model, block, "q"))
    assert read.shape[0] == model_inputs(model, case)["decoder_input_ids"].shape[1]


def test_swapped_self_and_cross_attention_is_caught(built) -> None:
    """The planted bug: a family whose decoder and cross stacks trade tensors reads valid
    tensors of the right shapes, and only the forward pass tells: perturbing what it calls
    the decoder's Q slice leaves the decoder's self-attention untouched."""
    model, checkpoint, case = built
    family = family_for(case.model_type)
    encoder, decoder, cross = family.stacks
    swapped_decoder = replace(decoder, layer=cross.layer, tensors=cross.tensors)
    swapped_cross = replace(cross, layer=decoder.layer, tensors=decoder.tensors)
    wrong = replace(family, stacks=(encoder, swapped_decoder, swapped_cross))
    mistaken = open_checkpoint(checkpoint.root, family=wrong)
    for stack in ("decoder", "cross"):
        found = heads_changed_by_q_and_k(model, mistaken, case, stack)
        assert any(changed != {head} for _, head, changed in found), stack


def test_plugin_spectra_equal_numpy_on_the_models_own_slices(built) -> None:
    model, checkpoint, _ = built
    g = checkpoint.geometry
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    for block in checkpoint.layer_numbers:
        for matrix in MATRICES:
            name = parameter_name(checkpoint, model, block, matrix)
            flat = model.get_parameter(name).detach().double().flatten().numpy()
            for head in range(g.heads):
                positions = slice_positions(checkpoint, block, matrix, head).numpy()
                reference = np.linalg.svd(flat[positions], compute_uv=False)
                values = engine.head(block, matrix, head).singular_values
                np.testing.assert_allclose(values, reference, rtol=1e-9, atol=1e-12)
    engine.close()


def test_whole_run_through_pytest(built, pytester) -> None:
    """Every item of every stack is collected and run, under ids naming its stack; a failure
    report names the stack, the layer and the slice's rows in the model's own tensor."""
    _, checkpoint, case = built
    assert checkpoint.mlp == case.mlp
    assert checkpoint.stack_layers() == {
        "encoder": case.encoder_layers,
        "decoder": case.decoder_layers,
        "cross": case.decoder_layers,
    }
    bound = 'metric = "stable_rank"\nmax = 0.5\n'  # breaks every item: stable rank >= 1
    rules = pytester.makefile(
        ".toml", rules=f'[[rules]]\n{bound}[[rules]]\n{bound}scope = "matrix"\n'
    )
    report = pytester.path / "report.json"
    result = pytester.runpytest(
        f"--spectral-model={checkpoint.root}", f"--spectral-thresholds={rules}",
        "--spectral-scope=both", f"--spectral-report={report}", "-p", "no:cacheprovider",
    )  # fmt: skip
    g = checkpoint.geometry
    per_layer = {
        "encoder": g.heads * 4 + 4 + len(case.mlp),
        "decoder": g.heads * 4 + 4 + len(case.mlp),
        "cross": g.heads * 4 + 4,
    }
    layers = {"encoder": case.encoder_layers, "decoder": case.decoder_layers}
    layers["cross"] = case.decoder_layers
    expected = {stack: layers[stack] * per_layer[stack] for stack in STACKS}
    result.assert_outcomes(failed=sum(expected.values()))
    items = json.loads(report.read_text())["items"]
    counted = {stack: sum(item["stack"] == stack for item in items) for stack in STACKS}
    assert counted == expected
    assert all(item["nodeid"].startswith(f"spectral::{item['stack']}::") for item in items)
    name = checkpoint.tensors[(checkpoint.block("cross", 0), "q")].name
    result.stdout.fnmatch_lines(
        [
            f"cross layer 0, whole q: {name} (*)",
            f"cross layer 0, head 1, q: rows {g.head_dim}:{2 * g.head_dim} of {name} (*)",
        ],
        consecutive=False,
    )


def test_failure_messages_name_the_slices_own_rows_or_columns(built) -> None:
    _, checkpoint, _ = built
    g = checkpoint.geometry
    for stack in STACKS:
        block = checkpoint.block(stack, 0)
        for matrix in MATRICES:
            entry = checkpoint.tensors[(block, matrix)]
            positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
            for index in range(g.heads):
                axis, start, stop = slice_span(matrix, index, g, checkpoint.layout)
                named = positions[start:stop] if axis == "rows" else positions[:, start:stop]
                torch.testing.assert_close(
                    named, slice_positions(checkpoint, block, matrix, index)
                )
