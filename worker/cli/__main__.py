"""`python -m lorabus.worker.cli ARGS`: the `lorabus` command, as the console script runs it."""

import sys

from lorabus.worker.cli import main

sys.exit(main())
