"""``python -m netprobe ...`` is the ``netprobe`` command."""

import sys

from netprobe.cli import main

sys.exit(main())
