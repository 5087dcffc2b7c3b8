"""``python -m kasou``: the same as the ``kasou`` command."""

import sys

from kasou.cli import main

sys.exit(main())
