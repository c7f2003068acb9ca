"""The schedule against REFERENCE.md §3.1-3.3, table-driven."""

import warnings

import pytest

from rifle.core.schedule import (
    RifleScheduleWarning,
    check_step_budget,
    default_guard,
    make_schedule,
    raw_points,
    steps_after,
)


@pytest.mark.parametrize(
    "total,k,expected",
    [
        (40, 1, [20]),
        (40, 2, [13, 26]),
        (40, 3, [10, 20, 30]),
        (40, 0, []),
        (12, 1, [6]),
        (12, 2, [4, 8]),
        (10, 3, [2, 5, 7]),
        (7, 6, [1, 2, 3, 4, 5, 6]),
        (9000, 2, [3000, 6000]),
    ],
)
def test_points_follow_floor_rule(total, k, expected):
    assert raw_points(total, k) == expected
    assert raw_points(total, k) == [i * total // (k + 1) for i in range(1, k + 1)]


@pytest.mark.parametrize("total,guard", [(40, 5), (8, 1), (1, 1), (9, 2), (100, 13)])
def test_default_guard(total, guard):
    assert default_guard(total) == guard


def test_never_after_last_epoch_and_epoch_count_not_rounded():
    s = make_schedule(41, 3)
    assert s.points == (10, 20, 30)
    assert all(p < s.total for p in s.points)
    assert s.total == 41


def test_guard_drops_late_points_with_warning():
    # E=10, K=3 -> 2, 5, 7; guard 4 drops 7 (only 3 epochs after it)
    with pytest.warns(RifleScheduleWarning, match=r"\[7\]"):
        s = make_schedule(10, 3, guard=4)
    assert s.points == (2, 5) and s.dropped == (7,)


def test_default_guard_keeps_paper_schedule_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_schedule(40, 3).points == (10, 20, 30)


def test_guard_dropping_everything_is_an_error():
    with pytest.raises(ValueError, match="drops every"):
        make_schedule(10, 1, guard=6)  # point 5, 5 epochs after < 6


def test_invalid_k():
    with pytest.raises(ValueError, match=">= 0"):
        raw_points(40, -1)
    with pytest.raises(ValueError, match="non-empty periods"):
        raw_points(4, 4)
    with pytest.raises(TypeError):
        raw_points(40, 1.5)


def test_periods_and_step_budget():
    s = make_schedule(12, 2)
    assert s.periods() == [(0, 4), (4, 8), (8, 12)]
    assert steps_after(s, 10) == [40, 40]
    with pytest.warns(RifleScheduleWarning, match="min_steps_after=100"):
        assert check_step_budget(s, 10) == [4, 8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_step_budget(s, 30) == []  # 120 steps after each re-init
