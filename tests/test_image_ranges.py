"""Out-of-range values behind valid checksums: the semantic checks, not the framing.

Real images of small programs (tests/progs: signals, POSIX timers, threads,
locks, timerfd, epoll ...) are decoded record by record; hypothesis sets one
to three metadata values to boundary numbers (0, -1, 2^31, 2^32-1, 2^63,
2^64-2, 2^64-1, TASK_SIZE ...), strings to long / NUL-holding / non-UTF-8
text, lists to empty or oversized, then re-encodes the image as a hostile
writer would: right per-record checksums and a right trailer digest.  Each
mutant is then read as `lcr show` reads it and restarted through the API
(linuxcr.restart, in this process).  Whatever the mutant:

- only an LcrError may come out, never another exception;
- an image `lcr show` refuses for a HEADER/TREE/TASK field is refused by
  restart with the very same message before any task is made (spawn is
  watched), and no process is left behind;
- a restart that succeeds gave a process, which is killed.

LCR_FUZZ_EXAMPLES=5000 for a deeper run (the default keeps the suite short).
A table of hand-made cases (the issue's forged rlimit among them) goes
through the real CLI: exit code 6, one line naming record, field and value.
"""
from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
import linuxcr
from linuxcr import api
from linuxcr.engine import spawn
from linuxcr.errors import ImageError, LcrError
from linuxcr.image.schema import ARCH, RecType
from linuxcr.sys.syscalls import TASK_SIZE
from test_image_fuzz import parse, reframe, split_records

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(platform.machine() != ARCH, reason="images are x86_64 only")]

EXAMPLES = int(os.environ.get("LCR_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
META = (RecType.HEADER, RecType.TREE, RecType.TASK)   # read before any task exists

# (name, argv builder (bins, dir)); the ones that cannot run here are skipped
PROGRAMS = [
    ("signals", lambda b, d: [b["signals"]]),
    ("posix_timer", lambda b, d: [b["posix_timer"]]),
    ("threads", lambda b, d: [b["threads"]]),
    ("flock", lambda b, d: [b["flock"], d]),
    ("fd_timerfd", lambda b, d: [b["fd_timerfd"]]),
    ("fd_epoll", lambda b, d: [b["fd_epoll"]]),
    ("fd_signalfd", lambda b, d: [b["fd_signalfd"]]),
    ("fd_memfd", lambda b, d: [b["fd_memfd"]]),
]


class Images(dict):
    def __repr__(self) -> str:      # hypothesis prints fixtures it fails with
        return f"<{len(self)} real images>"


@pytest.fixture(scope="module")
def images(bins) -> Images:
    d = Path(tempfile.mkdtemp(prefix="lcr-ranges-"))
    out = Images()
    try:
        for name, argv in PROGRAMS:
            work = d / name
            work.mkdir()
            log = work / "log"
            p = helpers.start_detached(argv(bins, work), log, cwd=work)
            try:
                helpers.wait_for_line(log, r"READY|SKIP", pid=p.pid)
                if "SKIP" in helpers.read_log(log):
                    continue
                img = work / "img"
                try:
                    linuxcr.checkpoint(p.pid, img, leave_running=True)
                except LcrError:
                    continue          # not checkpointable here: the others are enough
                out[name] = img.read_bytes()
            finally:
                helpers.kill_and_reap(p.pid)
                for child in helpers.live_children(p.pid):
                    helpers.kill_and_reap(child)
        if not out:
            pytest.skip("no test program could be checkpointed here")
        yield out
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ the mutations

INTS = [0, 1, -1, 2, 9, 19, 64, 65, 4095, 4096, 4097, (1 << 22), (1 << 22) + 1, (1 << 31) - 1,
        1 << 31, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, TASK_SIZE - 4096, TASK_SIZE,
        TASK_SIZE + 4096, 1 << 47, (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1,
        -(1 << 31), -(1 << 63)]
MARK = "\x01BADUTF8\x01"            # replaced by bytes that are not UTF-8 after encoding
STRS = ["", "/", "rel", "x" * 4097, "/a\0b", "a\0", "\0", MARK, "/" + "d/" * 2100, "é" * 200]


def _leaves(obj, prefix=()):
    """(path, value) of every value inside decoded msgpack, containers included."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield prefix + (k,), v
        yield from _leaves(v, prefix + (k,))


def _new_value(old, data: st.DataObject):
    if isinstance(old, bool):
        return data.draw(st.sampled_from([not old, 2, None]), label="bool")
    if isinstance(old, int):
        v = data.draw(st.one_of(
            st.sampled_from(INTS),
            st.sampled_from([old - 1, old + 1, old - 4096, old + 4096, old ^ (1 << 63), -old]),
            st.integers(-(1 << 63), (1 << 64) - 1)), label="int")
        return min(max(v, -(1 << 63)), (1 << 64) - 1)      # what msgpack can hold
    if isinstance(old, str):
        return data.draw(st.sampled_from(STRS), label="str")
    if isinstance(old, bytes):
        return data.draw(st.sampled_from([b"", bytes(1), old[:-1], old + b"\0", bytes(1 << 16),
                                          b"\xff" * len(old)]), label="bytes")
    if isinstance(old, list):
        how = data.draw(st.sampled_from(["empty", "drop", "dup", "grow", "huge"]), label="list")
        if how == "empty" or not old:
            return []
        if how == "drop":
            return old[1:]
        if how == "dup":
            return old + old[:1]
        return old * (65 if how == "grow" else max(1, 5000 // len(old)))
    return data.draw(st.sampled_from([0, -1, "", None, []]), label="other")


def mutate(meta: bytes, data: st.DataObject) -> bytes:
    obj = msgspec.msgpack.decode(meta)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        leaves = [(p, v) for p, v in _leaves(obj)]
        if not leaves:
            break
        # numbers first: they are what the kernel is picky about
        nums = [x for x in leaves if isinstance(x[1], int) and not isinstance(x[1], bool)]
        pool = nums if nums and data.draw(st.integers(0, 3), label="num?") else leaves
        path, old = data.draw(st.sampled_from(pool), label="path")
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = _new_value(old, data)
    raw = msgspec.msgpack.encode(obj)
    enc = MARK.encode()
    return raw.replace(enc, b"\xff\xfe" + enc[2:])    # same length: the msgpack stays framed


# ------------------------------------------------------------------ running a mutant


class Watch:
    """Counts blank tasks made (spawn is where every restored task starts)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spawned = 0
        for fn in ("in_host", "in_new_namespaces"):
            real = getattr(spawn, fn)

            def counted(*a, _real=real, **kw):
                self.spawned += 1
                return _real(*a, **kw)
            monkeypatch.setattr(spawn, fn, counted)


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    return Watch(monkeypatch)


def _no_new_children(before: set[int]) -> None:
    """Every child lcr made is gone (dead and reaped).  A task killed by
    lcr (PTRACE_O_EXITKILL, SIGKILL) may still be exiting: a short grace."""
    for pid in helpers.live_children() - before:
        for _ in range(300):
            if helpers.proc_state(pid) in ("Z", "X", None):
                break
            time.sleep(0.01)
        state = helpers.proc_state(pid)
        if state not in ("Z", "X", None):
            kill_tree(pid)
            raise AssertionError(f"restart left pid {pid} ({state}) behind")
        helpers.reap(pid)
    helpers.reap_zombie_children()


def kill_tree(pid: int) -> None:
    """pid and its descendants (a restored tree), children first found."""
    kids = helpers.live_children(pid)
    helpers.kill_and_reap(pid)
    for k in kids:
        kill_tree(k)


LOG = os.environ.get("LCR_FUZZ_LOG")     # a file: one line per mutant that lcr made tasks for


def _log(line: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(line + "\n")


def run_mutant(img: bytes, path: Path, watch: Watch, any_pid: bool) -> str:
    """show, then restart; returns what happened ("refused", "failed", "restored")."""
    path.write_bytes(img)
    shown: LcrError | None = None
    try:
        api.show(str(path))
    except LcrError as e:
        shown = e
    assert shown is None or str(shown).isprintable(), str(shown)
    before = helpers.live_children()
    watch.spawned = 0
    pid = None
    try:
        pid = linuxcr.restart(str(path), any_pid=any_pid)
    except LcrError as e:
        msg = str(e)
        assert msg.isprintable(), msg
        if isinstance(shown, ImageError) and not watch.spawned:
            assert msg == str(shown), (msg, str(shown))
        _no_new_children(before)
        if watch.spawned:
            _log(f"failed: {type(e).__name__}: {msg}")
        return "refused" if not watch.spawned else "failed"
    finally:
        if pid is not None:
            kill_tree(pid)
    assert shown is None, f"lcr show refused what restart took: {shown}"
    _no_new_children(before)
    return "restored"


STATS: dict[str, int] = {}


def _diff(a: bytes, b: bytes) -> str:
    """The changed values, for the log."""
    try:
        x, y = msgspec.msgpack.decode(a), msgspec.msgpack.decode(b)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return "(not UTF-8)"
    old = dict(_leaves(x))
    return "; ".join(f"{'.'.join(map(str, p))}={str(v)[:60]}" for p, v in _leaves(y)
                     if not isinstance(v, (dict, list)) and old.get(p, object()) != v)[:300]


@FUZZ
@given(data=st.data())
def test_out_of_range_metadata(images: Images, watch: Watch, tmp_path_factory, data) -> None:
    name = data.draw(st.sampled_from(sorted(images)), label="program")
    recs = [parse(r) for r in split_records(images[name])]
    kinds = data.draw(st.sampled_from([META, META, META, (RecType.PAGES, RecType.PAGEMAP)]),
                      label="records")
    at = [i for i, r in enumerate(recs) if r[0] in kinds] or [1]
    i = data.draw(st.sampled_from(at), label="record")
    rtype, meta, body = recs[i]
    recs[i] = (rtype, mutate(meta, data), body)
    _log(f"-- {name} {RecType(rtype).name}: {_diff(meta, recs[i][1])}")
    path = tmp_path_factory.getbasetemp() / "mutant.img"
    what = run_mutant(reframe(recs), path, watch, any_pid=data.draw(st.booleans(), label="any"))
    if rtype in META and what == "failed":
        STATS["failed after spawn"] = STATS.get("failed after spawn", 0) + 1
    STATS[what] = STATS.get(what, 0) + 1


def test_zz_report_fuzz_counts() -> None:
    """(prints what the fuzzing above did; -s to see it)"""
    print(f"\nout-of-range fuzzing: {STATS}", file=sys.stderr)


# ------------------------------------------------------------------ hand-made cases, CLI


def _set(path: list, value):
    def edit(obj: dict) -> None:
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


CASES = [
    # (id, record type, edit of the decoded record, words the message must hold)
    ("rlimit-2^64-2", RecType.TASK, _set(["rlimits", 0, "hard"], (1 << 64) - 2),
     "rlimits[0].hard = 18446744073709551614"),
    ("rlimit-soft-above-hard", RecType.TASK,
     lambda t: t["rlimits"][7].update(soft=t["rlimits"][7]["hard"] + 1), "above the hard limit"),
    ("nofile-infinity", RecType.TASK, _set(["rlimits", 7, "hard"], (1 << 64) - 1),
     "rlimits[7].hard"),
    ("uid-minus-one", RecType.TASK, _set(["creds", "uid", 1], (1 << 32) - 1), "creds.uid"),
    ("group-minus-one", RecType.TASK, _set(["creds", "groups"], [(1 << 32) - 1]), "creds.groups"),
    ("unknown-capability", RecType.TASK, _set(["caps", 1], 1 << 63), "caps"),
    ("sigkill-handler", RecType.TASK, _set(["sigactions", 0, "sig"], 9), "sigactions[0].sig = 9"),
    ("umask", RecType.TASK, _set(["umask"], 0o1000), "umask"),
    ("personality", RecType.TASK, _set(["personality"], 0xFFFFFFFF), "personality"),
    ("pgid-huge", RecType.TASK, _set(["pgid"], 1 << 40), "pgid"),
    ("vma-kernel", RecType.TASK, _set(["vmas", 0, "end"], TASK_SIZE + 4096), "vmas[0].end"),
    ("vma-unaligned", RecType.TASK, _set(["vmas", 0, "start"], 0x400001), "vmas[0].start"),
    ("mm-order", RecType.TASK, _set(["mm", "end_code"], 0x1000), "mm.end_code"),
    ("cwd-nul", RecType.TASK, _set(["cwd"], "/tmp\0x"), "NUL"),
    ("cwd-relative", RecType.TASK, _set(["cwd"], "tmp"), "not an absolute path"),
    ("regs-cs", RecType.TASK, lambda t: t.update(regs=t["regs"][:17 * 8] + bytes(8)
                                                  + t["regs"][18 * 8:]), "regs"),
    ("itimer-s64", RecType.TASK, _set(["itimers", 0, 0], 1 << 63), "itimers"),
    ("robust-len", RecType.TASK, _set(["robust_list", 1], 7), "robust_list"),
    ("fd-pos", RecType.TREE, _set(["files", 0, "pos"], -5), "files[0].pos = -5"),
    ("header-image-id", RecType.HEADER, _set(["image_id"], b"\1\2"), "image_id"),
]


@pytest.mark.parametrize("rtype,edit,words", [pytest.param(r, e, w, id=i) for i, r, e, w in CASES])
def test_cli_refuses_out_of_range(images: Images, tmp_path: Path, rtype, edit, words) -> None:
    img = images.get("signals") or next(iter(images.values()))
    recs = [parse(r) for r in split_records(img)]
    i = next(k for k, r in enumerate(recs) if r[0] == rtype)
    obj = msgspec.msgpack.decode(recs[i][1])
    edit(obj)
    recs[i] = (rtype, msgspec.msgpack.encode(obj), b"")
    path = tmp_path / "forged.img"
    path.write_bytes(reframe(recs))
    env = {k: v for k, v in os.environ.items() if k not in ("LCR_DEBUG", "LCR_VERBOSE")}
    before = helpers.live_children()
    for cmd in (["show"], ["restart"]):
        cp = subprocess.run([sys.executable, "-m", "linuxcr", *cmd, str(path)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
        assert cp.returncode == ImageError.exit_code, (cmd, cp.stderr)
        lines = cp.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
        assert "is corrupt" in lines[0] and words in lines[0], lines[0]
        assert f"{rtype.name} record" in lines[0], lines[0]
    _no_new_children(before)
