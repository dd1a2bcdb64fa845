"""``python -m mtrank.cli``: the same as the ``mtrank`` console script."""

import sys

from mtrank.cli import main

sys.exit(main())
