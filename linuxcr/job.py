"""`lcr run --checkpoint-dir DIR -- CMD`: a job that survives preemption.

lcr stays in the foreground as the supervisor (a container's entrypoint,
pid 1 or right under a minimal init):

- start: DIR holds a verified image chain made by this command line ->
  restore it; else start CMD fresh as init of a new pid namespace (`lcr run`).
  A corrupt or foreign image is never half-used: refuse with one line, or
  (--fresh-on-bad-image) move it aside into DIR/bad-<time>/ and start fresh.
- SIGTERM/SIGINT (--signal adds more): checkpoint the whole tree into DIR
  within the grace budget, name it, point DIR/latest at it (a symlink
  replaced by rename: a reader never sees a partial image as latest), exit 0.
  Out of time: the unfinished image is dropped (it was never named), latest
  stays as it was, and the signal goes to the command instead.
- --interval: periodic incremental checkpoints (full every --full-every),
  keeping --keep of them and the parents they need (engine/incremental.py's
  retention rule).
- otherwise a supervisor: reaps (it is a child subreaper, so the command's
  init, re-parented, is its child), forwards every other signal, and exits
  with the command's status when it ends by itself.

The command's stdout and stderr go to a FIFO that lcr copies to its own
stdout: a FIFO is restored by its path (resources/fdkinds/fifo.py), so a
restored job writes into the new container's log as the first one did.

Hooks (--hooks): before a checkpoint, lcr writes {"phase": "checkpoint"}
to DIR/.hooks and sends --hook-signal (SIGUSR2) to the command, then waits
(a share of the grace budget) for DIR/.hooks.ack; after a restore it does the
same with "restored".  linuxcr/selfckpt.py answers that for the program.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from linuxcr import api
from linuxcr.errors import BadImage, GraceExceeded, ImageError, JobError, LcrError

PR_SET_CHILD_SUBREAPER = 36
STATE = "job.json"
LATEST = "latest"
HOOKS = ".hooks"
FORMAT = 1
HOOK_SHARE = 0.3          # of the grace budget, at most, for the program's hooks


@dataclass
class JobOptions:
    directory: str
    argv: list[str]
    grace: float = 25.0
    interval: float | None = None
    keep: int = 0
    full_every: int = 10
    fresh_on_bad_image: bool = False
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
    hooks: bool = False
    hook_signal: int = signal.SIGUSR2
    compress: bool = False
    sign: str | None = None
    verify: str | None = None
    cwd: str | None = None
    saved_exit_code: int = 0  # lcr's exit status once the final image is saved
    say: object = None        # callable(str): where lcr's own lines go (stderr)


@dataclass
class Image:
    name: str
    parent: str | None
    taken: float
    pages: int
    bytes: int
    full: bool


@dataclass
class State:
    """DIR/job.json: who made the images and how they chain."""
    argv: list[str]
    cwd: str | None
    images: list[Image] = field(default_factory=list)
    seq: int = 0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "argv": self.argv, "cwd": self.cwd, "seq": self.seq,
                           "images": [vars(i) for i in self.images]}, indent=1)

    @classmethod
    def load(cls, path: str) -> "State":
        with open(path) as f:
            d = json.load(f)
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}")
        return cls(argv=list(d["argv"]), cwd=d.get("cwd"), seq=int(d.get("seq", 0)),
                   images=[Image(**i) for i in d.get("images", [])])

    def find(self, name: str) -> Image | None:
        return next((i for i in self.images if i.name == name), None)

    def chain(self, name: str) -> list[Image]:
        """name and its parents, newest first; ValueError if one is unknown."""
        out: list[Image] = []
        cur: str | None = name
        while cur is not None:
            img = self.find(cur)
            if img is None or img in out:
                raise ValueError(f"{cur} is not recorded in {STATE}")
            out.append(img)
            cur = img.parent
        return out


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_latest(directory: str, name: str) -> None:
    """DIR/latest -> name, replaced by rename (never absent, never partial)."""
    tmp = os.path.join(directory, f".latest-{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(name, tmp)
    os.replace(tmp, os.path.join(directory, LATEST))
    _fsync_dir(directory)


def latest(directory: str) -> str | None:
    """The image name DIR/latest points at, or None."""
    try:
        return os.readlink(os.path.join(directory, LATEST))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BadImage(f"{directory}/{LATEST}: not a link to an image ({e.strerror})") from None


# --- start: resume or fresh ----------------------------------------------------

def verify_latest(opts: JobOptions) -> tuple[State, str] | None:
    """(state, latest image name) if DIR holds a complete chain made by this
    command line; None if it holds nothing; BadImage otherwise."""
    d = opts.directory
    name = latest(d)
    if name is None:
        return None
    try:
        state = State.load(os.path.join(d, STATE))
    except FileNotFoundError:
        raise BadImage(f"{d}/{LATEST} exists but {d}/{STATE} does not: not made by lcr run") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BadImage(f"{d}/{STATE} is unreadable: {e}") from None
    if state.argv != list(opts.argv):
        raise BadImage(f"{d} holds a checkpoint of another command ({' '.join(state.argv)!r})",
                       "give another --checkpoint-dir, or empty this one")
    try:
        chain = state.chain(name)
    except ValueError as e:
        raise BadImage(f"{d}/{LATEST}: {e}") from None
    for img in chain:            # every byte and checksum of the chain, before anything runs
        try:
            api.show(os.path.join(d, img.name), verify=opts.verify)
        except LcrError as e:
            raise BadImage(f"{d}/{img.name}: {e}") from None
    return state, name


def put_aside(directory: str) -> str:
    """Move every image, latest and job.json into DIR/bad-<time>/; its path."""
    aside = os.path.join(directory, time.strftime("bad-%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for n in os.listdir(directory):
        if n == LATEST or n == STATE or n.endswith(".img"):
            os.replace(os.path.join(directory, n), os.path.join(aside, n))
    _fsync_dir(directory)
    return aside


# --- the running job ---------------------------------------------------------------

class Job:
    def __init__(self, opts: JobOptions) -> None:
        self.o = opts
        self.d = opts.directory
        self.say = opts.say or (lambda m: print(f"lcr: {m}", file=sys.stderr, flush=True))
        self.pid = 0
        self.state = State(argv=list(opts.argv), cwd=opts.cwd)
        self.pending: list[int] = []
        self.trackers = None
        self.since_full = 0
        self._gone: list[Image] = []     # dropped by retention, unlinked once job.json is written
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fifo = ""
        # held while a final checkpoint runs: what is still in the FIFO then
        # is saved in the image and printed by the restored job, not twice
        self.relay = threading.Lock()

    # signals: handlers queue them (SA_RESTART: lcr's own syscalls are not
    # interrupted); the main loop wakes on the wakeup fd.
    def _install_signals(self) -> None:
        def queue(sig, _frame) -> None:
            self.pending.append(sig)
        catch = set(self.o.signals) | {signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                                       signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT,
                                       signal.SIGCHLD}
        for s in catch:
            signal.signal(s, queue)
            signal.siginterrupt(s, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _output_fifo(self) -> None:
        """The command's stdout+stderr: a FIFO at a path a new container has too."""
        import hashlib
        key = hashlib.sha256(os.path.realpath(self.d).encode()).hexdigest()[:12]
        rundir = os.environ.get("LCR_JOB_RUNDIR", f"/tmp/lcr-job-{key}")
        os.makedirs(rundir, mode=0o700, exist_ok=True)
        self.fifo = os.path.join(rundir, "output")
        if not os.path.exists(self.fifo):
            os.mkfifo(self.fifo, 0o600)
        # O_RDWR: a reader is always there (no writer blocks on open) and we
        # never see EOF between a command that died and its restored copy
        fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        threading.Thread(target=_relay, args=(fd, sys.stdout.fileno(), self.relay), daemon=True).start()

    def start(self) -> None:
        preflight()
        os.makedirs(self.d, exist_ok=True)
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise JobError("cannot become a child subreaper (prctl)")
        self._install_signals()
        self._output_fifo()
        try:
            found = verify_latest(self.o)
        except BadImage as e:
            if not self.o.fresh_on_bad_image:
                raise
            aside = put_aside(self.d)
            self.say(f"{e}; kept aside in {aside}; starting fresh (--fresh-on-bad-image)")
            found = None
        if found is not None:
            self.state, name = found
            self._resume(name)
        else:
            self._fresh()

    def _fresh(self) -> None:
        if self.o.hooks:      # what linuxcr.selfckpt in the program looks for
            os.environ["LCR_JOB_DIR"] = self.d
            os.environ["LCR_JOB_HOOK_SIGNAL"] = str(int(self.o.hook_signal))
        self.pid = api.run(list(self.o.argv), log=self.fifo, cwd=self.o.cwd)
        self.state = State(argv=list(self.o.argv), cwd=self.o.cwd, seq=self.state.seq)
        _write_atomic(os.path.join(self.d, STATE), self.state.to_json())
        self.say(f"started {' '.join(self.o.argv)} (pid {self.pid}); "
                 f"checkpoints go to {self.d}")

    def _resume(self, name: str) -> None:
        img = self.state.find(name)
        path = os.path.join(self.d, name)
        res = api.restart_full(path, verify=self.o.verify, images_dir=self.d)
        self.pid = res.pid
        pages = sum(i.pages for i in self.state.chain(name))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(img.taken)) if img else "?"
        self.say(f"resumed from {path} taken at {when}, {pages} pages (pid {self.pid})")
        for w in res.warnings:
            self.say(f"warning: {w}")
        if self.o.hooks:
            self._hook("restored", wait=0.0)

    # --- checkpoints ----------------------------------------------------------------

    def _hook(self, phase: str, wait: float) -> bool:
        """Tell the program (opted in with --hooks) and wait up to ``wait`` s
        for its answer; True if it answered."""
        seq = self.state.seq
        ack = os.path.join(self.d, HOOKS + ".ack")
        try:
            os.unlink(ack)
        except FileNotFoundError:
            pass
        _write_atomic(os.path.join(self.d, HOOKS), json.dumps({"phase": phase, "seq": seq}))
        try:
            os.kill(self.pid, self.o.hook_signal)
        except ProcessLookupError:
            return False
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                with open(ack) as f:
                    if json.load(f).get("seq") == seq:
                        return True
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
        return wait <= 0

    def checkpoint(self, deadline: float | None, final: bool) -> Image:
        """One image of the tree into DIR (named only when complete), then
        latest -> it.  ``deadline`` (monotonic): GraceExceeded past it, the
        image dropped and the tree left running."""
        from linuxcr.engine import incremental
        if self.trackers is None:
            self.trackers = incremental.Trackers(track=self.o.interval is not None)
        last = self.state.images[-1] if self.state.images else None
        parent = last.name if (self.o.interval is not None and last is not None
                               and self.since_full < self.o.full_every - 1) else None
        if parent is not None and not os.path.exists(os.path.join(self.d, parent)):
            parent = None
        self.state.seq += 1
        name = f"ckpt-{self.state.seq:06d}.img"
        path = os.path.join(self.d, name)
        my_signals = set(self.o.signals)

        def progress(_n: int) -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise GraceExceeded("out of grace time")
            if not final and my_signals & signal.sigpending():
                raise GraceExceeded("a stop signal came during a periodic checkpoint")

        if self.o.hooks:
            budget = (deadline - time.monotonic()) * HOOK_SHARE if deadline else 10.0
            if not self._hook("checkpoint", wait=max(budget, 0.0)):
                self.say("warning: the program did not answer its before-checkpoint hook in time")
        t0 = time.time()
        # lcr's own signals wait while the tree is frozen (a handler must not
        # interrupt ptrace work); the progress check still sees them pending
        old = signal.pthread_sigmask(signal.SIG_BLOCK, my_signals | {signal.SIGCHLD})
        try:     # a dropped image leaves a gap in the numbers: never reused
            res = api.checkpoint(self.pid, path, leave_running=not final, compress=self.o.compress,
                                 sign=self.o.sign, parent=os.path.join(self.d, parent) if parent
                                 else None, images_dir=self.d, trackers=self.trackers,
                                 progress=progress)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        img = Image(name=name, parent=parent, taken=t0, pages=res.pages,
                    bytes=res.bytes_written, full=parent is None)
        self.since_full = 0 if parent is None else self.since_full + 1
        self.state.images.append(img)
        self._retain(keep_latest=img)
        _write_atomic(os.path.join(self.d, STATE), self.state.to_json())
        set_latest(self.d, name)
        return img

    def _retain(self, keep_latest: Image) -> None:
        from linuxcr.engine import incremental
        keep = self.o.keep or (0 if self.o.interval else 1)
        saved = [incremental.Saved(path=i.name, parent=i.parent, seconds=0, bytes=i.bytes,
                                   pages=i.pages, full=i.full) for i in self.state.images]
        need = incremental.needed(saved, keep) if keep else {s.path for s in saved}
        need.add(keep_latest.name)
        # job.json is written before anything is unlinked: a crash between
        # leaves unreferenced files, never a reference to a missing one
        gone = [i for i in self.state.images if i.name not in need]
        self.state.images = [i for i in self.state.images if i.name in need]
        self._gone = gone

    def _unlink_gone(self) -> None:
        for i in self._gone:
            try:
                os.unlink(os.path.join(self.d, i.name))
            except FileNotFoundError:
                pass
        self._gone = []

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Until the command ends (its status) or a stop signal (0 once saved)."""
        next_at = time.monotonic() + self.o.interval if self.o.interval else None
        while True:
            while self.pending:
                sig = self.pending.pop(0)
                if sig == signal.SIGCHLD:
                    continue
                if sig in self.o.signals:
                    return self.stop(sig)
                self._forward(sig)
            status = self._reap()
            if status is not None:
                return status
            timeout = None if next_at is None else max(next_at - time.monotonic(), 0)
            if timeout is None or timeout > 0:
                try:
                    select.select([self._wake_r], [], [], timeout)
                except InterruptedError:
                    pass
                _drain(self._wake_r)
            if next_at is not None and time.monotonic() >= next_at and not self.pending:
                self._periodic()
                next_at = time.monotonic() + self.o.interval

    def _periodic(self) -> None:
        try:
            img = self.checkpoint(deadline=None, final=False)
        except GraceExceeded:
            self.say("periodic checkpoint dropped: a stop signal came")
            self._continued()
            return
        except LcrError as e:
            self.say(f"warning: periodic checkpoint failed: {e}; the next one is full")
            self.since_full = self.o.full_every
            self._continued()
            return
        self._continued()
        self._unlink_gone()
        self.say(f"{self.d}/{img.name}: {'full' if img.full else 'incremental'}, "
                 f"{img.pages} pages, {img.bytes} bytes")

    def _continued(self) -> None:
        if self.o.hooks:
            self._hook("continued", wait=0.0)

    def stop(self, sig: int) -> int:
        """The final checkpoint; 0 once saved, else the command's own end."""
        t0 = time.monotonic()
        name = signal.Signals(sig).name
        self.say(f"{name}: checkpointing pid {self.pid} into {self.d} (grace {self.o.grace:g} s)")
        self.relay.acquire()
        try:
            img = self.checkpoint(deadline=t0 + self.o.grace, final=True)
        except LcrError as e:
            self.relay.release()
            self._continued()
            why = (f"not finished within {self.o.grace:g} s" if isinstance(e, GraceExceeded)
                   else f"failed: {e}")
            self.say(f"checkpoint {why}: dropped; latest stays {latest(self.d) or '(none)'}; "
                     f"passing {name} to the command")
            return self._forward_and_wait(sig)
        self._unlink_gone()
        self._reap()
        self.say(f"saved {self.d}/{img.name} ({img.pages} pages, {img.bytes} bytes) in "
                 f"{time.monotonic() - t0:.2f} s; exiting")
        return self.o.saved_exit_code

    def _forward(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _forward_and_wait(self, sig: int) -> int:
        self._forward(sig)
        while True:
            status = self._reap()
            if status is not None:
                return status
            try:
                select.select([self._wake_r], [], [], 0.5)
            except InterruptedError:
                pass
            _drain(self._wake_r)
            for s in self.pending:
                if s != signal.SIGCHLD:
                    self._forward(s)
            self.pending.clear()

    def _reap(self) -> int | None:
        """Reap every child (we are a subreaper); the command's exit status
        if the command itself ended."""
        result = None
        while True:
            try:
                p, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if p == 0:
                break
            if p == self.pid:
                result = os.waitstatus_to_exitcode(st)
                result = 128 - result if result < 0 else result
        return result


def preflight() -> None:
    """What a checkpoint will need, tried now: a job that cannot be saved
    must fail at its start, not when it is preempted."""
    from linuxcr.sys.syscalls import kcmp_file
    me = os.getpid()
    try:
        kcmp_file(me, me, 0, 0)
    except PermissionError:
        raise JobError("kcmp(2) is not permitted here: lcr could not checkpoint this job",
                       "a container's default seccomp profile allows kcmp only with "
                       "CAP_SYS_PTRACE: add that capability, or use deploy/seccomp-lcr.json "
                       "(docs/containers.md)") from None
    except OSError:
        pass          # EBADF and such: kcmp itself is there


def _relay(src: int, dst: int, lock: threading.Lock) -> None:
    while True:
        try:
            select.select([src], [], [], 0.2)
        except InterruptedError:
            continue
        with lock:
            try:
                data = os.read(src, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            try:
                os.write(dst, data)
            except OSError:
                pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def run_job(opts: JobOptions) -> int:
    """`lcr run --checkpoint-dir`: returns the exit status for lcr."""
    if not opts.argv:
        raise LcrError("nothing to run")
    job = Job(opts)
    job.start()
    code = job.run()
    sys.stdout.flush()
    time.sleep(0.05)             # let the relay copy what is left in the FIFO
    return code


__all__ = ["JobOptions", "run_job", "verify_latest", "set_latest", "latest", "BadImage",
           "JobError", "ImageError"]


def _signal_number(name: str) -> int:
    n = name.upper()
    n = n if n.startswith("SIG") else "SIG" + n
    try:
        return int(signal.Signals[n])
    except KeyError:
        raise LcrError(f"--signal {name}: no such signal") from None


def options_from_cli(directory: str, argv: list[str], *, cwd: str | None, grace: str,
                     interval: str | None, keep: int, full_every: int, fresh: bool,
                     signals: tuple[str, ...], hooks: bool, compress: bool, sign: str | None,
                     verify: str | None, log: str | None, saved_exit_code: int = 0) -> JobOptions:
    """The `lcr run --checkpoint-dir` options, checked (one line each)."""
    from linuxcr.engine.incremental import parse_duration
    if log:
        raise LcrError("-o does not combine with --checkpoint-dir",
                       "the command's output goes to lcr's stdout (the container log)")

    def dur(opt: str, text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as e:
            raise LcrError(f"{opt}: {e}") from None
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise JobError(f"--checkpoint-dir {directory} is not a directory")
    if keep and interval is None:
        raise LcrError("--keep needs --interval")
    return JobOptions(directory=os.path.abspath(directory), argv=argv, grace=dur("--grace", grace),
                      interval=dur("--interval", interval) if interval else None, keep=keep,
                      full_every=full_every, fresh_on_bad_image=fresh,
                      signals=(signal.SIGTERM, signal.SIGINT) + tuple(_signal_number(s) for s in signals),
                      hooks=hooks, compress=compress, sign=sign, verify=verify, cwd=cwd,
                      saved_exit_code=saved_exit_code)
