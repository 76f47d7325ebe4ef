"""``python -m ser_cli``: the ``ser`` command without its console script."""

import sys

from ser_cli.cli import main

sys.exit(main())
