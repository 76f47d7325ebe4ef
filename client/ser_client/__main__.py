"""``python -m ser_client submit|status|history``."""

import sys

from ser_client.cli import main

sys.exit(main())
