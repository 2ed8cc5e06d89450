"""ConfigService: the one Python API that changes the configuration.

Every mutation runs under one asyncio lock (two concurrent creates of the same name give
one success and one conflict) and follows the same path:

    validate on a copy of the model -> persist the difference in one SQLite transaction
    -> ``await engine.apply(model.copy())`` -> return the new object.

If the engine cannot apply a change (a portal address already bound by another program,
say), the database and the in-memory model are put back and the old model is re-applied,
so the persisted state and the running target never disagree.

Validation follows FreeNAS 9.3-11.3 (see the REST issue): errors are raised as
``ConfigError`` with a ``{model_field: [message, ...]}`` dict (``"__all__"`` for the whole
object) and a ``kind`` (invalid / conflict / not_found) so that each REST façade can
render its own body and status.  Field names are the model's; the façades map them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pyscsi_target.config.model import (
    AUTH_METHODS,
    BLOCK_SIZES,
    DEFAULT_BASENAME,
    EXTENT_TYPES,
    RPM_VALUES,
    AuthCredential,
    ConfigModel,
    Extent,
    GlobalConfig,
    InitiatorGroup,
    LunMap,
    PortalGroup,
    Target,
    TargetGroup,
)
from pyscsi_target.config.store import ConfigStore, StoreTransaction
from pyscsi_target.values import (
    MAX_ISCSI_NAME,
    check_iscsi_name,
    format_listen,
    initiator_names_text,
    is_full_iscsi_name,
    networks_text,
    parse_access_config,
    parse_listen,
    parse_naa,
    parse_size,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

INVALID = "invalid"
CONFLICT = "conflict"
NOT_FOUND = "not_found"

MAX_LUN = 1023  # FreeNAS/ctld limit; also keeps REPORT LUNS in peripheral/flat addressing
MAX_IQN_LEN = MAX_ISCSI_NAME
CHAP_MIN, CHAP_MAX = 12, 16
DEMO_SIZE = 1 << 30

_SERIAL_RE = re.compile(r"^[\x21-\x7e]{1,16}$")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")


# --- errors --------------------------------------------------------------------------------


class ConfigError(Exception):
    """A refused change.  ``errors`` maps model field names (or ``__all__``) to messages."""

    kind = INVALID

    def __init__(self, errors: dict[str, list[str]] | str, field: str = "__all__") -> None:
        if isinstance(errors, str):
            errors = {field: [errors]}
        self.errors = errors
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items()))

    @property
    def message(self) -> str:
        """All messages in one line (for APIs with a single error string)."""
        parts = []
        for key, msgs in self.errors.items():
            for msg in msgs:
                parts.append(msg if key == "__all__" else f"{key}: {msg}")
        return "; ".join(parts)


class ValidationError(ConfigError):
    kind = INVALID


class ConflictError(ConfigError):
    kind = CONFLICT


class NotFoundError(ConfigError):
    kind = NOT_FOUND


class _Errors:
    """Collects per-field messages so a client sees every problem at once."""

    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def add(self, field: str, msg: str) -> None:
        self.errors.setdefault(field, []).append(msg)

    def __contains__(self, field: str) -> bool:
        return field in self.errors

    def raise_if_any(self, cls: type[ConfigError] = ValidationError) -> None:
        if self.errors:
            raise cls(self.errors)


# --- the engine, as this module uses it ----------------------------------------------------


class EngineLike(Protocol):
    async def apply(self, model: ConfigModel) -> None: ...

    def session_count(self, target_id: int) -> int: ...


# --- value coercion (clients send ids as strings, rpm as numbers, ...) ---------------------

_MISSING = object()


def _as_str(errs: _Errors, field: str, value: Any, *, max_len: int = 1024, allow_ctrl: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        errs.add(field, "This field must be a string.")
        return None
    text = value if isinstance(value, str) else str(value)
    if len(text) > max_len:
        errs.add(field, f"Ensure this value has at most {max_len} characters (it has {len(text)}).")
        return None
    if not allow_ctrl and _CTRL_RE.search(text):
        errs.add(field, "Control characters are not allowed.")
        return None
    return text


def _as_int(
    errs: _Errors, field: str, value: Any, *, lo: int | None = None, hi: int | None = None
) -> int | None:
    if isinstance(value, bool):
        errs.add(field, "Enter a whole number.")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,18}\s*", value):
        value = int(value)
    if not isinstance(value, int):
        errs.add(field, "Enter a whole number.")
        return None
    if lo is not None and value < lo:
        errs.add(field, f"Ensure this value is greater than or equal to {lo}.")
        return None
    if hi is not None and value > hi:
        errs.add(field, f"Ensure this value is less than or equal to {hi}.")
        return None
    return value


def _as_bool(errs: _Errors, field: str, value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off", ""):
            return False
    errs.add(field, "Enter a boolean (true or false).")
    return None


def is_local_address(ip: str) -> bool:
    """True if ``ip`` is a wildcard or configured on this host (a bind to it succeeds)."""
    addr = ipaddress.ip_address(ip)
    if addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL and exc.errno != errno.EINVAL
    return True


def _create_sparse(path: str, size: int) -> None:
    """Create a sparse file of ``size`` bytes (the backstore's helper when available)."""
    try:
        from pyscsi_target.backstore.file import create_sparse  # type: ignore[attr-defined]
    except ImportError:
        create_sparse = None
    if create_sparse is not None:
        create_sparse(path, size)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _grow_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)


# --- the service ---------------------------------------------------------------------------


class ConfigService:
    """Owns the ConfigModel; the REST façades and the daemon change it only through here."""

    def __init__(
        self,
        store: ConfigStore,
        engine: EngineLike | None,
        extent_roots: Iterable[Path | str] | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self._lock = asyncio.Lock()
        self._model = store.load()
        self.extent_roots: list[Path] = []
        self.set_extent_roots(extent_roots)

    def set_extent_roots(self, roots: Iterable[Path | str] | None) -> None:
        roots = list(roots or [])
        if not roots:
            roots = [self.store.state_dir / "extents"]
        resolved = []
        for root in roots:
            Path(root).mkdir(parents=True, exist_ok=True)
            resolved.append(Path(os.path.realpath(root)))
        self.extent_roots = resolved

    @property
    def model(self) -> ConfigModel:
        """The current model.  Read-only for callers: change it through the methods below."""
        return self._model

    # --- start-up ----------------------------------------------------------------------

    async def start(self, *, default_portals: Iterable[str] = ("0.0.0.0:3260",), demo: bool = False) -> None:
        """Seed an empty state dir, optionally add the demo target, then apply to the engine."""
        async with self._lock:
            if self.store.is_empty():
                model = ConfigModel(global_config=GlobalConfig(basename=DEFAULT_BASENAME))
                listen = []
                for entry in default_portals:
                    listen.append(str(parse_listen(entry, allow_zero=True)))
                new_pg = PortalGroup(id=0, tag=1, listen=listen, comment="default") if listen else None

                def seed(tx: StoreTransaction) -> None:
                    if new_pg is not None:
                        new_pg.id = tx.new_id("portal_groups")
                        model.portal_groups[new_pg.id] = new_pg
                    tx.sync(ConfigModel(), model)

                with self.store.transaction() as tx:
                    seed(tx)
                self._model = model
                log.info("initialised a new configuration in %s", self.store.path)
        if demo:
            await self.ensure_demo()
        else:
            async with self._lock:
                if self.engine is not None:
                    await self.engine.apply(self._model.copy())

    async def ensure_demo(self, size: int = DEMO_SIZE) -> None:
        """The ``--demo`` target: a sparse 1 GiB file, target ``demo``, LUN 0, open to all."""
        model = self._model
        extent = next((e for e in model.extents.values() if e.name == "demo"), None)
        if extent is None:
            extent = await self.create_extent(
                {"name": "demo", "type": "File", "path": "demo.img", "filesize": str(size)}
            )
        target = next((t for t in self._model.targets.values() if t.name == "demo"), None)
        if target is None:
            target = await self.create_target({"name": "demo"})
        for pg_id in sorted(self._model.portal_groups):
            if not any(g.portal_group == pg_id for g in self._model.groups_of_target(target.id)):
                await self.create_target_group({"target": target.id, "portal_group": pg_id})
        if not any(m.target == target.id and m.extent == extent.id for m in self._model.lun_maps.values()):
            await self.create_lun_map({"target": target.id, "extent": extent.id, "lunid": None})
        async with self._lock:
            if self.engine is not None:
                await self.engine.apply(self._model.copy())

    # --- the commit path ---------------------------------------------------------------

    async def _mutate(self, fn: Callable[[], Awaitable[T]]) -> T:
        # Shielded: a client hanging up must not leave a change persisted but half-applied.
        async def locked() -> T:
            async with self._lock:
                return await fn()

        return await asyncio.shield(asyncio.ensure_future(locked()))

    async def _commit(self, new: ConfigModel, before_sync: Callable[[StoreTransaction], None] | None = None) -> None:
        old = self._model
        with self.store.transaction() as tx:
            if before_sync is not None:
                before_sync(tx)
            tx.sync(old, new)
        self._model = new
        if self.engine is None:
            return
        try:
            await self.engine.apply(new.copy())
        except Exception as exc:
            log.exception("engine could not apply the new configuration; reverting it")
            with self.store.transaction() as tx:
                tx.sync(new, old)
            self._model = old
            try:
                await self.engine.apply(old.copy())
            except Exception:
                log.exception("engine could not re-apply the previous configuration either")
            raise ValidationError(f"The running target could not apply this change: {exc}") from exc

    def _get(self, kind: str, obj_id: Any, label: str) -> Any:
        objs = getattr(self._model, kind)
        try:
            key = int(obj_id)
        except (TypeError, ValueError):
            key = None
        if isinstance(obj_id, bool) or key is None or key not in objs:
            raise NotFoundError(f"{label} {obj_id} does not exist.")
        return objs[key]

    async def _create(self, kind: str, build: Callable[[ConfigModel], Any]) -> Any:
        async def op() -> Any:
            new = self._model.copy()
            obj = build(new)

            def assign(tx: StoreTransaction) -> None:
                obj.id = tx.new_id(kind)
                getattr(new, kind)[obj.id] = obj

            await self._commit(new, assign)
            return dataclasses.replace(obj)

        return await self._mutate(op)

    async def _update(self, kind: str, label: str, obj_id: Any, build: Callable[[ConfigModel, Any], Any]) -> Any:
        async def op() -> Any:
            current = self._get(kind, obj_id, label)
            new = self._model.copy()
            obj = build(new, dataclasses.replace(current))
            getattr(new, kind)[current.id] = obj
            await self._commit(new)
            return dataclasses.replace(obj)

        return await self._mutate(op)

    # --- global configuration ----------------------------------------------------------

    async def update_global(self, changes: dict[str, Any]) -> GlobalConfig:
        async def op() -> GlobalConfig:
            new = self._model.copy()
            gc = new.global_config
            errs = _Errors()
            if changes.get("basename") is not None:
                basename = _as_str(errs, "basename", changes["basename"], max_len=MAX_IQN_LEN)
                if basename is not None:
                    try:
                        check_iscsi_name(basename)
                    except ValueError:
                        ok = False
                    else:
                        ok = True
                    if not is_full_iscsi_name(basename) or (not ok and not basename.startswith("iqn.")):
                        errs.add("basename", "Base name must be an iqn., eui. or naa. name in lower case.")
                    elif not ok:
                        errs.add("basename", "Base name must look like iqn.yyyy-mm.reversed.domain.")
                    else:
                        gc.basename = basename
            if changes.get("isns_servers") is not None:
                servers = _as_str(errs, "isns_servers", changes["isns_servers"])
                if servers is not None:
                    for entry in servers.split():
                        if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9a-fA-F:.]+\](:\d{1,5})?", entry):
                            errs.add("isns_servers", f"{entry!r} is not a host name or address.")
                    gc.isns_servers = " ".join(servers.split())
            if "pool_avail_threshold" in changes:
                value = changes["pool_avail_threshold"]
                threshold = None if value in (None, "") else _as_int(errs, "pool_avail_threshold", value, lo=0, hi=99)
                gc.pool_avail_threshold = threshold or None  # 0 = none, as for extents
            errs.raise_if_any()
            for target in new.targets.values():
                if len(new.target_iqn(target)) > MAX_IQN_LEN:
                    raise ValidationError({"basename": [f"Target {target.name} would get an IQN over 223 bytes."]})
            await self._commit(new)
            return dataclasses.replace(gc)

        return await self._mutate(op)

    async def set_service_enabled(self, enabled: bool) -> bool:
        async def op() -> bool:
            new = self._model.copy()
            new.service_enabled = bool(enabled)
            await self._commit(new)
            return new.service_enabled

        return await self._mutate(op)

    # --- portal groups -----------------------------------------------------------------

    def _build_portal_group(self, model: ConfigModel, fields: dict[str, Any], pg: PortalGroup) -> PortalGroup:
        errs = _Errors()
        if fields.get("tag") is not None:
            tag = _as_int(errs, "tag", fields["tag"], lo=1, hi=65535)
            if tag is not None:
                pg.tag = tag
        if fields.get("comment") is not None:
            pg.comment = _as_str(errs, "comment", fields["comment"]) or ""
        if fields.get("listen") is not None:
            listen = fields["listen"]
            if isinstance(listen, str):
                listen = listen.split()
            if not isinstance(listen, list):
                errs.add("listen", "Enter a list of IP:PORT strings.")
            else:
                out: list[str] = []
                for entry in listen:
                    if not isinstance(entry, str):
                        errs.add("listen", "Each portal must be an IP:PORT string.")
                        continue
                    try:
                        addr = parse_listen(entry)
                    except ValueError as exc:
                        errs.add("listen", str(exc))
                        continue
                    ip, norm = addr.host, str(addr)
                    if norm in out:
                        errs.add("listen", f"{norm} is listed twice.")
                        continue
                    if norm not in pg.listen and not is_local_address(ip):
                        errs.add("listen", f"IP {ip} is not configured on this host.")
                        continue
                    out.append(norm)
                if not out and "listen" not in errs:
                    errs.add("listen", "At least one portal IP:PORT is required.")
                pg.listen = out
        if fields.get("discovery_auth_method") is not None:
            method = _as_str(errs, "discovery_auth_method", fields["discovery_auth_method"])
            if method is not None:
                if method not in AUTH_METHODS:
                    errs.add("discovery_auth_method", f"Select a valid choice: {', '.join(AUTH_METHODS)}.")
                else:
                    pg.discovery_auth_method = method
        if "discovery_auth_group" in fields:
            value = fields["discovery_auth_group"]
            pg.discovery_auth_group = (
                None if value in (None, "") else _as_int(errs, "discovery_auth_group", value, lo=1)
            )
        if not pg.listen and "listen" not in errs:
            errs.add("listen", "This field is required.")
        errs.raise_if_any()
        self._check_auth_group(
            model, pg.discovery_auth_method, pg.discovery_auth_group, "discovery_auth_method", "discovery_auth_group"
        )
        # Uniqueness: (ip, port) across all portal groups, wildcards overlapping the same port.
        taken: dict[tuple[str, int], PortalGroup] = {}
        for other in model.portal_groups.values():
            if other.id == pg.id:
                continue
            if other.tag == pg.tag:
                raise ConflictError({"tag": [f"Portal group tag {pg.tag} already exists."]})
            for entry in other.listen:
                a = parse_listen(entry, allow_zero=True)
                taken[(a.host, a.port)] = other
        for entry in pg.listen:
            a = parse_listen(entry, allow_zero=True)
            ip, port = a.host, a.port
            if port == 0:
                continue  # never collides: the kernel picks a free port
            for (oip, oport), other in taken.items():
                if oport != port:
                    continue
                a, b = ipaddress.ip_address(oip), ipaddress.ip_address(ip)
                overlap = a == b or (a.version == b.version and (a.is_unspecified or b.is_unspecified))
                if overlap:
                    raise ConflictError(
                        {"listen": [f"{entry} is already used by portal {other.tag} ({format_listen(oip, oport)})."]}
                    )
        return pg

    def _check_auth_group(self, model: ConfigModel, method: str, tag: int | None, mfield: str, gfield: str) -> None:
        if tag is not None and not model.auth_group(tag):
            raise ValidationError({gfield: [f"Auth group {tag} does not exist."]})
        if method in ("CHAP", "CHAP Mutual") and tag is None:
            raise ValidationError({gfield: [f"An auth group is required for {method}."]})
        if method == "CHAP Mutual" and not any(c.peeruser for c in model.auth_group(tag)):
            raise ValidationError({gfield: ["CHAP Mutual needs a credential with a peer user in the auth group."]})

    async def create_portal_group(self, fields: dict[str, Any]) -> PortalGroup:
        def build(model: ConfigModel) -> PortalGroup:
            tag = max((p.tag for p in model.portal_groups.values()), default=0) + 1
            return self._build_portal_group(model, fields, PortalGroup(id=0, tag=tag))

        return await self._create("portal_groups", build)

    async def update_portal_group(self, pg_id: Any, changes: dict[str, Any]) -> PortalGroup:
        return await self._update(
            "portal_groups", "Portal", pg_id, lambda model, pg: self._build_portal_group(model, changes, pg)
        )

    async def delete_portal_group(self, pg_id: Any) -> None:
        async def op() -> None:
            pg = self._get("portal_groups", pg_id, "Portal")
            new = self._model.copy()
            del new.portal_groups[pg.id]
            # Django's CASCADE, as FreeNAS: the targets stop being exported on this portal.
            for g in list(new.target_groups.values()):
                if g.portal_group == pg.id:
                    del new.target_groups[g.id]
            await self._commit(new)

        await self._mutate(op)

    # --- initiator groups --------------------------------------------------------------

    def _build_initiator_group(self, model: ConfigModel, fields: dict[str, Any], ig: InitiatorGroup) -> InitiatorGroup:
        errs = _Errors()
        if fields.get("tag") is not None:
            tag = _as_int(errs, "tag", fields["tag"], lo=1, hi=65535)
            if tag is not None:
                ig.tag = tag
        if fields.get("comment") is not None:
            ig.comment = _as_str(errs, "comment", fields["comment"]) or ""
        if fields.get("initiators") is not None:
            text = _as_str(errs, "initiators", fields["initiators"], max_len=65536, allow_ctrl=True)
            if text is not None:
                try:
                    ig.initiators = initiator_names_text(text)
                except ValueError as exc:
                    errs.add("initiators", str(exc))
        if fields.get("auth_network") is not None:
            text = _as_str(errs, "auth_network", fields["auth_network"], max_len=65536, allow_ctrl=True)
            if text is not None:
                try:
                    ig.auth_network = networks_text(text)
                except ValueError as exc:
                    errs.add("auth_network", str(exc))
        errs.raise_if_any()
        return ig

    async def create_initiator_group(self, fields: dict[str, Any]) -> InitiatorGroup:
        def build(model: ConfigModel) -> InitiatorGroup:
            tag = max((i.tag for i in model.initiator_groups.values()), default=0) + 1
            return self._build_initiator_group(model, fields, InitiatorGroup(id=0, tag=tag))

        return await self._create("initiator_groups", build)

    async def update_initiator_group(self, ig_id: Any, changes: dict[str, Any]) -> InitiatorGroup:
        return await self._update(
            "initiator_groups", "Authorized initiator", ig_id,
            lambda model, ig: self._build_initiator_group(model, changes, ig),
        )

    async def delete_initiator_group(self, ig_id: Any) -> None:
        async def op() -> None:
            ig = self._get("initiator_groups", ig_id, "Authorized initiator")
            new = self._model.copy()
            del new.initiator_groups[ig.id]
            # Fail closed: a target group that was restricted by this group is removed rather
            # than silently opened to every initiator.
            for g in list(new.target_groups.values()):
                if g.initiator_group == ig.id:
                    del new.target_groups[g.id]
            await self._commit(new)

        await self._mutate(op)

    # --- auth credentials --------------------------------------------------------------

    def _build_auth_credential(self, model: ConfigModel, fields: dict[str, Any], ac: AuthCredential) -> AuthCredential:
        errs = _Errors()
        if fields.get("tag") is not None:
            tag = _as_int(errs, "tag", fields["tag"], lo=1, hi=65535)
            if tag is not None:
                ac.tag = tag
        for name in ("user", "secret", "peeruser", "peersecret"):
            if fields.get(name) is not None:
                value = _as_str(errs, name, fields[name], max_len=255)
                if value is not None:
                    if name.endswith("user") and value and re.search(r"\s", value):
                        errs.add(name, "User names cannot contain white space.")
                    setattr(ac, name, value)
        if not ac.tag and "tag" not in errs:
            errs.add("tag", "This field is required.")
        if not ac.user and "user" not in errs:
            errs.add("user", "This field is required.")
        if "secret" not in errs and not CHAP_MIN <= len(ac.secret) <= CHAP_MAX:
            errs.add("secret", f"Secret must be between {CHAP_MIN} and {CHAP_MAX} characters.")
        if ac.peeruser and not ac.peersecret and "peersecret" not in errs:
            errs.add("peersecret", "The peer secret is required if you set a peer user.")
        if ac.peersecret and not ac.peeruser and "peeruser" not in errs:
            errs.add("peeruser", "The peer user is required if you set a peer secret.")
        if ac.peersecret and "peersecret" not in errs:
            if not CHAP_MIN <= len(ac.peersecret) <= CHAP_MAX:
                errs.add("peersecret", f"Peer secret must be between {CHAP_MIN} and {CHAP_MAX} characters.")
            elif ac.peersecret == ac.secret:
                errs.add("peersecret", "The peer secret cannot be the same as the secret.")
        errs.raise_if_any()
        return ac

    async def create_auth_credential(self, fields: dict[str, Any]) -> AuthCredential:
        return await self._create(
            "auth_credentials",
            lambda model: self._build_auth_credential(model, fields, AuthCredential(id=0, tag=0, user="", secret="")),
        )

    async def update_auth_credential(self, ac_id: Any, changes: dict[str, Any]) -> AuthCredential:
        return await self._update(
            "auth_credentials", "Auth credential", ac_id,
            lambda model, ac: self._build_auth_credential(model, changes, ac),
        )

    async def delete_auth_credential(self, ac_id: Any) -> None:
        async def op() -> None:
            ac = self._get("auth_credentials", ac_id, "Auth credential")
            new = self._model.copy()
            del new.auth_credentials[ac.id]
            # Target groups keep their CHAP requirement: with no credential left, logins fail
            # (closed) instead of becoming unauthenticated.
            await self._commit(new)

        await self._mutate(op)

    # --- targets -----------------------------------------------------------------------

    def _build_target(self, model: ConfigModel, fields: dict[str, Any], t: Target) -> Target:
        errs = _Errors()
        if fields.get("name") is not None:
            name = _as_str(errs, "name", fields["name"], max_len=MAX_IQN_LEN)
            if name is not None:
                t.name = name
        if not t.name and "name" not in errs:
            errs.add("name", "This field is required.")
        elif "name" not in errs:
            try:
                check_iscsi_name(t.name)
            except ValueError as exc:
                errs.add("name", str(exc))
            else:
                if len(model.target_iqn(t).encode()) > MAX_IQN_LEN:
                    errs.add("name", "The target's IQN would be longer than 223 bytes.")
        if "alias" in fields:
            alias = fields["alias"]
            if alias is None or alias == "":
                t.alias = None
            else:
                t.alias = _as_str(errs, "alias", alias, max_len=255)
        if fields.get("comment") is not None:
            t.comment = _as_str(errs, "comment", fields["comment"]) or ""
        if fields.get("access_config") is not None:
            text = _as_str(errs, "access_config", fields["access_config"], max_len=8192)
            if text is not None:
                try:
                    parse_access_config(text)
                    t.access_config = text.strip()
                except ValueError as exc:
                    errs.add("access_config", str(exc))
        if fields.get("virtual_server_id") is not None:
            vs = _as_int(errs, "virtual_server_id", fields["virtual_server_id"], lo=0, hi=255)
            if vs is not None:
                t.virtual_server_id = vs
        errs.raise_if_any()
        for other in model.targets.values():
            if other.id == t.id:
                continue
            if other.name == t.name:
                raise ConflictError({"name": ["Target name already exists"]})
            if t.alias is not None and other.alias == t.alias:
                raise ConflictError({"alias": ["Target alias already exists"]})
            if model.target_iqn(other) == model.target_iqn(t):
                raise ConflictError({"name": ["Target name already exists"]})
        return t

    async def create_target(self, fields: dict[str, Any]) -> Target:
        return await self._create("targets", lambda model: self._build_target(model, fields, Target(id=0, name="")))

    async def update_target(self, target_id: Any, changes: dict[str, Any]) -> Target:
        return await self._update(
            "targets", "Target", target_id, lambda model, t: self._build_target(model, changes, t)
        )

    def _check_not_in_use(self, target_id: int) -> None:
        count = self.engine.session_count(target_id) if self.engine is not None else 0
        if count > 0:
            raise ConflictError("Target is in use")

    async def delete_target(self, target_id: Any) -> None:
        async def op() -> None:
            t = self._get("targets", target_id, "Target")
            self._check_not_in_use(t.id)
            new = self._model.copy()
            del new.targets[t.id]
            for g in list(new.target_groups.values()):
                if g.target == t.id:
                    del new.target_groups[g.id]
            for m in list(new.lun_maps.values()):
                if m.target == t.id:
                    del new.lun_maps[m.id]
            await self._commit(new)

        await self._mutate(op)

    # --- target groups -----------------------------------------------------------------

    def _build_target_group(self, model: ConfigModel, fields: dict[str, Any], g: TargetGroup) -> TargetGroup:
        errs = _Errors()
        if fields.get("target") is not None:
            value = _as_int(errs, "target", fields["target"], lo=1)
            if value is not None:
                g.target = value
        if fields.get("portal_group") is not None:
            value = _as_int(errs, "portal_group", fields["portal_group"], lo=1)
            if value is not None:
                g.portal_group = value
        if "initiator_group" in fields:
            value = fields["initiator_group"]
            g.initiator_group = None if value in (None, "") else _as_int(errs, "initiator_group", value, lo=1)
        if "auth_group" in fields:
            value = fields["auth_group"]
            g.auth_group = None if value in (None, "") else _as_int(errs, "auth_group", value, lo=1)
        if fields.get("auth_type") is not None:
            value = _as_str(errs, "auth_type", fields["auth_type"])
            if value is not None:
                if value not in AUTH_METHODS:
                    errs.add("auth_type", f"Select a valid choice: {', '.join(AUTH_METHODS)}.")
                else:
                    g.auth_type = value
        if fields.get("initial_digest") is not None:
            # FreeNAS stored this free-form (its own document PUTs "CHAP"); keep it short.
            value = _as_str(errs, "initial_digest", fields["initial_digest"], max_len=120)
            if value is not None:
                g.initial_digest = value
        if "target" not in errs and g.target not in model.targets:
            errs.add("target", "Select a valid choice. That choice is not one of the available choices.")
        if "portal_group" not in errs and g.portal_group not in model.portal_groups:
            errs.add("portal_group", "Select a valid choice. That choice is not one of the available choices.")
        if (
            "initiator_group" not in errs
            and g.initiator_group is not None
            and g.initiator_group not in model.initiator_groups
        ):
            errs.add("initiator_group", "Select a valid choice. That choice is not one of the available choices.")
        errs.raise_if_any()
        self._check_auth_group(model, g.auth_type, g.auth_group, "auth_type", "auth_group")
        for other in model.target_groups.values():
            if other.id != g.id and other.target == g.target and other.portal_group == g.portal_group:
                tag = model.portal_groups[g.portal_group].tag
                raise ConflictError({"portal_group": [f"Portal {tag} cannot be duplicated on a target"]})
        return g

    async def create_target_group(self, fields: dict[str, Any]) -> TargetGroup:
        return await self._create(
            "target_groups",
            lambda model: self._build_target_group(model, fields, TargetGroup(id=0, target=0, portal_group=0)),
        )

    async def update_target_group(self, tg_id: Any, changes: dict[str, Any]) -> TargetGroup:
        return await self._update(
            "target_groups", "Target group", tg_id, lambda model, g: self._build_target_group(model, changes, g)
        )

    async def delete_target_group(self, tg_id: Any) -> None:
        async def op() -> None:
            g = self._get("target_groups", tg_id, "Target group")
            new = self._model.copy()
            del new.target_groups[g.id]
            await self._commit(new)

        await self._mutate(op)

    # --- extents -----------------------------------------------------------------------

    def _resolve_file_path(self, errs: _Errors, raw: str) -> str | None:
        """An extent file path inside an extent root, or None (message added)."""
        if "\x00" in raw or not raw.strip():
            errs.add("path", "Enter a file path.")
            return None
        parts = Path(raw).parts
        if ".." in parts:
            errs.add("path", "'..' is not allowed in an extent path.")
            return None
        candidate = Path(raw) if os.path.isabs(raw) else self.extent_roots[0] / raw
        candidate = Path(os.path.normpath(candidate))
        real = Path(os.path.realpath(candidate))
        # Both the path as written and the path after following symlinks must be in a root.
        for root in self.extent_roots:
            if candidate.is_relative_to(root) and real.is_relative_to(root) and real != root:
                break
        else:
            roots = ", ".join(str(r) for r in self.extent_roots)
            errs.add("path", f"Extent files must be inside an extent root ({roots}).")
            return None
        if real.is_dir():
            errs.add("path", "You need to specify a filepath, not a directory.")
            return None
        if real.exists() and not real.is_file():
            errs.add("path", "The extent path exists and is not a regular file.")
            return None
        return str(candidate)

    def _resolve_disk(self, errs: _Errors, raw: str) -> str | None:
        name = raw.strip()
        if name.startswith("/dev/"):
            name = name[5:]
        if not name or "\x00" in name or ".." in Path(name).parts or name.startswith("/"):
            errs.add("disk", "Enter a device name such as sdb, ada1 or zvol/tank/volume.")
            return None
        dev = Path("/dev") / name
        real = Path(os.path.realpath(dev))
        if not real.is_relative_to("/dev"):
            errs.add("disk", "The device must be under /dev.")
            return None
        try:
            st = os.stat(real)
        except OSError:
            errs.add("disk", f"Device {dev} does not exist.")
            return None
        if not stat.S_ISBLK(st.st_mode):
            errs.add("disk", f"{dev} is not a block device.")
            return None
        return str(dev)

    def _build_extent(
        self, model: ConfigModel, fields: dict[str, Any], e: Extent, old: Extent | None
    ) -> tuple[Extent, int | None]:
        """Validate; returns the extent and the file size to create/grow to (File only)."""
        errs = _Errors()
        if fields.get("name") is not None:
            name = _as_str(errs, "name", fields["name"], max_len=120)
            if name is not None:
                e.name = name.strip()
        if not e.name and "name" not in errs:
            errs.add("name", "This field is required.")
        if fields.get("type") is not None:
            kind = _as_str(errs, "type", fields["type"])
            if kind is not None:
                if kind.upper() == "ZVOL":
                    kind = "Disk"
                if kind not in EXTENT_TYPES:
                    errs.add("type", "Select a valid choice: File, Disk.")
                else:
                    e.type = kind
        for name in ("comment",):
            if fields.get(name) is not None:
                setattr(e, name, _as_str(errs, name, fields[name]) or "")
        for name in ("pblocksize", "ro", "insecure_tpc", "xen"):
            if fields.get(name) is not None:
                value = _as_bool(errs, name, fields[name])
                if value is not None:
                    setattr(e, name, value)
        if fields.get("blocksize") is not None:
            bs = _as_int(errs, "blocksize", fields["blocksize"])
            if bs is not None:
                if bs not in BLOCK_SIZES:
                    errs.add("blocksize", "Select a valid choice: 512, 1024, 2048, 4096.")
                else:
                    e.blocksize = bs
        if fields.get("rpm") is not None:
            rpm = _as_str(errs, "rpm", fields["rpm"])
            if rpm is not None:
                if rpm not in RPM_VALUES:
                    errs.add("rpm", f"Select a valid choice: {', '.join(RPM_VALUES)}.")
                else:
                    e.rpm = rpm
        if "avail_threshold" in fields:
            value = fields["avail_threshold"]
            # 0 means "no threshold" to clients (democratic-csi's extentAvailThreshold: 0): stored as null.
            threshold = None if value in (None, "") else _as_int(errs, "avail_threshold", value, lo=0, hi=99)
            e.avail_threshold = threshold or None
        if fields.get("serial") is not None:
            serial = _as_str(errs, "serial", fields["serial"])
            if serial is not None:
                if serial and not _SERIAL_RE.match(serial):
                    errs.add("serial", "A serial is 1-16 printable ASCII characters without spaces.")
                else:
                    e.serial = serial
        if fields.get("naa") is not None:
            naa = _as_str(errs, "naa", fields["naa"])
            if naa is not None:
                try:
                    e.naa = parse_naa(naa) if naa else naa
                except ValueError as exc:
                    errs.add("naa", str(exc))
        if fields.get("filesize") is not None:
            size = _as_str(errs, "filesize", fields["filesize"], max_len=40)
            if size is not None:
                e.filesize = size.strip()
        if fields.get("path") is not None:
            path = _as_str(errs, "path", fields["path"], max_len=4096)
            if path is not None:
                e.path = path
        if fields.get("disk") is not None:
            disk = _as_str(errs, "disk", fields["disk"], max_len=4096)
            if disk is not None:
                e.disk = disk

        size: int | None = None
        if e.type == "Disk" and "type" not in errs:
            if not e.disk and "disk" not in errs:
                errs.add("disk", "This field is required for a Disk extent.")
            elif "disk" not in errs:
                if old is None or old.disk != e.disk or old.type != e.type:
                    dev = self._resolve_disk(errs, e.disk)
                    if dev is not None:
                        e.path = dev
                        e.disk = dev[len("/dev/"):]
            e.filesize = "0"
        elif e.type == "File" and "type" not in errs:
            e.disk = ""
            if not e.path and "path" not in errs:
                errs.add("path", "This field is required for a File extent.")
            elif "path" not in errs:
                resolved = self._resolve_file_path(errs, e.path)
                if resolved is not None:
                    e.path = resolved
            if "filesize" not in errs and "path" not in errs and "blocksize" not in errs:
                try:
                    wanted = parse_size(e.filesize or "0")
                except ValueError as exc:
                    errs.add("filesize", str(exc))
                else:
                    exists = os.path.exists(e.path)
                    current = os.path.getsize(e.path) if exists else 0
                    if wanted == 0:
                        if not exists:
                            errs.add("filesize", "A size of 0 (auto) needs an existing file.")
                        elif current < e.blocksize or current % e.blocksize:
                            errs.add("filesize", f"The file's size ({current}) is not a multiple of the block size.")
                    elif wanted % e.blocksize:
                        errs.add("filesize", f"The size must be a multiple of the block size ({e.blocksize}).")
                    elif exists and wanted < current:
                        errs.add("filesize", f"The file is already {current} bytes; extents are never shrunk.")
                    elif wanted > (1 << 63) - 1:
                        errs.add("filesize", "The size is too large.")
                    else:
                        size = wanted
        errs.raise_if_any()
        if not e.serial:
            e.serial = secrets.token_hex(7)
        if not e.naa:
            used = {x.naa for x in model.extents.values()}
            while True:
                # NAA type 3 (locally assigned, 64 bits), like the document's example.
                naa = "0x3" + secrets.token_hex(8)[1:]
                if naa not in used:
                    e.naa = naa
                    break
        for other in model.extents.values():
            if other.id == e.id:
                continue
            if other.name == e.name:
                raise ConflictError({"name": ["Extent name must be unique"]})
            if other.naa == e.naa:
                raise ConflictError({"naa": ["Extent naa must be unique"]})
            if other.path == e.path:
                field = "disk" if e.type == "Disk" else "path"
                raise ConflictError({field: [f"{e.path} is already used by extent {other.name}."]})
        return e, size

    def _realise_file(self, e: Extent, size: int | None) -> bool:
        """Create parent directories and the sparse file, or grow it.  True if created."""
        if e.type != "File" or size is None:
            return False
        try:
            os.makedirs(os.path.dirname(e.path), exist_ok=True)
            # Re-check after mkdir: a symlink raced in would be caught here.
            real = Path(os.path.realpath(e.path))
            if not any(real.is_relative_to(root) for root in self.extent_roots):
                raise ValidationError({"path": ["Extent files must be inside an extent root."]})
            if os.path.exists(e.path):
                _grow_file(e.path, size)
                return False
            _create_sparse(e.path, size)
            return True
        except OSError as exc:
            raise ValidationError({"filesize" if exc.errno in (errno.EFBIG, errno.ENOSPC) else "path": [
                f"Could not create the extent file: {exc.strerror or exc}."
            ]}) from exc

    async def create_extent(self, fields: dict[str, Any]) -> Extent:
        async def op() -> Extent:
            new = self._model.copy()
            e, size = self._build_extent(new, fields, Extent(id=0, name="", filesize=""), None)
            created = self._realise_file(e, size)

            def assign(tx: StoreTransaction) -> None:
                e.id = tx.new_id("extents")
                new.extents[e.id] = e

            try:
                await self._commit(new, assign)
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                raise
            return dataclasses.replace(e)

        return await self._mutate(op)

    async def update_extent(self, extent_id: Any, changes: dict[str, Any]) -> Extent:
        async def op() -> Extent:
            current = self._get("extents", extent_id, "Extent")
            new = self._model.copy()
            e, size = self._build_extent(new, changes, dataclasses.replace(current), current)
            self._realise_file(e, size)
            new.extents[e.id] = e
            await self._commit(new)
            return dataclasses.replace(e)

        return await self._mutate(op)

    async def delete_extent(self, extent_id: Any, delete_file: bool = False) -> None:
        async def op() -> None:
            e = self._get("extents", extent_id, "Extent")
            new = self._model.copy()
            del new.extents[e.id]
            for m in list(new.lun_maps.values()):
                if m.extent == e.id:
                    del new.lun_maps[m.id]
            await self._commit(new)
            if delete_file and e.type == "File":
                real = Path(os.path.realpath(e.path))
                if any(real.is_relative_to(root) for root in self.extent_roots) and real.is_file():
                    with contextlib.suppress(OSError):
                        os.unlink(real)

        await self._mutate(op)

    # --- LUN maps ----------------------------------------------------------------------

    def _build_lun_map(self, model: ConfigModel, fields: dict[str, Any], m: LunMap, auto_lun: bool) -> LunMap:
        errs = _Errors()
        if fields.get("target") is not None:
            value = _as_int(errs, "target", fields["target"], lo=1)
            if value is not None:
                m.target = value
        if fields.get("extent") is not None:
            value = _as_int(errs, "extent", fields["extent"], lo=1)
            if value is not None:
                m.extent = value
        if fields.get("lunid") not in (None, ""):
            value = _as_int(errs, "lunid", fields["lunid"], lo=0, hi=MAX_LUN)
            if value is not None:
                m.lunid = value
                auto_lun = False
        if "target" not in errs and m.target not in model.targets:
            errs.add("target", "Select a valid choice. That choice is not one of the available choices.")
        if "extent" not in errs and m.extent not in model.extents:
            errs.add("extent", "Select a valid choice. That choice is not one of the available choices.")
        errs.raise_if_any()
        others = [o for o in model.lun_maps.values() if o.id != m.id and o.target == m.target]
        if any(o.extent == m.extent for o in others):
            raise ConflictError({"extent": ["Extent is already in this target."]})
        used = {o.lunid for o in others}
        if auto_lun:
            free = next((n for n in range(MAX_LUN + 1) if n not in used), None)
            if free is None:
                raise ConflictError({"lunid": ["No free LUN ID left in this target."]})
            m.lunid = free
        elif m.lunid in used:
            raise ConflictError({"lunid": ["LUN ID is already being used for this target."]})
        return m

    async def create_lun_map(self, fields: dict[str, Any]) -> LunMap:
        return await self._create(
            "lun_maps",
            lambda model: self._build_lun_map(model, fields, LunMap(id=0, target=0, extent=0, lunid=0), True),
        )

    async def update_lun_map(self, map_id: Any, changes: dict[str, Any]) -> LunMap:
        return await self._update(
            "lun_maps", "Target to extent", map_id, lambda model, m: self._build_lun_map(model, changes, m, False)
        )

    async def delete_lun_map(self, map_id: Any) -> None:
        async def op() -> None:
            m = self._get("lun_maps", map_id, "Target to extent")
            new = self._model.copy()
            del new.lun_maps[m.id]
            await self._commit(new)

        await self._mutate(op)

    # --- the Hitachi NAS view of a target ---------------------------------------------
    #
    # enableAuthentication + secret map onto the FreeNAS objects: the target's groups get
    # auth type CHAP and an auth group holding one credential whose user is the target's
    # CHAP name (see chap_name) and whose secret is the target's secret.  The group is
    # "owned" by the target when no other target uses its tag; a shared group is never
    # modified: the target gets a fresh tag instead.

    @staticmethod
    def chap_name(target: Target) -> str:
        """The CHAP user name an initiator must send for a /v9 authenticated target."""
        return target.name

    def target_auth(self, model: ConfigModel, target_id: int) -> tuple[bool, str]:
        """(isAuthenticationEnabled, secret) of a target, as the /v9 view shows them."""
        groups = model.groups_of_target(target_id)
        enabled = bool(groups) and all(g.auth_type in ("CHAP", "CHAP Mutual") for g in groups)
        tags = [g.auth_group for g in groups if g.auth_group is not None]
        secret = ""
        if tags:
            creds = sorted(model.auth_group(tags[0]), key=lambda c: c.id)
            if creds:
                secret = creds[0].secret
        return enabled, secret

    def _owned_tag(self, model: ConfigModel, target_id: int) -> int | None:
        tags = {g.auth_group for g in model.groups_of_target(target_id)}
        if len(tags) != 1:
            return None
        tag = next(iter(tags))
        if tag is None:
            return None
        users = {g.target for g in model.target_groups.values() if g.auth_group == tag}
        pgs = {p.discovery_auth_group for p in model.portal_groups.values()}
        return tag if users == {target_id} and tag not in pgs else None

    async def create_hnas_target(self, fields: dict[str, Any]) -> Target:
        """POST /v9/storage/iscsi-targets: a target exported on every portal group."""

        async def op() -> Target:
            new = self._model.copy()
            errs = _Errors()
            alias = fields.get("alias")
            name = fields.get("name")
            if name is None:
                if alias is None or alias == "":
                    errs.add("alias", "This field is required.")
                    errs.raise_if_any()
                alias_s = _as_str(errs, "alias", alias, max_len=255)
                errs.raise_if_any()
                assert alias_s is not None
                name = re.sub(r"[^-a-z0-9.:]+", "-", alias_s.lower()).strip("-.:") or "target"
            t = self._build_target(
                new,
                {
                    "name": name,
                    "alias": alias,
                    "comment": fields.get("comment"),
                    "access_config": fields.get("access_config"),
                    "virtual_server_id": fields.get("virtual_server_id"),
                },
                Target(id=0, name=""),
            )
            def assign(tx: StoreTransaction) -> None:
                t.id = tx.new_id("targets")
                new.targets[t.id] = t
                for pg_id in sorted(new.portal_groups):
                    g = TargetGroup(id=tx.new_id("target_groups"), target=t.id, portal_group=pg_id)
                    new.target_groups[g.id] = g
                self._apply_hnas_auth(new, t, fields, tx)

            self._check_hnas_auth_fields(fields)
            await self._commit(new, assign)
            return dataclasses.replace(t)

        return await self._mutate(op)

    async def patch_hnas_target(self, target_id: Any, fields: dict[str, Any]) -> Target:
        """PATCH /v9/storage/iscsi-targets/{id}: alias, comment, accessConfig,
        enableAuthentication, secret, regenerateGUN."""

        async def op() -> Target:
            current = self._get("targets", target_id, "iSCSI target")
            new = self._model.copy()
            t = self._build_target(
                new,
                {k: fields[k] for k in ("alias", "comment", "access_config") if k in fields},
                dataclasses.replace(current),
            )
            errs = _Errors()
            if fields.get("regenerate_gun") is not None and _as_bool(errs, "regenerate_gun", fields["regenerate_gun"]):
                t.gun_generation += 1
            errs.raise_if_any()
            self._check_hnas_auth_fields(fields)
            new.targets[t.id] = t

            def assign(tx: StoreTransaction) -> None:
                self._apply_hnas_auth(new, t, fields, tx)

            await self._commit(new, assign)
            return dataclasses.replace(t)

        return await self._mutate(op)

    def _check_hnas_auth_fields(self, fields: dict[str, Any]) -> None:
        errs = _Errors()
        if fields.get("enable_authentication") is not None:
            _as_bool(errs, "enable_authentication", fields["enable_authentication"])
        if fields.get("secret") is not None:
            secret = _as_str(errs, "secret", fields["secret"], max_len=255)
            if secret is not None and secret and re.search(r"\s", secret):
                errs.add("secret", "The secret cannot contain white space.")
        errs.raise_if_any()

    def _apply_hnas_auth(self, model: ConfigModel, t: Target, fields: dict[str, Any], tx: StoreTransaction) -> None:
        errs = _Errors()
        enable = None
        if fields.get("enable_authentication") is not None:
            enable = _as_bool(errs, "enable_authentication", fields["enable_authentication"])
        secret = fields.get("secret")
        if secret is not None:
            secret = str(secret)
        groups = model.groups_of_target(t.id)
        owned = self._owned_tag(model, t.id)
        if secret:
            if owned is None:
                tag = max((c.tag for c in model.auth_credentials.values()), default=0) + 1
                tag = max(tag, max((g.auth_group or 0 for g in model.target_groups.values()), default=0) + 1)
                cred = AuthCredential(id=tx.new_id("auth_credentials"), tag=tag, user=self.chap_name(t), secret=secret)
                model.auth_credentials[cred.id] = cred
                for g in groups:
                    g.auth_group = tag  # a group already enforcing CHAP now uses the new secret
                owned = tag
            else:
                creds = sorted(model.auth_group(owned), key=lambda c: c.id)
                for extra in creds[1:]:
                    del model.auth_credentials[extra.id]
                creds[0].secret = secret  # the user name stays: FreeNAS-side clients may rely on it
                if creds[0].peersecret == secret:
                    creds[0].peeruser = creds[0].peersecret = ""
        if enable is True:
            if not groups:
                msg = "The target is not exported on any portal group, so there is nothing to protect."
                raise ValidationError({"enable_authentication": [msg]})
            usable = [g.auth_group for g in groups if g.auth_group is not None and model.auth_group(g.auth_group)]
            tag = owned if owned is not None else (usable[0] if usable else None)
            if tag is None:
                raise ValidationError({"secret": ["A secret is required to enable authentication."]})
            for g in groups:
                if g.auth_group is None or not model.auth_group(g.auth_group):
                    g.auth_group = tag
                if g.auth_type not in ("CHAP", "CHAP Mutual"):
                    g.auth_type = "CHAP"
        elif enable is False:
            for g in groups:
                g.auth_type = "None"

