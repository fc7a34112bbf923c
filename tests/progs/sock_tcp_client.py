"""sock_tcp_client -- a client of sock_tcp_echo that is NOT checkpointed: it
keeps one connection open and keeps sending numbered messages of varied
sizes, several in flight at once, and checks that every reply comes back
intact and in order.

    python sock_tcp_client.py HOST PORT

Prints "READY pid=P", then "OK n=N" every 20 replies; on SIGUSR1
"PASS sock_tcp_client pid=P n=N"; on any error (reset, end of stream,
wrong bytes) "FAIL sock_tcp_client pid=P: ..." and exits 1.
"""
import collections
import os
import random
import signal
import socket
import sys
import time

WINDOW = 8            # messages in flight


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    me = os.getpid()
    probe = []
    signal.signal(signal.SIGUSR1, lambda *a: probe.append(1))
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rnd = random.Random(1234)
    pending = collections.deque()
    buf = b""
    sent = done = 0
    print(f"READY pid={me}", flush=True)
    try:
        while True:
            if probe:
                probe.clear()
                print(f"PASS sock_tcp_client pid={me} n={done}", flush=True)
            while len(pending) < WINDOW:
                msg = b"m%08d:" % sent + bytes(rnd.randrange(97, 123) for _ in range(rnd.randrange(1, 3000))) + b"\n"
                s.sendall(msg)
                pending.append(msg)
                sent += 1
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"the server closed the connection after {done} replies")
            buf += chunk
            while pending and len(buf) >= len(pending[0]):
                want = pending.popleft()
                got, buf = buf[:len(want)], buf[len(want):]
                if got != want:
                    raise RuntimeError(f"reply {done} differs: got {got[:40]!r}, want {want[:40]!r}")
                done += 1
                if done % 20 == 0:
                    print(f"OK n={done}", flush=True)
            time.sleep(0.002)
    except Exception as e:
        print(f"FAIL sock_tcp_client pid={me}: {type(e).__name__}: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
