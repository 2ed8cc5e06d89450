"""A LoginPolicy over fixed data, for driving the login and text machines without an engine."""

from __future__ import annotations

from pyscsi_target.iscsi.params import ChapCredential, LoginReject, LoginResult, TargetInfo
from pyscsi_target.values import LoginStatus


class StaticPolicy:
    """A self-contained LoginPolicy over fixed data (login and text tests, no engine).

    ``allowed`` maps a target IQN to the initiator names admitted (absent: everyone).
    complete_login assigns TSIHs, reinstates a session of the same (initiator, ISID)
    when TSIH is 0 and refuses an unknown non-zero TSIH with 0x020a."""

    def __init__(self, targets: list[TargetInfo], *, portal_group_tag: int = 1,
                 allowed: dict[str, set[str]] | None = None, discovery_method: str = "None",
                 discovery_credentials: list[ChapCredential] | None = None,
                 addresses: list[str] | None = None) -> None:
        self.targets = {t.iqn: t for t in targets}
        self.portal_group_tag = portal_group_tag
        self.allowed = allowed or {}
        self.discovery_method = discovery_method
        self.discovery_credentials = discovery_credentials or []
        self.addresses = addresses if addresses is not None else [f"127.0.0.1:3260,{portal_group_tag}"]
        self.sessions: dict[tuple[str, int], int] = {}  # (initiator, ISID) -> TSIH
        self.completed: list[LoginResult] = []
        self._next_tsih = 1

    def lookup_target(self, name: str) -> TargetInfo | None:
        return self.targets.get(name)

    def initiator_allowed(self, target: TargetInfo, initiator_name: str) -> bool:
        names = self.allowed.get(target.iqn)
        return names is None or initiator_name in names

    def discovery_auth(self) -> tuple[str, list[ChapCredential]]:
        return self.discovery_method, self.discovery_credentials

    def complete_login(self, result: LoginResult) -> int:
        key = (result.initiator_name, result.isid)
        if result.tsih:
            if result.tsih not in self.sessions.values():
                raise LoginReject(LoginStatus.SESSION_DOES_NOT_EXIST, "session does not exist")
            tsih = result.tsih
        else:
            tsih = self._next_tsih
            self._next_tsih = self._next_tsih % 0xFFFF + 1
            self.sessions[key] = tsih  # replaces (reinstates) an older session of that ISID
        self.completed.append(result)
        return tsih

    def send_targets(self, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
        out = []
        for t in self.targets.values():
            if (which == "All" or which == t.iqn) and self.initiator_allowed(t, initiator_name):
                out.append((t.iqn, list(self.addresses)))
        return out
