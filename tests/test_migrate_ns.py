"""Migration keeps an `lcr run` tree's own namespaces as `lcr restart`
does: the destination's tree gets a uts (its hostname), ipc and network
namespace of its own again, also when the final image is incremental
(the skeleton's blanks are made in them).  As restart, the destination
refuses a tree whose mapped files changed (FileIdentity).

The tree is started and migrated from one shell in namespace A: each `ip
netns exec` makes a mount namespace of its own, and a tree in another
mount namespace than the migrating lcr's is refused (its mounts)."""
from __future__ import annotations

import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import READY_TIMEOUT, assert_pass, wait_for_line
from test_migrate import (LCR_MIG, PORT, TOKEN, Receiver, _env, _migrate, _restored,  # noqa: F401
                          needs_net, net)
from test_run_ns import PROBE

pytestmark = pytest.mark.e2e


def _ns(pid, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


@needs_net
def test_migrated_tree_keeps_its_namespaces(net, trees, procs, tmp_path):  # noqa: F811
    log, pidfile = tmp_path / "ns.log", tmp_path / "root.pid"
    py = shlex.quote(sys.executable)
    script = (f"{py} -m linuxcr run --hostname box-1 --ipc --net -o {log} -- {py} {PROBE} box-1 "
              f"> {pidfile} || exit 9; "
              f"until grep -q '^READY pid=2$' {log}; do sleep 0.05; done; "
              f"{shlex.join(map(str, LCR_MIG))} migrate $(cat {pidfile}) "
              f"--to {net.addr_b}:{PORT} --token {TOKEN}")
    recv = Receiver(net, procs, tmp_path)
    cp = subprocess.run(net.exec_a(["sh", "-c", script]), capture_output=True, text=True,
                        timeout=240, env=_env(verbose=False), stdin=subprocess.DEVNULL)
    if pidfile.exists() and pidfile.read_text().strip():
        trees.add(int(pidfile.read_text()))
    if cp.returncode != 0:
        recv.p.kill()
    assert cp.returncode == 0, cp.stderr
    new = trees.add(_restored(recv, procs))
    assert not re.search("full image", cp.stdout + cp.stderr), cp.stdout   # the skeleton's path
    for kind in ("uts", "ipc", "net"):
        assert _ns(new, kind) != _ns("self", kind), f"migrated into lcr's {kind} namespace"
    assert_pass(new, log, "ns_probe")


MAPPER = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
static volatile sig_atomic_t probe;
static void on_usr1(int s) { (void)s; probe = 1; }
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    const char *m = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, fd, 0);
    signal(SIGUSR1, on_usr1);
    printf("READY pid=%d first=%c\n", getpid(), m[0]);
    fflush(stdout);
    for (;;) {
        if (probe) { probe = 0; printf("SECOND %c pid=%d\n", m[4096], getpid()); fflush(stdout); }
        usleep(1000);
    }
}
"""


class _BoundReceiver(Receiver):
    """`lcr receive` in a mount namespace where ``over`` is bind-mounted on
    ``path``: the destination machine's file at that path is another one."""

    def __init__(self, net, procs, tmp: Path, path: Path, over: Path) -> None:
        self.out, self.err = tmp / "recv.out", tmp / "recv.err"
        recv = shlex.join(map(str, [*LCR_MIG, "receive", "--listen", f"{net.addr_b}:{PORT}",
                                    "--token", TOKEN, "--timeout", "120s"]))
        argv = net.exec_b(["sh", "-c", f"mount --bind {over} {path} && exec {recv}"])
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                      env=_env(), close_fds=True, start_new_session=True)
        procs.add(self.p.pid)
        wait_for_line(self.err, r"listening on", pid=self.p.pid)


@needs_net
def test_migration_refused_when_a_mapped_file_differs(net, procs, tmp_path):  # noqa: F811
    """As restart: the destination refuses a tree whose mapped file is
    another one there (its pages not in the image would come from it);
    the source runs on."""
    if not shutil.which("gcc"):
        pytest.skip("gcc not found")
    src, exe, data, other = (tmp_path / n for n in ("mapper.c", "mapper", "data", "other"))
    src.write_text(MAPPER)
    subprocess.run(["gcc", "-O1", "-o", exe, src], check=True, capture_output=True)
    data.write_bytes(b"a" * 4096 + b"b" * 4096)
    other.write_bytes(b"A" * 4096 + b"B" * 4096)
    log = tmp_path / "mapper.log"
    p = procs.start([exe, data], log)
    wait_for_line(log, r"^READY pid=\d+ first=a", READY_TIMEOUT, pid=p.pid)
    recv = _BoundReceiver(net, procs, tmp_path, data, other)
    cp = _migrate(net, p.pid)
    if cp.returncode == 0:
        new = _restored(recv, procs)
        start = os.path.getsize(log)
        os.kill(new, signal.SIGUSR1)
        m = wait_for_line(log, r"^SECOND (.)", READY_TIMEOUT, start=start, pid=new)
        pytest.fail(f"migrated, and the process reads {m.group(1)!r} where it had 'b'")
    assert re.search(rf"{data} changed since the checkpoint", cp.stderr), cp.stderr
    recv.wait()
    start = os.path.getsize(log)
    os.kill(p.pid, signal.SIGUSR1)
    wait_for_line(log, r"^SECOND b", READY_TIMEOUT, start=start, pid=p.pid)    # runs on
