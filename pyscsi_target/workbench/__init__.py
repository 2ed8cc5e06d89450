"""The initiator developer's workbench: fault injection, PDU capture, strict mode, and the
daemon-wide record of failed logins.

``Workbench`` (one per engine) owns the fault rules (faults.py), the captures
(capture.py) and the set of targets in strict mode, and keeps each connection's hooks
(hooks.py) in step with them: a connection that no rule and no capture covers carries no
hook at all.  The adapter (server/protocol.py) tells it when a connection opens, when its
login has said who is connecting, when it enters full feature phase and when it closes.

Nothing here is persisted: rules, captures and strict mode last until they are removed or
the daemon stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from ..iscsi.login import LoginMachine
from ..iscsi.violations import Violations, login_rule
from .capture import Capture, CaptureBoard
from .faults import INPUT, OUTPUT, SCSI, FaultBoard, FaultRule
from .hooks import ConnectionHook, attach, detach, identity_of

if TYPE_CHECKING:
    from ..server.engine import Engine
    from ..server.protocol import IscsiProtocol

log = logging.getLogger(__name__)


class Workbench:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.faults = FaultBoard()
        self.captures = CaptureBoard()
        self.strict: set[str] = set()  # lower-case IQNs of targets in strict mode
        self.login_failures: Counter[int] = Counter()  # login status -> count
        self.login_violations = Violations(limit=256)  # the recent refused logins, with the rule
        self._expiry: asyncio.TimerHandle | None = None
        self._refresh_pending = False

    # --- strict mode ---------------------------------------------------------------------------

    def is_strict(self, iqn: str) -> bool:
        return bool(self.strict) and iqn.lower() in self.strict

    def set_strict(self, iqn: str, on: bool) -> None:
        key = iqn.lower()
        if on == (key in self.strict):
            return
        if on:
            self.strict.add(key)
        else:
            self.strict.discard(key)
        log.info("target %s: strict mode %s", iqn, "on" if on else "off")
        for s in self.engine.session_registry.of_target(iqn):
            s.set_strict(on)
            if s.target is not None:
                s.target.strict = on

    # --- connections (the adapter calls these) -----------------------------------------------------

    def connection_made(self, proto: IscsiProtocol) -> None:
        if self.faults.rules or self.captures.captures:
            self.refresh(proto, opened=True)

    def login_progress(self, proto: IscsiProtocol) -> None:
        """A login PDU was answered: the initiator and target may be known now."""
        self.refresh(proto)

    def entered_ffp(self, proto: IscsiProtocol) -> None:
        self.refresh(proto)

    def connection_lost(self, proto: IscsiProtocol) -> None:
        if proto.hook is not None:
            proto.hook.closed()

    def login_failed(self, proto: IscsiProtocol, login: LoginMachine) -> None:
        status = int(login.status) if login.status is not None else 0
        self.login_failures[status] += 1
        rule = login_rule(status, login.rule)
        if rule is not None:
            target = login.target.iqn if login.target is not None else "-"
            self.login_violations.add(rule, f"login {status:#06x}",
                                      f"{login.initiator_name or '?'} from {proto.peer} to {target}: {login.reason}")

    # --- keeping hooks in step with rules and captures ------------------------------------------------

    def refresh(self, proto: IscsiProtocol, opened: bool = False) -> None:
        hook = proto.hook
        target, initiator, tsih = identity_of(proto)
        rules = [r for r in self.faults.active() if r.scope.matches_nexus(target, initiator, tsih)]
        caps = [c for c in self.captures.running() if c.scope.matches_nexus(target, initiator, tsih)]
        if not rules and not caps and (hook is None or hook.device is None or not hook.device.held):
            if hook is not None:
                detach(proto)
            return
        if hook is None:
            hook = ConnectionHook(self, proto)
        known = [c for c in caps if c.scope.identity_known(target, initiator, tsih)]
        if opened and len(known) < len(caps):
            hook.pending = []  # who this is decides the other captures: keep the login meanwhile
        for cap in known:
            hook.join(cap, from_start=opened or hook.pending is not None)
        if len(known) == len(caps):
            hook.pending = None
        wanted = {c.id for c in caps}
        for cap_id in list(hook.streams):
            if cap_id not in wanted:
                hook.leave(cap_id)
        hook.rules_in = [r for r in rules if r.seat == INPUT]
        hook.rules_out = [r for r in rules if r.seat == OUTPUT]
        hook.rules_scsi = [r for r in rules if r.seat == SCSI]
        if hook.empty:
            detach(proto)
        else:
            attach(proto, hook)

    def refresh_all(self) -> None:
        self._refresh_pending = False
        for proto in list(self.engine.connections):
            self.refresh(proto)
        self._schedule_expiry()

    def schedule_refresh(self) -> None:
        """A rule is spent: take it off the connections soon (not from inside a hook)."""
        if not self._refresh_pending:
            self._refresh_pending = True
            asyncio.get_running_loop().call_soon(self.refresh_all)

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        at = self.faults.next_expiry()
        if at is not None:
            delay = max(0.0, at - time.monotonic()) + 0.001
            self._expiry = asyncio.get_running_loop().call_later(delay, self.refresh_all)

    # --- the API's operations ----------------------------------------------------------------------

    def add_rule(self, rule: FaultRule) -> FaultRule:
        self.faults.add(rule)
        self.refresh_all()
        return rule

    def remove_rule(self, rule_id: int) -> FaultRule | None:
        rule = self.faults.remove(rule_id)
        if rule is not None:
            self.refresh_all()
        return rule

    def clear_rules(self) -> int:
        n = self.faults.clear()
        self.refresh_all()
        return n

    def start_capture(self, cap: Capture) -> Capture:
        self.refresh_all()
        return cap

    def stop_capture(self, cap: Capture) -> None:
        self.captures.stop(cap)
        self.refresh_all()

    def remove_capture(self, cap_id: int) -> Capture | None:
        cap = self.captures.remove(cap_id)
        self.refresh_all()
        return cap

    def session_proto(self, tsih: int) -> IscsiProtocol | None:
        for proto in self.engine.connections:
            if proto.conn is not None and proto.conn.session.tsih == tsih and not proto.conn.closed:
                return proto
        return None


__all__ = ["Workbench"]
