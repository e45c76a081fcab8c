"""Each supported family's head layout, verified against the transformers implementation.

For a tiny random model of each family, the slice the plugin analyses for a head is perturbed
in the model's own parameters, and the model's own forward pass must change for exactly that
head: its attention pattern for a Q slice, the attention of every query head sharing it for a
K slice, that head's segment of the attention output for a V slice. An O slice must be exactly
what multiplies the head's segment of the output projection's input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_spectral.checkpoints.checkpoint import MATRICES, Checkpoint, open_checkpoint
from pytest_spectral.checkpoints.slices import slice_span
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.compute.spectra import head_blocks
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS

transformers = pytest.importorskip("transformers")

SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
}
FAMILIES = {
    "llama (GQA)": ("llama", {**SMALL, "num_key_value_heads": 2}),
    "mistral": ("mistral", {**SMALL, "num_key_value_heads": 2}),
    "mixtral": ("mixtral", {**SMALL, "num_key_value_heads": 2, "num_local_experts": 2}),
    "qwen2 (bias)": ("qwen2", {**SMALL, "num_key_value_heads": 2}),
    "qwen3 (head_dim)": ("qwen3", {**SMALL, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma (MQA, head_dim)": ("gemma", {**SMALL, "num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": ("gemma2", {**SMALL, "num_key_value_heads": 2, "head_dim": 24}),
    "phi3 (fused)": ("phi3", {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0}),
    "gpt2 (Conv1D)": ("gpt2", {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128}),
    "gpt_neox (interleaved)": ("gpt_neox", dict(SMALL)),
    "falcon (multi-query)": ("falcon", {**SMALL, "multi_query": True}),
    "falcon (grouped)": ("falcon", {**SMALL, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon (interleaved)": ("falcon", {**SMALL, "multi_query": False}),
    "opt": (
        "opt",
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "ffn_dim": 128,
            "vocab_size": 128,
            "word_embed_proj_dim": 64,
        },
    ),
    "bert": ("bert", dict(SMALL)),
    "roberta": ("roberta", {**SMALL, "pad_token_id": 1}),
}


GATED = ("gate", "up", "down")
EXPECTED_MLP = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), GATED),
    "mixtral": (),  # experts: no single MLP matrix per layer
    "phi3": ("gate_up", "down"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[object, Checkpoint]:
    model_type, options = FAMILIES[request.param]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **options)
    config._attn_implementation = "eager"
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = transformers.AutoModel.from_config(config)
    model.eval()
    directory = tmp_path_factory.mktemp(model_type) / "model"
    model.save_pretrained(directory)
    return model, open_checkpoint(directory)


def parameter_name(checkpoint: Checkpoint, model, matrix: str) -> str:
    """The model's own name for the tensor the plugin reads (saved names may drop a prefix)."""
    saved = checkpoint.tensors[(0, matrix)].name
    names = dict(model.named_parameters())
    return next(n for n in (saved, *(n for n in names if n.endswith(saved))) if n in names)


def slice_positions(checkpoint: Checkpoint, matrix: str, head_slice: int) -> torch.Tensor:
    """Which elements of the stored tensor the plugin takes as slice ``head_slice``."""
    entry = checkpoint.tensors[(0, matrix)]
    positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
    return head_blocks(positions, matrix, checkpoint.geometry, checkpoint.layout)[head_slice]


def flat_indices(checkpoint: Checkpoint, matrix: str, head_slice: int) -> torch.Tensor:
    return slice_positions(checkpoint, matrix, head_slice).flatten()


def run(model, o_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer 0's attention pattern, and the input and output of its output projection."""
    captured = {}
    module = model.get_submodule(o_name.removesuffix(".weight"))

    def hook(_module, args, output) -> None:
        captured["input"], captured["output"] = args[0].detach().clone(), output.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            ids = torch.arange(3, 9).unsqueeze(0)
            out = model(input_ids=ids, output_attentions=True)
    finally:
        handle.remove()
    return out.attentions[0][0], captured["input"][0], captured["output"][0]


def perturbed(model, name: str, indices: torch.Tensor, factor: float = 3.0):
    """A context in which the given elements of parameter ``name`` are scaled."""
    parameter = model.get_parameter(name)

    class Scaled:
        def __enter__(self) -> None:
            self.saved = parameter.detach().clone()
            with torch.no_grad():
                parameter.view(-1)[indices] *= factor

        def __exit__(self, *exc: object) -> None:
            with torch.no_grad():
                parameter.copy_(self.saved)

    return Scaled()


def changed_heads(before: torch.Tensor, after: torch.Tensor, heads: int, per_head) -> set[int]:
    return {
        h
        for h in range(heads)
        if not torch.allclose(per_head(before, h), per_head(after, h), atol=1e-6)
    }


def test_q_and_k_slices_drive_exactly_their_heads_attention(family) -> None:
    model, checkpoint = family
    g = checkpoint.geometry
    o_name = parameter_name(checkpoint, model, "o")
    base, _, _ = run(model, o_name)
    pattern = lambda attention, h: attention[h]  # noqa: E731
    for head in (0, g.heads - 1):
        with perturbed(
            model, parameter_name(checkpoint, model, "q"), flat_indices(checkpoint, "q", head)
        ):
            attention, _, _ = run(model, o_name)
        assert changed_heads(base, attention, g.heads, pattern) == {head}
    kv_head = g.kv_heads - 1
    sharing = {h for h in range(g.heads) if g.kv_head_of(h) == kv_head}
    with perturbed(
        model, parameter_name(checkpoint, model, "k"), flat_indices(checkpoint, "k", kv_head)
    ):
        attention, _, _ = run(model, o_name)
    assert changed_heads(base, attention, g.heads, pattern) == sharing


def test_v_slice_drives_exactly_its_heads_outputs(family) -> None:
    model, checkpoint = family
    g = checkpoint.geometry
    o_name = parameter_name(checkpoint, model, "o")
    _, base, _ = run(model, o_name)
    segment = lambda x, h: x[:, h * g.head_dim : (h + 1) * g.head_dim]  # noqa: E731
    kv_head = 0
    with perturbed(
        model, parameter_name(checkpoint, model, "v"), flat_indices(checkpoint, "v", kv_head)
    ):
        _, o_input, _ = run(model, o_name)
    assert changed_heads(base, o_input, g.heads, segment) == {
        h for h in range(g.heads) if g.kv_head_of(h) == kv_head
    }


def test_o_slice_is_what_multiplies_the_heads_segment(family) -> None:
    model, checkpoint = family
    g = checkpoint.geometry
    o_name = parameter_name(checkpoint, model, "o")
    module = model.get_submodule(o_name.removesuffix(".weight"))
    _, o_input, _ = run(model, o_name)
    head = g.heads - 1
    without_segment = o_input.clone()
    without_segment[:, head * g.head_dim : (head + 1) * g.head_dim] = 0
    with torch.no_grad():
        expected = module(without_segment)
        with perturbed(model, o_name, flat_indices(checkpoint, "o", head), factor=0.0):
            actual = module(o_input)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_plugin_spectra_equal_numpy_on_the_models_own_slices(family) -> None:
    model, checkpoint = family
    g = checkpoint.geometry
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    for matrix in MATRICES:
        weight = model.get_parameter(parameter_name(checkpoint, model, matrix)).detach().double()
        flat = weight.flatten().numpy()
        for head in range(g.heads):
            index = g.kv_head_of(head) if matrix in ("k", "v") else head
            block = flat[slice_positions(checkpoint, matrix, index).numpy()]
            reference = np.linalg.svd(block, compute_uv=False)
            values = engine.head(0, matrix, head).singular_values
            np.testing.assert_allclose(values, reference, rtol=1e-9, atol=1e-12)


def test_failure_messages_name_the_slices_own_rows_or_columns(family) -> None:
    """In fused and transposed tensors a head's weights are not at head * head_dim."""
    _, checkpoint = family
    g = checkpoint.geometry
    for matrix in MATRICES:
        entry = checkpoint.tensors[(0, matrix)]
        positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
        for index in range(g.distinct_heads(matrix)):
            axis, start, stop = slice_span(matrix, index, g, checkpoint.layout)
            named = positions[start:stop] if axis == "rows" else positions[:, start:stop]
            torch.testing.assert_close(named, slice_positions(checkpoint, matrix, index))


def test_whole_run_through_pytest(family, pytester) -> None:
    _, checkpoint = family
    result = pytester.runpytest(
        f"--spectral-model={checkpoint.root}", "-p", "no:cacheprovider", "--spectral-scope", "both"
    )
    g = checkpoint.geometry
    assert checkpoint.mlp == EXPECTED_MLP.get(checkpoint.model_type, ("fc1", "fc2"))
    result.assert_outcomes(passed=g.layers * (g.heads * 4 + 4 + len(checkpoint.mlp)))


def test_failure_report_locates_the_slice_in_the_stored_tensor(family, pytester) -> None:
    _, checkpoint = family
    bound = 'metric = "stable_rank"\nmax = 0.5\n'  # breaks every item: stable rank >= 1
    rules = pytester.makefile(
        ".toml", rules=f'[[rules]]\n{bound}[[rules]]\n{bound}scope = "matrix"\n'
    )
    result = pytester.runpytest(
        f"--spectral-model={checkpoint.root}", f"--spectral-thresholds={rules}",
        "--spectral-layers=0", "--spectral-matrices=q", "--spectral-scope=both",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    name = checkpoint.tensors[(0, "q")].name
    axis, start, stop = slice_span("q", 1, checkpoint.geometry, checkpoint.layout)
    whole = f"Q's share of fused {name}" if checkpoint.layout.fused else name
    result.stdout.fnmatch_lines(
        [
            f"layer 0, whole q: {whole} (*)",
            f"layer 0, head 1, q: {axis} {start}:{stop} of {name} (*)",
        ],
        consecutive=False,
    )
