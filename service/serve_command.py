"""The command line that starts ``vstar serve`` in a child process (``vstar demo``, ``vstar bench serve``).

``python -m vstar`` would put the working directory first on ``sys.path``, so a
folder named ``vstar`` there (the demo's V-STAR checkpoint, for one) would be
imported in place of the command: the child runs ``vstar.main`` from the
folder this package sits in, the same code as the parent's, wherever it was
started from.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds vstar.py beside the packages, installed or checked out


def serve_command(checkpoint: Path, port: int, host: str | None = None) -> list[str]:
    """argv for ``vstar serve --checkpoint checkpoint --port port [--host host]`` with this interpreter."""
    start = f"import sys; sys.path[0] = {str(PROJECT_ROOT)!r}; sys.argv[0] = 'vstar'; import vstar; vstar.main()"
    args = ["serve", "--checkpoint", str(checkpoint), "--port", str(port)] + (["--host", host] if host else [])
    return [sys.executable, "-c", start, *args]
