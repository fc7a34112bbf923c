"""`lcr diff A B` on two checkpoints of one running process (--leave-running),
text and --json (valid against results.SCHEMAS["diff"]), and `lcr show` of
an incremental image saying what each image of its chain holds."""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest

import helpers
from helpers import lcr

jsonschema = pytest.importorskip("jsonschema")

# Opens a file and maps (and touches) 4 MiB on SIGUSR2: what diff must show.
STEPPER = r"""
import mmap, os, signal, sys, time
step = []
def go(*_):
    f = os.open(sys.argv[1], os.O_RDONLY); os.read(f, 5)
    m = mmap.mmap(-1, 4 << 20); m[::4096] = b"x" * (1024)
    step.append((f, m))
    print(f"STEP2 pid={os.getpid()}", flush=True)
signal.signal(signal.SIGUSR2, go)
print(f"READY pid={os.getpid()}", flush=True)
while True:
    signal.pause()
"""


def _valid(data) -> None:
    sys.path.insert(0, str(helpers.REPO))
    from linuxcr.results import SCHEMAS
    jsonschema.validate(data, SCHEMAS["diff"])


def _diff(a, b) -> dict:
    d = json.loads(lcr("diff", a, b, "--json").stdout)
    _valid(d)
    return d


def test_diff_file_opened_and_area_added(procs, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello world\n")
    log = tmp_path / "stepper.log"
    p = procs.start([sys.executable, "-c", STEPPER, str(data)], log)
    helpers.wait_for_line(log, r"READY pid=", pid=p.pid)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    lcr("checkpoint", p.pid, "-o", a, "--leave-running")
    os.kill(p.pid, signal.SIGUSR2)
    helpers.wait_for_line(log, r"STEP2 pid=", pid=p.pid)
    lcr("checkpoint", p.pid, "-o", b, "--leave-running")
    d = _diff(a, b)
    assert d["same_process"] and not d["processes_added"] and not d["processes_removed"]
    (t,) = d["tasks"]
    assert t["pid"] == p.pid
    opened = [f for f in t["files"]["opened"] if f["what"] == str(data)]
    assert opened and opened[0]["pos"] == 5, t["files"]
    big = [v for v in t["areas"]["added"] + t["areas"]["changed"]
           if v.get("pages", v.get("pages_b", 0)) >= 1024]
    assert big, t["areas"]
    assert t["registers_changed"]
    text = lcr("diff", a, b).stdout
    assert f"+ fd {opened[0]['fd']} {data}" in text, text
    # the log (stdout) moved on by the STEP2 line
    assert any(f["fd"] == 1 and f["pos_b"] > f["pos_a"] for f in t["files"]["moved"]), t["files"]
    # an image against itself: nothing changed
    same = _diff(a, a)["tasks"][0]
    assert not any(same["areas"].values()) and not any(same["files"].values())
    assert not same["registers_changed"]


def test_diff_memhog_incremental(bins, procs, tmp_path):
    r = helpers.start_memhog(procs, bins, tmp_path, 16)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    lcr("checkpoint", r.pid, "-o", a, "--leave-running")
    lcr("checkpoint", r.pid, "-o", b, "--leave-running", "--parent", a)
    d = _diff(a, b)
    (t,) = d["tasks"]
    assert t["pid"] == r.pid
    # b stores only what changed since a: fewer pages of its own
    assert t["pages_b"] <= t["pages_a"]
    assert t["threads"] == {"a": 1, "b": 1}
    show = json.loads(lcr("show", b, "--json").stdout)
    by_depth = show["tasks"][0]["pages_by_depth"]
    assert by_depth.get("1", 0) > 0, by_depth         # a contributes pages
    assert sum(v["saved_pages"] for v in show["tasks"][0]["vmas"]) == sum(by_depth.values())
    text = lcr("show", b).stdout
    assert "pages per image of the chain: this image:" in text and "parent 1:" in text, text


def test_diff_refuses_stdin(tmp_path):
    cp = lcr("diff", "-", tmp_path / "x.img", check=False)
    helpers.assert_clean_error(cp, "UsageError", mentions=["standard input"])
