"""``python -m qbench.cli``: the ``qbench`` command."""

import sys

from qbench.cli import main

sys.exit(main())
