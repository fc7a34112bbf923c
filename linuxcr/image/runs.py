"""Sets of pages as sorted lists of ranges: the arithmetic of incremental images.

A range is (start, end) in bytes, page aligned, end exclusive; a list of
ranges is sorted and not overlapping.  Tagged ranges (start, end, tag) carry
a value along (the depth of the image holding those pages).  Pure functions,
unit-tested (tests/test_incremental_units.py).
"""
from __future__ import annotations

from typing import Iterable

Range = tuple[int, int]
Tagged = tuple[int, int, int]


def normalize(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with overlapping and touching ranges merged, empty ones dropped."""
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[0] < r[1]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """a minus b (both normalized)."""
    out: list[Range] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        cur = s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def intersect_tagged(a: list[Range], b: list[Tagged]) -> list[Tagged]:
    """The parts of a (normalized) covered by b (sorted, not overlapping),
    each with the tag of the b range covering it."""
    out: list[Tagged] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            lo, hi = max(s, b[k][0]), min(e, b[k][1])
            if lo < hi:
                out.append((lo, hi, b[k][2]))
            k += 1
    return out


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """a and b (both normalized)."""
    return [(s, e) for s, e, _ in intersect_tagged(a, [(s, e, 0) for s, e in b])]


def merge_tagged(runs: Iterable[Tagged]) -> list[Tagged]:
    """Sorted; adjacent ranges with the same tag joined.  Overlaps are an error."""
    out: list[list[int]] = []
    for s, e, t in sorted(runs):
        if out and s < out[-1][1]:
            raise ValueError(f"overlapping ranges at 0x{s:x}")
        if out and s == out[-1][1] and t == out[-1][2]:
            out[-1][1] = e
        else:
            out.append([s, e, t])
    return [(s, e, t) for s, e, t in out]


def total(ranges: Iterable[tuple]) -> int:
    return sum(r[1] - r[0] for r in ranges)


def split(ranges: Iterable[Range], most: int) -> list[Range]:
    """Ranges cut into pieces of at most ``most`` bytes."""
    out = []
    for s, e in ranges:
        while s < e:
            out.append((s, min(e, s + most)))
            s += most
    return out
