"""What a full-feature-phase connection is fed, and what it tells its adapter.

``Connection.handle`` takes one of these: a framed PDU, a digest error or an oversized
PDU from the ``PDUReader``, or one of the adapter's events below (timers, shutdown, the
session registry, the socket).  Dispatch is on the event's type, in one place, so that a
hook on the input (fault injection, capture) has a single seat.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .pdu import Framed


@dataclass(frozen=True, slots=True)
class Ping:
    """The link has been idle: send a NOP-In ping (unless one is still unanswered)."""


@dataclass(frozen=True, slots=True)
class RequestLogout:
    """Async Message event 1: ask the initiator to log out within ``within`` seconds."""

    within: int


@dataclass(frozen=True, slots=True)
class AnnounceDrop:
    """Async Message event 3: the session's connections are about to be dropped."""


@dataclass(frozen=True, slots=True)
class AbortTasks:
    """The connection is being closed or reinstated: its tasks end without a response."""


@dataclass(frozen=True, slots=True)
class LinkLost:
    """The socket is gone: abort everything, send nothing more."""


PING = Ping()
ANNOUNCE_DROP = AnnounceDrop()
ABORT_TASKS = AbortTasks()
LINK_LOST = LinkLost()

AdapterEvent = Ping | RequestLogout | AnnounceDrop | AbortTasks | LinkLost
Event = Framed | AdapterEvent


class Notice(StrEnum):
    """What the connection tells its adapter (``on_event``)."""

    LOGOUT = "logout"  # the session logged out; the connection closes once its output is written
    DROP = "drop"  # fatal protocol error; likewise
    COLD_RESET = "cold_reset"  # TARGET COLD RESET done: every connection of the target must go
