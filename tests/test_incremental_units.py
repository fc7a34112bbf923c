"""Unit and property tests of the page-range arithmetic (image/runs.py) and
of the interval helpers of engine/incremental.py."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from linuxcr.engine.incremental import Saved, needed, parse_duration
from linuxcr.image import runs

P = 4096


def _ranges(draw_pages):
    return st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=12).map(
        lambda xs: runs.normalize((a * P, (a + n) * P) for a, n in xs))


def _pages(rs) -> set[int]:
    return {p for s, e in rs for p in range(s // P, e // P)}


@given(_ranges(None), _ranges(None))
@settings(max_examples=300, deadline=None)
def test_subtract_is_set_difference(a, b):
    out = runs.subtract(a, b)
    assert _pages(out) == _pages(a) - _pages(b)
    assert out == sorted(out) and all(s < e for s, e in out)


@given(_ranges(None), _ranges(None), st.integers(1, 5))
@settings(max_examples=300, deadline=None)
def test_intersect_tagged(a, b, tag):
    tb = [(s, e, tag + i) for i, (s, e) in enumerate(b)]
    out = runs.intersect_tagged(a, tb)
    assert _pages((s, e) for s, e, _ in out) == _pages(a) & _pages(b)
    for s, e, t in out:       # each piece carries the tag of the b range holding it
        assert any(bs <= s and e <= be and t == bt for bs, be, bt in tb)


@given(_ranges(None))
def test_normalize_idempotent_and_merge_tagged(a):
    assert runs.normalize(a) == a
    tagged = [(s, e, 0) for s, e in a]
    assert _pages((s, e) for s, e, _ in runs.merge_tagged(tagged)) == _pages(a)


def test_merge_tagged_rejects_overlap_and_joins_same_tag():
    assert runs.merge_tagged([(0, P, 1), (P, 2 * P, 1), (2 * P, 3 * P, 2)]) == \
        [(0, 2 * P, 1), (2 * P, 3 * P, 2)]
    with pytest.raises(ValueError):
        runs.merge_tagged([(0, 2 * P, 1), (P, 3 * P, 1)])


def test_split():
    assert runs.split([(0, 5 * P)], 2 * P) == [(0, 2 * P), (2 * P, 4 * P), (4 * P, 5 * P)]


@pytest.mark.parametrize("text,sec", [("30s", 30), ("10m", 600), ("1h", 3600), ("500ms", 0.5),
                                      ("2.5", 2.5), ("1d", 86400)])
def test_parse_duration(text, sec):
    assert parse_duration(text) == sec


@pytest.mark.parametrize("text", ["", "x", "10q", "-5s", "0", "m"])
def test_parse_duration_bad(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_retention_keeps_chains():
    s = [Saved(f"i{k}", None if k in (0, 3) else f"i{k - 1}", 0, 0, 0, k in (0, 3))
         for k in range(6)]
    assert needed(s, 2) == {"i3", "i4", "i5"}
    assert needed(s, 4) == {"i0", "i1", "i2", "i3", "i4", "i5"}
    assert needed(s, 0) == {f"i{k}" for k in range(6)}
