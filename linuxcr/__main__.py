from linuxcr.cli import main

# Guarded: importing every linuxcr module (tests that drop privileges after
# importing) must not run the CLI with the importer's argv.
if __name__ == "__main__":
    main()
