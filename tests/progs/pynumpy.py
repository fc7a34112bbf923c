#!/usr/bin/env python3
"""pynumpy -- a numpy test program.

    pynumpy.py [MiB]        (size of the data array, default 32)

BLAS is limited to one thread (OPENBLAS_NUM_THREADS=1 etc., set before numpy
is imported) so the process has a single thread.

State: a MiB-sized uint64 array of pseudo-random words (THP-backed, as numpy
asks for huge pages) whose weighted checksum  sum w[i]*(2i+1) mod 2^64  is
kept up to date while random words are rewritten; two 128x128 float64
matrices A, B whose product, computed once at start, is recomputed and
compared bit for bit; a power-iteration vector v (v = A v / |A v|) updated
every iteration.

Prints "READY pid=P threads=T"; on SIGUSR1 "PASS pynumpy pid=P count=N" or
"FAIL pynumpy: <details> (pid=P)".
"""
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

NAME = "pynumpy"
M64 = (1 << 64) - 1


def threads():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def checksum(w):
    s = np.uint64(0)
    step = 1 << 20
    with np.errstate(over="ignore"):
        for a in range(0, w.size, step):
            b = min(a + step, w.size)
            wt = np.arange(a, b, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
            s = s + np.sum(w[a:b] * wt, dtype=np.uint64)
    return int(s) & M64


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    rng = np.random.default_rng(20261123)
    w = rng.integers(1, M64, size=(mib << 20) // 8, dtype=np.uint64, endpoint=True)
    expected = checksum(w)
    a = rng.standard_normal((128, 128))
    b = rng.standard_normal((128, 128))
    c0 = a @ b
    v = np.ones(128) / np.sqrt(128)
    probe = {"req": False}
    signal.signal(signal.SIGUSR1, lambda s, f: probe.__setitem__("req", True))

    print("READY pid=%d threads=%d numpy=%s" % (os.getpid(), threads(), np.__version__),
          flush=True)
    counter = 0
    last_probe = -1
    pick = np.random.default_rng(7)
    while True:
        idx = pick.integers(0, w.size, size=4)
        new = pick.integers(1, M64, size=4, dtype=np.uint64, endpoint=True)
        for i, nv in zip(idx.tolist(), new.tolist()):
            expected = (expected + (nv - int(w[i])) * (2 * i + 1)) & M64
            w[i] = nv
        c = a @ b
        v = a @ v
        v /= np.linalg.norm(v)
        counter += 1
        if probe["req"]:
            probe["req"] = False
            fails = []
            if counter <= last_probe:
                fails.append("counter %d after %d" % (counter, last_probe))
            last_probe = counter
            act = checksum(w)
            if act != expected:
                fails.append("checksum %016x, want %016x" % (act, expected))
            if not np.array_equal(a @ b, c0) or not np.array_equal(c, c0):
                fails.append("A @ B differs from the product computed at start")
            if not np.all(np.isfinite(v)) or abs(np.linalg.norm(v) - 1.0) > 1e-9:
                fails.append("power-iteration vector broken")
            if threads() != 1:
                fails.append("%d threads" % threads())
            if fails:
                print("FAIL %s: %s (pid=%d)" % (NAME, "; ".join(fails), os.getpid()), flush=True)
            else:
                print("PASS %s pid=%d count=%d" % (NAME, os.getpid(), counter), flush=True)
        time.sleep(0.001)


if __name__ == "__main__":
    main()
