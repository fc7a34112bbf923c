"""The `lcr` command line.  Every user error ends as one line on stderr and
its exit code (errors.EXIT_CODES, listed by `lcr --help`); never a traceback unless LCR_DEBUG=1."""
from __future__ import annotations

import os
import sys

import click

from linuxcr import __version__
from linuxcr.cli_common import help_epilog, main_guarded, run_guarded
from linuxcr.cli_output import emit_json, note, opts, reporting, say, warn
from linuxcr.errors import LcrError, Terminated, UsageError

# linuxcr.api (and with it every engine and resource module), json and the
# rest are imported inside the commands that use them: start-up time of each
# `lcr` command (tests/test_startup.py).

class _Group(click.Group):
    """The `lcr` group; `migrate` and `receive` (cli_migrate.py) are loaded
    only when asked for (or listed by --help): start-up time."""

    _LAZY = {"migrate": "migrate_cmd", "receive": "receive_cmd"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._LAZY))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._LAZY and name not in self.commands:
            from linuxcr import cli_migrate
            self.add_command(getattr(cli_migrate, self._LAZY[name]), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None,  # type: ignore[override]
             standalone_mode: bool = True, **extra):
        """Usage errors as one `lcr: ...` line with their own exit code
        (cli_common.main_guarded) instead of click's usage block and 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        main_guarded(lambda: super(_Group, self).main(args, prog_name or "lcr", complete_var,
                                                      False, **extra))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=help_epilog())
@click.version_option(__version__)   # not package_name=: importlib.metadata is slow
def main() -> None:
    """Transparent checkpoint/restart of Linux processes."""


@main.command()
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, metavar="PATH|-",
              help="Image file, or - for standard output (with --interval: a directory).")
@click.option("--leave-running", is_flag=True, help="Keep the process running after the dump.")
@click.option("--compress", is_flag=True, help="Compress memory pages with zstd.")
@click.option("--low-downtime", is_flag=True,
              help="Freeze only for an in-memory snapshot; write the image while it runs on.")
@click.option("--sign", "sign_key", metavar="KEYFILE",
              help="Sign the image: an HMAC-SHA256 secret or an Ed25519 private key (PEM).")
@click.option("--parent", metavar="IMAGE",
              help="Incremental: store only the pages changed since IMAGE (an earlier image of "
                   "this process); restart finds IMAGE by the path recorded, or --images-dir.")
@click.option("--track", is_flag=True,
              help="Keep counting the pages the process writes (userfaultfd), so that the next "
                   "--parent checkpoint knows them without comparing contents.")
@click.option("--images-dir", metavar="DIR", help="Where the parents of --parent IMAGE are.")
@click.option("--interval", metavar="DURATION",
              help="Periodic: a checkpoint every DURATION (30s, 10m, 1h) into the directory -o, "
                   "full then incremental, the process running on, until it exits or ^C.")
@click.option("--keep", type=click.IntRange(min=0), default=0, metavar="N",
              help="With --interval: keep the N newest images (and the parents they need).")
@click.option("--full-every", type=click.IntRange(min=1), default=10, metavar="M",
              help="With --interval: every M-th image is a full one (default 10).")
@click.option("--count", type=click.IntRange(min=0), default=0, metavar="N",
              help="With --interval: stop after N checkpoints.")
@click.option("--external", is_flag=True,
              help="Record pipes and sockets whose other end is outside the tree (restart "
                   "then gives each a new file with --fd N=...).")
@click.option("--shell-job", is_flag=True,
              help="The process runs on the terminal of a shell (its other end is outside the "
                   "tree): save that terminal as external; restart with --shell-job.")
@click.option("-f", "--force", is_flag=True, help="Replace IMAGE if it exists (atomically).")
@click.option("--no-agent", is_flag=True,
              help="Run here even if this user's lcr agent runs (also LCR_NO_AGENT=1).")
@reporting()
def checkpoint(pid: int, output: str, leave_running: bool, compress: bool,
               low_downtime: bool = False, sign_key: str | None = None,
               parent: str | None = None, track: bool = False, images_dir: str | None = None,
               interval: str | None = None, keep: int = 0, full_every: int = 10,
               count: int = 0, external: bool = False, shell_job: bool = False,
               force: bool = False, no_agent: bool = False) -> None:
    """Save process PID to an image (the process is killed after a complete dump)."""
    # SIGTERM/SIGHUP mid-dump: the same cleanup as ^C (target thawed, nothing
    # of ours left in it), then one line and 143/129 -- not a death that
    # leaves the guardian to put the target back after lcr is gone.
    Terminated.arm()

    def go() -> None:
        from linuxcr import api
        if interval is not None:
            _interval(pid, output, interval, keep, full_every, count, compress,
                      bad=[n for n, v in (("--parent", parent), ("--low-downtime", low_downtime),
                                          ("--sign", sign_key)) if v])
            return
        if output == "-":
            if sys.stdout.isatty():
                raise LcrError("refusing to write an image to a terminal", "use -o FILE or a pipe")
            if opts().json:
                raise UsageError("--json prints to standard output: it does not combine with -o -")
            out: int | str = 1
        else:
            out = output
        if low_downtime and (parent or track):
            raise LcrError("--low-downtime does not combine with --parent or --track yet")
        from linuxcr.cli_output import bar, tree_memory
        with bar(f"checkpoint pid {pid}", tree_memory(pid)) as b:
            if low_downtime:
                from linuxcr.image import stream
                with stream.options(signer=api.load_key(sign_key, signing=True)):
                    res = api.checkpoint_low_downtime(pid, out, leave_running=leave_running,
                                                      compress=compress, overwrite=force,
                                                      progress=b.advance)
            else:
                res = api.checkpoint(pid, out, leave_running=leave_running, compress=compress,
                                     sign=sign_key, parent=parent, track=track,
                                     images_dir=images_dir, overwrite=force, progress=b.advance,
                                     external=external, shell_job=shell_job)
        for w in res.warnings:
            warn(w)
        inc = res.incremental
        if opts().json:
            emit_json(res)
        if low_downtime:
            note(f"pid {pid} frozen {res.frozen_seconds * 1e3:.1f} ms "
                 f"(image written in {res.seconds:.3f} s)")
        elif inc:
            methods = sorted(set(inc.get("method", {}).values()))
            note(f"pid {pid}: incremental image: {inc['stored']} pages stored, "
                 f"{inc['inherited']} left to its parents ({', '.join(methods)}), "
                 f"{res.bytes_written} bytes in {res.seconds:.3f} s")
        else:
            say(f"pid {pid}: {res.pages} pages, {res.bytes_written} bytes in "
                f"{res.seconds:.3f} s (frozen {res.frozen_seconds:.3f} s)")
    run_guarded(go)


def _interval(pid: int, outdir: str, interval: str, keep: int, full_every: int, count: int,
              compress: bool, bad: list[str]) -> None:
    from linuxcr import api, periodic
    from linuxcr.engine import incremental
    if bad:
        raise LcrError(f"--interval does not combine with {', '.join(bad)}")
    try:
        every = incremental.parse_duration(interval)
    except ValueError as e:
        raise LcrError(f"--interval: {e}") from None
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise LcrError(f"{outdir} is not a directory", "with --interval, -o names a directory")
    api.as_pid(pid)

    def saved(s, note: str) -> None:
        if s is None:
            click.echo(f"lcr: warning: {note}", err=True)
            return
        kind = "full" if s.full else "incremental"
        click.echo(f"lcr: {s.path}: {kind}, {s.pages} pages, {s.bytes} bytes, {s.seconds:.3f} s"
                   + (f" ({note})" if note else ""), err=True)
    run = periodic.run_interval(pid, outdir, every, keep=keep, full_every=full_every,
                                compress=compress, count=count, on_saved=saved)
    click.echo(f"lcr: pid {pid}: {len(run.saved)} images kept in {outdir}, "
               f"{len(run.removed)} removed; {run.reason}", err=True)


@main.command()
@click.argument("image", metavar="IMAGE|-")
@click.option("--any-pid", is_flag=True, help="Take any free pid if the saved one is in use.")
@click.option("--verify", "verify_key", metavar="KEYFILE",
              help="Refuse the image unless it is signed with this key (HMAC secret or Ed25519 key).")
@click.option("--trust", multiple=True, metavar="WHAT",
              help="(root) Let the image have: uid, caps, setuid, files, or all (comma-separated "
                   "or repeated).")
@click.option("--images-dir", metavar="DIR",
              help="Where the parents of an incremental image are (default: the paths it "
                   "recorded, beside it).")
@click.option("--fd", "fd_specs", multiple=True, metavar="N=PATH|-|&M",
              help="Give the restored process a new file for external fd N: PATH, - (lcr's "
                   "stdout) or &M (fd M of lcr). Repeatable.")
@click.option("--shell-job", is_flag=True,
              help="Put the restored job on this terminal, in the foreground, with job control "
                   "(^Z, fg, ^C); lcr stays until it ends (as --wait).")
@click.option("--wait", is_flag=True,
              help="Stay in the foreground, forward SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/2 to the "
                   "restored root and exit with its exit status.")
@click.option("--lazy", is_flag=True,
              help="Return as soon as the process runs; a background page server fills its "
                   "private memory on demand from IMAGE (a file) and exits when all is in. "
                   "See docs/lazy.md.")
@click.option("--lazy-log", metavar="FILE",
              help="The page server's log (default: $TMPDIR/lcr-lazy-PID.log).")
@click.option("--no-agent", is_flag=True,
              help="Run here even if your lcr agent runs (by default it runs the restart in a "
                   "warm worker: no start-up time; the same result).")
@reporting()
def restart(image: str, any_pid: bool, verify_key: str | None = None,
            trust: tuple[str, ...] = (), images_dir: str | None = None,
            fd_specs: tuple[str, ...] = (), shell_job: bool = False, wait: bool = False,
            lazy: bool = False, lazy_log: str | None = None, no_agent: bool = False) -> None:
    """Restart the process saved in IMAGE; prints its pid."""
    # SIGTERM/SIGHUP mid-restart: the same teardown as ^C (every task made
    # killed, lcr's files and objects gone), then one line and 143/129; once
    # every task is finished they are held until the tree is let go
    # (engine/restore.py), and --wait forwards them to the restored root.
    Terminated.arm()
    code = [0]

    def go() -> None:
        from linuxcr import api
        from linuxcr.cli_output import bar
        if wait or shell_job:
            api.stay_parent()
        src: int | str = 0 if image == "-" else image
        size = os.stat(image).st_size if image != "-" and os.path.isfile(image) else None
        with bar("restart", size) as b:
            if size:
                b.poll(_reading(image))
            res = api.restart_full(src, any_pid=any_pid, verify=verify_key,
                                   trust=trust, images_dir=images_dir, fds=list(fd_specs),
                                   shell_job=shell_job, lazy=lazy, lazy_log=lazy_log)
        for w in res.warnings:
            warn(w)
        if res.namespace:
            note(f"restored in a new pid namespace: the process sees pid {res.vpid}, "
                 f"pid {res.pid} from here")
        elif res.pid != res.original_pid:
            note(f"pid {res.original_pid} was in use; restored as pid {res.pid}")
        say(f"pid {res.original_pid} -> {res.pid}: {res.processes} process(es), {res.pages} pages "
            f"in {res.seconds:.3f} s")
        if res.lazy_server:
            note(f"running; {res.lazy_pages} pages still to come from page server pid "
                 f"{res.lazy_server} (log: {res.lazy_log})")
        if opts().json:
            emit_json(res)
            return
        click.echo(str(res.pid))
        sys.stdout.flush()
        if wait or shell_job:
            code[0] = api.wait_restored(res.pid, shell_job=shell_job,
                                        note=lambda m: click.echo(f"lcr: {m}", err=True))
    run_guarded(go)
    sys.exit(code[0])


def _reading(path: str):
    """How far this process has read the image file ``path`` (the bar of
    `lcr restart`): the offset of our fd open on it."""
    def get() -> int | None:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path):
                    with open(f"/proc/self/fdinfo/{fd}") as f:
                        return int(f.readline().split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return None
    return get


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-o", "--output", "log", metavar="LOG",
              help="Send the command's stdout and stderr to LOG (default: ~/.local/state/lcr/runs/PID.log, "
                   "or $LCR_RUN_LOGS/PID.log).")
@click.option("-C", "--cwd", metavar="DIR", help="Working directory of the command.")
@click.option("--checkpoint-dir", metavar="DIR",
              help="A job that survives preemption (docs/kubernetes.md): resume from DIR if it "
                   "holds a checkpoint of this command, stay in the foreground, and on SIGTERM "
                   "or SIGINT checkpoint into DIR and exit 0.")
@click.option("--grace", default="25s", metavar="DURATION",
              help="With --checkpoint-dir: time allowed for the checkpoint on SIGTERM (default "
                   "25s; less than the engine's grace period); past it the command gets the signal.")
@click.option("--interval", metavar="DURATION", help="With --checkpoint-dir: also a checkpoint "
                                                     "every DURATION (incremental).")
@click.option("--keep", type=click.IntRange(min=0), default=0, metavar="N",
              help="With --interval: keep the N newest images (and the parents they need).")
@click.option("--full-every", type=click.IntRange(min=1), default=10, metavar="M",
              help="With --interval: every M-th image is a full one (default 10).")
@click.option("--fresh-on-bad-image", is_flag=True,
              help="With --checkpoint-dir: a corrupt or foreign image is moved aside and the "
                   "command starts fresh (default: refuse).")
@click.option("--signal", "stop_signals", multiple=True, metavar="SIG",
              help="With --checkpoint-dir: another signal that means checkpoint and exit.")
@click.option("--hooks", is_flag=True,
              help="With --checkpoint-dir: the program runs linuxcr.before_checkpoint/"
                   "after_restore hooks (it is told by SIGUSR2).")
@click.option("--saved-exit-code", type=click.IntRange(0, 255), default=0, metavar="N",
              help="With --checkpoint-dir: exit status once saved (default 0; a Kubernetes Job "
                   "wants another, see docs/kubernetes.md).")
@click.option("--compress", is_flag=True, help="With --checkpoint-dir: compress pages with zstd.")
@click.option("--sign", "sign_key", metavar="KEYFILE", help="With --checkpoint-dir: sign images.")
@click.option("--verify", "verify_key", metavar="KEYFILE",
              help="With --checkpoint-dir: resume only from images signed with this key.")
@click.option("--ipc", is_flag=True, help="A fresh ipc namespace (System V IPC of its own).")
@click.option("--uts", is_flag=True, help="A uts namespace of its own (its own hostname).")
@click.option("--hostname", metavar="NAME", help="Its hostname, in a uts namespace of its own.")
@click.option("--net", is_flag=True, help="A fresh network namespace with loopback up.")
@click.option("--mount", is_flag=True, help="A private mount namespace.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@reporting(progress_option=False)
def run(log: str | None, cwd: str | None, argv: tuple[str, ...], checkpoint_dir: str | None = None,
        grace: str = "25s", interval: str | None = None, keep: int = 0, full_every: int = 10,
        fresh_on_bad_image: bool = False, stop_signals: tuple[str, ...] = (), hooks: bool = False,
        compress: bool = False, sign_key: str | None = None, verify_key: str | None = None,
        saved_exit_code: int = 0, ipc: bool = False, uts: bool = False, net: bool = False,
        mount: bool = False, hostname: str | None = None) -> None:
    """Start a command in a fresh pid namespace, detached; prints its pid.

    pid 1 of the namespace is a small init (the pid printed) that forwards
    SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 to the command and exits
    with its status.  The whole tree can then be checkpointed, and restarts
    with every pid as it was.  With --checkpoint-dir, lcr stays in the
    foreground as the job's supervisor (a container entrypoint).  --ipc,
    --uts/--hostname, --net, --mount: more namespaces of its own, made again
    on restart."""
    kinds = tuple(k for k, on in (("ipc", ipc), ("uts", uts), ("net", net), ("mnt", mount)) if on)

    def go() -> None:
        if checkpoint_dir is not None:
            from linuxcr.job import options_from_cli, run_job
            sys.exit(run_job(options_from_cli(checkpoint_dir, list(argv), cwd=cwd, grace=grace,
                                              interval=interval, keep=keep, full_every=full_every,
                                              fresh=fresh_on_bad_image, signals=stop_signals,
                                              hooks=hooks, compress=compress, sign=sign_key,
                                              verify=verify_key, log=log,
                                              saved_exit_code=saved_exit_code)))
        from linuxcr import api
        from linuxcr.results import RunResult
        pid, where = api.run_logged(list(argv), log=log, cwd=cwd, namespaces=kinds,
                                    hostname=hostname)
        if log is None:
            note(f"output of pid {pid} goes to {where}")
        if opts().json:
            emit_json(RunResult(pid=pid, argv=tuple(argv)))
            return
        click.echo(str(pid))
    run_guarded(go)


@main.command()
@click.argument("image", metavar="IMAGE|-")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verify", "verify_key", metavar="KEYFILE",
              help="Also check the image's signatures with this key.")
def show(image: str, as_json: bool, verify_key: str | None = None) -> None:
    """Show what an image holds (and validate it)."""
    def go() -> None:
        import json

        from linuxcr import api
        from linuxcr.image.show import render_text
        s = api.show(0 if image == "-" else image, verify=verify_key)
        if as_json:
            from linuxcr.results import schema_id
            click.echo(json.dumps({"schema": schema_id("show"), **s}, indent=2))
            return
        click.echo(render_text(s))
        if "signed" in s["header"].get("flags", []):
            sig = s.get("signature")
            click.echo(f"  signed: signature good ({sig['alg']}, key {sig['key_id']})" if sig
                       else "  signed (not checked: give --verify KEYFILE)")
    run_guarded(go)


@main.command()
@click.argument("image_a", metavar="A")
@click.argument("image_b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(image_a: str, image_b: str, as_json: bool) -> None:
    """What changed from image A to image B of the same process: memory areas
    and their saved pages, open files, threads, registers, signals."""
    def go() -> None:
        import json

        from linuxcr import api
        from linuxcr.image.diff import diff as diff_images
        from linuxcr.image.diff import render_diff
        if "-" in (image_a, image_b):
            raise UsageError("lcr diff reads two image files, not standard input")
        d = diff_images(api.show(image_a), api.show(image_b))
        if as_json:
            from linuxcr.results import schema_id
            click.echo(json.dumps({"schema": schema_id("diff"), **d}, indent=2))
            return
        click.echo(render_diff(d))
    run_guarded(go)


@main.command()
@click.argument("pid", type=int)
@click.option("--tree/--no-tree", default=True, help="Include all descendants (default).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(pid: int, tree: bool, as_json: bool) -> None:
    """Say whether PID can be checkpointed now, and if not, why."""
    def go() -> None:
        import json

        from linuxcr import api
        from linuxcr.errors import NotCheckpointable
        res = api.check_full(pid, tree=tree)
        if as_json:
            click.echo(json.dumps(res.to_json(), indent=2))
        elif res.reasons:
            for r in res.reasons:
                click.echo(f"pid {pid}: {r}")
        elif res.tracking is not None:
            click.echo(f"pid {pid}: can be checkpointed")
            click.echo(f"pid {pid}: incremental checkpoints (--parent) find changed pages by "
                       f"{res.tracking.method}: {res.tracking.why}")
        if res.reasons:
            sys.exit(NotCheckpointable.exit_code)
    run_guarded(go)


# --- in-memory checkpoints (see linuxcr/agent.py) ------------------------------

@main.command(hidden=True)
@click.option("--foreground", is_flag=True, help="Do not detach.")
def agent(foreground: bool) -> None:
    """Run this user's snapshot agent (started on demand by the commands below)."""
    from linuxcr.agent.server import run_agent
    run_guarded(lambda: run_agent(foreground, run_cli=_run_handed_off, warm=_warm))


def _warm() -> None:
    from linuxcr import api
    from linuxcr.cli_output import bar  # noqa: F401
    api.warm()


def _run_handed_off(argv: list[str]) -> int:
    """In the agent's worker (agent/worker.py): one command line handed off
    by the CLI (handoff.py), as `lcr` would run it; its exit code."""
    from linuxcr import faults
    faults.reset()
    try:
        main.main(args=argv[1:], prog_name="lcr")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


@main.command()
@click.argument("pid", type=int)
@reporting(progress_option=False)
def snapshot(pid: int) -> None:
    """Take an in-memory (copy-on-write) checkpoint of PID; prints its crid."""
    def go() -> None:
        from linuxcr import api
        from linuxcr.results import SnapshotInfo
        s = api.snapshot(pid)
        info = SnapshotInfo.from_agent(s.info)
        say(f"pid {pid} frozen {info.frozen_seconds * 1e3:.1f} ms")
        if opts().json:
            emit_json(info)
            return
        click.echo(s.crid)
    run_guarded(go)


@main.command()
@click.argument("pid", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def snapshots(pid: int | None, as_json: bool) -> None:
    """List in-memory checkpoints (of PID only, if given)."""
    import time as _time

    def go() -> None:
        import json

        from linuxcr import api
        rows = [r.to_json() for r in api.snapshots(pid)]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(f"{'CRID':<12} {'PID':>7} {'PROCS':>5}  {'TAKEN':<19} {'FROZEN':>9} {'HELD':>10}")
        for r in rows:
            taken = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(r["time"]))
            click.echo(f"{r['crid']:<12} {r['pid']:>7} {r.get('processes', 1):>5}  {taken:<19} "
                       f"{r['frozen_seconds'] * 1e3:>7.1f}ms {r['held'] / 2**20:>8.1f}MiB")
    run_guarded(go)


@main.command()
@click.argument("crid")
@click.option("-o", "--output", required=True, metavar="PATH|-", help="Image file, or - for stdout.")
@click.option("--compress", is_flag=True, help="Compress memory pages with zstd.")
@click.option("-f", "--force", is_flag=True, help="Replace IMAGE if it exists (atomically).")
@reporting()
def writeback(crid: str, output: str, compress: bool, force: bool = False) -> None:
    """Write in-memory checkpoint CRID out as a normal image."""
    def go() -> None:
        from linuxcr import api
        if output == "-" and sys.stdout.isatty():
            raise LcrError("refusing to write an image to a terminal", "use -o FILE or a pipe")
        if output == "-" and opts().json:
            raise UsageError("--json prints to standard output: it does not combine with -o -")
        from linuxcr.cli_output import bar
        held = next((r.held for r in api.snapshots() if r.crid == crid), None)
        with bar(f"writeback {crid}", held) as b:
            if output != "-":
                b.poll(_growing(output))
            res = api.writeback(crid, 1 if output == "-" else output, compress=compress,
                                overwrite=force)
        say(f"{crid}: {res.pages} pages, {res.bytes_written} bytes in {res.seconds:.3f} s")
        if opts().json:
            emit_json(res)
    run_guarded(go)


def _growing(path: str):
    """Bytes written so far to the image going to ``path`` (its temporary,
    unnamed file is one of our fds in the same directory): the bar of
    `lcr writeback`."""
    where = os.path.realpath(os.path.dirname(path) or ".")

    def get() -> int | None:
        best = None
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
                if link.startswith(where + "/") and ("#" in link or ".lcr-partial-" in link
                                                     or link.endswith("(deleted)")):
                    best = max(best or 0, os.fstat(int(fd)).st_size)
            except (OSError, ValueError):
                continue
        return best
    return get


@main.command()
@click.argument("crid")
@click.option("--memory-only", is_flag=True,
              help="Memory and registers only (signal handlers, fds and offsets stay as they are now).")
@click.option("--full", is_flag=True,
              help="Rebuild the whole address space even where only the written pages need copying.")
@reporting()
def rollback(crid: str, memory_only: bool, full: bool = False) -> None:
    """Bring the process of CRID (same pid) back to the snapshot's state."""
    def go() -> None:
        from linuxcr import api
        from linuxcr.cli_output import bar
        with bar(f"rollback {crid}", None) as b:     # no byte count from the agent: a pulse
            b.poll(lambda: None)
            res = api.rollback(crid, memory_only=memory_only, full=full)
        for w in res.warnings:
            warn(w)
        why = "; ".join(res.full_because)
        if opts().json:
            emit_json(res)
            return
        note(f"pid {res.pid} rolled back in {res.seconds * 1e3:.1f} ms "
             f"({res.path}: {res.pages_copied} pages copied, "
             f"{res.pages_dropped} dropped" + (f"; full because {why}" if why else "") + ")")
    run_guarded(go)


@main.command()
@click.argument("crid")
@reporting(progress_option=False)
def discard(crid: str) -> None:
    """Free in-memory checkpoint CRID."""
    def go() -> None:
        from linuxcr import api
        res = api.discard(crid)
        if opts().json:
            emit_json(res)
    run_guarded(go)


# --- live migration: `lcr migrate`, `lcr receive` (linuxcr/cli_migrate.py), -----
# added to the group by _Group.get_command when used.
