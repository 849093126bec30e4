"""``python -m benchmarks``: the same as the ``akl-bench`` command."""

import sys

from benchmarks.cli import main

sys.exit(main())
