"""pyscsi-target against tgtd (bench/run).  The fixtures of tests/support are imported as ``support``."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
