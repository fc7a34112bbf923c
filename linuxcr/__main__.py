import sys

# ^C while Python is still importing the CLI (its first ~0.2 s) is the same
# one line and exit code as later (cli_common.run_guarded), not a traceback.
try:
    from linuxcr.cli import main
except KeyboardInterrupt:
    sys.stderr.write("lcr: interrupted\n")
    sys.exit(130)

# Guarded: importing every linuxcr module (tests that drop privileges after
# importing) must not run the CLI with the importer's argv.
if __name__ == "__main__":
    main()
