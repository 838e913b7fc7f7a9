"""``python -m pipesim.executor``: one rank of an executor job (see ``pipesim.executor.entry``)."""

import sys

from .entry import main

sys.exit(main())
