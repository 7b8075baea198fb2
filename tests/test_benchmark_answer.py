"""guardrl.toy.benchmark_answer: changes per run and the paired test against the null control, on hand-made
evaluation rows with hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from guardrl.toy.benchmark_answer import metric_table, paired_test, run_changes


def _rows(variant: str, seed: int, start: float, end: float, se: float = 0.03) -> list[dict]:
    common = {"variant": variant, "seed": seed, "clip_mode": "matched", "split": "heldout", "sampler": "sde"}
    return [
        {**common, "iteration": 0, "check_counts": start, "check_counts_se": se},
        {**common, "iteration": 32, "check_counts": (start + end) / 2, "check_counts_se": se},
        {**common, "iteration": 64, "check_counts": end, "check_counts_se": se},
    ]


def test_paired_test_on_hand_worked_differences():
    # d = 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t_0.975(df 2) = 4.302653; t = 2 sqrt(3) = 3.4641, and for
    # df = 2 the two-sided p has the closed form 1 - t / sqrt(t^2 + 2) = 1 - 3.4641 / 3.7417 = 0.07418.
    mean, low, high, p = paired_test([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert low == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert high == pytest.approx(2.0 + 4.302653 / math.sqrt(3), abs=1e-5)
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), abs=1e-5)
    one = paired_test([0.5])
    assert one[0] == 0.5 and all(math.isnan(x) for x in one[1:])


def test_changes_are_final_minus_iteration_zero_with_combined_se():
    rows = _rows("flow_grpo", 0, 0.60, 0.45) + _rows("null_control", 0, 0.60, 0.58)
    changes = run_changes(rows, "check_counts", "matched", "heldout", "sde")
    assert changes[("flow_grpo", 0)][0] == pytest.approx(-0.15)
    assert changes[("null_control", 0)][0] == pytest.approx(-0.02)
    assert changes[("flow_grpo", 0)][1] == pytest.approx(0.03 * math.sqrt(2))


def test_the_table_reports_the_paired_difference_against_the_null():
    rows = []
    for seed, (variant_end, null_end) in enumerate([(0.45, 0.58), (0.50, 0.57), (0.40, 0.59)]):
        rows += _rows("flow_grpo", seed, 0.60, variant_end) + _rows("null_control", seed, 0.60, null_end)
    lines = metric_table(rows, "check_counts", "matched", "heldout", "sde")
    flow = next(line for line in lines if line.startswith("| flow_grpo"))
    # changes -0.15, -0.10, -0.20 (mean -0.150, se 0.05/sqrt(3) = 0.029); null -0.02, -0.03, -0.01;
    # paired differences -0.13, -0.07, -0.19: mean -0.130, sd 0.06, se 0.03464, CI -0.130 -+ 4.3027 * 0.03464
    assert "| -0.150 ± 0.029 |" in flow
    assert "-0.130 [-0.279, +0.019]" in flow
    # t = -0.13 / 0.03464 = -3.753; df 2: p = 1 - 3.753 / sqrt(3.753^2 + 2) = 0.0642
    assert flow.rstrip(" |").endswith("0.064")
