"""probeloop -- the loop the Python test programs of `lcr run` trees end in
(ns_probe.py, netns_server.py): imported from their own directory.

serve(name, check, passed) prints "READY pid=P", then on each SIGUSR1 runs
check(n) (n: 0, 1, ... the rounds so far; it returns the failures) and
prints "PASS <name> pid=P <passed(n)>" or "FAIL <name>: <failures> (pid=P)".
"""
import os
import signal
from typing import Callable


def serve(name: str, check: Callable[[int], list[str]], passed: Callable[[int], str]) -> None:
    probe = [False]

    def on_usr1(sig, frame):
        probe[0] = True

    signal.signal(signal.SIGUSR1, on_usr1)
    print(f"READY pid={os.getpid()}", flush=True)
    rounds = 0
    while True:
        signal.pause()
        if probe[0]:
            probe[0] = False
            f = check(rounds)
            if f:
                print(f"FAIL {name}: {'; '.join(f)} (pid={os.getpid()})", flush=True)
            else:
                print(f"PASS {name} pid={os.getpid()} {passed(rounds)}", flush=True)
            rounds += 1
