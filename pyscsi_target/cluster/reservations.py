"""Persistent reservations of a LU exported by several gateways, kept in RADOS.

Beyond ceph-iscsi (whose gateways each keep their own reservations): registrations, the
reservation, the PR generation, APTPL and the unit attentions they raise hold across I_T
nexuses on every gateway.  An I_T nexus is (initiator port, relative target port) and each
gateway has its own target port group, so nexus keys are unique across gateways.

The object ``pyscsi-target.pr.<naa>`` holds, in its omap:

- ``version``: a counter every change bumps (compare-and-swap on it serialises PR OUTs from
  all gateways in the OSD);
- ``state``: ``{"regs": [[port, tpg, key]...], "reservation": [port, tpg, type] | null,
  "generation": n, "aptpl": bool}``;
- ``ua/<tpg>/<port>``: the unit attentions raised for a nexus of another gateway,
  ``[[version, asc, ascq]...]``, written in the same CAS as the change that raised them.

A PR OUT (scsi/pr.py, through ``change``) reads the object, runs on that fresh copy, and
commits with one CAS on ``version``; a refused CAS (another gateway changed it meanwhile)
restores the copy and runs the command again.  After the CAS the change is notified with
the new state and its unit attentions in the payload: each gateway installs the state and
raises the unit attentions of its own nexuses inside the notify callback, then acknowledges.
The PR OUT completes once every gateway has acknowledged (or the notify timed out), so a
command sent next through any gateway already sees the change.  A gateway that missed a
notify (a gap in versions) re-reads the object and raises the unit attentions recorded for
its nexuses with a version newer than the last it raised; recorded ones it has raised are
removed (CAS on their exact value).

Reservation conflicts are checked against each gateway's in-memory copy, which the notify
keeps current.  APTPL: the object persists; state without APTPL is cleared when a gateway
opens the LU while no other gateway serving it is alive (the whole "device" powered off).
RESERVE(6/10) reservations remain per gateway.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from pyscsi_target.cluster.follower import NOTIFY_TIMEOUT_MS, Follower
from pyscsi_target.cluster.rados import IoCtx, Notification, RadosError
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.registry import ITKey
from pyscsi_target.scsi.reservations import PersistentReservations, Reservation
from pyscsi_target.scsi.task import ScsiTask

log = logging.getLogger(__name__)

PR_PREFIX = "pyscsi-target.pr."
#: A PR OUT is run again this often when other gateways keep changing the state under it.
ATTEMPTS = 20
RECHECK = 5.0

State = dict[str, Any]
UaEntries = list[list[int]]  # [[version, asc, ascq], ...]


def _ua_key(key: ITKey) -> str:
    return f"ua/{key[1]}/{key[0]}"


def _key_of(ua_key: str) -> ITKey:
    _ua, tpg, port = ua_key.split("/", 2)
    return port, int(tpg)


class ClusterReservations(PersistentReservations, Follower):
    """``lu.pr`` of an RBD LU on a gateway of a cluster (replaces the local store's)."""

    def __init__(self, lu: LogicalUnit, io: IoCtx, local_tags: frozenset[int]) -> None:
        # The local APTPL store is not used: the state lives in RADOS (load()).
        self.lu = lu
        self.regs: dict[ITKey, int] = {}
        self.reservation: Reservation | None = None
        self.generation = 0
        self.aptpl = False
        Follower.__init__(self, io, PR_PREFIX + lu.naa.hex(), RECHECK)
        self.local_tags = local_tags
        self.version = 0  # the shared version installed here
        self.ua_seen = 0  # unit attentions of versions up to this one are raised here
        self.loaded = False
        self._lock = asyncio.Lock()  # one PR OUT of this LU at a time on this gateway
        self._busy = False
        self._deferred: dict[str, Any] | None = None  # a notify that came while a change ran
        # What a change in progress raises (applied only once it committed).
        self._recording: list[tuple[ITKey, tuple[int, int]]] | None = None
        self._aborts: set[ITKey] = set()
        self._committing = False
        self._jobs: set[asyncio.Task[Any]] = set()

    # --- the shared state ------------------------------------------------------------------

    def _encode(self) -> State:
        r = self.reservation
        return {
            "regs": [[p, t, k] for (p, t), k in sorted(self.regs.items())],
            "reservation": [r.holder[0], r.holder[1], r.type] if r is not None else None,
            "generation": self.generation,
            "aptpl": self.aptpl,
        }

    def _install(self, state: State | None) -> None:
        state = state or {}
        self.regs = {(p, int(t)): int(k) for p, t, k in state.get("regs", ())}
        res = state.get("reservation")
        self.reservation = Reservation((res[0], int(res[1])), int(res[2])) if res else None
        self.generation = int(state.get("generation", 0))
        self.aptpl = bool(state.get("aptpl", False))

    def read(self) -> tuple[int, State | None, dict[str, UaEntries]]:
        """(version, state, ua keys) as the cluster holds them (blocking)."""
        try:
            values = self.io.omap_get(self.oid)
        except RadosError as exc:
            if exc.errno == errno.ENOENT:
                return 0, None, {}
            raise
        version = int(values.get("version") or 0)
        state = json.loads(values["state"]) if values.get("state") else None
        uas = {k: json.loads(v) for k, v in values.items() if k.startswith("ua/")}
        return version, state, uas

    def is_local(self, key: ITKey) -> bool:
        return key[1] in self.local_tags

    # --- loading (the gateway round, before the LU's groups become active) ----------------------

    async def load(self, alone: bool) -> None:
        """Install the shared state; ``alone``: no other gateway serving the LU is alive, so
        state without APTPL does not survive (the device was powered off as a whole)."""
        async with self._lock:
            # The object must exist to be watched (an empty one until the first PR OUT).
            await asyncio.to_thread(self.io.omap_cas, self.oid, None, None, (), True)
            for _ in range(ATTEMPTS):
                version, state, uas = await asyncio.to_thread(self.read)
                if not (alone and state and not state.get("aptpl") and (state.get("regs") or state.get("reservation"))):
                    break
                cleared = {"version": str(version + 1).encode(), "state": json.dumps(self._empty()).encode()}
                base = {"version": str(version).encode() if version else b""}
                if await asyncio.to_thread(self.io.omap_cas, self.oid, base, cleared, list(uas), True):
                    log.info("LU %s: persistent reservations without APTPL cleared (no other gateway up)",
                             self.lu.name)
                    version, state, uas = version + 1, self._empty(), {}
                    break
            self._install(state)
            self.version = version
            self._raise_recorded(uas, version)
            if self._task is None:
                await self.follow()
            self.loaded = True

    @staticmethod
    def _empty() -> State:
        return {"regs": [], "reservation": None, "generation": 0, "aptpl": False}

    def _raise_recorded(self, uas: dict[str, UaEntries], up_to: int) -> None:
        """Raise the recorded unit attentions of this gateway's nexuses not raised yet, and
        forget (in the background) the ones raised."""
        done: dict[str, UaEntries] = {}
        for ua_key, entries in uas.items():
            key = _key_of(ua_key)
            if not self.is_local(key):
                continue
            for version, asc, ascq in entries:
                if version > self.ua_seen:
                    self.lu.add_ua(key, (asc, ascq))
            done[ua_key] = entries
        self.ua_seen = max(self.ua_seen, up_to)
        if done:
            self._background(asyncio.to_thread(self._forget, done))

    def _forget(self, raised: dict[str, UaEntries]) -> None:
        for ua_key, entries in raised.items():
            try:
                self.io.omap_cas(self.oid, {ua_key: json.dumps(entries).encode()}, None, [ua_key])
            except RadosError as exc:  # the next read tries again
                log.debug("forgetting raised unit attentions: %s", exc)

    # --- PR OUT: read, run, compare-and-swap ------------------------------------------------------

    def commit(self, task: ScsiTask) -> None:
        self._committing = True  # completed by _run_change once the CAS succeeded

    def unit_attention(self, key: ITKey, code: tuple[int, int]) -> None:
        if self._recording is None:
            self.lu.add_ua(key, code)
        else:
            self._recording.append((key, code))

    def abort_nexuses(self, keys: set[ITKey], task: ScsiTask) -> None:
        if self._recording is None:
            super().abort_nexuses(keys, task)
        else:
            self._aborts |= keys

    def change(self, task: ScsiTask, apply: Callable[[], None]) -> None:
        self._background(self._change(task, apply))

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._jobs.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._jobs.discard)

    async def _change(self, task: ScsiTask, apply: Callable[[], None]) -> None:
        async with self._lock:
            self._busy = True
            try:
                await self._run_change(task, apply)
            except Exception as exc:  # noqa: BLE001 - the command fails, the gateway goes on
                log.error("LU %s: PERSISTENT RESERVE OUT failed: %r", self.lu.name, exc)
                self.lu.fail(task, exc)
            finally:
                self._busy = False
                self._recording = None
                deferred, self._deferred = self._deferred, None
                if deferred is not None and int(deferred["version"]) > self.version:
                    self._apply_notice(deferred)

    async def _run_change(self, task: ScsiTask, apply: Callable[[], None]) -> None:
        for _ in range(ATTEMPTS):
            version, state, uas = await asyncio.to_thread(self.read)
            self._install(state)
            self.version = version
            self._recording, self._aborts, self._committing = [], set(), False
            before = self._encode()
            try:
                apply()
            except (IndexError, ValueError):  # malformed parameter data, as LogicalUnit._run maps it
                self._install(before)
                self.lu.fail(task, S.invalid_cdb(0))
                return
            except (S.CheckCondition, S.ReservationConflict) as exc:
                self._install(before)
                self.lu.fail(task, exc)
                return
            except BaseException:
                self._install(before)
                raise
            if not self._committing:
                return  # completed without a change (a RESERVE by the holder, a no-op RELEASE)
            raised, aborts = self._recording, self._aborts
            self._recording = None
            after = self._encode()
            remote: dict[str, UaEntries] = {}
            new_version = version + 1
            for key, code in raised:
                if not self.is_local(key):
                    remote.setdefault(_ua_key(key), list(uas.get(_ua_key(key), []))).append(
                        [new_version, code[0], code[1]])
            compare = {"version": str(version).encode() if version else b""}
            compare.update({k: json.dumps(uas[k]).encode() if k in uas else b"" for k in remote})
            values = {"version": str(new_version).encode(), "state": json.dumps(after).encode()}
            values.update({k: json.dumps(v).encode() for k, v in remote.items()})
            if not await asyncio.to_thread(self.io.omap_cas, self.oid, compare, values, (), True):
                continue  # another gateway changed it first: run the command again on theirs
            self.version = self.ua_seen = new_version
            for key, code in raised:
                if self.is_local(key):
                    self.lu.add_ua(key, code)
            if aborts:
                local_aborts = {k for k in aborts if self.is_local(k)}
                if local_aborts:
                    super().abort_nexuses(local_aborts, task)
            notice = {"version": new_version, "state": after,
                      "ua": [[k[0], k[1], c[0], c[1]] for k, c in raised if not self.is_local(k)],
                      "abort": [[k[0], k[1]] for k in aborts if not self.is_local(k)]}
            await self._tell_others(notice)
            self.lu.done(task)
            return
        raise RadosError(errno.EBUSY, "the reservation state kept changing on other gateways")

    async def _tell_others(self, notice: dict[str, Any]) -> None:
        """Notify every gateway and wait for their acknowledgements: once this returns, each
        live gateway checks conflicts against the new state and has raised its unit
        attentions (a dead one times out)."""
        try:
            result = await asyncio.to_thread(self.io.notify, self.oid, json.dumps(notice).encode(),
                                             NOTIFY_TIMEOUT_MS)
        except RadosError as exc:
            log.warning("LU %s: notifying the other gateways of a reservation change failed: %s",
                        self.lu.name, exc)
            return
        if result.timeouts:
            log.warning("LU %s: %d gateway(s) did not acknowledge a reservation change", self.lu.name,
                        len(result.timeouts))

    # --- resets ------------------------------------------------------------------------------------

    def spread_reset(self, code: tuple[int, int]) -> asyncio.Future[None]:
        """A LOGICAL UNIT RESET (or target reset) made here: the LU's part on every other
        gateway resets too (LogicalUnit.on_reset); done once they all acknowledged."""
        notice = {"reset": list(code), "origin": sorted(self.local_tags)}
        return asyncio.ensure_future(self._tell_others(notice))

    # --- the others' changes ----------------------------------------------------------------------

    def _notified(self, n: Notification) -> bytes:
        """Another gateway changed the state: install it and raise our nexuses' unit attentions
        now, on the loop, before the acknowledgement goes back."""
        try:
            notice = json.loads(n.data) if n.data else None
        except ValueError:
            notice = None
        if isinstance(notice, dict) and "reset" in notice:
            if not set(notice.get("origin", ())) & self.local_tags:  # not our own
                asc, ascq = notice["reset"]
                self.lu.reset((int(asc), int(ascq)))
            return b""
        if not isinstance(notice, dict) or "version" not in notice:
            self.wake()
            return b""
        if self._busy:
            self._deferred = notice  # our own change is reading or writing: after it
            return b""
        self._apply_notice(notice)
        return b""

    def _apply_notice(self, notice: dict[str, Any]) -> None:
        version = int(notice["version"])
        if version <= self.version:
            return  # our own, or one we already have
        gap = version != self.version + 1
        self._install(notice.get("state"))
        self.version = version
        if gap:
            self.wake()  # missed notices: their unit attentions come from the object
            return
        for port, tpg, asc, ascq in notice.get("ua", ()):
            key = (str(port), int(tpg))
            if self.is_local(key):
                self.lu.add_ua(key, (int(asc), int(ascq)))
        self.ua_seen = version
        aborts = {(str(p), int(t)) for p, t in notice.get("abort", ()) if int(t) in self.local_tags}
        if aborts:
            it_key = self.lu.registry.it_key
            self.lu.abort_tasks(lambda t: it_key(t.nexus) in aborts)
        self.wake()  # forget the raised ones in the object

    async def round(self) -> None:
        """A periodic or woken check: newer state installed, recorded unit attentions raised."""
        async with self._lock:
            version, state, uas = await asyncio.to_thread(self.read)
            if version > self.version:
                self._install(state)
                self.version = version
            self._raise_recorded(uas, version)

    async def close(self) -> None:
        await self.unfollow()
