"""Copy-on-write sharing across a restored tree (tests/progs/cow_workers.c).

A parent fills 64 MiB (90% of its area) and forks 4 workers; each worker
rewrites its own 1% of the pages, the rest stays shared with the parent;
then the parent rewrites 1% of its own and fills the last 10% (which the
workers never saw).  After checkpoint and restart:

- every process's checksum of the whole area is what it was (the workers'
  own pages, the parent's later pages not seen by the workers, zeros where
  a worker never had a page);
- the tree's total Pss_Anon is within 5% of what it was (the pages shared
  before are shared again; stored once in the image, with the parent);
- the same under `lcr run` (a pid namespace), and for an incremental image whose base shares
  pages (the increment stores what its base left to the parent);
- a restart that fails between a parent's fill and its child's fork (lcr
  killed, or an error) leaves no process behind.

Every process is killed and reaped by pid at teardown (``trees``).
"""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

import helpers
from helpers import assert_pass, lcr, pass_field, wait_for_line
from rootless_helpers import (Trees, assert_tree_running_untraced, checkpoint_tree, children,
                              restart_tree, tree_pids)

pytestmark = pytest.mark.e2e

MIB = 64
WORKERS = 4
SLACK = 0.05          # Pss_Anon after restart within 5% of before




def _start(bins, trees: Trees, tmp: Path) -> tuple[int, list[int], Path]:
    log = tmp / "cow.log"
    p = helpers.start_detached([bins["cow_workers"], MIB, WORKERS], log)
    trees.add(p.pid, p)
    m = wait_for_line(log, r"^READY pid=(\d+) workers=([\d,]+)", helpers.READY_TIMEOUT, pid=p.pid)
    return p.pid, [int(x) for x in m.group(2).split(",")], log


def pss_anon(root: int) -> int:
    """Sum of Pss_Anon (KiB) of the whole tree (/proc/PID/smaps_rollup)."""
    total = 0
    for p in tree_pids(root):
        text = Path(f"/proc/{p}/smaps_rollup").read_text()
        total += int(re.search(r"^Pss_Anon:\s+(\d+) kB", text, re.M).group(1))
    return total


def sums(root: int, workers: list[int], log: Path) -> dict[int, int]:
    """Each process's checksum of its whole area (each checks every word too)."""
    out = {root: pass_field(assert_pass(root, log, "cow_parent"), "sum")}
    for w in workers:
        out[w] = pass_field(assert_pass(w, log, "cow_worker"), "sum")
    return out


def _show(img: Path) -> dict:
    return json.loads(lcr("show", "--json", img).stdout)


def test_shared_pages_come_back_shared(bins, trees, tmp_path):
    root, workers, log = _start(bins, trees, tmp_path)
    before = sums(root, workers, log)
    pss_before = pss_anon(root)
    checkpoint_tree(root, tmp_path / "img")
    s = _show(tmp_path / "img")
    area = MIB * 256
    for t in s["tasks"][1:]:
        # a worker stores its own 1% (and its stack, libc data...), shares the rest
        assert t["pages_shared_with_parent"] > area * 0.85, t["pages_shared_with_parent"]
        assert t["pages"] < area * 0.05, t["pages"]
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == root and children(root) == sorted(workers)
    assert_tree_running_untraced(root)
    pss_after = pss_anon(root)
    assert sums(root, workers, log) == before
    assert abs(pss_after - pss_before) <= SLACK * pss_before, \
        f"Pss_Anon of the tree was {pss_before} KiB, is {pss_after} KiB after restart"
    # and once more: a restored tree shares as the original did
    checkpoint_tree(root, tmp_path / "img2")
    new, _ = restart_tree(tmp_path / "img2", trees)
    assert sums(root, workers, log) == before
    assert abs(pss_anon(root) - pss_before) <= SLACK * pss_before


def test_lcr_run_tree(bins, trees, tmp_path):
    """Under `lcr run` (its init in front, a pid namespace of its own)."""
    log = tmp_path / "cow.log"
    root = int(lcr("run", "-o", log, "-C", tmp_path, "--", bins["cow_workers"], MIB,
                   WORKERS).stdout)
    trees.add(root)
    wait_for_line(log, r"^READY pid=", helpers.READY_TIMEOUT, pid=root)
    (server,) = children(root)
    workers = children(server)
    before = sums(server, workers, log)
    pss_before = pss_anon(root)
    checkpoint_tree(root, tmp_path / "img")
    new, _ = restart_tree(tmp_path / "img", trees)
    (server,) = children(new)
    workers = children(server)
    assert len(workers) == WORKERS
    # host pids are new (a new pid namespace): the same checksums, by process
    assert sorted(sums(server, workers, log).values()) == sorted(before.values())
    assert abs(pss_anon(new) - pss_before) <= SLACK * pss_before


def test_incremental_on_a_shared_base(bins, trees, tmp_path):
    """The base stores a worker's shared pages with the parent only: the
    increment must store them for the worker itself."""
    root, workers, log = _start(bins, trees, tmp_path)
    before = sums(root, workers, log)
    lcr("checkpoint", root, "-o", tmp_path / "base", "--leave-running")
    assert_tree_running_untraced(root)
    checkpoint_tree(root, tmp_path / "inc", "--parent", tmp_path / "base")
    new, _ = restart_tree(tmp_path / "inc", trees)
    assert new == root
    assert sums(root, workers, log) == before


@pytest.mark.parametrize("action", ["kill", "raise"])
def test_failure_between_fill_and_fork_leaves_nothing(action, bins, trees, tmp_path):
    root, workers, log = _start(bins, trees, tmp_path)
    before = sums(root, workers, log)
    checkpoint_tree(root, tmp_path / "img")
    kids_before = helpers.live_children()
    env = helpers.child_env({"LCR_FAULT": f"restore.cow_fork:{action}@2"})  # one worker made
    cp = lcr("restart", tmp_path / "img", check=False, env=env)
    if action == "kill":
        assert cp.returncode == -signal.SIGKILL, f"the fault did not fire: {cp.returncode} {cp.stderr}"
    else:
        helpers.assert_clean_error(cp, "LcrError", mentions=["fault injected", "restore.cow_fork"],
                                   empty_stdout=True)
    for p in [root] + workers:
        helpers.reap(p)        # dies with lcr (EXITKILL), or killed by it; reaped as our orphan
    assert not helpers.pids_with_exe(bins["cow_workers"]), "a process of the tree is left"
    left = helpers.live_children() - kids_before
    assert not left, f"processes left behind: {left}"
    new, _ = restart_tree(tmp_path / "img", trees)      # nothing in the way
    assert sums(new, workers, log) == before


# --------------------------------------------------------------------------
# the pieces, without processes

def _entry(pfn: int, present: bool = True, file: bool = False) -> int:
    from linuxcr.procfs.pagemap import PM_FILE, PM_PRESENT
    return (PM_PRESENT if present else 0) | (PM_FILE if file else 0) | pfn


def test_same_frames_finds_only_the_same_anonymous_page():
    import struct
    from linuxcr.procfs.pagemap import same_frames
    parent = [_entry(10), _entry(11), _entry(12), _entry(0), _entry(14, file=True), _entry(15),
              _entry(16, present=False)]
    child = [_entry(10), _entry(99), _entry(12), _entry(0), _entry(14, file=True), _entry(15),
             _entry(16)]
    pack = lambda xs: struct.pack(f"<{len(xs)}Q", *xs)   # noqa: E731
    # page 1 was copied, page 3 has no PFN (not root), page 4 is the file's, page 6 absent in the parent
    assert same_frames(pack(parent), pack(child), 0x10000) == [(0x10000, 1), (0x12000, 1),
                                                              (0x15000, 1)]


def test_inherited_areas_must_be_the_parents():
    from linuxcr.errors import ImageError
    from linuxcr.image.schema import Vma
    from linuxcr.resources import memory
    heap = Vma(start=0x100000, end=0x200000, prot=3, shared=False, kind="anon", pages=True)
    other = Vma(start=0x300000, end=0x400000, prot=3, shared=False, kind="anon", pages=True)
    assert memory.inherited_areas([heap, other], [heap], [(0x100000, 0x101000)], "img") \
        == [(0x100000, 0x200000)]
    for cow in ([(0x300000, 0x301000)],            # an area the parent lacks
                [(0x1ff000, 0x201000)],            # across the area's end
                [(0x500000, 0x501000)]):           # outside every area
        with pytest.raises(ImageError, match="marked shared with the parent"):
            memory.inherited_areas([heap, other], [heap], cow, "img")
    shared = Vma(start=0x100000, end=0x200000, prot=3, shared=True, kind="anon", pages=True)
    with pytest.raises(ImageError):            # MAP_SHARED is not copy-on-write
        memory.inherited_areas([shared], [shared], [(0x100000, 0x101000)], "img")
    prot = Vma(start=0x100000, end=0x200000, prot=1, shared=False, kind="anon", pages=True)
    with pytest.raises(ImageError):            # mprotect'ed in the child since
        memory.inherited_areas([prot], [heap], [(0x100000, 0x101000)], "img")
