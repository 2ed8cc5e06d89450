"""Value types of the domain, each with the one parser every layer uses.

The REST façades, the config service, the engine, the CLI and the backstores all read
sizes, listen addresses, access lists, iSCSI names and login statuses through this
module, so what the API accepts is exactly what the running target understands.

Parsers raise ``ValueError`` whose text is meant for an API client (the config service
puts it under the field's name).  This module imports nothing of the project: it sits at
the bottom of the import graph.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- sizes -----------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNIT_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(text: str | int) -> int:
    """A FreeNAS size: bytes, or a number with KB..PB (binary multiples, as FreeNAS meant
    them).  ``"1.5GB"`` is 1610612736; a fraction must come out as whole bytes.  0 means
    "the size of the existing file" to extents."""
    if isinstance(text, bool):
        raise ValueError(f"Invalid size {text!r}: use bytes or a number with KB, MB, GB, TB or PB.")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"Invalid size {text!r}: a size cannot be negative.")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"Invalid size {text!r}: use bytes or a number with KB, MB, GB, TB or PB.")
    number, unit = m.group(1), m.group(2).upper()
    mult = 1 << (10 * _UNIT_POWER[unit])
    whole, _, frac = number.partition(".")
    value = int(whole) * mult
    if frac:
        scaled = int(frac) * mult
        if scaled % (10 ** len(frac)):
            raise ValueError(f"Invalid size {text!r}: not a whole number of bytes.")
        value += scaled // (10 ** len(frac))
    return value


# --- listen addresses ------------------------------------------------------------------

ISCSI_PORT = 3260
_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[^\[\]]+)\]|(?P<v4>[^:\[\]]+))(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """An IP literal and a TCP port; ``str()`` is the form the APIs show ("[v6]:port")."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_listen(self.host, self.port)

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@lru_cache(maxsize=4096)  # pure, on immutable results: logins and SendTargets ask again and again
def parse_listen(text: str, *, default_port: int | None = None, allow_zero: bool = False) -> ListenAddress:
    """``"IP:PORT"`` or ``"[v6]:PORT"`` (the port may be left out when ``default_port`` is
    given).  Host names are refused: a portal binds to an address.  Port 0 (the kernel
    picks one) only with ``allow_zero``, for the daemon's own ``--portal`` seeding."""
    m = _LISTEN_RE.match(text.strip())
    if not m or (m.group("port") is None and default_port is None):
        raise ValueError(f"{text!r} is not IP:PORT (write IPv6 addresses as [addr]:port).")
    host = m.group("v6") or m.group("v4") or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a valid IP address.") from None
    if m.group("v4") and ip.version != 4:
        raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port.")
    if m.group("v6") and ip.version != 6:
        raise ValueError(f"{text!r}: only IPv6 addresses go in brackets.")
    port = int(m.group("port")) if m.group("port") is not None else int(default_port or 0)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"Port {port} is out of range 1-65535.")
    return ListenAddress(str(ip), port)


ISNS_PORT = 3205  # RFC 4171


def parse_isns_servers(text: str) -> tuple[tuple[ListenAddress, ...], tuple[str, ...]]:
    """FreeNAS ``iscsi_isns_servers``: IP[:port] entries (IPv6 in brackets, port 3205 by
    default) separated by white space or commas.  Returns the servers, duplicates dropped,
    and the entries that are not IP[:port] (host names included: FreeNAS refused them)."""
    servers: list[ListenAddress] = []
    rejected: list[str] = []
    for entry in text.replace(",", " ").split():
        try:
            addr = parse_listen(entry, default_port=ISNS_PORT)
        except ValueError:
            rejected.append(entry)
            continue
        if addr not in servers:
            servers.append(addr)
    return tuple(servers), tuple(rejected)


def parse_peer_ip(text: str) -> IPAddress | None:
    """A connection's peer address as the access rules see it: zone index dropped and an
    IPv4-mapped IPv6 address (dual-stack socket) turned back into IPv4; None if unparsable."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _in(ip: IPAddress | None, net: IPNetwork) -> bool:
    return ip is not None and ip.version == net.version and ip in net


# --- access lists ------------------------------------------------------------------------

Access = Literal["rw", "ro"]
_ACCESS_ENTRY_RE = re.compile(r"^(?P<host>[^()\s]+)\s*(?:\(\s*(?P<mode>ro|rw)\s*\))?$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class AccessRule:
    network: IPNetwork | None  # None: "*", everyone
    read_only: bool


@dataclass(frozen=True, slots=True)
class AccessList:
    """The Hitachi ``accessConfig``: first matching rule wins; no rules = everyone rw."""

    rules: tuple[AccessRule, ...] = ()

    def decide(self, address: str) -> Access | None:
        """"rw", "ro", or None when the address matches no rule (refused)."""
        if not self.rules:
            return "rw"
        ip = parse_peer_ip(address)
        for rule in self.rules:
            if rule.network is None or _in(ip, rule.network):
                return "ro" if rule.read_only else "rw"
        return None


@lru_cache(maxsize=4096)  # pure, on immutable results: logins and SendTargets ask again and again
def parse_access_config(text: str) -> AccessList:
    """Entries separated by ``,`` or ``;``: an IP address, a CIDR network or ``*``, each
    optionally followed by ``(ro)`` or ``(rw)`` (default rw).  Blank means everyone."""
    if not text.strip():
        return AccessList()
    rules: list[AccessRule] = []
    for raw in re.split(r"[,;]", text):
        item = raw.strip()
        if not item:
            raise ValueError("Empty entry in access configuration.")
        m = _ACCESS_ENTRY_RE.match(item)
        if not m:
            raise ValueError(
                f"Invalid access configuration entry {item!r}: use IP, CIDR or * optionally followed by (ro) or (rw)."
            )
        host = m.group("host")
        ro = (m.group("mode") or "rw").lower() == "ro"
        if host == "*":
            rules.append(AccessRule(None, ro))
            continue
        try:
            rules.append(AccessRule(ipaddress.ip_network(host, strict=False), ro))
        except ValueError:
            raise ValueError(
                f"Invalid host {host!r} in access configuration: use an IP address, a CIDR network or *."
            ) from None
    return AccessList(tuple(rules))


# --- initiator groups: names and networks -----------------------------------------------------

ALL = "ALL"
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text) if w]


@dataclass(frozen=True, slots=True)
class InitiatorNames:
    """FreeNAS ``iscsi_target_initiator_initiators``: ``ALL`` or initiator names."""

    names: frozenset[str] | None = None  # lower-cased; None = ALL

    def allows(self, initiator_name: str) -> bool:
        return self.names is None or initiator_name.lower() in self.names

    def __str__(self) -> str:
        return ALL if self.names is None else "\n".join(sorted(self.names))


@lru_cache(maxsize=4096)  # pure, on immutable results: logins and SendTargets ask again and again
def parse_initiator_names(text: str) -> InitiatorNames:
    """Names separated by white space or commas; blank or any ``ALL`` means everyone."""
    words = _words(text)
    if not words or any(w.upper() == ALL for w in words):
        return InitiatorNames()
    for name in words:
        if len(name.encode()) > MAX_ISCSI_NAME or _CTRL_RE.search(name):
            raise ValueError(f"{name[:40]!r} is not a valid initiator name.")
    return InitiatorNames(frozenset(w.lower() for w in words))


def _stored_list(text: str, check: Callable[[str], object]) -> str:
    """The stored form of an ALL-or-entries list: ``ALL``, or one entry per line as given."""
    words = _words(text)
    if not words or any(w.upper() == ALL for w in words):
        return ALL
    check(text)
    return "\n".join(words)


def initiator_names_text(text: str) -> str:
    return _stored_list(text, parse_initiator_names)


@dataclass(frozen=True, slots=True)
class NetworkList:
    """FreeNAS ``iscsi_target_initiator_auth_network``: ``ALL`` or IP/CIDR entries."""

    networks: tuple[IPNetwork, ...] | None = None  # None = ALL

    def allows(self, address: str) -> bool:
        if self.networks is None:
            return True
        ip = parse_peer_ip(address)
        return any(_in(ip, net) for net in self.networks)


@lru_cache(maxsize=4096)  # pure, on immutable results: logins and SendTargets ask again and again
def parse_networks(text: str) -> NetworkList:
    words = _words(text)
    if not words or any(w.upper() == ALL for w in words):
        return NetworkList()
    nets: list[IPNetwork] = []
    for word in words:
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word[:60]!r} is not an IP address or CIDR network.") from None
    return NetworkList(tuple(nets))


def networks_text(text: str) -> str:
    return _stored_list(text, parse_networks)


# --- iSCSI names (RFC 7143 4.2.7, RFC 3722) ------------------------------------------------------

MAX_ISCSI_NAME = 223  # bytes
_NAME_CHARS_RE = re.compile(r"^[-a-z0-9.:]+$")
_IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9][-a-z0-9.]*(:[-a-z0-9.:]*)?$")
_EUI_RE = re.compile(r"^eui\.[0-9a-f]{16}$")
_NAA_NAME_RE = re.compile(r"^naa\.([0-9a-f]{16}|[0-9a-f]{32})$")


def check_iscsi_name(name: str) -> str:
    """A configured iSCSI name (target, base name): the normalised (lower-case) form of
    RFC 3722, as ctld and FreeNAS require.  Returns ``name``; raises ValueError."""
    if not _NAME_CHARS_RE.match(name):
        raise ValueError("Use lowercase alphanumeric characters plus dot (.), dash (-), and colon (:).")
    if len(name.encode()) > MAX_ISCSI_NAME:
        raise ValueError("An iSCSI name is at most 223 bytes.")
    if name.startswith("iqn.") and not _IQN_RE.match(name):
        raise ValueError("An iqn. name must look like iqn.yyyy-mm.reversed.domain[:identifier].")
    if name.startswith("eui.") and not _EUI_RE.match(name):
        raise ValueError("An eui. name is eui. followed by 16 hex digits.")
    if name.startswith("naa.") and not _NAA_NAME_RE.match(name):
        raise ValueError("A naa. name is naa. followed by 16 or 32 hex digits.")
    return name


def is_full_iscsi_name(name: str) -> bool:
    return name.startswith(("iqn.", "eui.", "naa."))


def acceptable_peer_name(name: str) -> bool:
    """An initiator's or target's name as sent in a login: the iqn./eui./naa. form, no
    white space or control characters.  Looser than ``check_iscsi_name`` on purpose:
    initiators send mixed case (RFC 3722 folds it) and we compare case-insensitively."""
    raw = name.encode()
    if not raw or len(raw) > MAX_ISCSI_NAME or any(c <= 0x20 or c == 0x7F for c in raw):
        return False
    low = name.lower()
    if low.startswith("iqn."):
        return len(low) > 4
    if low.startswith(("eui.", "naa.")):
        digits = low[4:]
        sizes = (16,) if low.startswith("eui.") else (16, 32)
        return len(digits) in sizes and all(c in "0123456789abcdef" for c in digits)
    return False


# --- NAA designators of logical units ------------------------------------------------------------

_NAA_RE = re.compile(r"^0x[0-9a-fA-F]{16}$")


def parse_naa(text: str) -> str:
    """An extent's NAA designator, ``0x`` and 16 hex digits; returned in lower case."""
    if not _NAA_RE.match(text):
        raise ValueError("An naa is 0x followed by 16 hex digits.")
    return text.lower()


# --- RBD image names ----------------------------------------------------------------------------

# What the rbd CLI accepts as a pool, namespace or image name: no "/" (the separator), no "@"
# (snapshots), no white space or control characters; Ceph caps names at 255 bytes.
_RBD_PART_RE = re.compile(r"^[^/@\s\x00-\x1f\x7f]{1,255}$")


@dataclass(frozen=True)
class RbdImageName:
    pool: str
    image: str
    namespace: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)


def parse_rbd_image(text: str) -> RbdImageName:
    """An RBD extent's image, as ``rbd`` names it: ``pool/image`` or ``pool/namespace/image``."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(_RBD_PART_RE.match(p) for p in parts):
        raise ValueError(f"{text!r} is not an RBD image name: use pool/image or pool/namespace/image "
                         "(no @, white space or empty parts).")
    if len(parts) == 2:
        return RbdImageName(parts[0], parts[1])
    return RbdImageName(parts[0], parts[2], parts[1])


def parse_rados_location(text: str) -> tuple[str, str]:
    """Where a gateway cluster keeps its shared state: ``pool`` or ``pool/namespace``."""
    parts = text.split("/")
    if len(parts) not in (1, 2) or not all(_RBD_PART_RE.match(p) for p in parts):
        raise ValueError(f"{text!r} is not a RADOS location: use pool or pool/namespace.")
    return parts[0], parts[1] if len(parts) == 2 else ""


# --- login status (RFC 7143 11.13.5) -------------------------------------------------------------


class LoginStatus(IntEnum):
    """Status-Class << 8 | Status-Detail of a Login Response."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self.value >> 8

    @property
    def status_detail(self) -> int:
        return self.value & 0xFF

    @classmethod
    def of(cls, status_class: int, status_detail: int) -> LoginStatus | int:
        """The named status, or the raw 16-bit value for one RFC 7143 does not name."""
        value = (status_class << 8) | status_detail
        try:
            return cls(value)
        except ValueError:
            return value
