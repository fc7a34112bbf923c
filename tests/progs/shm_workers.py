"""Shared anonymous memory written by workers that have exited (issue 17).

    shm_workers.py MIB WORKERS [--holes] [--sparse]

The parent maps MIB MiB MAP_SHARED|MAP_ANONYMOUS, forks WORKERS workers;
worker w writes a pattern naming (w, page) into every 3rd page of its
slice (--sparse: only the first page of it), exits; the parent reaps them and never touches the area itself
(its page tables map none of those pages) before it prints READY.  On
SIGUSR1 it checks every written page (and with --holes that every other
page is zero) and prints ``PASS shm_workers pid=P pages=N`` or FAIL.
"""
import mmap
import os
import signal
import sys

PAGE = mmap.PAGESIZE


def pattern(w: int, i: int) -> bytes:
    unit = b"%02d:%08d|" % (w, i)
    return (unit * (PAGE // len(unit) + 1))[:PAGE]


def written(size: int, workers: int, sparse: bool = False):
    """(worker, page index) of every page a worker writes."""
    per = size // PAGE // workers
    for w in range(workers):
        for i in range(w * per, w * per + 1 if sparse else (w + 1) * per, 3):
            yield w, i


def main() -> None:
    mib, workers = int(sys.argv[1]), int(sys.argv[2])
    holes, sparse = "--holes" in sys.argv, "--sparse" in sys.argv
    size = mib << 20
    area = mmap.mmap(-1, size)            # MAP_SHARED | MAP_ANONYMOUS
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            for ww, i in written(size, workers, sparse):
                if ww == w:
                    area[i * PAGE:(i + 1) * PAGE] = pattern(w, i)
            os._exit(0)
        os.waitpid(pid, 0)
    got = {}

    def check(_sig, _frm) -> None:
        bad, n = [], 0
        want = dict(((i, w) for w, i in written(size, workers, sparse)))
        for i, w in want.items():
            n += 1
            if area[i * PAGE:(i + 1) * PAGE] != pattern(w, i):
                bad.append(i)
        if holes:
            zero = bytes(PAGE)
            for i in range(size // PAGE):
                if i not in want and area[i * PAGE:(i + 1) * PAGE] != zero:
                    bad.append(i)
        if bad:
            print(f"FAIL shm_workers pid={os.getpid()} bad={len(bad)} first={bad[0]}", flush=True)
        else:
            print(f"PASS shm_workers pid={os.getpid()} pages={n}", flush=True)
        got["n"] = got.get("n", 0) + 1

    signal.signal(signal.SIGUSR1, check)
    print(f"READY pid={os.getpid()} area=0x{mmap_addr(area):x}", flush=True)
    while True:
        signal.pause()


def mmap_addr(area: mmap.mmap) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(area))


if __name__ == "__main__":
    main()
