"""snap_pipe -- holds the write end of a pipe on fd 1; closes it on SIGUSR1
and keeps running.  Prints READY pid=P on stderr (the log)."""
import os
import signal
import sys
import time

def close(sig, frame):
    os.close(1)
    print(f"CLOSED pid={os.getpid()}", file=sys.stderr, flush=True)

signal.signal(signal.SIGUSR1, close)
print(f"READY pid={os.getpid()}", file=sys.stderr, flush=True)
while True:
    time.sleep(0.01)
