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


# ------------------------------------------------------------------ chains of hand-made images

import os  # noqa: E402
import random  # noqa: E402

from hypothesis import HealthCheck  # noqa: E402

from linuxcr.errors import ImageError  # noqa: E402
from linuxcr.image.chain import Chain, index  # noqa: E402
from linuxcr.image.schema import PageMap, PageRun, ParentRef, RecType, Tree  # noqa: E402
from linuxcr.image.stream import ImageWriter  # noqa: E402
from helpers import damage  # noqa: E402
from test_image import BASE, PID, make_header, make_task  # noqa: E402


def _write(path, *, pages, pagemap=None, parent=None, image_id=b"\x01" * 16):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = ImageWriter(fd, compress=False)
        w.header(make_header(flags=[], image_id=image_id, parent=parent))
        w.record(RecType.TREE, Tree(root=PID))
        w.record(RecType.TASK, make_task())
        for addr, data in pages:
            w.page_run(PID, addr, memoryview(data))
        if pagemap is not None:
            w.record(RecType.PAGEMAP, PageMap(pid=PID, runs=[PageRun(addr=a, npages=n, depth=d)
                                                           for a, n, d in pagemap]))
        w.finish()
        return w.digest
    finally:
        os.close(fd)


def _pair(tmp_path, pagemap=None, child_pages=None):
    rnd = random.Random(3)
    full = [(BASE, rnd.randbytes(4 * P))]
    d = _write(tmp_path / "full.img", pages=full, image_id=b"\x01" * 16)
    ref = ParentRef(id=b"\x01" * 16, digest=d, path="full.img", depth=1)
    new = rnd.randbytes(P)
    _write(tmp_path / "inc.img", pages=child_pages if child_pages is not None else [(BASE + P, new)],
           pagemap=pagemap if pagemap is not None else [(BASE, 1, 1), (BASE + P, 1, 0), (BASE + 2 * P, 2, 1)],
           parent=ref, image_id=b"\x02" * 16)
    return full[0][1], new


def test_chain_reads_pages_from_the_right_image(tmp_path):
    old, new = _pair(tmp_path)
    inc = index(str(tmp_path / "inc.img"))
    chain = Chain.open(inc.header.parent, str(tmp_path / "inc.img"))
    try:
        assert chain.held(PID) == [(BASE, BASE + 4 * P, 1)]
        got = b"".join(bytes(d) for _, d in chain.read(1, PID, BASE + 2 * P, BASE + 4 * P))
        assert got == old[2 * P:]
        with pytest.raises(ImageError, match="2 parents up"):
            list(chain.read(2, PID, BASE, BASE + P))
        with pytest.raises(ImageError, match="lacks pages"):
            list(chain.read(1, PID, BASE, BASE + 9 * P))
    finally:
        chain.close()
        inc.close()
    # a chain of two, seen from a grandchild
    c2 = Chain.from_path(str(tmp_path / "inc.img"))
    try:
        assert c2.held(PID) == [(BASE, BASE + P, 2), (BASE + P, BASE + 2 * P, 1),
                                (BASE + 2 * P, BASE + 4 * P, 2)]
        addrs, hashes = c2.hashes(PID)
        assert len(addrs) == 4 and int(addrs[1]) == BASE + P
    finally:
        c2.close()


def test_child_whose_page_map_disagrees_with_its_pages(tmp_path):
    _pair(tmp_path, pagemap=[(BASE, 2, 1), (BASE + 2 * P, 2, 1)])       # says nothing is stored
    with pytest.raises(ImageError, match="do not match its page map"):
        index(str(tmp_path / "inc.img"))


def test_child_with_depth_beyond_its_chain(tmp_path):
    _pair(tmp_path, pagemap=[(BASE, 1, 3), (BASE + P, 1, 0)])
    with pytest.raises(ImageError, match="beyond its chain"):
        index(str(tmp_path / "inc.img"))


def test_overlapping_page_map(tmp_path):
    _pair(tmp_path, pagemap=[(BASE, 2, 1), (BASE + P, 1, 0)])
    with pytest.raises(ImageError, match="overlapping"):
        index(str(tmp_path / "inc.img"))


def test_parent_replaced_or_missing(tmp_path):
    _pair(tmp_path)
    inc = index(str(tmp_path / "inc.img"))
    ref = inc.header.parent
    inc.close()
    _write(tmp_path / "full.img", pages=[(BASE, bytes(4 * P))], image_id=b"\x01" * 16)
    with pytest.raises(ImageError, match="changed after"):
        Chain.open(ref, str(tmp_path / "inc.img"))
    _write(tmp_path / "full.img", pages=[(BASE, bytes(4 * P))], image_id=b"\x09" * 16)
    with pytest.raises(ImageError, match="not the parent"):
        Chain.open(ref, str(tmp_path / "inc.img"))
    os.unlink(tmp_path / "full.img")
    with pytest.raises(ImageError, match="missing"):
        Chain.open(ref, str(tmp_path / "inc.img"))


@given(st.data())
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_chain_fails_cleanly(tmp_path, data):
    """Any byte flip or cut in a parent or child: indexing and reading the
    chain end in ImageError or in the right bytes, never anything else."""
    old, new = _pair(tmp_path)
    which = data.draw(st.sampled_from(["full.img", "inc.img"]))
    p = tmp_path / which
    damage(p, data)
    try:
        c = Chain.from_path(str(tmp_path / "inc.img"))
    except ImageError:
        return
    try:
        want = bytearray(old)
        want[P:2 * P] = new
        for s, e, d in c.held(PID):
            for addr, chunk in c.read(d, PID, s, e):
                # whatever is read and not refused is the real content
                assert bytes(chunk) == want[addr - BASE: addr - BASE + len(chunk)]
    except ImageError:
        pass
    finally:
        c.close()
