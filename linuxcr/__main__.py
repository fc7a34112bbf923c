from linuxcr.cli import main

main()
