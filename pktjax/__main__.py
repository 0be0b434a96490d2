"""``python -m pktjax``: the ``pktjax`` command line."""

import sys

from pktjax.cli import main

sys.exit(main())
