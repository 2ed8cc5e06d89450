"""Asymmetric logical unit access (SPC-4 5.15): the access state of each target port group
of one logical unit, as REPORT TARGET PORT GROUPS shows it and as commands are gated by it.

Target port groups are portal group tags (one relative target port per group).  A lone
daemon leaves every group active/optimized.  When several gateways export one LU (an RBD
image), whoever tracks them (pyscsi_target/cluster/gateways.py) sets one group state per
tag through ``set_states``: the owner gateway's groups active/optimized, the others
active/non-optimized, a dead gateway's unavailable, and this gateway's own groups
transitioning or unavailable while it takes the image over or after it was fenced.  A
change raises ASYMMETRIC ACCESS STATE CHANGED on every I_T nexus of the LU (implicit ALUA:
the target changes states itself, TPGS = 01b).
"""

from __future__ import annotations

from collections.abc import Mapping

AO = 0x0  # active/optimized
ANO = 0x1  # active/non-optimized
STANDBY = 0x2
UNAVAILABLE = 0x3
TRANSITIONING = 0xF

AO_SUP = 0x01  # support bits of a target port group descriptor
#: What a group of a clustered LU may go through: T_SUP, U_SUP, AN_SUP, AO_SUP.
CLUSTER_SUPPORTED = 0x80 | 0x08 | 0x02 | AO_SUP

# NOT READY additional sense of a command refused by its port's state (SPC-4 5.15.2.4-6).
TRANSITION = (0x04, 0x0A)  # ASYMMETRIC ACCESS STATE TRANSITION
TARGET_PORT_UNAVAILABLE = (0x04, 0x0C)  # LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE
TARGET_PORT_STANDBY = (0x04, 0x0B)
ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06)


class Alua:
    """The states of one LU's target port groups; groups not named are active/optimized."""

    __slots__ = ("states", "preferred", "supported")

    def __init__(self) -> None:
        self.states: dict[int, int] = {}  # target port group (portal group tag) -> state
        self.preferred: frozenset[int] | None = None  # groups reported with PREF=1 (None: the asker's)
        self.supported = AO_SUP  # a lone daemon's groups are always active/optimized

    def state(self, tag: int) -> int:
        return self.states.get(tag, AO)

    def set_states(self, states: Mapping[int, int], preferred: frozenset[int] | None = None) -> bool:
        """Replace the states; True when any group's state changed (the caller raises the
        unit attention)."""
        new = {tag: s for tag, s in states.items() if s != AO}
        changed = new != self.states
        self.states = new
        self.preferred = preferred
        return changed

    def refusal(self, tag: int) -> tuple[int, int] | None:
        """The NOT READY ASC/ASCQ a medium-access command through ``tag`` gets, or None when
        its group is active (optimized or not)."""
        s = self.states.get(tag, AO)
        if s in (AO, ANO):
            return None
        if s == TRANSITIONING:
            return TRANSITION
        if s == STANDBY:
            return TARGET_PORT_STANDBY
        return TARGET_PORT_UNAVAILABLE
