"""A job for `lcr run --checkpoint-dir` tests: prints "count N" every 50 ms.

    job_count.py [--mib M] [--term-exit CODE] [--hooks]

--mib: hold M MiB of non-zero data (so a checkpoint takes a while) and
       print "sum=S" of it with every count (a restored copy must agree).
--term-exit: on SIGTERM print "got SIGTERM" and exit CODE (a command that
       shuts itself down when lcr passes it the signal).
--hooks: register linuxcr before_checkpoint/after_restore hooks that print
       "hook before N" / "hook restored N".
"""
import argparse
import signal
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--mib", type=int, default=0)
ap.add_argument("--term-exit", type=int)
ap.add_argument("--hooks", action="store_true")
a = ap.parse_args()

data = bytearray()
if a.mib:
    block = bytes((i * 7 + 1) % 251 + 1 for i in range(1 << 20))
    data = bytearray(block * a.mib)
total = sum(data[:: 4096])

if a.term_exit is not None:
    def on_term(*_):
        print("got SIGTERM", flush=True)
        sys.exit(a.term_exit)
    signal.signal(signal.SIGTERM, on_term)

i = 0
if a.hooks:
    import linuxcr
    linuxcr.before_checkpoint(lambda: print(f"hook before {i}", flush=True))
    linuxcr.after_restore(lambda: print(f"hook restored {i}", flush=True))

while True:
    print(f"count {i} sum={total}", flush=True)
    i += 1
    time.sleep(0.05)
