"""``python -m netprobe ...`` is the ``netprobe`` command."""

import sys

from netprobe.cli import main

if __name__ == "__main__":
    sys.exit(main())
