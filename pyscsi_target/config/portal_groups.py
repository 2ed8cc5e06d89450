"""Portal groups (FreeNAS "portal"): a tag and the addresses the target listens on."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Mapping

from pyscsi_target.config.auth_credentials import check_auth_group
from pyscsi_target.config.errors import ConflictError, Errors
from pyscsi_target.config.fields import Choice, Field, FieldSet, Integer, Nullable, StringList, Text
from pyscsi_target.config.model import AUTH_METHODS, ConfigModel, PortalGroup
from pyscsi_target.values import format_listen, parse_listen


class PortalGroupFields(FieldSet):
    tag = Field("tag", Integer(lo=1, hi=65535))
    comment = Field("comment", Text(max_len=120))  # FreeNAS's model length
    listen = Field(
        "listen",
        StringList(item={"type": "string", "example": "127.0.0.1:3260"}, message="Enter a list of IP:PORT strings."),
    )
    discovery_auth_method = Field("discovery_auth_method", Choice(Text(), AUTH_METHODS))
    discovery_auth_group = Field("discovery_auth_group", Nullable(Integer(lo=1)))


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


def _listen(errs: Errors, entries: list[object], current: list[str]) -> list[str]:
    out: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            errs.add("listen", "Each portal must be an IP:PORT string.")
            continue
        try:
            addr = parse_listen(entry)
        except ValueError as exc:
            errs.add("listen", str(exc))
            continue
        norm = str(addr)
        if norm in out:
            errs.add("listen", f"{norm} is listed twice.")
            continue
        if norm not in current and not is_local_address(addr.host):
            errs.add("listen", f"IP {addr.host} is not configured on this host.")
            continue
        out.append(norm)
    if not out and "listen" not in errs:
        errs.add("listen", "At least one portal IP:PORT is required.")
    return out


def build_portal_group(model: ConfigModel, fields: Mapping[str, object], pg: PortalGroup) -> PortalGroup:
    F = PortalGroupFields
    errs = Errors()
    F.tag.assign(pg, fields, errs)
    F.comment.assign(pg, fields, errs)
    entries = F.listen.read(fields, errs)
    if isinstance(entries, list):
        pg.listen = _listen(errs, entries, pg.listen)
    F.discovery_auth_method.assign(pg, fields, errs)
    F.discovery_auth_group.assign(pg, fields, errs)
    if not pg.listen and "listen" not in errs:
        errs.add("listen", "This field is required.")
    errs.raise_if_any()
    check_auth_group(model, pg.discovery_auth_method, pg.discovery_auth_group, "discovery_auth_group")
    _check_unique(model, pg)
    return pg


def _check_unique(model: ConfigModel, pg: PortalGroup) -> None:
    """A tag once; an (IP, port) once across portal groups, a wildcard overlapping its port."""
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
        if a.port == 0:
            continue  # never collides: the kernel picks a free port
        mine = ipaddress.ip_address(a.host)
        for (oip, oport), other in taken.items():
            if oport != a.port:
                continue
            theirs = ipaddress.ip_address(oip)
            overlap = mine == theirs or (
                mine.version == theirs.version and (mine.is_unspecified or theirs.is_unspecified)
            )
            if overlap:
                raise ConflictError(
                    {"listen": [f"{entry} is already used by portal {other.tag} ({format_listen(oip, oport)})."]}
                )
