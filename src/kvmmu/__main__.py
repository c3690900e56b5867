"""``python -m kvmmu``: the command line (see ``kvmmu --help``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
