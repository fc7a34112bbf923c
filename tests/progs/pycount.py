#!/usr/bin/env python3
"""pycount -- a plain CPython test program (no C extensions).

    pycount.py APPENDFILE

State: an integer counter; a dict of 1000 entries and a list of 1000
entries updated every iteration (a weighted checksum of the dict is kept up
to date incrementally); a generator suspended in the middle of its
iteration; an instance of a class; a text file opened for appending to
which a line is written every 20 iterations.

Prints "READY pid=P"; on SIGUSR1 it checks everything and prints
"PASS pycount pid=P count=N" or "FAIL pycount: <details> (pid=P)".
"""
import itertools
import os
import signal
import sys
import time

NAME = "pycount"
N = 1000
M = (1 << 61) - 1


class Box:
    def __init__(self):
        self.name = "box"
        self.items = {"a": [1, 2, 3], "b": (4, 5), "c": frozenset({6, 7})}
        self.touched = 0


def squares():
    for i in itertools.count():
        yield i * i


def weighted(d):
    return sum((k + 1) * v for k, v in d.items()) % M


def main():
    path = sys.argv[1]
    out = open(path, "a", buffering=1)
    written = os.fstat(out.fileno()).st_size
    last_line = None

    d = {k: (k * 7919) % M for k in range(N)}
    lst = [i - N for i in range(N)]     # lst[i] == i (mod N), <= counter
    checksum = weighted(d)
    gen = squares()
    gen_next = 0                      # next index the generator yields
    box = Box()
    probe = {"req": False}
    signal.signal(signal.SIGUSR1, lambda s, f: probe.__setitem__("req", True))

    counter = 0
    last_probe = -1
    print("READY pid=%d" % os.getpid(), flush=True)
    while True:
        counter += 1
        k = counter % N
        old = d[k]
        new = (old * 31 + counter) % M
        d[k] = new
        checksum = (checksum + (k + 1) * (new - old)) % M
        lst[k] = counter
        sq = next(gen)
        if sq != gen_next * gen_next:
            box.touched = -1
        gen_next += 1
        box.touched += 1
        if counter % 20 == 0:
            last_line = "line %d pid %d\n" % (counter, os.getpid())
            out.write(last_line)
            written += len(last_line)
        if probe["req"]:
            probe["req"] = False
            fails = []
            if counter <= last_probe:
                fails.append("counter %d after %d" % (counter, last_probe))
            last_probe = counter
            if weighted(d) != checksum:
                fails.append("dict checksum differs")
            if len(d) != N or sorted(d) != list(range(N)):
                fails.append("dict keys changed")
            bad = [i for i, v in enumerate(lst) if v % N != i or v > counter]
            if bad or lst[k] != counter:
                fails.append("list entries wrong at %s" % bad[:5])
            if box.touched != gen_next or box.name != "box" or box.items != {
                    "a": [1, 2, 3], "b": (4, 5), "c": frozenset({6, 7})}:
                fails.append("object/generator state wrong (%d, %d)"
                             % (box.touched, gen_next))
            size = os.fstat(out.fileno()).st_size
            if out.tell() != written or size != written:
                fails.append("append file: tell %d size %d, want %d"
                             % (out.tell(), size, written))
            if last_line is not None:
                with open(path, "rb") as f:
                    f.seek(max(0, written - len(last_line)))
                    tail = f.read().decode()
                if tail != last_line:
                    fails.append("last line of the file is %r, want %r" % (tail, last_line))
            if fails:
                print("FAIL %s: %s (pid=%d)" % (NAME, "; ".join(fails), os.getpid()), flush=True)
            else:
                print("PASS %s pid=%d count=%d" % (NAME, os.getpid(), counter), flush=True)
        time.sleep(0.001)


if __name__ == "__main__":
    main()
