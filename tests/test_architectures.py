"""The conformance matrix: every supported model type, verified against transformers.

For a tiny random model of each type in :mod:`architecture_matrix` (built and saved by
transformers; skipped, with the reason, when the installed transformers lacks the type), the
slice the plugin analyses for a head is perturbed in the model's own parameters, and the
model's own forward pass must change for exactly that head: its attention pattern for a Q
slice, the attention of every query head sharing it for a K slice, that head's segment of the
attention output for a V slice. An O slice must be exactly what multiplies the head's segment
of the output projection's input. The plugin's singular values of every head equal numpy's of
the model's own slices, and a whole pytest run collects exactly the items the geometry implies.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from architecture_matrix import CASES, ENCODER_DECODER_CASES, Case
from safetensors import safe_open

from pytest_spectral.checkpoints.checkpoint import MATRICES, Checkpoint, open_checkpoint
from pytest_spectral.checkpoints.families import FAMILIES, SUPPORTED_MODEL_TYPES
from pytest_spectral.checkpoints.families.family import FUSED_MATRICES
from pytest_spectral.checkpoints.slices import slice_span
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.compute.spectra import head_blocks, whole_matrix
from pytest_spectral.errors import CheckpointError
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS

transformers = pytest.importorskip("transformers")


def build(case: Case, directory) -> object:
    """A tiny random model of ``case``, saved to ``directory`` as transformers saves it (for a
    case ``built_as`` another type, with ``config.json`` naming the case's type, as the hub's
    checkpoints of that type do)."""
    built_as = case.built_as or case.model_type
    if built_as not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {built_as!r}")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(built_as, **case.config)
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = "eager"
    loaders = (
        (transformers.AutoModel,)
        if case.encoder
        else (
            transformers.AutoModelForCausalLM,
            transformers.AutoModelForImageTextToText,
            transformers.AutoModel,
        )
    )
    for loader in loaders:
        try:
            model = loader.from_config(config)
            break
        except ValueError:
            continue
    model.eval()
    model.save_pretrained(directory)
    if case.built_as is not None:
        saved = json.loads((directory / "config.json").read_text())
        saved["model_type"] = case.model_type
        (directory / "config.json").write_text(json.dumps(saved))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory) -> tuple[object, Checkpoint, Case]:
    case = CASES[request.param]
    directory = tmp_path_factory.mktemp(case.model_type) / "model"
    model = build(case, directory)
    return model, open_checkpoint(directory), case


def parameter_name(checkpoint: Checkpoint, model, matrix: str) -> str:
    """The model's own name for the tensor the plugin reads, found by its values: saved names
    may differ from the module's (``language_model.model.`` for ``model.language_model.``)."""
    entry = checkpoint.tensors[(0, matrix)]
    with safe_open(entry.file, "pt") as weights:
        saved = weights.get_tensor(entry.name)
    return next(
        name
        for name, parameter in model.named_parameters()
        if parameter.shape == saved.shape and torch.equal(parameter.detach(), saved)
    )


def slice_positions(checkpoint: Checkpoint, matrix: str, head_slice: int) -> torch.Tensor:
    """Which elements of the stored tensor the plugin takes as slice ``head_slice``."""
    entry = checkpoint.tensors[(0, matrix)]
    positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
    return head_blocks(positions, matrix, checkpoint.geometry, checkpoint.layout)[head_slice]


def flat_indices(checkpoint: Checkpoint, matrix: str, head_slice: int) -> torch.Tensor:
    return slice_positions(checkpoint, matrix, head_slice).flatten()


def whole_positions(checkpoint: Checkpoint, matrix: str) -> torch.Tensor:
    """Which elements of the stored tensor the plugin takes as the whole-matrix item."""
    entry = checkpoint.tensors[(0, matrix)]
    positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
    return whole_matrix(positions, matrix, checkpoint.geometry, checkpoint.layout)


def run(model, module_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer 0's attention pattern, and the input and output of the module whose weight is
    ``module_name`` (the output projection, or the Q projection)."""
    captured = {}
    module = model.get_submodule(module_name.removesuffix(".weight"))

    def hook(_module, args, output) -> None:
        captured["input"], captured["output"] = args[0].detach().clone(), output.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(**model_inputs(model), output_attentions=True)
    finally:
        handle.remove()
    return out.attentions[0][0], captured["input"][0], captured["output"][0]


def model_inputs(model) -> dict[str, torch.Tensor]:
    """Six tokens, or for a vision model one image of its size (fixed random pixels)."""
    if model.main_input_name == "pixel_values":
        config = model.config
        pixels = torch.Generator().manual_seed(0)
        shape = (1, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=pixels)}
    return {"input_ids": torch.arange(3, 9).unsqueeze(0)}


def perturbed(model, name: str, indices: torch.Tensor, factor: float | None = None):
    """A context in which the given elements of parameter ``name`` are scaled: by ``factor``,
    or by factors from 2 to 4 that differ along the slice, so that a norm applied per head
    (Gemma 3, Qwen 3) cannot undo the change."""
    parameter = model.get_parameter(name)

    class Scaled:
        def __enter__(self) -> None:
            self.saved = parameter.detach().clone()
            scale = torch.linspace(2.0, 4.0, len(indices)) if factor is None else factor
            with torch.no_grad():
                parameter.view(-1)[indices] *= (
                    scale.to(parameter.dtype) if factor is None else scale
                )

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
    model, checkpoint, case = family
    g = checkpoint.geometry
    if case.joint_qk_norm:
        pytest.skip("one norm over all heads: see test_q_and_k_slices_are_their_heads_segments")
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


def test_q_and_k_slices_are_their_heads_segments(family) -> None:
    """Where a norm over all heads follows the Q and K projections (OLMo 2), a head's slice
    is checked to produce exactly its segment of the projection's output, the segment the
    attention module reshapes into that head (``view(..., heads, head_dim)``)."""
    model, checkpoint, case = family
    if not case.joint_qk_norm:
        pytest.skip("per-head attention patterns are checked directly")
    g = checkpoint.geometry
    segment = lambda x, h: x[:, h * g.head_dim : (h + 1) * g.head_dim]  # noqa: E731
    for matrix, index, count in (("q", g.heads - 1, g.heads), ("k", g.kv_heads - 1, g.kv_heads)):
        name = parameter_name(checkpoint, model, matrix)
        _, _, base = run(model, name)
        with perturbed(model, name, flat_indices(checkpoint, matrix, index)):
            _, _, output = run(model, name)
        assert changed_heads(base, output, count, segment) == {index}


def test_v_slice_drives_exactly_its_heads_outputs(family) -> None:
    model, checkpoint, _ = family
    g = checkpoint.geometry
    o_name = parameter_name(checkpoint, model, "o")
    _, base, _ = run(model, o_name)
    d = g.head_rows("v")  # head_dim; v_head_dim under multi-head latent attention
    segment = lambda x, h: x[:, h * d : (h + 1) * d]  # noqa: E731
    kv_head = 0
    with perturbed(
        model, parameter_name(checkpoint, model, "v"), flat_indices(checkpoint, "v", kv_head)
    ):
        _, o_input, _ = run(model, o_name)
    assert changed_heads(base, o_input, g.heads, segment) == {
        h for h in range(g.heads) if g.kv_head_of(h) == kv_head
    }


def test_o_slice_is_what_multiplies_the_heads_segment(family) -> None:
    model, checkpoint, _ = family
    g = checkpoint.geometry
    o_name = parameter_name(checkpoint, model, "o")
    module = model.get_submodule(o_name.removesuffix(".weight"))
    _, o_input, _ = run(model, o_name)
    head, d = g.heads - 1, g.head_rows("o")
    without_segment = o_input.clone()
    without_segment[:, head * d : (head + 1) * d] = 0
    with torch.no_grad():
        expected = module(without_segment)
        with perturbed(model, o_name, flat_indices(checkpoint, "o", head), factor=0.0):
            actual = module(o_input)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_plugin_spectra_equal_numpy_on_the_models_own_slices(family) -> None:
    model, checkpoint, _ = family
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


def test_head_slices_partition_their_tensors(family) -> None:
    """Every weight of the Q, K, V and O tensors belongs to exactly one distinct head slice
    (a fused tensor's to one slice of one of its matrices): no slice misses a head's rows (its
    rope part, say) or reads another's."""
    _, checkpoint, _ = family
    g = checkpoint.geometry
    owned: dict[object, list[torch.Tensor]] = {}
    sizes: dict[object, int] = {}
    for matrix in MATRICES:
        entry = checkpoint.tensors[(0, matrix)]
        sizes[entry.key] = int(np.prod(entry.shape))
        for index in range(g.distinct_heads(matrix)):
            owned.setdefault(entry.key, []).append(flat_indices(checkpoint, matrix, index))
    for key, parts in owned.items():
        torch.testing.assert_close(torch.cat(parts).sort().values, torch.arange(sizes[key]))


def test_whole_matrix_spectra_equal_numpy_on_the_models_own_weights(family) -> None:
    """Every whole-matrix attention item (q, k, v, o, and multi-head latent attention's
    down-projections and rope key) against numpy on the model's own parameter."""
    model, checkpoint, case = family
    assert checkpoint.attention == (*MATRICES, *case.latent)
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    for matrix in checkpoint.attention:
        weight = model.get_parameter(parameter_name(checkpoint, model, matrix)).detach().double()
        block = weight.flatten().numpy()[whole_positions(checkpoint, matrix).numpy()]
        reference = np.linalg.svd(block, compute_uv=False)
        values = engine.whole(0, matrix).singular_values
        np.testing.assert_allclose(values, reference, rtol=1e-9, atol=1e-12)


def test_latent_rope_key_is_shared_by_every_head_and_outside_the_latent(family) -> None:
    """Multi-head latent attention: the rows the plugin takes as the shared rope key change
    every head's attention and leave the key/value latent (``kv_b_proj``'s input) untouched;
    the rows it takes as the key/value down-projection change that latent."""
    model, checkpoint, case = family
    if "k_rope" not in case.latent:
        pytest.skip("no multi-head latent attention")
    g = checkpoint.geometry
    kv_a = parameter_name(checkpoint, model, "kv_a")
    kv_b = parameter_name(checkpoint, model, "k")
    base, latent, _ = run(model, kv_b)
    every = lambda x, h: x[h]  # noqa: E731
    with perturbed(model, kv_a, whole_positions(checkpoint, "k_rope").flatten()):
        attention, rope_latent, _ = run(model, kv_b)
    assert changed_heads(base, attention, g.heads, every) == set(range(g.heads))
    torch.testing.assert_close(rope_latent, latent, rtol=0, atol=0)
    with perturbed(model, kv_a, whole_positions(checkpoint, "kv_a").flatten()):
        _, down_latent, _ = run(model, kv_b)
    assert not torch.allclose(down_latent, latent, atol=1e-6)


def test_latent_attention_refuses_circuits_saying_why(family, pytester) -> None:
    _, checkpoint, case = family
    if not case.latent:
        pytest.skip("circuits are tested in test_circuits.py")
    result = pytester.runpytest(
        f"--spectral-model={checkpoint.root}", "--spectral-matrices=q,qk", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--spectral-matrices qk: multi-head latent attention has no qk/ov circuit items*"]
    )


def test_latent_config_disagreeing_with_the_weights_names_the_dimensions(family, tmp_path) -> None:
    """A config whose v_head_dim is not the weights' is refused, naming the tensor and the
    dimensions its shape follows from."""
    _, checkpoint, case = family
    if not case.latent:
        pytest.skip("no multi-head latent attention")
    copy = tmp_path / "model"
    shutil.copytree(checkpoint.root, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "v_head_dim": 6}))
    c = case.config
    heads, nope, kv = c["num_attention_heads"], c["qk_nope_head_dim"], c["kv_lora_rank"]
    stored = heads * (nope + c["v_head_dim"])
    with pytest.raises(CheckpointError) as refused:
        open_checkpoint(copy).check_readable([(0, "v")])
    assert (
        f"tensor {checkpoint.tensors[(0, 'v')].name!r} has shape [{stored}, {kv}] but the config "
        f"implies [{heads * (nope + 6)}, {kv}] ({heads} heads x (qk_nope_head_dim {nope} + "
        f"v_head_dim 6), kv_lora_rank {kv})"
    ) in str(refused.value)


def test_latent_failures_name_each_slices_rows_and_shape(family, pytester) -> None:
    """Under multi-head latent attention each item reports its own shape and rows, computed
    here from the case's config: a K_nope slice is not where a V slice is, and the rope key
    is the last rows of kv_a_proj_with_mqa."""
    _, checkpoint, case = family
    if not case.latent:
        pytest.skip("no multi-head latent attention")
    c = case.config
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    kv, q_in, hidden = c["kv_lora_rank"], c["q_lora_rank"] or c["hidden_size"], c["hidden_size"]
    bound = 'metric = "stable_rank"\nmax = 0.5\n'  # breaks every item: stable rank >= 1
    both_scopes = f'[[rules]]\n{bound}[[rules]]\n{bound}scope = "matrix"\n'
    rules = pytester.makefile(".toml", rules=both_scopes)
    result = pytester.runpytest(
        f"--spectral-model={checkpoint.root}", f"--spectral-thresholds={rules}",
        "--spectral-scope=both", "--spectral-layers=0", "-p", "no:cacheprovider",
    )  # fmt: skip
    name = lambda m: checkpoint.tensors[(0, m)].name  # noqa: E731
    per_head = nope + v
    result.stdout.fnmatch_lines(
        [
            f"layer 0, whole kv_a: rows 0:{kv} of {name('kv_a')} ({kv}x{hidden})",
            f"layer 0, whole k_rope: rows {kv}:{kv + rope} of {name('k_rope')} ({rope}x{hidden})",
            f"layer 0, head 1, q: rows {nope + rope}:{2 * (nope + rope)} of {name('q')} "
            f"({nope + rope}x{q_in})",
            f"layer 0, K/V head 1, k: rows {per_head}:{per_head + nope} of {name('k')} "
            f"({nope}x{kv})",
            f"layer 0, K/V head 1, v: rows {per_head + nope}:{2 * per_head} of {name('v')} "
            f"({v}x{kv})",
            f"layer 0, head 1, o: columns {v}:{2 * v} of {name('o')} ({hidden}x{v})",
        ],
        consecutive=False,
    )


def test_failure_messages_name_the_slices_own_rows_or_columns(family) -> None:
    """In fused and transposed tensors a head's weights are not at head * head_dim."""
    _, checkpoint, _ = family
    g = checkpoint.geometry
    for matrix in MATRICES:
        entry = checkpoint.tensors[(0, matrix)]
        positions = torch.arange(int(np.prod(entry.shape))).view(entry.shape)
        for index in range(g.distinct_heads(matrix)):
            axis, start, stop = slice_span(matrix, index, g, checkpoint.layout)
            named = positions[start:stop] if axis == "rows" else positions[:, start:stop]
            torch.testing.assert_close(named, slice_positions(checkpoint, matrix, index))


def test_whole_run_through_pytest(family, pytester) -> None:
    """Every item the geometry implies is collected and run; a failure report locates the
    slice in the stored tensor (in fused and transposed tensors, not at head * head_dim)."""
    model, checkpoint, case = family
    kinds = {*case.mlp, *case.moe, *(EXPERT_KINDS if case.experts else ())}
    assert set(checkpoint.mlp) == kinds
    bound = 'metric = "stable_rank"\nmax = 0.5\n'  # breaks every item: stable rank >= 1
    rules = pytester.makefile(
        ".toml", rules=f'[[rules]]\n{bound}[[rules]]\n{bound}scope = "matrix"\n'
    )
    result = pytester.runpytest(
        f"--spectral-model={checkpoint.root}", f"--spectral-thresholds={rules}",
        "--spectral-scope=both", "-p", "no:cacheprovider",
    )  # fmt: skip
    g = checkpoint.geometry
    sparse = sparse_layers(model)
    mlp_items = sum(
        len(case.moe) + 3 * case.experts if layer in sparse else len(case.mlp)
        for layer in range(g.layers)
    )
    whole = 4 + len(case.latent)
    result.assert_outcomes(failed=g.layers * (g.heads * 4 + whole) + mlp_items)
    attention_only = "spectral: matrix scope analyses attention only: the checkpoint has no MLP"
    assert (attention_only in result.stdout.str()) == (mlp_items == 0)
    name = checkpoint.tensors[(0, "q")].name
    axis, start, stop = slice_span("q", 1, checkpoint.geometry, checkpoint.layout)
    fused = "q" in FUSED_MATRICES.get(checkpoint.layout.fused or "", "")
    whole = f"Q's share of fused {name}" if fused else name
    result.stdout.fnmatch_lines(
        [
            f"layer 0, whole q: {whole} (*)",
            f"layer 0, head 1, q: {axis} {start}:{stop} of {name} (*)",
        ],
        consecutive=False,
    )


EXPERT_KINDS = ("expert-gate", "expert-up", "expert-down")


def sparse_layers(model) -> set[int]:
    """The decoder layers transformers built with routed experts (an ``experts`` module)."""
    pattern = re.compile(r"layers\.(\d+)\.\w+\.experts$")
    return {int(m.group(1)) for name, _ in model.named_modules() if (m := pattern.search(name))}


def own_experts(model, layer: int, form: str) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s expert matrices as transformers' modeling code uses its own expert
    parameters (``experts.gate_up_proj`` and ``experts.down_proj``): kind -> ``[experts, out,
    in]`` in ``nn.Linear`` orientation (see ``Case.expert_form``)."""
    module = next(
        m
        for name, m in model.named_modules()
        if re.search(rf"layers\.{layer}\.\w+\.experts$", name)
    )
    gate_up, down = module.gate_up_proj.detach().double(), module.down_proj.detach().double()
    if form == "chunk":  # F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
        gate, up = gate_up.chunk(2, dim=1)
        return {"gate": gate, "up": up, "down": down}
    gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # x @ gate_up_proj[e]
    if form == "interleaved":  # gate_up[..., ::2], gate_up[..., 1::2]
        return {"gate": gate_up[:, 0::2], "up": gate_up[:, 1::2], "down": down}
    gate, up = gate_up.chunk(2, dim=1)  # gate_up.chunk(2, dim=-1)
    return {"gate": gate, "up": up, "down": down}


def assert_experts_match_the_models_own(model, checkpoint: Checkpoint, case: Case) -> int:
    """Each expert item's singular values equal numpy's of that expert's own matrix, in every
    sparse layer; returns how many were compared."""
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    compared = 0
    for layer in sorted(sparse_layers(model)):
        for kind, matrices in own_experts(model, layer, case.expert_form).items():
            assert checkpoint.experts[(layer, f"expert-{kind}")].count == case.experts
            for expert in range(case.experts):
                name = f"expert{expert:02d}-{kind}"
                assert checkpoint.item_shape(name, whole=True, block=layer) == tuple(
                    matrices[expert].shape
                )
                reference = np.linalg.svd(matrices[expert].numpy(), compute_uv=False)
                values = engine.whole(layer, name).singular_values
                np.testing.assert_allclose(values, reference, rtol=1e-9, atol=1e-12)
                compared += 1
    engine.close()
    return compared


def test_expert_spectra_equal_numpy_on_the_models_own_experts(family) -> None:
    """Every expert matrix, whatever form the checkpoint stores it in (one weight per
    expert, or 3-D tensors transposed, halved or interleaved), is that expert's own."""
    model, checkpoint, case = family
    if not case.experts:
        pytest.skip("not a mixture of experts")
    compared = assert_experts_match_the_models_own(model, checkpoint, case)
    assert compared == 3 * case.experts * len(sparse_layers(model)) > 0


def test_sparse_and_dense_layers_are_the_models_own(family) -> None:
    """The layers with expert items are exactly those transformers built with experts (the
    config's schedule, read as the modeling code reads it); the others have the dense MLP."""
    model, checkpoint, case = family
    if not case.experts:
        pytest.skip("not a mixture of experts")
    sparse = sparse_layers(model)
    assert sparse
    assert {layer for layer, _ in checkpoint.experts} == sparse
    for layer in range(checkpoint.geometry.layers):
        expected = (*case.moe, *EXPERT_KINDS) if layer in sparse else case.mlp
        present = {kind for kind in checkpoint.mlp if (layer, kind) in checkpoint.tensors}
        assert present == set(expected), layer


@pytest.mark.parametrize("case_name", ["mixtral", "qwen2_moe (decoder_sparse_step 2)"])
def test_transformers_5_stacked_experts_as_a_state_dict_holds_them(
    case_name: str, tmp_path: Path
) -> None:
    """A checkpoint written from the model's own ``state_dict`` (as training frameworks
    save it) holds transformers 5's stacked ``mlp.experts.gate_up_proj`` [experts, 2I, H]
    and ``down_proj`` [experts, H, I]: read as the same per-expert items."""
    from safetensors.torch import save_file

    case = CASES[case_name]
    model = build(case, tmp_path / "saved")
    directory = tmp_path / "state_dict"
    directory.mkdir()
    (directory / "config.json").write_bytes((tmp_path / "saved" / "config.json").read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    save_file(state, directory / "model.safetensors")
    checkpoint = open_checkpoint(directory)
    assert any("gate_up_proj" in e.sources[0].name for e in checkpoint.experts.values())
    assert assert_experts_match_the_models_own(model, checkpoint, case) > 0


def test_readme_table_matches_the_matrix() -> None:
    """The README's architecture table lists exactly the matrix's model types, which are
    exactly the ones the plugin declares, each family in a row of its own that describes its
    weights as the family's entry does."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Supported architectures and inputs", 1)[1].split("\n\n", 2)[1]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    listed = [t for row in rows for t in re.findall(r"`([^`]+)`", row[1])]
    assert len(listed) == len(set(listed))
    matrix = {case.model_type for case in (*CASES.values(), *ENCODER_DECODER_CASES.values())}
    assert set(listed) == matrix
    assert set(listed) == set(SUPPORTED_MODEL_TYPES)
    described = {
        frozenset(re.findall(r"`([^`]+)`", row[1])): row[2].removesuffix(" |") for row in rows
    }
    for family in FAMILIES:
        assert described[frozenset(family.model_types)] == family.note, family.name
