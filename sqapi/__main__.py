"""``python -m sqapi`` runs the command line (as the ``sqapi`` script does)."""

from sqapi.cli import main

if __name__ == "__main__":
    main(prog_name="sqapi")
