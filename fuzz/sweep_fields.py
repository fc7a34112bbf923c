"""Deterministic sweep: every metadata field of real images set to every boundary value.

    python fuzz/sweep_fields.py IMAGE... [--restart] [--max N]

For each HEADER/TREE/TASK record of each image, each field (the first item
of each list stands for the others) is set to each value of
tests/test_image_ranges.py's INTS (numbers) or STRS (strings), the image
re-encoded with right checksums and trailer, then read as `lcr show` does
and, with --restart, restarted through the API (as root, run it where a
restored process may appear: it is killed at once).  Anything but an
LcrError is printed as a CRASH line with the field and value; a restored
process left behind as LEFT.  The exit status is the number of problems.

Make images with ``lcr checkpoint PID -o x.img --leave-running`` of
tests/progs programs (signals, posix_timer, threads, flock, fd_*).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import msgspec  # noqa: E402

from linuxcr import api  # noqa: E402
from linuxcr.errors import LcrError  # noqa: E402
from linuxcr.image.schema import RecType  # noqa: E402
from test_image_fuzz import parse, reframe, split_records  # noqa: E402
from test_image_ranges import INTS, MARK, STRS  # noqa: E402

META = (RecType.HEADER, RecType.TREE, RecType.TASK)


def fields(obj, prefix=()):
    """Paths to the leaves, lists collapsed to their first item."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:1]) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from fields(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def mutants(img: bytes):
    recs = [parse(r) for r in split_records(img)]
    for i, (rtype, meta, body) in enumerate(recs):
        if rtype not in META:
            continue
        for path, old in list(fields(msgspec.msgpack.decode(meta))):
            values = INTS if isinstance(old, int) and not isinstance(old, bool) else \
                STRS if isinstance(old, str) else []
            for v in values:
                obj = msgspec.msgpack.decode(meta)
                at = obj
                for k in path[:-1]:
                    at = at[k]
                at[path[-1]] = v
                raw = msgspec.msgpack.encode(obj).replace(MARK.encode(), b"\xff\xfe" + MARK.encode()[2:])
                out = list(recs)
                out[i] = (rtype, raw, body)
                yield f"{RecType(rtype).name}.{'.'.join(map(str, path))}={v!r:.40}", reframe(out)


def children() -> set[int]:
    me, out = str(os.getpid()), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fl = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fl[1] == me and fl[0] not in "ZX":
                out.add(int(d))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+")
    ap.add_argument("--restart", action="store_true")
    ap.add_argument("--max", type=int, default=0)
    a = ap.parse_args()
    import ctypes    # restored trees' orphans come to us, to be killed
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)     # PR_SET_CHILD_SUBREAPER
    problems = n = 0
    counts: dict[str, int] = {}
    path = Path(tempfile.mkdtemp(prefix="lcr-sweep-")) / "mutant.img"
    for image in a.images:
        for what, data in mutants(Path(image).read_bytes()):
            n += 1
            if a.max and n > a.max:
                break
            path.write_bytes(data)
            steps = [("show", lambda: api.show(str(path)))]
            if a.restart:
                steps.append(("restart", lambda: api.restart(str(path), any_pid=True)))
            for step, fn in steps:
                before = children()
                try:
                    pid = fn()
                except LcrError as e:
                    counts[f"{step} refused"] = counts.get(f"{step} refused", 0) + 1
                    if not str(e).isprintable():
                        problems += 1
                        print(f"MESSAGE {step} {what}: {str(e)!r}", flush=True)
                    if step == "show":
                        break          # restart reads the same way: refused too
                except Exception:
                    problems += 1
                    print(f"CRASH {step} {what}: {traceback.format_exc(limit=-3)}", flush=True)
                else:
                    counts[f"{step} ok"] = counts.get(f"{step} ok", 0) + 1
                    if step == "restart":
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                for left in children() - before:
                    problems += 1
                    print(f"LEFT {step} {what}: pid {left}", flush=True)
                    os.kill(left, signal.SIGKILL)
                    os.waitpid(left, 0)
    print(f"{n} mutants: {counts}; {problems} problems")
    return min(problems, 100)


if __name__ == "__main__":
    sys.exit(main())
