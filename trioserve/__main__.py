"""``python -m trioserve``: the same as the ``trioserve`` command."""

import sys

from .cli import main

sys.exit(main())
