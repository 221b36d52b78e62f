"""``python -m routeaudit``: the same command line as ``routeaudit``."""

from __future__ import annotations

import sys

from routeaudit.cli import main

if __name__ == "__main__":
    sys.exit(main())
