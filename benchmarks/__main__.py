"""``python -m benchmarks`` (``./run.sh bench``): the benchmark report (``benchmarks/cli.py``)."""

import sys

from benchmarks.cli import main

sys.exit(main())
