"""``python -m pipesim.reports sweep|report``: the report commands without the main CLI."""

import sys

from .commands import main

sys.exit(main())
