"""End to end through pytest itself: collection, outcomes, options, reports and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_spectral.testing.strategies import matrix_from_spectrum
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
COLLAPSED = "spectral::layer01::head02-q"


@pytest.fixture
def planted(pytester: pytest.Pytester) -> Path:
    """The SHAPE model with query head 2 of layer 1 collapsed to rank 1 in Q."""
    tensors = random_llama_weights(SHAPE, seed=3)
    q = tensors[attention_name(1, "q")]
    q[16:24] = torch.outer(torch.linspace(1, 2, 8), torch.linspace(-1, 1, 32))
    return write_checkpoint(pytester.path / "planted", tensors, SHAPE.config())


def rules(pytester: pytest.Pytester, text: str, name: str = "rules.toml") -> Path:
    path = pytester.path / name
    path.write_text(textwrap.dedent(text))
    return path


STABLE_RANK_RULE = """
[[rules]]
name = "collapsed"
metric = "stable_rank"
min = 1.5
matrices = ["q"]
"""


class TestCollection:
    def test_one_item_per_layer_head_and_matrix(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "--collect-only", "-q")
        ids = [line for line in result.outlines if line.startswith("spectral::")]
        assert len(ids) == SHAPE.layers * SHAPE.heads * 4
        assert ids[:5] == [
            "spectral::layer00::head00-q",
            "spectral::layer00::head00-k",
            "spectral::layer00::head00-v",
            "spectral::layer00::head00-o",
            "spectral::layer00::head01-q",
        ]
        assert ids[-1] == "spectral::layer01::head03-o"
        assert str(planted) not in "\n".join(ids)

    def test_narrowing_by_layers_and_matrices(self, pytester, planted) -> None:
        result = pytester.runpytest(
            f"--spectral-model={planted}",
            "--spectral-layers",
            "1",
            "--spectral-matrices",
            "k,q",
            "--collect-only",
            "-q",
        )
        ids = [line for line in result.outlines if line.startswith("spectral::")]
        assert len(ids) == 4 * 2
        assert all(i.startswith("spectral::layer01::") and i[-1] in "qk" for i in ids)

    def test_without_paths_only_spectral_items_run(self, pytester, planted) -> None:
        pytester.makepyfile(test_user="def test_user(): pass")
        alone = pytester.runpytest(f"--spectral-model={planted}", "--spectral-layers", "0")
        alone.assert_outcomes(passed=16)
        both = pytester.runpytest(
            "test_user.py", f"--spectral-model={planted}", "--spectral-layers", "0"
        )
        both.assert_outcomes(passed=17)

    def test_plain_runs_are_untouched(self, pytester) -> None:
        pytester.makepyfile(test_user="def test_user(): pass")
        pytester.runpytest().assert_outcomes(passed=1)


class TestOutcomes:
    def test_no_rules_file_everything_passes(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}")
        result.assert_outcomes(passed=32)
        result.stdout.fnmatch_lines(["*spectral summary*", "32 items: 32 passed"])

    def test_broken_rule_fails_exactly_that_head(self, pytester, planted) -> None:
        path = rules(pytester, STABLE_RANK_RULE)
        result = pytester.runpytest(f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.assert_outcomes(passed=31, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*collapsed: stable_rank = 1 < min 1.5",
                "layer 1, head 2, q: rows 16:24 of model.layers.1.self_attn.q_proj.weight (8x32)",
                "  FAIL collapsed: stable_rank = 1 < min 1.5",
                "  top singular values (8 of 8): *",
                "*Low-rank pruning candidates*",
                "*L1 H2 q*collapsed: 1 < 1.5*",
                f"FAILED {COLLAPSED} - collapsed: stable_rank = 1 < min 1.5",
            ]
        )
        assert "Traceback" not in result.stdout.str()

    def test_warn_severity_reports_without_failing(self, pytester, planted) -> None:
        path = rules(pytester, STABLE_RANK_RULE + 'severity = "warn"\n')
        result = pytester.runpytest(f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        assert result.ret == pytest.ExitCode.OK
        result.assert_outcomes(passed=31, warnings=1)
        assert result.parseoutcomes()["warned"] == 1
        result.stdout.fnmatch_lines(["*SpectralRuleWarning: collapsed: stable_rank = 1 < min 1.5*"])

    def test_ini_option_points_at_the_rules(self, pytester, planted) -> None:
        rules(pytester, STABLE_RANK_RULE, name="spectral.toml")
        pytester.makeini("[pytest]\nspectral_thresholds = spectral.toml\n")
        result = pytester.runpytest(f"--spectral-model={planted}")
        result.assert_outcomes(passed=31, failed=1)

    def test_non_finite_and_zero_heads_fail_without_rules(self, pytester) -> None:
        tensors = random_llama_weights(SHAPE, seed=1)
        tensors[attention_name(0, "v")][0, 5] = float("nan")  # K/V head 0: query heads 0, 1
        tensors[attention_name(1, "o")][:, 8:16] = 0.0  # query head 1
        directory = write_checkpoint(pytester.path / "broken", tensors, SHAPE.config())
        result = pytester.runpytest(f"--spectral-model={directory}", "--spectral-report=r.json")
        result.assert_outcomes(passed=29, failed=3)
        items = {
            i["nodeid"]: i for i in json.loads((pytester.path / "r.json").read_text())["items"]
        }
        assert items["spectral::layer00::head00-v"]["metrics"]["nonfinite_count"] == 1
        assert items["spectral::layer00::head00-v"]["status"] == "nonfinite"
        assert items["spectral::layer00::head02-v"]["metrics"]["nonfinite_count"] == 0
        result.stdout.fnmatch_lines(
            [
                "FAILED spectral::layer00::head00-v - 1 non-finite weight",
                "FAILED spectral::layer00::head01-v - 1 non-finite weight",
                "FAILED spectral::layer01::head01-o - all weights zero",
            ]
        )


class TestGroupedQueryRules:
    """``heads`` in a rule are query heads, also for the K/V items a group of them shares."""

    GQA = LlamaShape(layers=2, heads=8, kv_heads=2, head_dim=8, hidden=32, mlp=False)

    def test_heads_select_k_and_v_items_by_query_head(self, pytester) -> None:
        directory = write_checkpoint(
            pytester.path / "gqa", random_llama_weights(self.GQA, seed=5), self.GQA.config()
        )
        # stable_rank <= 8 for every 8 x 32 slice: each selected item breaks these rules
        path = rules(
            pytester,
            """
            [[rules]]
            name = "k-of-heads-0-1"
            metric = "stable_rank"
            min = 100
            matrices = ["k"]
            heads = "0-1"

            [[rules]]
            name = "v-of-head-5"
            metric = "stable_rank"
            min = 100
            matrices = ["v"]
            heads = "5"
            layers = "1"
            """,
        )
        result = pytester.runpytest(
            f"--spectral-model={directory}", f"--spectral-thresholds={path}",
            "--spectral-report=r.json",
        )  # fmt: skip
        result.assert_outcomes(passed=64 - 5, failed=5)
        report = json.loads((pytester.path / "r.json").read_text())
        failed = sorted(i["nodeid"] for i in report["items"] if i["outcome"] == "failed")
        # query heads 0-3 share K/V head 0, heads 4-7 K/V head 1
        assert failed == [
            "spectral::layer00::head00-k",
            "spectral::layer00::head01-k",
            "spectral::layer01::head00-k",
            "spectral::layer01::head01-k",
            "spectral::layer01::head05-v",
        ]
        # the shared K slice is one candidate naming only the query heads the rule selects
        labels = sorted(
            (c["layer"], c["matrix"], c["kv_head"], c["heads"]) for c in report["candidates"]
        )
        assert labels == [(0, "k", 0, [0, 1]), (1, "k", 0, [0, 1]), (1, "v", 1, [5])]
        result.stdout.fnmatch_lines(["*L1 H0-1 k*k-of-heads-0-1*"])


class TestCandidatesTable:
    def test_params_saved_is_the_saved_share(self, pytester, planted) -> None:
        """The planted head is rank 1, 8 x 32: a rank-1 factorisation keeps 1 * (8 + 32) = 40
        of 256 parameters, saving 216, i.e. 84% (the kept share would be 16%); break-even
        8 * 32 / 40 = 6.4."""
        path = rules(pytester, STABLE_RANK_RULE)
        result = pytester.runpytest(
            f"--spectral-model={planted}", f"--spectral-thresholds={path}",
            "--spectral-report=r.json",
        )  # fmt: skip
        result.stdout.fnmatch_lines(
            [
                "*L1 H2 q *collapsed: 1 < 1.5 *1 (0.0?) *6 *216 (84%)*",
                "1 candidate slice; acting on every suggestion would save at most 216 parameters*",
            ]
        )
        report = json.loads((pytester.path / "r.json").read_text())
        (candidate,) = report["candidates"]
        assert candidate["suggested_rank"] == 1
        assert candidate["params"] == 256
        assert candidate["params_after_factorisation"] == 40
        assert candidate["params_saved"] == 216
        assert candidate["break_even_rank"] == pytest.approx(6.4)
        assert report["summary"]["params_saved"] == 216


class TestFloorLimited:
    def test_condition_number_below_the_bf16_floor_is_a_lower_bound(self, pytester) -> None:
        """A head of true condition number 1e6, stored in bf16: its sigma_min is rounding noise,
        so the ratio is sigma_1 / floor, floor = 2^-8 rms(W) (sqrt(m) + sqrt(n)) (README)."""
        tensors = random_llama_weights(SHAPE, seed=3)
        spectrum = np.geomspace(1.0, 1e-6, 8)
        block = torch.from_numpy(matrix_from_spectrum(spectrum, 8, 32, seed=0))
        tensors[attention_name(0, "q")][8:16] = block.float()
        directory = write_checkpoint(pytester.path / "ill", tensors, SHAPE.config())
        path = rules(
            pytester,
            '[[rules]]\nname = "ill"\nmetric = "first_last_ratio"\nmax = 100\nmatrices = ["q"]\n',
        )
        result = pytester.runpytest(
            f"--spectral-model={directory}", f"--spectral-thresholds={path}",
            "--spectral-report=r.json",
        )  # fmt: skip
        result.assert_outcomes(passed=31, failed=1)
        from safetensors.torch import load_file

        stored = load_file(directory / "model.safetensors")[attention_name(0, "q")][8:16]
        values = np.linalg.svd(stored.double().numpy(), compute_uv=False)
        floor = 2.0**-8 * np.sqrt((values**2).sum() / (8 * 32)) * (np.sqrt(8) + np.sqrt(32))
        assert values[-1] < floor
        items = {
            i["nodeid"]: i for i in json.loads((pytester.path / "r.json").read_text())["items"]
        }
        item = items["spectral::layer00::head01-q"]
        assert item["floor_limited"] is True
        assert item["metrics"]["first_last_ratio"] == pytest.approx(values[0] / floor, rel=1e-9)
        assert [i for i, record in items.items() if record["floor_limited"]] == [item["nodeid"]]
        result.stdout.fnmatch_lines(
            [
                "layer 0, head 1, q: rows 8:16 of *",
                f"  FAIL ill: first_last_ratio >= {values[0] / floor:.6g} > max 100 "
                "(a lower bound: sigma_min is below the storage/rounding floor)",
            ]
        )


class TestPytestOptionsWork:
    def test_keyword_selection(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "-k", "layer00 and q")
        result.assert_outcomes(passed=4)

    def test_marker_selection(self, pytester, planted) -> None:
        pytester.makepyfile(test_user="def test_user(): pass")
        result = pytester.runpytest(
            "test_user.py", f"--spectral-model={planted}", "-m", "spectral", "--strict-markers"
        )
        result.assert_outcomes(passed=32)

    def test_deselect(self, pytester, planted) -> None:
        result = pytester.runpytest(
            f"--spectral-model={planted}", "--deselect", "spectral::layer00"
        )
        result.assert_outcomes(passed=16)

    def test_exitfirst(self, pytester, planted) -> None:
        path = rules(pytester, STABLE_RANK_RULE)
        result = pytester.runpytest(
            f"--spectral-model={planted}", f"--spectral-thresholds={path}", "-x"
        )
        result.assert_outcomes(passed=24, failed=1)

    def test_last_failed(self, pytester, planted) -> None:
        path = rules(pytester, STABLE_RANK_RULE)
        args = (f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        pytester.runpytest(*args).assert_outcomes(passed=31, failed=1)
        rerun = pytester.runpytest(*args, "--lf", "-v")
        rerun.assert_outcomes(failed=1, deselected=31)
        rerun.stdout.fnmatch_lines([f"{COLLAPSED} FAILED*"])

    def test_junit_xml_carries_metrics(self, pytester, planted) -> None:
        pytester.runpytest(
            f"--spectral-model={planted}", "--junitxml", "out.xml", "-o", "junit_family=xunit1"
        )
        xml = (pytester.path / "out.xml").read_text()
        assert xml.count("<testcase") == 32
        assert '<property name="stable_rank"' in xml
        assert 'name="head02-q"' in xml


class TestJsonReport:
    def test_report_content(self, pytester, planted) -> None:
        path = rules(pytester, STABLE_RANK_RULE)
        (pytester.path / "out").mkdir()
        pytester.runpytest(
            f"--spectral-model={planted}",
            f"--spectral-thresholds={path}",
            "--spectral-report=out/report.json",
        )
        report = json.loads((pytester.path / "out/report.json").read_text())
        assert report["schema"] == "pytest-spectral-report"
        assert report["schema_version"] == 4
        assert report["model"]["num_key_value_heads"] == 2
        assert report["model"]["dtype"] == "BF16"
        assert len(report["rules"]["sha256"]) == 64
        # the planted head is rank 1: a rank-1 factorisation of 8 x 32 saves 256 - 40
        counts = {"items": 32, "passed": 31, "failed": 1, "warned": 0}
        counts |= {"error": 0, "skipped": 0, "not_run": 0}
        counts |= {"regressions": 0, "candidates": 1}
        assert report["summary"] == {**counts, "params_saved": 216}
        assert report["regressions"] == []
        items = {item["nodeid"]: item for item in report["items"]}
        collapsed = items[COLLAPSED]
        assert collapsed["outcome"] == "failed"
        assert collapsed["broken_rules"] == [
            {
                "rule": "collapsed",
                "metric": "stable_rank",
                "value": pytest.approx(1.0, rel=1e-4),
                "min": 1.5,
                "max": None,
                "min_change": None,
                "max_change": None,
                "baseline": None,
                "window": None,
                "reference_step": None,
                "severity": "fail",
                "bound": "min",
                "suggest": "low_rank",
            }
        ]
        k_item = items["spectral::layer01::head03-k"]
        assert (k_item["kv_head"], k_item["shape"]) == (1, [8, 32])
        assert items["spectral::layer01::head03-o"]["shape"] == [32, 8]
        assert set(k_item["metrics"]) >= {"top_k_ratio", "effective_rank", "energy_rank"}
        (candidate,) = report["candidates"]
        assert candidate["nodeids"] == [COLLAPSED]
        assert (candidate["heads"], candidate["rules"]) == ([2], ["collapsed"])
        assert candidate["suggested_rank"] == collapsed["metrics"]["energy_rank(p=0.95)"] == 1
        assert candidate["params_saved"] == 216

    def test_shared_kv_slices_are_one_candidate_each(self, pytester, planted) -> None:
        """Every K item fails: 8 items, but 2 layers x 2 K/V heads = 4 slices to compress."""
        path = rules(pytester, '[[rules]]\nmetric = "stable_rank"\nmin = 100\nmatrices = ["k"]\n')
        result = pytester.runpytest(
            f"--spectral-model={planted}", f"--spectral-thresholds={path}",
            "--spectral-report=r.json",
        )  # fmt: skip
        result.assert_outcomes(passed=24, failed=8)
        result.stdout.fnmatch_lines(["*L1 H2-3 k*", "4 candidate slices; *"])
        candidates = json.loads((pytester.path / "r.json").read_text())["candidates"]
        assert sorted((c["layer"], c["kv_head"], tuple(c["heads"])) for c in candidates) == [
            (0, 0, (0, 1)),
            (0, 1, (2, 3)),
            (1, 0, (0, 1)),
            (1, 1, (2, 3)),
        ]

    def test_singular_values_agree_with_numpy(self, pytester, planted) -> None:
        pytester.runpytest(f"--spectral-model={planted}", "--spectral-report=r.json")
        items = json.loads((pytester.path / "r.json").read_text())["items"]
        from safetensors.torch import load_file

        weights = {
            k: v.double().numpy() for k, v in load_file(planted / "model.safetensors").items()
        }
        for item in items:
            weight = weights[attention_name(item["layer"], item["matrix"])]
            index = item["kv_head"] if item["kv_head"] is not None else item["head"]
            block = (
                weight[:, index * 8 : index * 8 + 8]
                if item["matrix"] == "o"
                else (weight[index * 8 : index * 8 + 8])
            )
            reference = np.linalg.svd(block, compute_uv=False)
            # Below sigma_1 * max(m, n) * eps a singular value is rounding noise in any method
            # (the planted rank-1 head has seven of them); above it, 1e-9 relative holds.
            noise = reference[0] * max(block.shape) * np.finfo(np.float64).eps
            np.testing.assert_allclose(item["singular_values"], reference, rtol=1e-9, atol=noise)

    def test_parallel_run_gives_the_same_report(self, pytester, planted) -> None:
        path = rules(pytester, STABLE_RANK_RULE)
        common = (f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        pytester.runpytest_subprocess(*common, "--spectral-report=one.json", "-p", "no:xdist")
        parallel = pytester.runpytest_subprocess(
            *common, "--spectral-report=two.json", "-n", "2", "--dist", "loadscope"
        )
        parallel.assert_outcomes(passed=31, failed=1)
        one, two = (json.loads((pytester.path / n).read_text()) for n in ("one.json", "two.json"))
        one.pop("created"), two.pop("created")
        assert one == two


class TestUsageErrors:
    def test_malformed_rules_file_names_the_line(self, pytester, planted) -> None:
        path = rules(pytester, '[[rules]]\nmetric = "stable_rnk"\nmax = 1\n')
        result = pytester.runpytest(f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                f"ERROR: {path}:2: rule 1, key 'metric': unknown metric 'stable_rnk' "
                "(did you mean 'stable_rank'?)"
            ]
        )

    def test_missing_checkpoint(self, pytester) -> None:
        result = pytester.runpytest("--spectral-model", "no/such/model")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["ERROR: no/such/model: no such file or directory"])

    def test_layers_out_of_range(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "--spectral-layers", "0-5")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*layer(s) 2-5 do not exist; the model has 2 layers*"])

    @pytest.mark.parametrize(
        ("option", "value", "message"),
        [
            ("--spectral-matrices", "q,x", "*unknown matrix 'x'*"),
            ("--spectral-layers", "3-1", "*runs backwards*"),
            ("--spectral-energy", "2", "*expected a number in (0, 1]*"),
        ],
    )
    def test_bad_option_values(self, pytester, planted, option, value, message) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", option, value)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([message])


def report_items(pytester: pytest.Pytester, name: str = "r.json") -> dict[str, dict]:
    return {i["nodeid"]: i for i in json.loads((pytester.path / name).read_text())["items"]}


def assert_spectra_of_the_file(items: dict[str, dict], weights_file: Path, head_dim: int) -> None:
    """Every item's singular values are numpy's of its slice, read from the file as it is now."""
    from safetensors.torch import load_file

    weights = {k: v.double().numpy() for k, v in load_file(weights_file).items()}
    for nodeid, item in items.items():
        weight = weights[attention_name(item["layer"], item["matrix"])]
        index = item["kv_head"] if item["kv_head"] is not None else item["head"]
        rows = slice(index * head_dim, (index + 1) * head_dim)
        block = weight[:, rows] if item["matrix"] == "o" else weight[rows]
        reference = np.linalg.svd(block, compute_uv=False)
        assert len(item["singular_values"]) == head_dim, nodeid
        np.testing.assert_allclose(item["singular_values"], reference, rtol=1e-9, err_msg=nodeid)


class TestCacheKey:
    """What makes a cached spectrum stale, seen from the user's side."""

    ARGS = ("-p", "no:xdist", "-v")

    def test_corrected_config_with_the_same_shapes_is_not_served_stale(self, pytester) -> None:
        """4 heads of 8 and 2 heads of 16 give the same tensor shapes (32 x 32) and files."""
        stated = LlamaShape(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, mlp=False)
        directory = write_checkpoint(
            pytester.path / "model", random_llama_weights(stated, seed=6), stated.config()
        )
        args = (f"--spectral-model={directory}", *self.ARGS)
        pytester.runpytest(*args).assert_outcomes(passed=32)  # fills the cache
        corrected = LlamaShape(layers=2, heads=2, kv_heads=2, head_dim=16, hidden=32, mlp=False)
        (directory / "config.json").write_text(json.dumps(corrected.config()))
        result = pytester.runpytest(*args, "--spectral-report=r.json")
        result.assert_outcomes(passed=16)
        result.stdout.fnmatch_lines(["spectral: layer 0: * s; 0 of 4 matrices from the cache, *"])
        assert_spectra_of_the_file(report_items(pytester), directory / "model.safetensors", 16)

    def test_in_place_edit_of_an_unsampled_byte_is_recomputed(self, pytester) -> None:
        """A 128 KiB tensor: the 17 sampled 4 KiB blocks leave half of it unread, so only the
        file's identity (its modification and status-change times) tells that it changed."""
        shape = LlamaShape(layers=1, heads=4, kv_heads=4, head_dim=64, hidden=256, mlp=False)
        directory = write_checkpoint(
            pytester.path / "model", random_llama_weights(shape, seed=7), shape.config()
        )
        args = (f"--spectral-model={directory}", *self.ARGS)
        pytester.runpytest(*args, "--spectral-report=before.json").assert_outcomes(passed=16)
        from pytest_spectral.checkpoints.checkpoint import open_checkpoint

        entry = open_checkpoint(directory).tensors[(0, "q")]
        assert entry.nbytes == 128 * 1024
        sampled, stat = entry.sample_bytes(), entry.file.stat()
        # bytes 4096..8191 of every 8 KiB stride are never sampled: weight 3000 of q
        # (head 0, row 11, column 184) becomes 8.0 (bf16 0x4100, little-endian)
        with entry.file.open("r+b") as handle:
            handle.seek(entry.offset + 2 * 3000)
            handle.write(bytes([0x00, 0x41]))
        assert open_checkpoint(directory).tensors[(0, "q")].sample_bytes() == sampled
        assert (entry.file.stat().st_size, entry.file.stat().st_ino) == (stat.st_size, stat.st_ino)
        assert entry.file.stat().st_mtime_ns != stat.st_mtime_ns
        result = pytester.runpytest(*args, "--spectral-report=after.json")
        result.stdout.fnmatch_lines(["spectral: layer 0: * s; 0 of 4 matrices from the cache, *"])
        after = report_items(pytester, "after.json")
        head = "spectral::layer00::head00-q"
        assert (
            after[head]["singular_values"]
            != report_items(pytester, "before.json")[head]["singular_values"]
        )
        assert_spectra_of_the_file(after, directory / "model.safetensors", 64)


class TestEngineOptions:
    def test_verbose_run_reports_each_layer(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "-v")
        shared = "(K/V slices are shared by query heads)"
        result.stdout.fnmatch_lines(
            [
                f"spectral: layer 0: 16 items from 12 distinct slices {shared} in * s; "
                "0 of 4 matrices from the cache, 0 slices refined beyond the Gram route",
                f"spectral: layer 1: 16 items from 12 distinct slices {shared} in * s; "
                "0 of 4 matrices from the cache, * refined beyond the Gram route",
            ]
        )

    def test_rerun_is_served_from_cache_without_torch(self, pytester, planted) -> None:
        pytester.makeconftest(
            """
            import sys
            def pytest_sessionfinish(session):
                with open("torch-imported.txt", "w") as f:
                    f.write(str("torch" in sys.modules))
            """
        )
        args = (f"--spectral-model={planted}", "-v", "-p", "no:xdist", "-p", "no:randomly")
        first = pytester.runpytest_subprocess(*args)
        first.assert_outcomes(passed=32)
        assert (pytester.path / "torch-imported.txt").read_text() == "True"
        second = pytester.runpytest_subprocess(*args, "--spectral-report=cached.json")
        second.assert_outcomes(passed=32)
        second.stdout.fnmatch_lines(["spectral: layer 1: * 4 of 4 matrices from the cache, *"])
        assert (pytester.path / "torch-imported.txt").read_text() == "False"

    def test_a_safetensors_run_loads_no_other_format_nor_unused_option(
        self, pytester, planted
    ) -> None:
        """A run of a Hugging Face safetensors directory imports none of the other formats'
        readers (GGUF, LoRA, DCP, Mistral's native files, training checkpoints and the
        ``torch.save`` reader), nor what only options it was not given need (baseline,
        history, calibration, HTML, heat map); a re-run from the cache also no torch, nor the
        core counting (``loky``) that only computing needs. ``--spectral-calibrate`` shows the
        probe sees a module when it is used."""
        pytester.makeconftest(
            """
            import sys
            def pytest_unconfigure(config):
                with open("modules.txt", "w") as f:
                    f.write("\\n".join(sorted(sys.modules)))
            """
        )
        never = {
            "pytest_spectral.checkpoints.formats." + name
            for name in ("gguf_file", "lora", "dcp", "mistral", "training", "torch_file")
        } | {
            "pytest_spectral." + name
            for name in (
                "judging.baseline",
                "judging.calibrate",
                "reporting.history.earlier",
                "reporting.history.reports",
                "reporting.html_report",
                "reporting.heatmap",
            )
        }

        def modules(*extra: str) -> set[str]:
            args = (f"--spectral-model={planted}", "-p", "no:xdist", "-p", "no:randomly")
            pytester.runpytest_subprocess(*args, *extra).assert_outcomes(passed=32)
            return set((pytester.path / "modules.txt").read_text().split("\n"))

        first = modules()
        assert "pytest_spectral.checkpoints.formats.huggingface" in first
        assert "torch" in first
        assert first & never == set()
        cached = modules("--spectral-report=cached.json")
        assert cached & (never | {"torch", "loky"}) == set()
        calibrating = modules("--spectral-calibrate=rules.toml")
        assert calibrating & never == {"pytest_spectral.judging.calibrate"}

    def test_cached_values_equal_computed_values(self, pytester, planted) -> None:
        args = (f"--spectral-model={planted}",)
        pytester.runpytest(*args, "--spectral-report=cold.json", "--spectral-no-cache")
        pytester.runpytest(*args)  # fills the cache
        pytester.runpytest(*args, "--spectral-report=warm.json")
        cold, warm = (
            json.loads((pytester.path / n).read_text()) for n in ("cold.json", "warm.json")
        )
        assert cold["items"] == warm["items"]

    def test_no_cache_writes_nothing(self, pytester, planted) -> None:
        pytester.runpytest(f"--spectral-model={planted}", "--spectral-no-cache")
        assert not list(pytester.path.glob(".pytest_cache/d/spectral/*"))
        pytester.runpytest(f"--spectral-model={planted}")
        assert len(list(pytester.path.glob(".pytest_cache/d/spectral/*.npz"))) == 8

    def test_works_without_the_cache_plugin(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=32)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_absent_device_is_a_usage_error(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "--spectral-device", "cuda")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["ERROR: --spectral-device cuda: CUDA is not available here (available: cpu*)"]
        )

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    def test_cuda_run_gives_the_cpu_report(self, pytester, planted) -> None:
        """Same outcomes, singular values within 1e-9 and metrics, in one process, under -n 2
        and decomposing in a child process."""
        path = rules(pytester, STABLE_RANK_RULE)
        common = (f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        common += ("--spectral-no-cache",)
        runs = {
            "cpu": ("--spectral-device", "cpu", "-p", "no:xdist"),
            "cuda": ("--spectral-device", "cuda", "-p", "no:xdist"),
            "cuda-n2": ("--spectral-device", "cuda", "-n", "2", "--dist", "loadscope"),
            "cuda-child": (
                "--spectral-device", "cuda", "-p", "no:xdist", "--spectral-subprocess=on"
            ),
        }
        reports = {}
        for name, extra in runs.items():
            result = pytester.runpytest_subprocess(*common, *extra, f"--spectral-report={name}")
            result.assert_outcomes(passed=31, failed=1)
            items = json.loads((pytester.path / name).read_text())["items"]
            reports[name] = {item["nodeid"]: item for item in items}
        for name in ("cuda", "cuda-n2", "cuda-child"):
            assert reports[name].keys() == reports["cpu"].keys()
            for nodeid, expected in reports["cpu"].items():
                got = reports[name][nodeid]
                assert got["outcome"] == expected["outcome"], nodeid
                top = expected["singular_values"][0]
                np.testing.assert_allclose(
                    got["singular_values"], expected["singular_values"], rtol=1e-9, atol=top * 1e-14
                )
                if expected["floor_limited"]:
                    continue  # metrics of rounding-noise values (the planted head) may differ
                for metric, value in expected["metrics"].items():
                    # "nan" and "inf" are strings in the report; numbers agree to rounding
                    same = value if isinstance(value, str) else pytest.approx(value, rel=1e-6)
                    assert got["metrics"][metric] == same, (nodeid, metric)

    def test_float32_precision_is_recorded(self, pytester, planted) -> None:
        pytester.runpytest(
            f"--spectral-model={planted}",
            "--spectral-dtype",
            "float32",
            "--spectral-report=r.json",
        )
        report = json.loads((pytester.path / "r.json").read_text())
        assert report["settings"]["precision"] == "float32"
        assert {item["method"] for item in report["items"]} == {"svd32"}


def test_plugin_import_does_not_import_torch() -> None:
    code = (
        "import sys, pytest_spectral.plugin; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'pytest_spectral.judging.metrics' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_pytest_run_does_not_import_torch(pytester) -> None:
    pytester.makepyfile(
        test_user="import sys\ndef test_user():\n    assert 'torch' not in sys.modules\n"
    )
    pytester.runpytest_subprocess("-p", "no:xdist").assert_outcomes(passed=1)


class TestUserMetrics:
    CONFTEST = """
        import numpy as np

        def pytest_spectral_register_metrics(metrics):
            metrics.add(
                "tail_share",
                lambda sv, k=2: sv[..., -k:].sum(-1) / sv.sum(-1),
                "share of the k smallest singular values",
                k=2,
            )
    """

    def test_conftest_metric_fails_a_head(self, pytester, planted) -> None:
        pytester.makeconftest(self.CONFTEST)
        path = rules(
            pytester,
            '[[rules]]\nname = "thin-tail"\nmetric = "tail_share"\nk = 3\n'
            "min = 0.01\nmatrices = ['q']\n",
        )
        result = pytester.runpytest(
            f"--spectral-model={planted}",
            f"--spectral-thresholds={path}",
            "--spectral-report=r.json",
        )
        result.assert_outcomes(passed=31, failed=1)
        result.stdout.fnmatch_lines([f"FAILED {COLLAPSED} - thin-tail: tail_share(k=3) = *"])
        item = json.loads((pytester.path / "r.json").read_text())["items"][0]
        assert {"tail_share", "tail_share(k=3)"} <= set(item["metrics"])

    def test_misspelt_user_metric_is_suggested(self, pytester, planted) -> None:
        pytester.makeconftest(self.CONFTEST)
        path = rules(pytester, '[[rules]]\nmetric = "tail_shar"\nmax = 1\n')
        result = pytester.runpytest(f"--spectral-model={planted}", f"--spectral-thresholds={path}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*unknown metric 'tail_shar' (did you mean 'tail_share'?)"])

    def test_broken_user_metric_fails_items_with_its_name(self, pytester, planted) -> None:
        pytester.makeconftest(
            "def pytest_spectral_register_metrics(metrics):\n"
            "    metrics.add('broken', lambda sv: sv.sum())\n"
        )
        result = pytester.runpytest(f"--spectral-model={planted}", "-x")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*metric 'broken' returned shape [] for 4 slices; it must*"])


class TestScopes:
    @pytest.fixture
    def with_mlp(self, pytester) -> Path:
        shape = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=48)
        return write_checkpoint(
            pytester.path / "mlp", random_llama_weights(shape, seed=8), shape.config()
        )

    def test_both_scopes(self, pytester, with_mlp) -> None:
        result = pytester.runpytest(
            f"--spectral-model={with_mlp}", "--spectral-scope", "both", "--collect-only", "-q"
        )
        ids = [line for line in result.outlines if line.startswith("spectral::")]
        whole = [i for i in ids if "head" not in i]
        assert whole[:7] == [
            f"spectral::layer00::{m}" for m in ("q", "k", "v", "o", "gate", "up", "down")
        ]
        assert len(whole) == 2 * 7
        assert len(ids) - len(whole) == 2 * 4 * 4

    def test_whole_matrices_match_numpy_and_rules_select_them(self, pytester, with_mlp) -> None:
        path = rules(
            pytester,
            """
            [[rules]]
            name = "gate-energy"
            metric = "frobenius_norm"
            max = 0.0001
            matrices = ["gate"]
            scope = "matrix"
            """,
        )
        result = pytester.runpytest(
            f"--spectral-model={with_mlp}",
            "--spectral-scope",
            "both",
            f"--spectral-thresholds={path}",
            "--spectral-report=r.json",
        )
        result.assert_outcomes(passed=2 * 7 + 32 - 2, failed=2)
        result.stdout.fnmatch_lines(["FAILED spectral::layer00::gate - gate-energy: *"])
        from safetensors.torch import load_file

        weights = {
            k: v.double().numpy() for k, v in load_file(with_mlp / "model.safetensors").items()
        }
        items = json.loads((pytester.path / "r.json").read_text())["items"]
        whole = [i for i in items if i["scope"] == "matrix"]
        assert all(i["head"] is None and i["kv_head"] is None for i in whole)
        down = next(i for i in whole if i["nodeid"] == "spectral::layer01::down")
        reference = np.linalg.svd(weights["model.layers.1.mlp.down_proj.weight"], compute_uv=False)
        assert down["shape"] == [32, 48]
        np.testing.assert_allclose(down["singular_values"], reference, rtol=1e-9)

    def test_whole_matrices_are_measured_with_their_own_shape(self, pytester) -> None:
        """Random Gaussian matrices have no spikes; counted against the head slice's shape
        instead of the matrix's, the noise bulk itself would be counted as spikes."""
        shape = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=96)
        directory = write_checkpoint(
            pytester.path / "random", random_llama_weights(shape, seed=12), shape.config()
        )
        result = pytester.runpytest(
            f"--spectral-model={directory}", "--spectral-scope", "matrix",
            "--spectral-report=r.json",
        )  # fmt: skip
        result.assert_outcomes(passed=2 * 7)
        items = json.loads((pytester.path / "r.json").read_text())["items"]
        shapes = {i["matrix"]: tuple(i["shape"]) for i in items}
        assert shapes == {
            "q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64),
            "gate": (96, 64), "up": (96, 64), "down": (64, 96),
        }  # fmt: skip
        for item in items:
            assert len(item["singular_values"]) == min(item["shape"]), item["nodeid"]
            assert item["metrics"]["gd_spikes"] == 0, item["nodeid"]
            assert item["metrics"]["mp_spikes"] == 0, item["nodeid"]

    def test_mlp_matrix_absent_from_the_checkpoint(self, pytester, planted) -> None:
        result = pytester.runpytest(f"--spectral-model={planted}", "--spectral-matrices", "q,gate")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*this checkpoint has no gate (it has q, k, v, o, qk, ov)"])


def test_rule_can_suggest_removing_the_head(pytester, planted) -> None:
    path = rules(pytester, STABLE_RANK_RULE + 'suggest = "remove_head"\n')
    result = pytester.runpytest(
        f"--spectral-model={planted}",
        f"--spectral-thresholds={path}",
        "--spectral-report=r.json",
    )
    result.stdout.fnmatch_lines(["*remove head: 512*"])  # 8 Q rows + 8 O columns of 32
    item = next(
        i
        for i in json.loads((pytester.path / "r.json").read_text())["items"]
        if i["nodeid"] == COLLAPSED
    )
    assert item["broken_rules"][0]["suggest"] == "remove_head"


def test_user_metrics_are_recomputed_from_cached_spectra(pytester, planted) -> None:
    """The cache keeps built-in metrics; a conftest's metric may change between runs."""
    for constant in (1.0, 2.0):
        pytester.makeconftest(
            "import numpy as np\n"
            "def pytest_spectral_register_metrics(metrics):\n"
            f"    metrics.add('constant', lambda sv: np.full(sv.shape[:-1], {constant}))\n"
        )
        result = pytester.runpytest_subprocess(
            f"--spectral-model={planted}",
            "--spectral-report=r.json",
            "-v",
            "-p",
            "no:xdist",
        )
        item = json.loads((pytester.path / "r.json").read_text())["items"][0]
        assert item["metrics"]["constant"] == constant
    result.stdout.fnmatch_lines(["spectral: layer 0: * 4 of 4 matrices from the cache, *"])
