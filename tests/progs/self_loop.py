"""A training-like loop that checkpoints itself every N steps (linuxcr.checkpoint_self).

    self_loop.py DIR N TOTAL [--die-after K] [--no-ckpt]

Prints "checkpointed S" / "restored S" at each checkpoint, "before S" /
"after S" from its hooks, and "done TOTAL <sha256>" at the end: a digest of
every step, the same for an interrupted-and-restored run as for an
uninterrupted one.  --die-after K: SIGKILL itself right after the K-th
checkpoint (a preemption).  --no-ckpt: the reference run.
"""
import hashlib
import os
import signal
import sys

import linuxcr

d, n, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
die_after = int(sys.argv[sys.argv.index("--die-after") + 1]) if "--die-after" in sys.argv else 0
ckpt = "--no-ckpt" not in sys.argv
h = hashlib.sha256()
state = [1]          # some memory that evolves
step = 0
taken = 0
linuxcr.before_checkpoint(lambda: print(f"before {step}", flush=True))
linuxcr.after_restore(lambda: print(f"after {step}", flush=True))
while step < total:
    state.append((state[-1] * 6364136223846793005 + step) % (1 << 64))
    if len(state) > 1000:
        del state[:500]
    h.update(state[-1].to_bytes(8, "little"))
    step += 1
    if ckpt and step % n == 0:
        r = linuxcr.checkpoint_self(d)
        print(f"{r.state} {step}", flush=True)
        if r.restored:
            die_after = 0          # the copy runs to the end
        if r.checkpointed:
            taken += 1
            if taken == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
print(f"done {step} {h.hexdigest()}", flush=True)
