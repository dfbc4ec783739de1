"""What the ``perception2d models`` commands share: their exit codes and the one-line error
they print to stderr."""
from __future__ import annotations

import sys

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def err(msg: str) -> None:
    """Print ``error: MSG`` to stderr."""
    print(f"error: {msg}", file=sys.stderr)

