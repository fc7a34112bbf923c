"""snap_txn -- linuxcr.transaction() about the process itself.

    snap_txn.py FILE

Holds a list and a file offset; inside a transaction it changes both, opens
a new file, then rolls back.  Prints one line:
    PASS snap_txn pid=P ...   or   FAIL snap_txn: <details> (pid=P)
"""
import os
import sys

from linuxcr import api
from linuxcr.agent import RolledBack

pid = os.getpid()
path = sys.argv[1]
state = {"items": [1, 2, 3], "entered": 0}
fd = os.open(path, os.O_RDONLY)
os.read(fd, 10)
fails = []
EXTRA = 77                      # an fd the transaction opens
try:
    with api.transaction() as t:
        state["entered"] += 1
        if state["entered"] > 1:
            fails.append("the body ran twice")
        state["items"].append(4)
        os.read(fd, 20)
        os.dup2(os.open("/dev/null", os.O_RDONLY), EXTRA)
        t.rollback()
        fails.append("rollback returned")
except RolledBack as e:
    note = str(e)
else:
    fails.append("no RolledBack")
    note = ""
if state["items"] != [1, 2, 3]:
    fails.append(f"items {state['items']}")
if state["entered"] != 0:
    fails.append(f"entered {state['entered']}")
pos = os.lseek(fd, 0, os.SEEK_CUR)
if pos != 10:
    fails.append(f"offset {pos}")
try:
    os.fstat(EXTRA)
    fails.append(f"fd {EXTRA} opened in the transaction is still open")
except OSError:
    pass
open_fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
# a transaction that ends normally keeps its changes
with api.transaction() as t2:
    state["items"].append(5)
if state["items"] != [1, 2, 3, 5]:
    fails.append(f"commit lost: {state['items']}")
if fails:
    print(f"FAIL snap_txn: {'; '.join(fails)} (pid={pid})", flush=True)
else:
    print(f"PASS snap_txn pid={pid} note={note!r} fds={open_fds}", flush=True)
