"""The checkout whose `retrieval` a side-by-side benchmark measures: `--code DIR` on the
command line, else the benchmark's own checkout. Read before argparse runs, because the
package must be importable from there before the script's imports."""
from __future__ import annotations

import sys
from pathlib import Path


def code_root() -> Path:
    """--code DIR (or --code=DIR) from sys.argv, else this checkout; put first on sys.path."""
    root = Path(__file__).resolve().parents[1]
    for i, arg in enumerate(sys.argv):
        if arg == "--code" and i + 1 < len(sys.argv):
            root = Path(sys.argv[i + 1]).resolve()
        elif arg.startswith("--code="):
            root = Path(arg.split("=", 1)[1]).resolve()
    sys.path.insert(0, str(root))
    return root
