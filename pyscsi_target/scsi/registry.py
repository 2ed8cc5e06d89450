"""The SCSI layer's directory of what is running: target devices by name, logical units
by NAA designator, and the identity of every I_T nexus.

The engine creates one and hands it to every ScsiDevice and LogicalUnit it makes; REPORT
TARGET PORT GROUPS finds a nexus's device here, and the EXTENDED COPY copy manager finds
the LUs a parameter list names.  Loop thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyscsi_target.scsi.task import Nexus, ScsiTask

if TYPE_CHECKING:  # annotations only: device.py and lu.py import this module
    from pyscsi_target.scsi.device import ScsiDevice
    from pyscsi_target.scsi.lu import LogicalUnit

ITKey = tuple[str, int]  # (SCSI initiator port name, relative target port id)


class ScsiRegistry:
    def __init__(self) -> None:
        self.devices: dict[str, ScsiDevice] = {}  # by target name
        self.lus: dict[bytes, LogicalUnit] = {}  # by 8-byte NAA designator
        self._keys: dict[int, ITKey] = {}  # by nexus id

    def it_key(self, nexus: Nexus) -> ITKey:
        """The I_T nexus identity that UAs and reservations hang on (cached per nexus)."""
        key = self._keys.get(nexus.nexus_id)
        if key is None:
            key = self._keys[nexus.nexus_id] = (nexus.initiator_port.lower(), nexus.portal_group_tag)
        return key

    def forget_nexus(self, nexus: Nexus) -> None:
        self._keys.pop(nexus.nexus_id, None)

    def device_of(self, task: ScsiTask) -> ScsiDevice | None:
        return self.devices.get(task.nexus.target_name)

    def devices_mapping(self, lu: LogicalUnit) -> list[ScsiDevice]:
        return [d for d in self.devices.values() if any(v is lu for v in d.luns.values())]
