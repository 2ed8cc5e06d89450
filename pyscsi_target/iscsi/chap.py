"""CHAP authentication, target side (RFC 7143 12.1.3, RFC 1994), sans-IO.

``ChapServer`` runs one exchange over the security-stage key sets the login machine
hands it:

1. initiator ``CHAP_A=<list>`` -> we pick the first algorithm of that list we support
   (5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256) and answer ``CHAP_A``, a random ``CHAP_I``
   and a random ``CHAP_C`` as long as the digest (at least 16 bytes);
2. initiator ``CHAP_N``/``CHAP_R`` (+ ``CHAP_I``/``CHAP_C`` for mutual CHAP) -> we verify
   R = H(I || secret || C) against every credential of the auth group with that user
   name (constant-time compare), and for mutual CHAP answer ``CHAP_N=<peeruser>``,
   ``CHAP_R=H(I' || peersecret || C')``.

Every failure raises ``ChapError`` whose message names the user but never a secret or a
response value; the login machine turns it into status 0x0201.  A challenge equal to the
one we sent (a reflection attack) and a peer secret equal to the initiator's secret
(RFC 7143 12.1.3 forbids one secret for both directions) are refused.

Binary values are accepted as ``0x`` hex or ``0b`` base64 (RFC 7143 5.1) and sent as hex.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable

from .negotiation import parse_number
from .params import ChapCredential

# CHAP_A value -> (hashlib name, digest length).  IANA "iSCSI CHAP algorithms" registry.
ALGORITHMS: dict[int, tuple[str, int]] = {
    5: ("md5", 16),
    6: ("sha1", 20),
    7: ("sha256", 32),
    8: ("sha3_256", 32),
}
MAX_CHALLENGE = 1024  # RFC 7143 12.1.3: challenges are at most 1024 bytes


class ChapError(Exception):
    """CHAP failed; the message is safe to log (no secrets)."""


def decode_binary(value: str) -> bytes:
    """RFC 7143 5.1 binary-value: 0x/0X hex (odd digit count allowed) or 0b/0B base64."""
    prefix, body = value[:2].lower(), value[2:]
    if prefix == "0x":
        if not body:
            raise ValueError("empty hex constant")
        if len(body) % 2:
            body = "0" + body
        try:
            return bytes.fromhex(body)
        except ValueError as e:
            raise ValueError("bad hex constant") from e
    if prefix == "0b":
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("bad base64 constant") from e
    raise ValueError("binary value without 0x/0b prefix")


def encode_hex(data: bytes) -> str:
    return "0x" + data.hex()


def chap_digest(algorithm: int, ident: int, secret: bytes, challenge: bytes) -> bytes:
    """H(identifier || secret || challenge) (RFC 1994 4.1)."""
    h = hashlib.new(ALGORITHMS[algorithm][0])
    h.update(bytes((ident,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def select_algorithm(offer: str) -> int | None:
    """First value of the initiator's CHAP_A list that we support."""
    for item in offer.split(","):
        n = parse_number(item.strip())
        if n is not None and n in ALGORITHMS:
            return n
    return None


class ChapServer:
    """One target-side CHAP exchange; see the module docstring.

    ``step(keys)`` takes the CHAP_* keys of one complete login request (a dict) and
    returns the pairs to answer; ``done`` becomes True once the initiator is
    authenticated (and, if asked, we have answered its challenge)."""

    def __init__(self, credentials: list[ChapCredential], *, mutual_required: bool,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.credentials = credentials
        self.mutual_required = mutual_required
        self._random = random_bytes
        self.algorithm: int | None = None
        self.ident = 0
        self.challenge = b""
        self.user: str | None = None  # the authenticated CHAP_N
        self.mutual = False
        self.done = False

    def step(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if self.done:
            if keys:
                raise ChapError("CHAP keys after the exchange completed")
            return []
        if self.algorithm is None:
            return self._start(keys)
        return self._verify(keys)

    def _start(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if not keys:
            return []  # the initiator may still be busy with other keys
        if set(keys) != {"CHAP_A"}:
            raise ChapError(f"expected CHAP_A first, got {sorted(keys)}")
        alg = select_algorithm(keys["CHAP_A"])
        if alg is None:
            raise ChapError(f"no supported CHAP algorithm in CHAP_A={keys['CHAP_A'][:64]}")
        self.algorithm = alg
        rnd = self._random(1 + max(16, ALGORITHMS[alg][1]))
        self.ident, self.challenge = rnd[0], rnd[1:]
        return [("CHAP_A", str(alg)), ("CHAP_I", str(self.ident)), ("CHAP_C", encode_hex(self.challenge))]

    def _verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if not keys:
            return []
        unexpected = set(keys) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if unexpected or "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise ChapError(f"expected CHAP_N and CHAP_R, got {sorted(keys)}")
        assert self.algorithm is not None
        alg = self.algorithm
        user = keys["CHAP_N"]
        try:
            response = decode_binary(keys["CHAP_R"])
        except ValueError as e:
            raise ChapError(f"user {user!r}: malformed CHAP_R ({e})") from None
        if not self.credentials:
            raise ChapError(f"user {user!r}: no CHAP credentials configured (empty auth group)")
        matched: ChapCredential | None = None
        # Check every candidate so that timing does not reveal which names exist.
        for cred in self.credentials:
            if not cred.secret:
                continue  # an empty secret would authenticate anyone knowing the user name
            expect = chap_digest(alg, self.ident, cred.secret.encode(), self.challenge)
            if hmac.compare_digest(expect, response) and cred.user == user and matched is None:
                matched = cred
        if matched is None:
            raise ChapError(f"user {user!r}: CHAP response did not verify (algorithm {alg})")
        self.user = user
        out: list[tuple[str, str]] = []
        if "CHAP_I" in keys or "CHAP_C" in keys:
            out = self._answer_mutual(keys, matched)
        elif self.mutual_required:
            raise ChapError(f"user {user!r}: mutual CHAP required but no CHAP_I/CHAP_C sent")
        self.done = True
        return out

    def _answer_mutual(self, keys: dict[str, str], cred: ChapCredential) -> list[tuple[str, str]]:
        user = cred.user
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise ChapError(f"user {user!r}: mutual CHAP needs both CHAP_I and CHAP_C")
        ident = parse_number(keys["CHAP_I"])
        if ident is None or ident > 255:
            raise ChapError(f"user {user!r}: invalid CHAP_I")
        try:
            challenge = decode_binary(keys["CHAP_C"])
        except ValueError as e:
            raise ChapError(f"user {user!r}: malformed CHAP_C ({e})") from None
        if not 1 <= len(challenge) <= MAX_CHALLENGE:
            raise ChapError(f"user {user!r}: CHAP_C length {len(challenge)} out of range")
        if challenge == self.challenge:
            raise ChapError(f"user {user!r}: reflected CHAP challenge refused")
        if not cred.peeruser or not cred.peersecret:
            raise ChapError(f"user {user!r}: mutual CHAP requested but no peer credentials configured")
        if hmac.compare_digest(cred.peersecret.encode(), cred.secret.encode()):
            raise ChapError(f"user {user!r}: peer secret equals the initiator secret; refused")
        assert self.algorithm is not None
        self.mutual = True
        rsp = chap_digest(self.algorithm, ident, cred.peersecret.encode(), challenge)
        return [("CHAP_N", cred.peeruser), ("CHAP_R", encode_hex(rsp))]
