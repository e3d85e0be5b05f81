"""The blocking rule on its own: heaviest first until the rest fits, for calls and for traffic."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from gateway.usage import choose_blocked, parse_usage


@pytest.mark.parametrize(("usage", "already", "calls", "traffic", "expected"), [
    ({1: (30, 0), 2: (5, 0)}, set(), 20, 0, [1]),
    ({1: (10, 0), 2: (9, 0), 3: (8, 0)}, set(), 10, 0, [1, 2]),
    ({1: (10, 0), 2: (9, 0)}, set(), 19, 0, []),
    ({1: (1, 900), 2: (50, 10)}, set(), 0, 500, [1]),
    ({1: (40, 10), 2: (1, 900)}, set(), 30, 500, [1, 2]),
    ({1: (30, 0), 2: (25, 0)}, {1}, 20, 0, [2]),
    ({1: (30, 0), 2: (5, 0)}, {1}, 20, 0, []),
    ({1: (30, 0)}, set(), 0, 0, []),
    ({2: (10, 0), 1: (10, 0)}, set(), 15, 0, [1]),  # ties: lower id first, deterministic on every instance
])
def test_choose_blocked(usage: dict[int, tuple[int, int]], already: set[int], calls: int, traffic: int,
                        expected: list[int]) -> None:
    assert [token for token, _ in choose_blocked(usage, already, calls, traffic)] == expected


def test_reason_names_the_limit() -> None:
    [(_, reason)] = choose_blocked({1: (5, 2000)}, set(), 0, 1000)
    assert reason == "its account is over the limit of 1000 bytes of traffic"


def test_parse_usage() -> None:
    assert parse_usage({b"c:1": b"3", b"b:1": b"100", b"c:2": b"1"}) == {1: (3, 100), 2: (1, 0)}


@given(usage=st.dictionaries(st.integers(1, 50), st.tuples(st.integers(0, 1000), st.integers(0, 10 ** 6)), max_size=20),
       calls=st.integers(0, 5000), traffic=st.integers(0, 10 ** 7))
def test_what_is_left_fits_and_no_lighter_token_is_blocked_needlessly(usage: dict[int, tuple[int, int]], calls: int,
                                                                      traffic: int) -> None:
    blocked = {token for token, _ in choose_blocked(usage, set(), calls, traffic)}
    left = [counts for token, counts in usage.items() if token not in blocked]
    if calls:
        assert sum(c for c, _ in left) <= calls
    if traffic:
        assert sum(b for _, b in left) <= traffic
    if not calls and not traffic:
        assert not blocked
