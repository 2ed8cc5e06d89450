"""What the iSCSI transport needs from the SCSI layer (implemented by scsi.device.ScsiDevice).

The data path is ``submit``: a ScsiTask goes in, ``task.on_done`` comes back once
(scsi/task.py states the contract).  Task management functions act on one I_T nexus
(one session) and answer a SAM service response; the session registry registers a
nexus when a session starts and reports its loss when the session ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..scsi.task import Nexus, ScsiTask, TmfResult


class ScsiLayer(Protocol):
    def submit(self, task: ScsiTask) -> None: ...

    def abort_task(self, nexus: Nexus, lun: int, tag: int) -> TmfResult: ...

    def abort_task_set(self, nexus: Nexus, lun: int) -> TmfResult: ...

    def clear_task_set(self, nexus: Nexus, lun: int) -> TmfResult: ...

    def clear_aca(self, nexus: Nexus, lun: int) -> TmfResult: ...

    def lun_reset(self, nexus: Nexus, lun: int) -> TmfResult: ...

    def target_reset(self, nexus: Nexus, cold: bool) -> TmfResult: ...

    def when_settled(self, done: Callable[[], None]) -> None:
        """Call ``done`` once the resets just made took effect everywhere (a LU exported by
        several gateways); the TMF response is sent then."""
        ...

    def add_nexus(self, nexus: Nexus) -> None: ...

    def nexus_lost(self, nexus: Nexus) -> None: ...
