"""The rules file: what a valid one means, and how each mistake is reported."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_spectral.judging.ranges import RangeSyntaxError, parse_index_set
from pytest_spectral.judging.rules import RulesError, load_rules


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def as_spec(parts: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{a + n}" if n else str(a) for a, n in parts)


class TestRanges:
    def test_ranges_and_singles(self) -> None:
        s = parse_index_set("0-3, 8")
        assert [i for i in range(10) if i in s] == [0, 1, 2, 3, 8]
        assert s.beyond(5).spec == "8"
        assert not s.beyond(9)

    @given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), min_size=1, max_size=8))
    def test_intervals_behave_like_the_plain_set(self, parts) -> None:
        expected = {i for a, n in parts for i in range(a, a + n + 1)}
        s = parse_index_set(as_spec(parts))
        assert {i for i in range(-3, 80) if i in s} == expected
        kept = s.intervals
        assert all(a <= b and b + 1 < next_a for (a, b), (next_a, _) in itertools.pairwise(kept))
        for count in (0, 5, 30, 75):
            beyond = s.beyond(count)
            assert {i for i in range(80) if i in beyond} == {i for i in expected if i >= count}
            assert bool(beyond) == any(i >= count for i in expected)
            if beyond:
                assert parse_index_set(beyond.spec) == beyond  # the spec text says what it holds

    def test_a_billion_layers_cost_two_integers(self) -> None:
        s = parse_index_set("0-999999999")
        assert s.intervals == ((0, 999_999_999),)
        assert 999_999_999 in s
        assert 10**9 not in s
        assert s.beyond(4).spec == "4-999999999"

    @pytest.mark.parametrize("spec", ["1e3", "²", "0x10", "9" * 19, "1-" + "9" * 5000])
    def test_only_plain_ascii_integers(self, spec: str) -> None:
        with pytest.raises(RangeSyntaxError):
            parse_index_set(spec)

    def test_all_and_integers(self) -> None:
        assert 10**6 in parse_index_set("all")
        assert 3 in parse_index_set(3)
        assert 4 not in parse_index_set(3)

    @pytest.mark.parametrize("spec", ["", "3-1", "a", "1-", "1,,2", "-2"])
    def test_bad_specs_are_explained(self, spec: str) -> None:
        with pytest.raises(RangeSyntaxError):
            parse_index_set(spec)


class TestValidRules:
    def test_the_documented_shape(self, tmp_path: Path) -> None:
        rules = load_rules(
            write(
                tmp_path,
                """
[[rules]]
name = "qk-concentrated"
metric = "top_k_ratio"
k = 5
max = 0.5
matrices = ["q", "k"]
layers = "0-3,8"
heads = "0-7"
severity = "warn"
""",
            )
        )
        (rule,) = rules.rules
        assert rule.name == "qk-concentrated"
        assert rule.request.key == "top_k_ratio(k=5)"
        assert (rule.min, rule.max, rule.severity) == (None, 0.5, "warn")
        assert rule.applies_to(8, 7, "k")
        assert not rule.applies_to(4, 0, "q")
        assert not rule.applies_to(0, 8, "q")
        assert not rule.applies_to(0, 0, "v")
        assert len(rules.sha256 or "") == 64

    def test_defaults(self, tmp_path: Path) -> None:
        (rule,) = load_rules(write(tmp_path, '[[rules]]\nmetric = "stable_rank"\nmin = 2\n')).rules
        assert rule.name == "rule-1"
        assert rule.severity == "fail"
        assert rule.matrices >= {"q", "k", "v", "o", "gate", "fc1"}
        assert rule.scope == "head"
        assert rule.applies_to(99, 99, "o")

    def test_violation_messages(self, tmp_path: Path) -> None:
        (rule,) = load_rules(
            write(tmp_path, '[[rules]]\nmetric = "stable_rank"\nmin = 2\nmax = 4\n')
        ).rules
        assert rule.violation(3) is None
        assert rule.violation(1) == "< min 2"
        assert rule.violation(5) == "> max 4"
        assert rule.violation(float("nan")) == "is undefined (nan)"

    def test_empty_file_has_no_rules(self, tmp_path: Path) -> None:
        assert load_rules(write(tmp_path, "# nothing yet\n")).rules == ()


class TestMistakesNameFileLineAndKey:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                '[[rules]]\nmetric = "top_k_ratio"\nmax = 1\nmatirces = ["q"]\n',
                ":4: rule 1, key 'matirces': unknown key (did you mean 'matrices'?)",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\n\n[[rules]]\nmetric = "top_k_ratoi"\n',
                ":6: rule 2, key 'metric': unknown metric 'top_k_ratoi' "
                "(did you mean 'top_k_ratio'?)",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nk = 3\nmax = 1\n',
                ":3: rule 1, key 'k': metric 'stable_rank' takes no 'k' (it is for top_k_ratio, "
                "least_k_ratio)",
            ),
            (
                '[[rules]]\nmetric = "top_k_ratio"\nk = 0\nmax = 1\n',
                ":3: rule 1, key 'k': must be a positive integer, got 0",
            ),
            (
                '[[rules]]\nmetric = "energy_rank"\np = 1.5\nmax = 1\n',
                ":3: rule 1, key 'p': must be a number in (0, 1], got 1.5",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nlayers = "3-1"\n',
                ":4: rule 1, key 'layers': range '3-1' runs backwards",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmatrices = ["q", "x"]\n',
                ":4: rule 1, key 'matrices': unknown matrix 'x'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmin = 3\nmax = 1\n',
                ":3: rule 1, key 'min': min 3.0 is larger than max 1.0",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = "high"\n',
                ":3: rule 1, key 'max': must be a number, got 'high'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nseverity = "error"\n',
                ":4: rule 1, key 'severity': must be 'fail' or 'warn'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\n',
                ":1: rule 1 needs 'min', 'max', 'min_change' or 'max_change'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmin_change = 0.5\nmax_change = -0.5\n',
                ":3: rule 1, key 'min_change': min_change 0.5 is larger than max_change -0.5",
            ),
            (
                '[[rules]]\nmetric = "alpha"\nmax = 6\nscope = "matrix"\nheads = "0-3"\n',
                ":5: rule 1, key 'heads': a scope = \"matrix\" rule judges whole matrices, which "
                'have no heads; remove heads, or give the rule scope = "head"',
            ),
            ("[[rules]]\nmax = 1\n", ":1: rule 1 has no 'metric' key"),
            (
                '[[rule]]\nmetric = "stable_rank"\n',
                ":1: unknown top-level key 'rule' (did you mean 'rules'?)",
            ),
            ('[[rules]]\nmetric = "stable_rank"\nmax = 1\nmax = 2\n', ": TOML syntax error:"),
        ],
    )
    def test_message(self, tmp_path: Path, text: str, expected: str) -> None:
        path = write(tmp_path, text)
        with pytest.raises(RulesError) as info:
            load_rules(path)
        assert str(info.value).startswith(str(path))
        assert expected in str(info.value)

    def test_toml_syntax_error_names_the_line(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[[rules]]\nmetric = "stable_rank"\nmax = = 1\n')
        with pytest.raises(RulesError, match=r"line 3"):
            load_rules(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(RulesError, match="cannot read rules file"):
            load_rules(tmp_path / "absent.toml")


class TestRelativeChange:
    @pytest.mark.parametrize(
        ("value", "baseline"),
        [
            (1.0, float("inf")),
            (1.0, float("-inf")),
            (1.0, float("nan")),
            (1.0, 0.0),
            (float("inf"), 1.0),
            (float("nan"), 1.0),
        ],
    )
    def test_undefined_change_breaks_the_rule(self, tmp_path, value, baseline) -> None:
        (rule,) = load_rules(
            write(
                tmp_path,
                '[[rules]]\nmetric = "spectral_norm"\nmin_change = -0.5\nmax_change = 0.5\n',
            )
        ).rules
        assert rule.change_violation(value, baseline).endswith("relative change undefined")
        assert rule.change_violation(1.2, 1.0) is None
        assert "> max_change" in rule.change_violation(2.0, 1.0)
