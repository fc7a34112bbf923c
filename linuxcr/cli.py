"""The `lcr` command line.  Every user error ends as one line on stderr and
its exit code (errors.EXIT_CODES, listed by `lcr --help`); never a traceback unless LCR_DEBUG=1."""
from __future__ import annotations

import os
import sys

import click

from linuxcr import __version__
from linuxcr.cli_common import help_epilog, run_guarded
from linuxcr.errors import LcrError

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
def checkpoint(pid: int, output: str, leave_running: bool, compress: bool,
               low_downtime: bool = False, sign_key: str | None = None,
               parent: str | None = None, track: bool = False, images_dir: str | None = None,
               interval: str | None = None, keep: int = 0, full_every: int = 10,
               count: int = 0) -> None:
    """Save process PID to an image (the process is killed after a complete dump)."""
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
            out = 1
        else:
            out = output
        if low_downtime and (parent or track):
            raise LcrError("--low-downtime does not combine with --parent or --track yet")
        if low_downtime:
            from linuxcr.image import stream
            with stream.options(signer=api.load_key(sign_key, signing=True)):
                res = api.checkpoint_low_downtime(pid, out, leave_running=leave_running,
                                                  compress=compress)
        else:
            res = api.checkpoint(pid, out, leave_running=leave_running, compress=compress,
                                 sign=sign_key, parent=parent, track=track, images_dir=images_dir)
        for w in getattr(res, "warnings", []):
            click.echo(f"lcr: warning: {w}", err=True)
        inc = getattr(res, "incremental", None)
        if low_downtime:
            click.echo(f"lcr: pid {pid} frozen {res.frozen_seconds * 1e3:.1f} ms "
                       f"(image written in {res.seconds:.3f} s)", err=True)
        elif inc:
            methods = sorted(set(inc.get("method", {}).values()))
            click.echo(f"lcr: pid {pid}: incremental image: {inc['stored']} pages stored, "
                       f"{inc['inherited']} left to its parents ({', '.join(methods)}), "
                       f"{res.bytes_written} bytes in {res.seconds:.3f} s", err=True)
        elif os.environ.get("LCR_VERBOSE"):
            click.echo(f"lcr: pid {pid}: {res.pages} pages, {res.bytes_written} bytes in "
                       f"{res.seconds:.3f} s (frozen {res.frozen_seconds:.3f} s)", err=True)
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
def restart(image: str, any_pid: bool, verify_key: str | None = None,
            trust: tuple[str, ...] = (), images_dir: str | None = None) -> None:
    """Restart the process saved in IMAGE; prints its pid."""
    def go() -> None:
        from linuxcr import api
        res = api.restart_full(0 if image == "-" else image, any_pid=any_pid, verify=verify_key,
                               trust=trust, images_dir=images_dir)
        for w in res.warnings:
            click.echo(f"lcr: warning: {w}", err=True)
        if res.namespace:
            click.echo(f"lcr: restored in a new pid namespace: the process sees pid {res.vpid}, "
                       f"pid {res.pid} from here", err=True)
        elif res.pid != res.original_pid:
            click.echo(f"lcr: pid {res.original_pid} was in use; restored as pid {res.pid}", err=True)
        click.echo(str(res.pid))
        sys.stdout.flush()
    run_guarded(go)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-o", "--output", "log", metavar="LOG", help="Send the command's stdout and stderr to LOG.")
@click.option("-C", "--cwd", metavar="DIR", help="Working directory of the command.")
@click.option("--ipc", is_flag=True, help="A fresh ipc namespace (System V IPC of its own).")
@click.option("--uts", is_flag=True, help="A uts namespace of its own (its own hostname).")
@click.option("--hostname", metavar="NAME", help="Its hostname, in a uts namespace of its own.")
@click.option("--net", is_flag=True, help="A fresh network namespace with loopback up.")
@click.option("--mount", is_flag=True, help="A private mount namespace.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def run(log: str | None, cwd: str | None, argv: tuple[str, ...], ipc: bool = False,
        uts: bool = False, net: bool = False, mount: bool = False,
        hostname: str | None = None) -> None:
    """Start a command as init of a fresh pid namespace, detached; prints its pid.

    The whole tree it starts can then be checkpointed, and restarts with
    every pid as it was (and the namespaces asked for, made again)."""
    kinds = tuple(k for k, on in (("ipc", ipc), ("uts", uts), ("net", net), ("mnt", mount)) if on)

    def go() -> None:
        from linuxcr import api
        click.echo(str(api.run(list(argv), log=log, cwd=cwd, namespaces=kinds,
                               hostname=hostname)))
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
            click.echo(json.dumps(s, indent=2))
            return
        click.echo(render_text(s))
        if "signed" in s["header"].get("flags", []):
            sig = s.get("signature")
            click.echo(f"  signed: signature good ({sig['alg']}, key {sig['key_id']})" if sig
                       else "  signed (not checked: give --verify KEYFILE)")
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
        reasons = api.check(pid, tree=tree)
        tracking = api.tracking(pid)
        if as_json:
            click.echo(json.dumps({"pid": pid, "checkpointable": not reasons, "reasons": reasons,
                                   "dirty_tracking": tracking}))
        elif reasons:
            for r in reasons:
                click.echo(f"pid {pid}: {r}")
        else:
            click.echo(f"pid {pid}: can be checkpointed")
            click.echo(f"pid {pid}: incremental checkpoints (--parent) find changed pages by "
                       f"{tracking['method']}: {tracking['why']}")
        if reasons:
            sys.exit(5)
    run_guarded(go)


# --- in-memory checkpoints (see linuxcr/agent.py) ------------------------------

@main.command(hidden=True)
@click.option("--foreground", is_flag=True, help="Do not detach.")
def agent(foreground: bool) -> None:
    """Run this user's snapshot agent (started on demand by the commands below)."""
    from linuxcr.agent.server import run_agent
    run_guarded(lambda: run_agent(foreground))


@main.command()
@click.argument("pid", type=int)
def snapshot(pid: int) -> None:
    """Take an in-memory (copy-on-write) checkpoint of PID; prints its crid."""
    def go() -> None:
        from linuxcr import api
        s = api.snapshot(pid)
        if os.environ.get("LCR_VERBOSE"):
            click.echo(f"lcr: pid {pid} frozen {s.info['frozen_seconds'] * 1e3:.1f} ms", err=True)
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
        rows = api.snapshots(pid)
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
def writeback(crid: str, output: str, compress: bool) -> None:
    """Write in-memory checkpoint CRID out as a normal image."""
    def go() -> None:
        from linuxcr import api
        if output == "-" and sys.stdout.isatty():
            raise LcrError("refusing to write an image to a terminal", "use -o FILE or a pipe")
        api.writeback(crid, 1 if output == "-" else output, compress=compress)
    run_guarded(go)


@main.command()
@click.argument("crid")
@click.option("--memory-only", is_flag=True,
              help="Memory and registers only (signal handlers, fds and offsets stay as they are now).")
@click.option("--full", is_flag=True,
              help="Rebuild the whole address space even where only the written pages need copying.")
def rollback(crid: str, memory_only: bool, full: bool = False) -> None:
    """Bring the process of CRID (same pid) back to the snapshot's state."""
    def go() -> None:
        from linuxcr import api
        res = api.rollback(crid, memory_only=memory_only, full=full)
        for w in res.get("warnings", []):
            click.echo(f"lcr: warning: {w}", err=True)
        why = "; ".join(f"pid {r['pid']}: {r['reason']}" for r in res.get("per_process", [])
                        if r.get("reason"))
        click.echo(f"lcr: pid {res['pid']} rolled back in {res['seconds'] * 1e3:.1f} ms "
                   f"({res.get('path', 'full')}: {res.get('pages_copied', 0)} pages copied, "
                   f"{res.get('pages_dropped', 0)} dropped" + (f"; full because {why}" if why else "")
                   + ")", err=True)
    run_guarded(go)


@main.command()
@click.argument("crid")
def discard(crid: str) -> None:
    """Free in-memory checkpoint CRID."""
    def go() -> None:
        from linuxcr import api
        api.discard(crid)
    run_guarded(go)


# --- live migration: `lcr migrate`, `lcr receive` (linuxcr/cli_migrate.py), -----
# added to the group by _Group.get_command when used.
