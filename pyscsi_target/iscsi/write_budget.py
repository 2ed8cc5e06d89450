"""The daemon-wide budget of write-buffer memory, shared fairly between sessions.

A WRITE's data is gathered in the target's memory until it is all in and the backstore has
written it.  Without a bound, any initiator could announce large WRITEs and never send
their data (issue 10: six unauthenticated sessions took the daemon to 1.6 GB).  So every
session's write commands draw on one ``WriteBudget``:

- **Admission is per command, allocation per burst.**  A write command reserves its whole
  ExpectedDataTransferLength when it arrives; its buffers are only allocated as its data
  arrives, one per burst (connection.py).  Reserving the whole command at once means an
  admitted command can always receive all its data: no two half-received commands ever wait
  for each other's memory (no hold-and-wait, so no deadlock), and R2Ts never wait for memory.
- **Refusal is TASK SET FULL.**  A command the budget cannot take completes with TASK SET
  FULL (its data, if any comes, is discarded).  SAM-5 defines it for exactly this, "the
  task set lacks resources"; Linux answers it by lowering the LU's queue depth and retrying,
  which adapts the initiator to what the target can hold.  BUSY would retry at the same
  depth, and closing the CmdSN window (MaxCmdSN) would stall every command of the session,
  reads included, and needs an unsolicited NOP-In to reopen.
- **Fair share.**  Each session is guaranteed a floor, ``min(floor, total // (2 * sessions))``,
  that no other session can take: a well-behaved session keeps writing while others hold
  the rest.  Beyond its floor a session borrows what no one has reserved and no other
  session's floor needs, up to ``session_cap`` (at least one command of the SCSI layer's
  maximum transfer length, else a quarter of the budget).

The bytes reserved stay at most ``total``, except while sessions join after others have
borrowed the whole pool: their floors are honoured at once, and borrowing stops until the
excess is returned.  All floors together are at most half the budget, so the ceiling is
1.5 x ``total`` (384 MiB with the default 256 MiB).
"""

from __future__ import annotations

from ..scsi.task import MAX_TRANSFER_BYTES

DEFAULT_TOTAL = 256 << 20
DEFAULT_FLOOR = 16 << 20


class WriteBudget:
    """Write-buffer bytes the daemon lets all sessions reserve at once."""

    def __init__(self, total: int = DEFAULT_TOTAL, floor: int = DEFAULT_FLOOR, session_cap: int | None = None) -> None:
        self.total = total
        self.floor_limit = floor
        if session_cap is None:  # room for one maximal command, or a quarter of the budget
            session_cap = min(total, max(MAX_TRANSFER_BYTES, total // 4))
        self.session_cap = session_cap
        self.used = 0  # bytes reserved by every account
        self.floor = floor  # each account's guaranteed share: min(floor_limit, total // (2 * accounts))
        self._floor_used = 0  # sum over the accounts of min(used, floor)
        self._accounts: set[WriteAccount] = set()
        # Counters for observability (plain attributes: a metrics exporter reads them).
        self.refused = 0  # commands refused (TASK SET FULL)
        self.peak = 0  # most bytes reserved at once

    def account(self) -> WriteAccount:
        """A new session's account (``close`` it when the session ends)."""
        a = WriteAccount(self)
        self._accounts.add(a)
        self._refloor()
        return a

    @property
    def sessions(self) -> int:
        return len(self._accounts)

    def _refloor(self) -> None:
        self.floor = min(self.floor_limit, self.total // (2 * max(1, len(self._accounts))))
        f = self.floor
        self._floor_used = sum(min(a.used, f) for a in self._accounts)

    def _reserved_for_others(self, a: WriteAccount) -> int:
        """Floor room the other accounts are guaranteed and have not used."""
        f = self.floor
        unused_floors = f * len(self._accounts) - self._floor_used
        return unused_floors - max(0, f - a.used)

    def _take(self, a: WriteAccount, n: int) -> bool:
        used = a.used
        if used + n > self.session_cap:
            return False
        f = self.floor
        if used + n > f and n > self.total - self.used - self._reserved_for_others(a):
            return False  # beyond its floor, and the free bytes are others' guaranteed room
        a.used = used + n
        self.used += n
        self._floor_used += min(used + n, f) - min(used, f)
        if self.used > self.peak:
            self.peak = self.used
        return True

    def _give(self, a: WriteAccount, n: int) -> None:
        used = a.used
        a.used = used - n
        self.used -= n
        f = self.floor
        self._floor_used += min(used - n, f) - min(used, f)

    def _close(self, a: WriteAccount) -> None:
        if a in self._accounts:
            if a.used:
                self._give(a, a.used)
            self._accounts.discard(a)
            self._refloor()
        a.closed = True


class WriteAccount:
    """One session's share of a WriteBudget."""

    __slots__ = ("budget", "used", "refused", "closed")

    def __init__(self, budget: WriteBudget) -> None:
        self.budget = budget
        self.used = 0  # bytes this session has reserved
        self.refused = 0
        self.closed = False  # its session ended: everything was given back at once

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes for a write command; False when the budget cannot (TASK SET FULL)."""
        if not self.closed and self.budget._take(self, n):
            return True
        self.refused += 1
        self.budget.refused += 1
        return False

    def give(self, n: int) -> None:
        """Return ``n`` bytes reserved by ``take`` (nothing once the account is closed)."""
        if not self.closed:
            self.budget._give(self, n)

    def close(self) -> None:
        """The session ended: whatever it still holds goes back."""
        self.budget._close(self)
