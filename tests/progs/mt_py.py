#!/usr/bin/env python3
"""mt_py -- a multi-threaded CPython program: threading, queue.Queue, Lock.

    mt_py.py

A producer thread puts numbered items (1, 2, 3, ...) into a bounded
queue.Queue(maxsize=16); 3 worker threads take them and, under one
threading.Lock, add each item to a shared total, count it in their own
slot, and check the items come out in order (one queue, one producer: each
item is the previous one + 1, whichever worker takes it).  The producer
sleeps 0.5 ms between items, so workers block in Queue.get() most of the
time.

On SIGUSR1 (Python runs handlers in the main thread) the main thread checks,
under the lock: all 5 threads alive (main, producer, 3 workers), no order
error, total == n * (n + 1) / 2 for the n items taken, the per-worker
counts add up to n, produced - n == items still queued, and that every
worker and the producer made progress since the last probe (waits up to
5 s).  Prints "READY pid=P", then "PASS mt_py pid=P items=N" or
"FAIL mt_py: <details> (pid=P)".
"""
import os
import queue
import signal
import threading
import time

NAME = "mt_py"
NWORKERS = 3


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.q = queue.Queue(maxsize=16)
        self.produced = 0          # written by the producer only
        self.taken = 0             # under lock
        self.last = 0              # under lock
        self.total = 0             # under lock
        self.per_worker = [0] * NWORKERS   # under lock
        self.errors = []           # under lock
        self.progress = {}         # thread name -> count


def producer(s):
    name = threading.current_thread().name
    n = 0
    while True:
        n += 1
        s.q.put(n)
        s.produced = n
        s.progress[name] = s.progress.get(name, 0) + 1
        time.sleep(0.0005)


def worker(s, i):
    name = threading.current_thread().name
    while True:
        item = s.q.get()
        with s.lock:
            if item != s.last + 1 and len(s.errors) < 5:
                s.errors.append("worker %d took %d after %d" % (i, item, s.last))
            s.last = item
            s.taken += 1
            s.total += item
            s.per_worker[i] += 1
        s.progress[name] = s.progress.get(name, 0) + 1
        s.q.task_done()


def verify(s, last_progress):
    fails = []
    names = ["producer"] + ["worker-%d" % i for i in range(NWORKERS)]
    live = {t.name for t in threading.enumerate() if t.is_alive()}
    missing = [n for n in names if n not in live]
    if missing:
        fails.append("threads not alive: %s" % missing)
    if threading.active_count() != 1 + len(names):
        fails.append("%d threads, want %d" % (threading.active_count(), 1 + len(names)))
    for n in names:
        deadline = time.monotonic() + 5
        while s.progress.get(n, 0) <= last_progress.get(n, 0) and time.monotonic() < deadline:
            time.sleep(0.001)
        if s.progress.get(n, 0) <= last_progress.get(n, 0):
            fails.append("%s made no progress" % n)
        last_progress[n] = s.progress.get(n, 0)
    with s.lock:
        # the producer may be between q.put() and s.produced = n: hold the
        # queue's own mutex too, and allow that one item
        with s.q.mutex:
            queued = len(s.q.queue)
            produced = s.produced
        n = s.taken
        if s.errors:
            fails.append("order errors: %s" % s.errors)
        if s.total != n * (n + 1) // 2:
            fails.append("total %d for %d items, want %d" % (s.total, n, n * (n + 1) // 2))
        if sum(s.per_worker) != n:
            fails.append("workers counted %s, %d items taken" % (s.per_worker, n))
        if s.last != n:
            fails.append("last item %d, %d taken" % (s.last, n))
        if produced - n - queued not in (0, -1):
            fails.append("produced %d, taken %d, queued %d" % (produced, n, queued))
    return fails, n


def main():
    s = State()
    probe = threading.Event()
    signal.signal(signal.SIGUSR1, lambda sig, frame: probe.set())
    threads = [threading.Thread(target=producer, args=(s,), name="producer", daemon=True)]
    threads += [threading.Thread(target=worker, args=(s, i), name="worker-%d" % i, daemon=True)
                for i in range(NWORKERS)]
    for t in threads:
        t.start()
    while any(s.progress.get(t.name, 0) == 0 for t in threads):
        time.sleep(0.001)
    print("READY pid=%d" % os.getpid(), flush=True)
    last_progress = {}
    while True:
        if probe.is_set():
            probe.clear()
            fails, n = verify(s, last_progress)
            if fails:
                print("FAIL %s: %s (pid=%d)" % (NAME, "; ".join(fails), os.getpid()), flush=True)
            else:
                print("PASS %s pid=%d items=%d" % (NAME, os.getpid(), n), flush=True)
        time.sleep(0.002)


if __name__ == "__main__":
    main()
