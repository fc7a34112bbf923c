"""End to end on real applications (not purpose-written test programs):
each is started detached, checkpointed while it works, restarted, and must
go on correctly by its own account.

- multiprocessing.Pool(4) (start methods fork, spawn, forkserver) computing
  a sum it checks itself: a tree with pipes and POSIX semaphores mapped
  MAP_SHARED from /dev/shm (spawn/forkserver: named files, whose mapping
  in the parent shows glibc's temporary name "(deleted)");
- numpy/scipy with several OpenBLAS threads: the final checksum equals that
  of an uninterrupted run;
- `python3 -m http.server`: the listener serves again after the restart;
- sqlite3 in WAL mode (-wal and -shm mapped MAP_SHARED) in a transaction
  loop: consistent and PRAGMA integrity_check ok after the restart;
- an IPython kernel (skipped without ipykernel and jupyter_client): x = 41
  before, x + 1 == 42 after, from a fresh client on the same connection
  file; also as `lcr run` init (pid namespace init with many threads);
- redis-server (skipped without it): SET, checkpoint --leave-running, kill,
  restart, GET;
- `lcr run` of a many-threaded init: the checkpoint kills and reaps it
  without hanging (regression: freezer.reap waited thread by thread);
- the `lcr check` reason for a TCP socket in CLOSE_WAIT says what to do.

Needs root for the TCP connections the kernel test holds (repair mode).
Every process is killed and reaped by pid at teardown (trees fixture); so
are the keepers lcr leaves holding checkpointed TCP connections.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import helpers
from helpers import lcr, wait_for_line
from rootless_helpers import Trees, checkpoint_tree, descendants, restart_tree, tree_pids, wait_until

pytestmark = pytest.mark.e2e

PY = sys.executable
DONE_TIMEOUT = 180.0     # safety bound for a computation to finish after a restart


def _keepers() -> set[int]:
    """Keeper processes (fdkinds/tcp.py) that came to us (a subreaper)."""
    out = set()
    me = str(os.getpid())
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = helpers.proc_status(int(d))
        if not st or st.get("PPid") != me:
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-c" in argv and any(b"TCP_REPAIR" in a for a in argv):
            out.add(int(d))
    return out


@pytest.fixture(autouse=True)
def no_keepers_left():
    yield
    for p in _keepers():
        helpers.kill_and_reap(p)




def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"python module(s) {', '.join(missing)} not installed "
                    f"(pip install {' '.join(missing)})")


def _need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(trees: Trees, argv, log, env=None, cwd=None) -> int:
    p = helpers.start_detached(argv, log, env=helpers.child_env(env), cwd=cwd)
    return trees.add(p.pid, p)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------
# 1. multiprocessing.Pool

POOL = r'''
import multiprocessing as mp, os, sys, time
def work(n):
    s = 0
    for i in range(n * 20000, (n + 1) * 20000):
        s = (s + i * i) % 1000000007
    time.sleep(0.03)
    return s
if __name__ == "__main__":
    N, method = int(sys.argv[1]), sys.argv[2]
    mp.set_start_method(method)
    print("START pid=%d method=%s" % (os.getpid(), mp.get_start_method()), flush=True)
    total = 0
    with mp.Pool(4) as pool:
        for k, r in enumerate(pool.imap(work, range(N))):
            total = (total + r) % 1000000007
            if k % 20 == 0:
                print("progress", k, flush=True)
    exp = 0
    for n in range(N):
        s = 0
        for i in range(n * 20000, (n + 1) * 20000):
            s = (s + i * i) % 1000000007
        exp = (exp + s) % 1000000007
    print("RESULT", total, "EXPECTED", exp, "OK" if total == exp else "MISMATCH", flush=True)
'''


def _sem_inodes(pid: int) -> set[int]:
    """Inodes of the /dev/shm/sem.* files pid maps."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = line.split(maxsplit=5)
        if len(f) == 6 and f[5].startswith("/dev/shm/sem."):
            out.add(int(f[4]))
    return out


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_pool(method, trees, tmp_path):
    """Before the fix, spawn and forkserver were refused: the workers map
    /dev/shm/sem.mp-* (a tmpfs file) and lcr took every /dev/ path for
    device memory; the parent maps the same inodes under glibc's temporary
    name, unlinked, which must come back as that same file, not a copy."""
    prog = _write(tmp_path, "pool.py", POOL)
    log = tmp_path / "pool.log"
    root = _start(trees, [PY, prog, 400, method], log)
    wait_for_line(log, r"^progress 60\b", pid=root)
    workers = descendants(root)
    assert len(workers) >= 4, f"pool tree: {workers}"
    cp = lcr("check", root, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    checkpoint_tree(root, tmp_path / "img")
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == root
    sems = {p: _sem_inodes(p) for p in tree_pids(new)}
    users = [s for s in sems.values() if s]
    assert all(s <= sems[new] for s in users), f"semaphores not shared with the parent: {sems}"
    m = wait_for_line(log, r"^RESULT ", DONE_TIMEOUT, pid=new)
    assert m.string.rstrip().endswith(" OK"), m.string
    assert re.search(r"^progress (\d+)", helpers.read_log(log), re.M)


# --------------------------------------------------------------------------
# 2. numpy/scipy with OpenBLAS threads

BLAS = r'''
import numpy as np, scipy.linalg, signal, os, sys
rng = np.random.default_rng(1)
A = rng.standard_normal((200, 200))
A = A @ A.T + 200 * np.eye(200)
st = {"i": 0, "acc": 0.0}
def usr1(sig, frm):
    print("PROBE pid=%d iter=%d acc=%.10e" % (os.getpid(), st["i"], st["acc"]), flush=True)
signal.signal(signal.SIGUSR1, usr1)
print("READY pid=%d" % os.getpid(), flush=True)
N = int(sys.argv[1])
x = np.ones(200)
while st["i"] < N:
    M = A @ A
    c = scipy.linalg.cho_factor(A)
    x = scipy.linalg.cho_solve(c, x + 1.0)
    st["acc"] += float(np.trace(M)) * 1e-9 + float(x.sum())
    st["i"] += 1
print("DONE iter=%d acc=%.10e" % (st["i"], st["acc"]), flush=True)
'''
BLAS_ENV = {"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "4"}


def test_numpy_scipy_blas_threads(trees, tmp_path):
    _need("numpy", "scipy")
    prog = _write(tmp_path, "blas.py", BLAS)
    n = 4000
    ref = subprocess.run([PY, prog, str(n)], capture_output=True, text=True, timeout=DONE_TIMEOUT,
                         stdin=subprocess.DEVNULL, env=helpers.child_env(BLAS_ENV))
    want = re.search(r"^DONE .*$", ref.stdout, re.M)
    assert want, f"reference run: {ref.stdout}{ref.stderr}"
    log = tmp_path / "blas.log"
    root = _start(trees, [PY, prog, n], log, env=BLAS_ENV)
    wait_for_line(log, r"^READY", pid=root)
    time.sleep(0.5)
    threads = len(os.listdir(f"/proc/{root}/task"))
    assert threads > 1, "OpenBLAS started no threads"
    before = helpers.probe(root, log, r"^PROBE ")
    checkpoint_tree(root, tmp_path / "img")
    new, _ = restart_tree(tmp_path / "img", trees)
    assert len(os.listdir(f"/proc/{new}/task")) == threads
    after = helpers.probe(new, log, r"^PROBE ")
    it = lambda m: int(re.search(r"iter=(\d+)", m.string).group(1))  # noqa: E731
    assert it(after) >= it(before), (before.string, after.string)
    got = wait_for_line(log, r"^DONE ", DONE_TIMEOUT, pid=new)
    if it(before) >= n:
        pytest.skip("the computation ended before the checkpoint (machine too fast)")
    assert got.string.strip() == want.group(0).strip(), (got.string, want.group(0))


# --------------------------------------------------------------------------
# 3. python3 -m http.server

def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait_get(url: str, pid: int, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url, 5.0)
        except OSError:
            if not helpers.alive(pid) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_http_server(trees, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.txt").write_text("hello-lcr\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/index.txt"
    root = _start(trees, [PY, "-m", "http.server", port, "--bind", "127.0.0.1", "-d", www],
                  tmp_path / "http.log")
    assert _wait_get(url, root) == b"hello-lcr\n"
    checkpoint_tree(root, tmp_path / "img")
    with pytest.raises(OSError):
        _get(url, 2.0)                 # nobody listens while it is checkpointed
    new, _ = restart_tree(tmp_path / "img", trees)
    for _ in range(3):
        assert _get(url) == b"hello-lcr\n"


# --------------------------------------------------------------------------
# 4. sqlite3 in WAL mode

WAL = r'''
import sqlite3, os, signal, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v INTEGER, s TEXT)")
con.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, n INTEGER)")
con.execute("INSERT OR IGNORE INTO meta VALUES('sum', 0)")
st = {"n": 0}
def usr1(s, f):
    total = con.execute("SELECT coalesce(sum(v),0) FROM t").fetchone()[0]
    meta = con.execute("SELECT n FROM meta WHERE k='sum'").fetchone()[0]
    ic = con.execute("PRAGMA integrity_check").fetchone()[0]
    print("PROBE pid=%d n=%d sum=%d meta=%d integrity=%s %s" % (os.getpid(), st["n"], total, meta,
          ic, "OK" if total == meta and ic == "ok" else "MISMATCH"), flush=True)
signal.signal(signal.SIGUSR1, usr1)
print("READY pid=%d" % os.getpid(), flush=True)
i = 0
while True:
    con.execute("BEGIN IMMEDIATE")
    for j in range(20):
        i += 1
        con.execute("INSERT INTO t(v, s) VALUES(?, ?)", (i, "x" * (i % 200)))
        con.execute("UPDATE meta SET n = n + ? WHERE k='sum'", (i,))
        time.sleep(0.001)
    con.execute("COMMIT")
    st["n"] = i
'''


def test_sqlite_wal(trees, tmp_path):
    prog = _write(tmp_path, "wal.py", WAL)
    db = tmp_path / "wal.db"
    log = tmp_path / "wal.log"
    root = _start(trees, [PY, prog, db], log)
    wait_for_line(log, r"^READY", pid=root)
    wait_until(lambda: Path(f"{db}-shm").exists(), 30, "the -shm file")
    time.sleep(1.0)
    maps = Path(f"/proc/{root}/maps").read_text()
    assert f"{db}-shm" in maps, "the -shm file is not mapped"
    before = helpers.probe(root, log, r"^PROBE ")
    assert before.string.rstrip().endswith("OK"), before.string
    checkpoint_tree(root, tmp_path / "img")
    new, _ = restart_tree(tmp_path / "img", trees)
    n0 = int(re.search(r"n=(\d+)", before.string).group(1))
    time.sleep(1.0)
    after = helpers.probe(new, log, r"^PROBE ")
    assert after.string.rstrip().endswith("OK"), after.string
    assert int(re.search(r"n=(\d+)", after.string).group(1)) > n0, (before.string, after.string)
    con = sqlite3.connect(db, timeout=30)       # a second reader, as another program would
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


# --------------------------------------------------------------------------
# 5. an IPython kernel

KEXEC = r'''
import sys
from jupyter_client import BlockingKernelClient
kc = BlockingKernelClient(connection_file=sys.argv[1])
kc.load_connection_file()
kc.start_channels()
kc.wait_for_ready(timeout=60)
for code in sys.argv[2:]:
    msg_id = kc.execute(code)
    out = None
    while True:
        m = kc.get_iopub_msg(timeout=60)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "execute_result":
            out = m["content"]["data"]["text/plain"]
        if m["msg_type"] == "error":
            out = "ERROR " + m["content"]["ename"]
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    print("RESULT", out, flush=True)
kc.stop_channels()
'''


def _kexec(tmp_path: Path, cf: Path, *code: str) -> list[str]:
    prog = _write(tmp_path, "kexec.py", KEXEC)
    cp = subprocess.run([PY, prog, cf, *code], capture_output=True, text=True, timeout=120,
                        stdin=subprocess.DEVNULL, env=_kernel_env(tmp_path))
    got = re.findall(r"^RESULT (.*)$", cp.stdout, re.M)
    assert cp.returncode == 0 and len(got) == len(code), f"client: {cp.stdout}{cp.stderr}"
    return got


def _kernel_env(tmp_path: Path) -> dict:
    return helpers.child_env({"IPYTHONDIR": str(tmp_path / "ipython"),
                              "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")})


@pytest.mark.parametrize("where", ["host", "lcr-run"])
def test_ipython_kernel(where, trees, tmp_path):
    """lcr-run: the kernel is the init of a pid namespace, with a dozen
    threads; before the fix the checkpoint hung after the image was written
    (see test_lcr_run_many_threads)."""
    _need("ipykernel", "jupyter_client")
    _need_root("the kernel holds TCP connections to itself (repair mode)")
    cf = tmp_path / "kernel.json"
    log = tmp_path / "kernel.log"
    argv = [PY, "-m", "ipykernel_launcher", "-f", cf]
    if where == "host":
        root = _start(trees, argv, log, env=_kernel_env(tmp_path))
    else:
        root = trees.add(int(lcr("run", "-o", log, "--", *argv, env=_kernel_env(tmp_path)).stdout))
    wait_until(lambda: cf.exists() and cf.stat().st_size > 0, 60, "the connection file")
    assert _kexec(tmp_path, cf, "x = 41", "x") == ["None", "41"]
    checkpoint_tree(root, tmp_path / "img")
    new, _ = restart_tree(tmp_path / "img", trees)
    assert _kexec(tmp_path, cf, "x + 1") == ["42"]


def test_lcr_run_many_threads(trees, tmp_path):
    """The init of a pid namespace with many threads, killed after the
    dump: the last of its threads to die waits in the kernel for the pids
    of the others to be released, which for traced threads only lcr's wait
    does; lcr waited for the threads one by one (in tid order) and hung
    about half the time.  A few rounds; each must finish."""
    prog = _write(tmp_path, "threads.py", r'''
import threading, time, os
def spin():
    x = 0
    while True:
        x += 1
        if x % 1000 == 0:
            time.sleep(0)
for _ in range(8):
    threading.Thread(target=spin, daemon=True).start()
print("READY", flush=True)
while True:
    time.sleep(1)
''')
    for i in range(4):
        log = tmp_path / f"threads{i}.log"
        root = trees.add(int(lcr("run", "-o", log, "--", PY, prog).stdout))
        wait_for_line(log, r"^READY", pid=root)
        checkpoint_tree(root, tmp_path / f"img{i}",
                        lcr_fn=lambda *a: lcr(*a, timeout=60))   # it hung: fail sooner
    new, _ = restart_tree(tmp_path / "img3", trees)
    helpers.assert_running_untraced(new)
    prog_pid = int(open(f"/proc/{new}/task/{new}/children").read().split()[0])   # under lcr run's init
    assert len(os.listdir(f"/proc/{prog_pid}/task")) == 9


# --------------------------------------------------------------------------
# 6. redis-server

def _redis(port: int, *args: str) -> bytes:
    msg = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(msg)
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2
                                             and not data.startswith(b"$-1")):
            got = s.recv(4096)
            if not got:
                break
            data += got
        return data


def test_redis(trees, tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    port = _free_port()
    log = tmp_path / "redis.log"
    root = _start(trees, [exe, "--port", port, "--bind", "127.0.0.1", "--daemonize", "no",
                          "--save", "", "--appendonly", "no", "--dir", tmp_path], log)

    def up():
        try:
            return _redis(port, "PING") == b"+PONG\r\n"
        except OSError:
            return False
    wait_until(up, 30, "redis to answer PING")
    assert _redis(port, "SET", "k", "hello") == b"+OK\r\n"
    lcr("checkpoint", root, "-o", tmp_path / "img", "--leave-running")
    assert _redis(port, "GET", "k") == b"$5\r\nhello\r\n"      # ran on
    assert _redis(port, "SET", "later", "x") == b"+OK\r\n"     # not in the image
    helpers.kill_and_reap(root)
    new, _ = restart_tree(tmp_path / "img", trees)
    assert new == root
    assert _redis(port, "GET", "k") == b"$5\r\nhello\r\n"
    assert _redis(port, "GET", "later") == b"$-1\r\n"
    assert _redis(port, "SET", "k2", "v2") == b"+OK\r\n"
    assert _redis(port, "DBSIZE") == b":2\r\n"


# --------------------------------------------------------------------------
# refusals

CLOSE_WAIT = r'''
import socket, os, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.close()                   # the peer closes: conn is in CLOSE_WAIT
srv.close()
print("READY pid=%d fd=%d" % (os.getpid(), conn.fileno()), flush=True)
while True:
    time.sleep(1)
'''


def test_close_wait_reason(trees, tmp_path):
    """A forked child keeping a copy of its parent's connection after the
    peer left (a fork-method multiprocessing pool in a Jupyter kernel does
    that): the reason names pid, fd, state, addresses and what to do."""
    prog = _write(tmp_path, "cw.py", CLOSE_WAIT)
    log = tmp_path / "cw.log"
    root = _start(trees, [PY, prog], log)
    fd = int(wait_for_line(log, r"^READY pid=\d+ fd=(\d+)", pid=root).group(1))
    cp = lcr("check", root, check=False)
    assert cp.returncode == helpers.error_exit_code("NotCheckpointable"), cp.stdout + cp.stderr
    line = next((ln for ln in cp.stdout.splitlines() if f"fd {fd}:" in ln), None)
    assert line, cp.stdout
    assert f"pid {root}" in line and "CLOSE_WAIT" in line and "127.0.0.1:" in line, line
    assert "close the fd" in line and "spawn" in line, line


def test_classify_dev_shm_file_and_relinked(tmp_path):
    """The mapping rules behind the pool fix, on our own maps: a file in
    /dev/shm is a file (not device memory); a mapping whose name was
    unlinked but whose inode is linked under another name in the same
    directory is that file; one with no name left stays an unlinked object."""
    import mmap

    from linuxcr.procfs import read_smaps
    from linuxcr.resources.memory import classify
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    tag = f"lcr-test-{os.getpid()}"
    tmp, final, gone = (f"/dev/shm/{tag}.{x}" for x in ("tmp", "final", "gone"))
    maps = []
    try:
        for p in (tmp, gone):
            with open(p, "wb") as f:
                f.write(b"\0" * 4096)
        fds = [os.open(p, os.O_RDWR) for p in (tmp, gone)]
        maps = [mmap.mmap(fd, 4096, mmap.MAP_SHARED) for fd in fds]
        for fd in fds:
            os.close(fd)
        os.link(tmp, final)
        os.unlink(tmp)           # as glibc's sem_open does
        os.unlink(gone)
        got = {}
        for e in read_smaps(os.getpid()):
            if e.map.path.startswith(f"/dev/shm/{tag}."):
                got[e.map.path] = classify(e)
        assert got[tmp].reason is None and got[tmp].vma.kind == "file", got[tmp]
        assert got[tmp].vma.path == final and not got[tmp].vma.pages
        assert got[gone].reason is None and got[gone].vma.kind == "deleted", got[gone]
    finally:
        for m in maps:
            m.close()
        for p in (tmp, final, gone):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
