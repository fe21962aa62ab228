"""``python -m slabcache``: the same as the ``slabcache`` command."""

import sys

from .cli import main

sys.exit(main())
