"""The rules file: what a valid one means, and how each mistake is reported."""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_spectral.judging.ranges import RangeSyntaxError, parse_index_set
from pytest_spectral.judging.rules import RulesError, RuleSet, load_rules, rules_of_stack


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def first_beyond(value: float, baseline: float, direction: float) -> float:
    """The float next to ``value`` (towards ``direction``) whose relative change against
    ``baseline`` differs from ``value``'s once rounded: the closest value beyond a bound."""
    change = (value - baseline) / abs(baseline)
    beyond = math.nextafter(value, direction)
    while (beyond - baseline) / abs(baseline) == change:
        beyond = math.nextafter(beyond, direction)
    return beyond


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

    def test_bounds_are_inclusive(self, tmp_path: Path) -> None:
        """A value equal to min or max passes; the next float beyond it breaks the rule."""
        (rule,) = load_rules(
            write(tmp_path, '[[rules]]\nmetric = "stable_rank"\nmin = 0.1\nmax = 0.7\n')
        ).rules
        assert rule.violation(0.1) is None
        assert rule.violation(0.7) is None
        assert rule.violation(math.nextafter(0.1, -math.inf)) == "< min 0.1"
        assert rule.violation(math.nextafter(0.7, math.inf)) == "> max 0.7"
        assert rule.violation(math.inf) == "> max 0.7"
        assert rule.violation(-math.inf) == "< min 0.1"

    @pytest.mark.parametrize(("key", "bound"), [("min", "min = 2"), ("max", "max = 2")])
    def test_one_sided_rules(self, tmp_path: Path, key: str, bound: str) -> None:
        (rule,) = load_rules(write(tmp_path, f'[[rules]]\nmetric = "stable_rank"\n{bound}\n')).rules
        below, above = rule.violation(1), rule.violation(3)
        assert (below, above) == (("< min 2", None) if key == "min" else (None, "> max 2"))
        assert rule.change_violation(1, 2) is None  # no relative bound: baselines are ignored

    def test_relative_bounds_are_inclusive(self, tmp_path: Path) -> None:
        """change = (value - baseline) / |baseline|: 6 against 4 is +50%, 2 against 4 is -50%."""
        (rule,) = load_rules(
            write(
                tmp_path,
                '[[rules]]\nmetric = "stable_rank"\nmin_change = -0.5\nmax_change = 0.5\n',
            )
        ).rules
        assert rule.violation(100) is None  # no absolute bound
        assert rule.change_violation(6, 4) is None
        assert rule.change_violation(2, 4) is None
        assert rule.change_violation(-2, -4) is None  # |baseline|: from -4 to -2 is +50%
        assert rule.change_violation(first_beyond(6, 4, math.inf), 4) == (
            "vs baseline 4 (+50.0%) > max_change +0.5"
        )
        assert rule.change_violation(first_beyond(2, 4, -math.inf), 4) == (
            "vs baseline 4 (-50.0%) < min_change -0.5"
        )
        assert rule.change_violation(-7, -4) == "vs baseline -4 (-75.0%) < min_change -0.5"
        assert rule.change_violation(3, None) == (
            "has no baseline value: the baseline report has no stable_rank for this item, nor "
            "singular values to compute it from (an item it did not collect, or one without a "
            "result there); record the baseline again (--spectral-report) from the known-good "
            "checkpoint with the same options"
        )
        undefined = "relative change undefined"
        assert rule.change_violation(3, 0.0) == f"vs baseline 0: {undefined}"
        assert rule.change_violation(math.nan, 2) == f"vs baseline 2: {undefined}"
        assert rule.change_violation(3, math.nan) == f"vs baseline nan: {undefined}"

    @pytest.mark.parametrize(
        ("entry", "accepted"),
        [
            ('metric = "top_k_ratio"\nk = 1', True),
            ('metric = "top_k_ratio"\nk = 2', True),
            ('metric = "top_k_ratio"\nk = true', False),
            ('metric = "top_k_ratio"\nk = 2.5', False),
            ('metric = "top_k_ratio"\nk = "3"', False),
            ('metric = "energy_rank"\np = 1', True),
            ('metric = "energy_rank"\np = 1.0', True),
            ('metric = "energy_rank"\np = 0.5', True),
            ('metric = "energy_rank"\np = 0', False),
            ('metric = "energy_rank"\np = 1.01', False),
            ('metric = "energy_rank"\np = true', False),
            ('metric = "energy_rank"\np = "0.5"', False),
        ],
    )
    def test_metric_parameters_in_range(self, tmp_path: Path, entry: str, accepted: bool) -> None:
        """k is a positive integer; p an energy fraction in (0, 1]: both ends checked."""
        path = write(tmp_path, f"[[rules]]\n{entry}\nmax = 1\n")
        if accepted:
            (rule,) = load_rules(path).rules
            name, value = entry.splitlines()[1].split(" = ")
            assert dict(rule.request.params)[name] == float(value)
        else:
            with pytest.raises(RulesError, match="must be a"):
                load_rules(path)

    def test_matrices_as_text_and_in_any_case(self, tmp_path: Path) -> None:
        text = '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmatrices = " Q, k ,DOWN"\n'
        (rule,) = load_rules(write(tmp_path, text)).rules
        assert rule.matrices == frozenset({"q", "k", "down"})

    def test_min_equal_to_max_pins_a_value(self, tmp_path: Path) -> None:
        text = '[[rules]]\nmetric = "numerical_rank"\nmin = 8\nmax = 8\n'
        (rule,) = load_rules(write(tmp_path, text)).rules
        assert (rule.violation(8), rule.violation(7), rule.violation(9)) == (
            None,
            "< min 8",
            "> max 8",
        )

    def test_scopes_select_heads_or_whole_matrices(self, tmp_path: Path) -> None:
        text = (
            '[[rules]]\nmetric = "alpha"\nmax = 6\nscope = "matrix"\nmatrices = ["down"]\n'
            '[[rules]]\nmetric = "alpha"\nmax = 6\nmatrices = ["down"]\n'
        )
        whole, head = load_rules(write(tmp_path, text)).rules
        assert (whole.scope, head.scope) == ("matrix", "head")
        assert whole.applies_to(3, None, "down")
        assert not whole.applies_to(3, 0, "down")
        assert head.applies_to(3, 0, "down")
        assert not head.applies_to(3, None, "down")

    @pytest.mark.parametrize("suggest", ["low_rank", "remove_head", "none", None])
    def test_a_rule_keeps_what_it_suggests(self, tmp_path: Path, suggest) -> None:
        """``suggest`` overrides the metric's compressible side; without it, None decides."""
        line = f'suggest = "{suggest}"\n' if suggest else ""
        text = f'[[rules]]\nmetric = "stable_rank"\nmin = 2\n{line}'
        (rule,) = load_rules(write(tmp_path, text)).rules
        assert rule.suggest == suggest

    @pytest.mark.parametrize("window", [2, 1000])
    def test_a_trend_window_spans_two_to_a_thousand_reports(self, tmp_path: Path, window) -> None:
        text = f'[[rules]]\nmetric = "stable_rank"\nmin_change = -0.1\nwindow = {window}\n'
        (rule,) = load_rules(write(tmp_path, text)).rules
        assert (rule.window, rule.is_trend, rule.is_relative) == (window, True, True)

    def test_stacks_select_the_items_of_their_stacks(self, tmp_path: Path) -> None:
        """``stacks`` names encoder-decoder stacks; ``text`` is what it calls an item in no
        stack (``stack`` None); a rule without ``stacks`` judges every item."""
        text = (
            '[[rules]]\nmetric = "stable_rank"\nmax = 1\nstacks = ["cross", "encoder"]\n'
            '[[rules]]\nmetric = "stable_rank"\nmax = 1\nstacks = "text"\n'
            '[[rules]]\nmetric = "stable_rank"\nmax = 1\n'
        )
        cross, plain, anywhere = load_rules(write(tmp_path, text)).rules
        assert (cross.stacks, plain.stacks, anywhere.stacks) == (
            frozenset({"cross", "encoder"}),
            frozenset({"text"}),
            None,
        )
        stacks = (None, "encoder", "decoder", "cross", "vision")
        assert [cross.applies_to(0, 0, "q", stack) for stack in stacks] == [
            False,
            True,
            False,
            True,
            False,
        ]
        assert [plain.applies_to(0, 0, "q", stack) for stack in stacks] == [
            True,
            False,
            False,
            False,
            False,
        ]
        assert all(anywhere.applies_to(0, 0, "q", stack) for stack in stacks)

    def test_the_rules_of_one_stack_judge_it_as_a_model_of_one_stack(self, tmp_path: Path) -> None:
        """A heatmap draws one stack at a time: its rules are those naming the stack or none,
        with ``stacks`` dropped so that they apply to cells drawn without a stack."""
        text = (
            '[[rules]]\nmetric = "stable_rank"\nmax = 1\nstacks = ["cross"]\n'
            '[[rules]]\nmetric = "stable_rank"\nmax = 2\nstacks = ["encoder", "decoder"]\n'
            '[[rules]]\nmetric = "stable_rank"\nmax = 3\n'
        )
        rules = load_rules(write(tmp_path, text)).rules
        cross = rules_of_stack(rules, "cross")
        assert [(r.max, r.stacks) for r in cross] == [(1, None), (3, None)]
        assert all(r.applies_to(0, 0, "q") for r in cross)
        assert [r.max for r in rules_of_stack(rules, "decoder")] == [2, 3]
        assert rules_of_stack(rules, None) == list(rules)  # a model of one stack: as they are

    def test_lines_of_a_rule_point_at_its_bounds_else_its_header(self, tmp_path: Path) -> None:
        text = (
            "# thresholds\n"
            '[[rules]]\nmetric = "stable_rank"\nmax = 1\n'
            '[[rules]]\nmax = 3\nmetric = "stable_rank"\n\n'
            '[[rules]]\nmetric = "stable_rank"\n  min = 0.5\nmax_change = 0.2\n'
        )
        first, second, third = load_rules(write(tmp_path, text)).rules
        assert first.lines == (("", 2), ("max", 4))
        # right after its header, and right after the bound of the rule before
        assert second.lines == (("", 5), ("max", 6))
        assert third.lines == (("", 9), ("min", 11), ("max_change", 12))
        assert (first.line("max"), first.line("min"), first.line()) == (4, 2, 2)
        assert (third.line("min"), third.line("max_change"), third.line("max")) == (11, 12, 9)
        # inline tables have no header lines to point at
        inline = 'rules = [{metric = "stable_rank", max = 1}]\n'
        (rule,) = load_rules(write(tmp_path, inline)).rules
        assert (rule.lines, rule.line("max")) == ((), None)

    def test_relative_and_absolute_rules(self, tmp_path: Path) -> None:
        text = (
            '[[rules]]\nmetric = "spectral_norm"\nmax = 6\n'
            '[[rules]]\nmetric = "spectral_norm"\nmin_change = -0.1\n'
            '[[rules]]\nmetric = "spectral_norm"\nmax_change = 0.1\n'
        )
        absolute, lower, upper = load_rules(write(tmp_path, text)).rules
        assert (absolute.is_relative, lower.is_relative, upper.is_relative) == (False, True, True)
        assert absolute.change_violation(100.0, 1.0) is None
        assert lower.violation(100.0) is None

    def test_requests_are_distinct_in_first_use_order(self, tmp_path: Path) -> None:
        text = "".join(
            f'[[rules]]\nmetric = "{metric}"\nmax = 1\n{extra}'
            for metric, extra in (
                ("stable_rank", ""),
                ("top_k_ratio", "k = 5\n"),
                ("stable_rank", ""),
                ("top_k_ratio", ""),
                ("top_k_ratio", "k = 5\n"),
            )
        )
        rules = load_rules(write(tmp_path, text))
        assert [r.key for r in rules.requests()] == [
            "stable_rank",
            "top_k_ratio(k=5)",
            "top_k_ratio",
        ]
        assert [r.name for r in rules.rules] == [f"rule-{i}" for i in range(1, 6)]
        assert RuleSet.empty().requests() == ()
        assert (RuleSet.empty().path, RuleSet.empty().sha256) == (None, None)

    def test_sha256_is_of_the_file_bytes(self, tmp_path: Path) -> None:
        text = '[[rules]]\nmetric = "stable_rank"\nmax = 1\n'
        rules = load_rules(write(tmp_path, text))
        assert rules.sha256 == hashlib.sha256(text.encode()).hexdigest()
        assert rules.path == tmp_path / "rules.toml"

    def test_empty_file_has_no_rules(self, tmp_path: Path) -> None:
        assert load_rules(write(tmp_path, "# nothing yet\n")).rules == ()


CHOOSE = (
    "choose from q, k, v, o, qk, ov, q_a, kv_a, k_rope, gate, up, gate_up, down, fc1, fc2, "
    "expert-gate, expert-up, expert-down, shared-gate, shared-up, shared-gate_up, shared-down, "
    "router"
)


class TestMistakesNameFileLineAndKey:
    """Every message, whole: ``file:line: rule N, key 'K': what is wrong``."""

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
                ":4: rule 1, key 'layers': range '3-1' runs backwards; write '1-3'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nheads = "x"\n',
                ":4: rule 1, key 'heads': 'x' is not a non-negative integer or a range 'a-b'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nheads = -1\n',
                ":4: rule 1, key 'heads': index -1 is negative",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmatrices = ["q", "x"]\n',
                f":4: rule 1, key 'matrices': unknown matrix 'x'; {CHOOSE}",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmatrices = [3]\n',
                f":4: rule 1, key 'matrices': unknown matrix 3; {CHOOSE}",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmatrices = []\n',
                ":4: rule 1, key 'matrices': must be a non-empty list such as ['q', 'k'], got []",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmatrices = 3\n',
                ":4: rule 1, key 'matrices': must be a non-empty list such as ['q', 'k'], got 3",
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
                '[[rules]]\nmetric = "stable_rank"\nmax = true\n',
                ":3: rule 1, key 'max': must be a number, got True",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = nan\n',
                ":3: rule 1, key 'max': must be a number, got nan",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nseverity = "error"\n',
                ":4: rule 1, key 'severity': must be 'fail' or 'warn', got 'error'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nsuggest = "prune"\n',
                ":4: rule 1, key 'suggest': must be 'low_rank', 'remove_head' or 'none', "
                "got 'prune'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nscope = "layer"\n',
                ":4: rule 1, key 'scope': must be 'head' or 'matrix', got 'layer'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmin_change = 0.5\nmax_change = 0.1\n',
                ":3: rule 1, key 'min_change': min_change 0.5 is larger than max_change 0.1",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1' + "0" * 400 + "\n",
                ":3: rule 1, key 'max': 1" + "0" * 400 + " is beyond the range of a float",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax_change = 0.1\nwindow = true\n',
                ":4: rule 1, key 'window': must be a whole number of reports, got True",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax_change = 0.1\nwindow = 2.0\n',
                ":4: rule 1, key 'window': must be a whole number of reports, got 2.0",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax_change = 0.1\nwindow = 1\n',
                ":4: rule 1, key 'window': must be between 2 (this report and the one before) "
                "and 1000, got 1",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax_change = 0.1\nwindow = 1001\n',
                ":4: rule 1, key 'window': must be between 2 (this report and the one before) "
                "and 1000, got 1001",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nwindow = 5\n',
                ":4: rule 1, key 'window': bounds a change over reports: give min_change or "
                "max_change",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nstacks = ["encoder", "middle"]\n',
                ":4: rule 1, key 'stacks': unknown stack 'middle'; choose from encoder, decoder, "
                "cross, text, vision",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nstacks = []\n',
                ":4: rule 1, key 'stacks': must be a non-empty list such as ['cross'], got []",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nstacks = 3\n',
                ":4: rule 1, key 'stacks': must be a non-empty list such as ['cross'], got 3",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nname = ""\n',
                ":4: rule 1, key 'name': must be a non-empty string, got ''",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nname = 7\n',
                ":4: rule 1, key 'name': must be a non-empty string, got 7",
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
            ("[[rules]]\nmetric = 3\nmax = 1\n", ":2: rule 1, key 'metric': unknown metric 3"),
            (
                '[[rule]]\nmetric = "stable_rank"\n',
                ":1: unknown top-level key 'rule' (did you mean 'rules'?)",
            ),
            (
                '\ntitle = "mine"\n[[rules]]\nmetric = "stable_rank"\nmax = 1\n',
                ":2: unknown top-level key 'title'",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\n\n[other]\nmetric = 1\n',
                ":5: unknown top-level key 'other'",
            ),
            ("rules = 3\n", ":1: 'rules' must be an array of tables ([[rules]])"),
            ("\nrules = [1, 2]\n", ":2: 'rules' must be an array of tables ([[rules]])"),
            (
                '# a comment\n\n[[rules]]\n  "metric" = "stable_rank"\n  max = 1\n  zzz = 2\n',
                ":6: rule 1, key 'zzz': unknown key",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\n\n[[rules]]\nmetric = "stable_rank"\n'
                "max = 2\n[rules.nested]\nx = 1\n",
                ":5: rule 2, key 'nested': unknown key",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nmax = 2\n',
                ": rules file: TOML syntax error: Cannot overwrite a value (at line 4, column 8)",
            ),
            (
                '[[rules]]\nmetric = "stable_rank"\nmax = 1\nlayer_range = "0-3"\n',
                ":4: rule 1, key 'layer_range': unknown key (did you mean 'layers'?)",
            ),
            # where no line can be named, the file alone: a dotted top-level key, inline rules
            (
                'x.y = 1\n[[rules]]\nmetric = "stable_rank"\nmax = 1\n',
                ": unknown top-level key 'x'",
            ),
            ("rules = [{max = 1}]\n", ": rule 1 has no 'metric' key"),
            (
                'rules = [{metric = "stable_rnk", max = 1}]\n',
                ": rule 1, key 'metric': unknown metric 'stable_rnk' (did you mean 'stable_rank'?)",
            ),
        ],
    )
    def test_message(self, tmp_path: Path, text: str, expected: str) -> None:
        path = write(tmp_path, text)
        with pytest.raises(RulesError) as info:
            load_rules(path)
        assert str(info.value) == f"{path}{expected}"

    def test_toml_syntax_error_names_the_line(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[[rules]]\nmetric = "stable_rank"\nmax = = 1\n')
        with pytest.raises(RulesError, match=r"line 3"):
            load_rules(path)

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "rules.toml"
        path.write_bytes(b'[[rules]]\nname = "caf\xe9"\n')
        with pytest.raises(RulesError) as info:
            load_rules(path)
        assert str(info.value) == (
            f"{path}: rules file is not UTF-8 text (invalid continuation byte at byte 21)"
        )

    def test_a_directory_is_not_a_rules_file(self, tmp_path: Path) -> None:
        with pytest.raises(RulesError) as info:
            load_rules(tmp_path)
        assert str(info.value) == (
            f"{tmp_path}: is a directory, not a regular file; only regular files are read"
        )

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
