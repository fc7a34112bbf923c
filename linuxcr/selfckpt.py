"""A program checkpoints itself, and hooks around checkpoints (CRaC's model).

    r = linuxcr.checkpoint_self("ckpt/")         # or a file path
    if r.restored: ...                           # a restarted copy, like fork()

lcr cannot ptrace its own process, so a helper does it: the caller forks a
helper that leaves (double fork: the helper is re-parented, not our
descendant, so not part of the tree it saves), the helper checkpoints the
caller -- which waits in read() on a pipe whose only write end the helper
holds -- and then writes the result into that pipe.  A restored copy wakes
in the same read() on a restored pipe whose writer was never part of the
image: it reads end-of-file.  So read() returns data in the original and
EOF in a restored copy: that is how each knows which it is.

Hooks: ``before_checkpoint(fn)`` and ``after_restore(fn)`` run around
checkpoint_self(), and in `lcr run --checkpoint-dir --hooks` jobs: lcr sets
LCR_JOB_DIR and LCR_JOB_HOOK_SIGNAL in the command's environment; the first
hook registered installs a handler for that signal, which runs the hooks of
the phase lcr wrote into $LCR_JOB_DIR/.hooks and answers in .hooks.ack.
As in CRaC, after_restore hooks also run when the program simply continues
after a checkpoint (leave_running, or a periodic checkpoint of a job).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from linuxcr.errors import LcrError

Hook = Callable[[], None]
_before: list[Hook] = []
_after: list[Hook] = []
_job_handler_installed = False
PR_GET_CHILD_SUBREAPER = 37


@dataclass
class SelfCheckpoint:
    """What checkpoint_self() returned: ``state`` "checkpointed" (the original,
    after the image was written) or "restored" (a copy restarted from it)."""
    state: str
    path: str
    pages: int = 0
    seconds: float = 0.0

    @property
    def restored(self) -> bool:
        return self.state == "restored"

    @property
    def checkpointed(self) -> bool:
        return self.state == "checkpointed"


def before_checkpoint(fn: Hook) -> Hook:
    """Run fn before every checkpoint of this process (close connections,
    flush scratch files); usable as a decorator."""
    _before.append(fn)
    _install_job_handler()
    return fn


def after_restore(fn: Hook) -> Hook:
    """Run fn after a restore (and after a checkpoint the program survives):
    reopen what before_checkpoint closed."""
    _after.append(fn)
    _install_job_handler()
    return fn


def run_hooks(phase: str) -> None:
    """"checkpoint": the before_checkpoint hooks, in order of registration;
    "restored"/"continued": the after_restore hooks, in reverse order."""
    for fn in (list(_before) if phase == "checkpoint" else list(reversed(_after))):
        fn()


# --- checkpoint_self ---------------------------------------------------------------------

def _image_path(target: str | os.PathLike) -> tuple[str, str | None]:
    """(image path, directory whose 'latest' link to update, if a directory)."""
    t = os.fspath(target)
    if t.endswith(os.sep) or os.path.isdir(t):
        os.makedirs(t, exist_ok=True)
        name = time.strftime(f"self-{os.getpid()}-%Y%m%d-%H%M%S-{time.monotonic_ns() % 10**6:06d}.img")
        return os.path.join(t, name), t
    return t, None


def _cannot_fork_away() -> str | None:
    """Why a helper we fork would stay our descendant (and be in the tree)."""
    if os.getpid() == 1:
        return "this process is the init of its pid namespace (orphans come back to it)"
    try:
        import ctypes
        v = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(v), 0, 0, 0)
        if v.value:
            return "this process is a child subreaper (orphans come back to it)"
    except OSError:
        pass
    return None


def checkpoint_self(target: str | os.PathLike, *, leave_running: bool = True,
                    compress: bool = False, sign: str | None = None) -> SelfCheckpoint:
    """Checkpoint the calling process (and its descendants) into ``target``
    (an image path, or a directory: a new image in it and DIR/latest -> it).
    Returns in the original with state "checkpointed" (unless
    ``leave_running`` is False: the original is then killed once the image
    is complete), and in a copy restarted from the image with "restored"."""
    why = _cannot_fork_away()
    if why:
        raise LcrError(f"checkpoint_self: {why}",
                       "run the program under `lcr run --checkpoint-dir DIR --hooks`, or "
                       "start it as a child of this one")
    path, directory = _image_path(target)
    run_hooks("checkpoint")
    r, w = os.pipe()
    t0 = time.monotonic()
    me = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    mid = os.fork()
    if mid == 0:                      # the intermediate: fork the helper, leave
        try:
            os.close(r)
            if os.fork() == 0:
                _helper(me, w, path, directory, leave_running, compress, sign)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(mid, 0)
    reply = _read_all(r)              # restored copies: EOF here, the writer is gone
    os.close(r)
    if not reply:
        res = SelfCheckpoint("restored", path)
        run_hooks("restored")
        return res
    msg = json.loads(reply)
    if "error" in msg:
        run_hooks("continued")
        raise LcrError(f"checkpoint_self: {msg['error']}")
    res = SelfCheckpoint("checkpointed", msg["path"], msg["pages"], time.monotonic() - t0)
    run_hooks("continued")
    return res


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            return out
        out += chunk


def _helper(pid: int, w: int, path: str, directory: str | None, leave_running: bool,
            compress: bool, sign: str | None) -> None:
    """In the helper (not a descendant of ``pid`` once its parent left)."""
    try:
        while os.getppid() == pid:          # until the intermediate is gone
            time.sleep(0.001)
        from linuxcr import api
        res = api.checkpoint(pid, path, leave_running=leave_running, compress=compress, sign=sign)
        if directory is not None:
            from linuxcr.job import set_latest
            set_latest(directory, os.path.basename(path))
        reply = {"path": path, "pages": res.pages}
    except LcrError as e:
        reply = {"error": str(e)}
    except BaseException as e:  # noqa: BLE001 - the caller waits for one line, whatever happens
        reply = {"error": f"internal error: {type(e).__name__}: {e}"}
    try:
        os.write(w, json.dumps(reply).encode())
    finally:
        os._exit(0)


# --- hooks for `lcr run --checkpoint-dir --hooks` jobs ---------------------------------

def _install_job_handler() -> None:
    global _job_handler_installed
    d, sig = os.environ.get("LCR_JOB_DIR"), os.environ.get("LCR_JOB_HOOK_SIGNAL")
    if _job_handler_installed or not d or not sig:
        return
    signal.signal(int(sig), _on_job_signal)
    signal.siginterrupt(int(sig), False)
    _job_handler_installed = True


def _on_job_signal(_sig, _frame) -> None:
    d = os.environ["LCR_JOB_DIR"]
    try:
        with open(os.path.join(d, ".hooks")) as f:
            req = json.load(f)
    except (OSError, ValueError):
        return
    try:
        run_hooks(str(req.get("phase")))
    finally:
        ack = os.path.join(d, ".hooks.ack")
        tmp = f"{ack}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"seq": req.get("seq"), "phase": req.get("phase")}, f)
        os.replace(tmp, ack)
