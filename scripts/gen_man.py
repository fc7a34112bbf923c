#!/usr/bin/env python3
"""Write man/lcr.1 from the click commands of `lcr` (linuxcr/cli.py and
cli_migrate.py): the synopsis, every command with its help and options,
and the exit-code table (errors.EXIT_CODES).

    python3 scripts/gen_man.py            # rewrite man/lcr.1
    python3 scripts/gen_man.py --check    # exit 1 if man/lcr.1 is out of date

No date in the page: the output depends on the commands only, so a test
(tests/test_man.py) can tell when it is stale."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import click  # noqa: E402

from linuxcr import __version__  # noqa: E402
from linuxcr.cli import main  # noqa: E402
from linuxcr.errors import EXIT_CODES  # noqa: E402

OUT = REPO / "man" / "lcr.1"


def esc(text: str) -> str:
    """Text as roff: backslashes and hyphens escaped, no line starting with
    a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln[:1] in (".", "'") else ln for ln in text.splitlines())


def paragraphs(text: str) -> list[str]:
    """click's help text (\\b marks a block kept as lines) as paragraphs."""
    out = []
    for block in text.strip().split("\n\n"):
        if block.startswith("\b\n"):
            out.append(".nf\n" + esc(block[2:]) + "\n.fi")
        else:
            out.append(esc(" ".join(block.split())))
    return out


def option_lines(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for p in cmd.get_params(ctx):
        rec = p.get_help_record(ctx)
        if rec is None or getattr(p, "hidden", False):
            continue
        names, help_ = rec
        lines += [".TP", f"\\fB{esc(names)}\\fR", esc(" ".join(help_.split())) or "."]
    return lines


def render() -> str:
    ctx = click.Context(main, info_name="lcr", help_option_names=["-h", "--help"])
    lines = [f'.TH LCR 1 "" "linuxcr {__version__}" "User Commands"',
             ".SH NAME", "lcr \\- transparent checkpoint/restart of Linux processes",
             ".SH SYNOPSIS", "\\fBlcr\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
             ".SH DESCRIPTION", *paragraphs(main.help or ""),
             ".SH OPTIONS", *option_lines(main, ctx),
             ".SH COMMANDS"]
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        lines += [f".SS {esc('lcr ' + name)} {esc(usage)}", *paragraphs(cmd.help or "")]
        lines += option_lines(cmd, sub)
    lines += [".SH EXIT STATUS", ".TS", "l l lx.",
              *(f"{code}\t{esc(cls)}\t{esc(meaning)}" for code, cls, meaning in EXIT_CODES),
              ".TE",
              ".SH ENVIRONMENT", ".TP", "\\fBLCR_DEBUG=1\\fR",
              "Show Python tracebacks instead of one line per error.",
              ".TP", "\\fBLCR_AGENT_DIR\\fR", "Where the snapshot agent keeps its socket and log.",
              ".SH SHELL COMPLETION",
              '.nf\neval "$(_LCR_COMPLETE=bash_source lcr)"\n.fi',
              ".SH SEE ALSO", "README.md and docs/ of linuxcr."]
    return "\n".join(lines) + "\n"


def main_() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python3 scripts/gen_man.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main_())
