"""``python -m compressc`` runs the command-line interface."""

from compressc.cli import main

if __name__ == "__main__":
    main()
