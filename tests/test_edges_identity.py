"""A restart never "succeeds" into a process that cannot run: the program or
a library it maps was rebuilt at the same path between checkpoint and
restart -> one-line refusal naming the file (resources/exe_identity.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import assert_clean_error, have_gcc, lcr, reap, restart_image, wait_for_line

pytestmark = pytest.mark.e2e

PROG = r"""
#include <stdio.h>
#include <unistd.h>
extern int step(void);
int main(void) {
    for (long i = 0;; i++) {
        printf("tick %ld %d\n", i, step());
        fflush(stdout);
        usleep(20000);
    }
}
"""
LIB = "int step(void) { return %d; }\n"
SOLO = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (long i = 0;; i++) { printf("tick %ld %d\n", i, VERSION); fflush(stdout); usleep(20000); }
}
"""


def _gcc(*args) -> None:
    subprocess.run(["gcc", "-O1", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def gcc():
    if not have_gcc():
        pytest.skip("gcc not found")


def _start(procs, argv, log: Path, env=None):
    p = procs.start(argv, log, env={**os.environ, **(env or {})})
    wait_for_line(log, r"^tick 3 ", pid=p.pid)
    return p.pid


def test_rebuilt_executable_is_refused(gcc, procs, tmp_path):
    src = tmp_path / "solo.c"
    src.write_text(SOLO)
    exe = tmp_path / "solo"
    _gcc("-DVERSION=1", src, "-o", exe)
    shutil.copy2(exe, tmp_path / "solo.orig")          # content and mtime
    log = tmp_path / "log"
    pid = _start(procs, [exe], log)
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    _gcc("-DVERSION=2", src, "-o", exe)                 # same path, other code
    cp = lcr("restart", img, check=False)
    line = assert_clean_error(cp, "RestoreError", mentions=[str(exe), "changed since the checkpoint"])
    assert "build-id" in line, line
    # `--trust files` is no way around it
    cp = lcr("restart", img, "--trust", "all", check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(exe)])
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _exe_is(p, exe)]
    # the original back (content and mtime): the restart goes through and runs on
    os.replace(tmp_path / "solo.orig", exe)
    n = log.stat().st_size
    new = restart_image(img, procs)
    m = wait_for_line(log, r"^tick (\d+) 1$", start=n, pid=new)
    assert int(m.group(1)) > 3


def _exe_is(pid: str, exe: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(exe)
    except OSError:
        return False


def test_touched_executable_is_refused(gcc, procs, tmp_path):
    """Same bytes, new mtime: refused too (the check is size, mtime, content)."""
    src = tmp_path / "solo.c"
    src.write_text(SOLO)
    exe = tmp_path / "solo"
    _gcc("-DVERSION=1", src, "-o", exe)
    pid = _start(procs, [exe], tmp_path / "log")
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    st = exe.stat()
    os.utime(exe, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(exe), "modification time"])


def test_changed_shared_library_is_refused(gcc, procs, tmp_path):
    (tmp_path / "lib.c").write_text(LIB % 7)
    (tmp_path / "prog.c").write_text(PROG)
    lib = tmp_path / "libstep.so"
    _gcc("-shared", "-fPIC", tmp_path / "lib.c", "-o", lib)
    _gcc(tmp_path / "prog.c", f"-L{tmp_path}", "-lstep", "-o", tmp_path / "prog")
    log = tmp_path / "log"
    pid = _start(procs, [tmp_path / "prog"], log, env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert "tick 3 7" in log.read_text()
    img = tmp_path / "img"
    lcr("checkpoint", pid, "-o", img)
    reap(pid)
    # a new library at the same path (as `make install` would leave it)
    (tmp_path / "lib.c").write_text(LIB % 8 + "int pad(int x) { return x * 3 + 1; }\n")
    _gcc("-shared", "-fPIC", tmp_path / "lib.c", "-o", tmp_path / "new.so")
    os.replace(tmp_path / "new.so", lib)
    cp = lcr("restart", img, check=False)
    assert_clean_error(cp, "RestoreError", mentions=[str(lib), "changed since the checkpoint"])
