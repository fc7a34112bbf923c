import sys


def entry() -> None:
    """The `lcr` command: `lcr checkpoint` and `lcr restart` go to this user's running agent
    (linuxcr/handoff.py: a warm worker, no start-up cost) unless it is not
    running; everything else, and the fallback, runs the CLI here."""
    # ^C while Python is still importing the CLI (its first ~0.2 s) is the same
    # one line and exit code as later (cli_common.run_guarded), not a traceback.
    try:
        from linuxcr.handoff import try_handoff
        code = try_handoff(sys.argv)
        if code is not None:
            sys.exit(code)
        from linuxcr.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("lcr: interrupted\n")
        sys.exit(130)
    main()


# Guarded: importing every linuxcr module (tests that drop privileges after
# importing) must not run the CLI with the importer's argv.
if __name__ == "__main__":
    entry()
