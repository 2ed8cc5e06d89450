"""Rate-limited logging: a fault that repeats per command or per request (a full disk, a
password guesser) must not flood the log, yet the first occurrence and the count of the
rest must be there to read.

``RateLimitedLog.log(level, key, msg, ...)`` writes the first line of each ``key`` at once,
then at most one line per ``interval`` seconds for that key; a line that passes after
others were held back says how many were.  Keys are bounded (the oldest are forgotten), so
an attacker varying the key (its source port, say) cannot grow the table without end.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL = 10.0
MAX_KEYS = 4096


class RateLimitedLog:
    __slots__ = ("logger", "interval", "clock", "_last", "_held")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: OrderedDict[object, float] = OrderedDict()  # key -> time of its last line
        self._held: dict[object, int] = {}  # key -> lines held back since its last line

    def log(self, level: int, key: object, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` logged within the interval; True if written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > MAX_KEYS:
            old, _ = self._last.popitem(last=False)
            self._held.pop(old, None)
        if held:
            msg += " (%d similar message%s held back in the last %.0f s)"
            args = (*args, held, "" if held == 1 else "s", now - last if last is not None else 0.0)
        self.logger.log(level, msg, *args)
        return True
