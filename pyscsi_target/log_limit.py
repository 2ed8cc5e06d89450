"""Rate-limited log lines: what a peer can trigger at will must not flood the log.

``LogLimit(interval)`` lets one line per key through every ``interval`` seconds and counts
the ones it held back; the next line that passes says how many were suppressed, so the log
stays truthful about volume without a line per event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

MAX_KEYS = 4096  # keys remembered (one per peer address, say); the oldest are forgotten


class LogLimit:
    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def log(self, logger: logging.Logger, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line with ``key`` passed less than ``interval`` ago;
        True when it was logged.  A ``None`` key is never held back."""
        if key is None:
            logger.log(level, msg, *args)
            return True
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= MAX_KEYS:
            oldest = next(iter(self._last))
            del self._last[oldest]
            self._suppressed.pop(oldest, None)
        self._last.pop(key, None)
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            logger.log(level, msg + " (and %d more like it since the last one logged)", *args, held)
        else:
            logger.log(level, msg, *args)
        return True
