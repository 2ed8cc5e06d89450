"""Log formats for a terminal, for journald, and JSON lines.

``text`` is ``<time> <LEVEL> <logger>: <message>`` for a terminal or a file.  Under
systemd with stderr connected to the journal, journald stamps every entry itself, so the
``journal`` format leaves the time out and starts each line with the syslog priority
(``<3>`` for an error), which journald turns into the entry's PRIORITY (SyslogLevelPrefix=,
on by default).  ``json`` writes one object per line for log shippers; under journald it
keeps the priority prefix.  ``auto`` picks ``journal`` when stderr is the journal stream
(``JOURNAL_STREAM`` names its device and inode, systemd.exec(5)), else ``text``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

FORMATS = ("auto", "text", "journal", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# syslog(3) priorities of the logging levels.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITY.items():  # highest level first
        if levelno >= level:
            return priority
    return 7


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """True when stderr is the stream systemd connected to journald (not redirected since)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``; every line of a traceback carries the prefix, so journald
    keeps a multi-line record at the record's priority."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def make_formatter(fmt: str, *, journal: bool | None = None) -> logging.Formatter:
    """The formatter for ``fmt`` (one of FORMATS); ``journal`` overrides the stderr check."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (choose from {', '.join(FORMATS)})")
    on_journal = stderr_is_journal() if journal is None else journal
    if fmt == "json":
        return JournalFormatter(JsonFormatter()) if on_journal else JsonFormatter()
    if fmt == "journal" or (fmt == "auto" and on_journal):
        return JournalFormatter()
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, fmt: str = "auto") -> None:
    """Log to stderr at ``level`` ("debug", "info", ...) in format ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
