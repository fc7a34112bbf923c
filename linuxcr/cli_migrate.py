"""`lcr migrate` and `lcr receive` (registered on the main group by cli.py).

    lcr receive --listen HOST:PORT [--token T] [--max-failures N]   # prints the restored pid
    lcr migrate PID --to HOST:PORT [--token T] [--max-downtime 50ms] [--max-rounds N]

The token may also come from --token-file or $LCR_MIGRATE_TOKEN (a token
on the command line is visible to every user in ps).  Errors: one line on
stderr, the exit code of its class (errors.EXIT_CODES: MigrationError 16,
AuthError 17); the source process is left running on every error.  `lcr
receive` logs each peer that fails before authenticating in one line on
stderr and goes on waiting (up to --max-failures of them).
"""
from __future__ import annotations

import os
import sys

import click

from linuxcr.cli_common import run_guarded
from linuxcr.errors import LcrError


def _duration(text: str, what: str) -> float:
    from linuxcr.engine.incremental import parse_duration
    try:
        return parse_duration(text)
    except ValueError as e:
        raise LcrError(f"{what}: {e}") from None


def _say(text: str) -> None:
    click.echo(f"lcr: {text}", err=True)


def _verbose() -> bool:
    return bool(os.environ.get("LCR_VERBOSE"))


@click.command("migrate")
@click.argument("pid", type=int)
@click.option("--to", "to", required=True, metavar="HOST:PORT",
              help="Where `lcr receive --listen` waits.")
@click.option("--token", metavar="TOKEN", help="Shared secret (also: --token-file, $LCR_MIGRATE_TOKEN).")
@click.option("--token-file", metavar="PATH", help="Read the shared secret from PATH.")
@click.option("--max-downtime", default="50ms", show_default=True, metavar="DURATION",
              help="Stop pre-copying once the rest fits in this (e.g. 50ms, 0.2s).")
@click.option("--max-rounds", default=8, show_default=True, type=click.IntRange(0, 1000),
              help="Pre-copy rounds after the first full copy, at most.")
@click.option("--timeout", default="60s", show_default=True, metavar="DURATION",
              help="Give up when the destination is silent this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def migrate_cmd(pid: int, to: str, token: str | None, token_file: str | None, max_downtime: str,
                max_rounds: int, timeout: str, as_json: bool) -> None:
    """Move process PID (and its descendants) to another machine, live.

    Pages are copied while PID runs; it is stopped only for the last ones,
    and killed once the destination reports the process running there."""
    def go() -> None:
        import json
        from dataclasses import asdict

        from linuxcr.engine.migrate import migrate
        from linuxcr.migration.protocol import load_token, parse_addr
        host, port = parse_addr(to)
        key = load_token(token, token_file)
        res = migrate(pid, host, port, token=key,
                      max_downtime=_duration(max_downtime, "--max-downtime"),
                      max_rounds=max_rounds, timeout=_duration(timeout, "--timeout"),
                      progress=_say if _verbose() else None)
        for w in res.warnings:
            _say(f"warning: {w}")
        if as_json:
            click.echo(json.dumps(asdict(res), indent=2))
            return
        where = f"pid {res.dest_pid}" + (f" (pid {res.dest_vpid} in its namespace)"
                                         if res.namespace else "")
        click.echo(f"migrated pid {pid} to {res.to}: {where}")
        for r in res.rounds:
            click.echo(f"round {r.n}: {r.pages} pages ({r.bytes / 2**20:.1f} MiB) "
                       f"in {r.seconds:.3f} s")
        kind = "full image" if res.full_image else \
            f"{res.final_pages} pages sent, {res.inherited_pages} already there"
        click.echo(f"stop-and-copy: {kind} ({res.final_bytes / 2**20:.1f} MiB); "
                   f"{res.stop_reason}")
        click.echo(f"downtime {res.downtime * 1e3:.1f} ms (freeze and collect "
                   f"{res.frozen_collect * 1e3:.1f} ms, destination {res.dest_seconds * 1e3:.1f} ms), "
                   f"total {res.seconds:.2f} s")
    run_guarded(go)


@click.command("receive")
@click.option("--listen", "listen", required=True, metavar="HOST:PORT",
              help="Address to accept the migration on (port 0: any; see LCR_VERBOSE).")
@click.option("--token", metavar="TOKEN", help="Shared secret (also: --token-file, $LCR_MIGRATE_TOKEN).")
@click.option("--token-file", metavar="PATH", help="Read the shared secret from PATH.")
@click.option("--timeout", default=None, metavar="DURATION",
              help="Give up if no migration arrives within this (default: wait forever).")
@click.option("--io-timeout", default="60s", show_default=True, metavar="DURATION",
              help="Give up when the source is silent this long.")
@click.option("--max-failures", default=100, show_default=True, type=click.IntRange(0, None),
              help="Give up after this many connections failed to authenticate (0: never).")
@click.option("--trust", multiple=True, metavar="WHAT",
              help="(root) Let the process have: uid, caps, setuid, files, or all.")
def receive_cmd(listen: str, token: str | None, token_file: str | None, timeout: str | None,
                io_timeout: str, max_failures: int, trust: tuple[str, ...]) -> None:
    """Accept one migration and restart it here; prints the new pid.

    Connections that fail before authenticating (wrong token, garbage,
    silence for 5 s) are logged on stderr and dropped, rate-limited per
    address; the wait goes on.  A session that fails after authenticating
    ends the command with its error (the source runs on)."""
    def go() -> None:
        from linuxcr.engine.migrate import receive
        from linuxcr.migration.protocol import load_token
        key = load_token(token, token_file)
        res = receive(listen, token=key,
                      timeout=_duration(timeout, "--timeout") if timeout else None,
                      io_timeout=_duration(io_timeout, "--io-timeout"), trust=trust,
                      max_failures=max_failures, log=_say,
                      on_listening=(lambda where: _say(f"listening on {where}"))
                      if _verbose() else None,
                      progress=_say if _verbose() else None)
        for w in res.warnings:
            _say(f"warning: {w}")
        if _verbose():
            _say(f"pid {res.original_pid} from {res.peer}: {res.rounds} pre-copy round(s), "
                 f"{res.precopied_pages} pages pre-copied, {res.final_pages} in the final image"
                 + (" (full)" if res.full_image else f", {res.inherited_pages} kept"))
        if res.namespace:
            _say(f"restored in a new pid namespace: the process sees pid {res.vpid}, "
                 f"pid {res.pid} from here")
        click.echo(str(res.pid))
        sys.stdout.flush()
    run_guarded(go)
