"""The login phase of one connection (RFC 7143 6.3, 11.12-11.13), sans-IO.

Use::

    m = LoginMachine(policy)                 # one per accepted connection
    for pdu in pdus_from_the_wire:           # every PDU, until m.done or m.failed
        for rsp in m.receive(pdu):
            send(rsp)                        # LoginResponse PDUs, no digests during login
        if m.failed:                         # a status-class != 0 response was sent:
            close_after_flush()              # RFC 7143 11.13.5: the target drops the connection
        elif m.done:
            start_full_feature_phase(m.result)   # LoginResult: params, TSIH, CmdSN, StatSN...

``receive`` never raises: malformed or unexpected input becomes a login reject
(``failed``), an internal error becomes 0x0300.  The adapter owns the login timeout
(RFC leaves it to the implementation) and the framing limit: during login the PDU
data segment is at most 8192 bytes (the default MaxRecvDataSegmentLength), so the
PDUReader must use max_data=8192 until ``done``, then ``result.params.max_recv_dsl``.
Header/data digests negotiated here start with the first PDU after the final response.

What the machine does:

- stages: security (CSG 0, optional) -> operational (CSG 1, optional) -> full feature
  (NSG 3); it follows the initiator's transit requests and holds T=0 while CHAP is
  incomplete;
- C bit: request text spread over several PDUs is accumulated (an empty response with
  T=0 acknowledges each partial PDU, RFC 7143 11.12.2), up to 64 KiB in total; a response
  longer than 8192 bytes is sent in pieces with C=1 and the initiator fetches the rest
  with empty requests;
- checks: version (0x0205), ISID/TSIH/CID constant over the login, CSG/NSG sequencing,
  T and C not both set, non-login PDUs (0x020b), keys offered twice (except the
  re-declarable declaratives), security keys in the operational stage,
  InitiatorName/TargetName/SessionType declared in the first request and later only
  repeated with the same value, as libiscsi does (all 0x0200 unless noted); missing
  InitiatorName or TargetName -> 0x0207, bad SessionType -> 0x0209, unknown target ->
  0x0203, initiator not allowed -> 0x0202, authentication failure -> 0x0201; the
  policy may raise any LoginReject (0x0204 target removed, 0x0206 too many
  connections, 0x0208, 0x020a no such session, 0x0301 service unavailable, 0x0302 out
  of resources, or a 0x0101/0x0102 redirect whose ``pairs`` carry the TargetAddress;
  we never redirect on our own);
- AuthMethod: the target's (or the portal's discovery) method decides what we accept:
  "None" -> None only, "CHAP" / "CHAP Mutual" -> CHAP only (mutual demands the
  initiator's CHAP_I/CHAP_C), "Auto" -> CHAP or None, in the initiator's order (None
  only if the auth group has no credentials).  Skipping the security stage, or never
  offering AuthMethod, counts as None.  Operational keys sent in the security stage are
  answered there (RFC 7143 6.3 lets operational negotiation start with the first request);
- StatSN: the first response carries the initiator's ExpStatSN, each further response
  +1; ExpCmdSN is the request's CmdSN (login requests are immediate) and MaxCmdSN
  opens a window of ``cmdsn_window`` commands;
- the first response of a Normal session declares TargetPortalGroupTag (and
  TargetAlias when set); the first operational-stage response (or the final one)
  declares our MaxRecvDataSegmentLength;
- ``policy.complete_login(result)`` is called just before the final response (T=1,
  NSG=3) and its TSIH is put there;
- CHAP guessing: with an ``AuthBackoff`` the CHAP response of an initiator name or source
  address that failed repeatedly is refused unevaluated (0x0201) while it backs off
  (auth_backoff.py); every login failure is logged with the peer's address, one line per
  address per 10 s at most (the next says how many were held back).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from ..log_limit import LogLimit
from ..values import MAX_ISCSI_NAME, LoginStatus, acceptable_peer_name, check_iscsi_name
from . import violations as V
from .auth_backoff import AuthBackoff, login_keys
from .chap import ChapError, ChapServer
from .negotiation import (
    KEYS,
    REDECLARABLE,
    Negotiator,
    TextError,
    check_duplicates,
    encode_pairs,
    is_security_key,
    parse_pairs,
)
from .params import ChapCredential, LoginPolicy, LoginReject, LoginResult, TargetInfo, TargetValues
from .pdu import PDU, LoginRequest, LoginResponse, NumberedRequest, ScsiCommand

log = logging.getLogger(__name__)
_FAILURES = LogLimit(10.0)  # login failure lines, per peer address
_BACKOFFS = LogLimit(10.0)  # "backing off" lines, per peer address

LOGIN_DSL = 8192  # RFC 7143 6.1/13.12: data segments during login use the default 8192
MAX_LOGIN_TEXT = 64 * 1024  # total request text accepted over one login
MAX_LOGIN_PDUS = 128  # bounds loops of empty requests
ISCSI_VERSION = 0x00

_FIRST_ONLY = ("InitiatorName", "TargetName", "SessionType")


def _redacted(pairs: list[tuple[str, str]]) -> str:
    """Keys for a debug log: CHAP values (hashes of secrets, challenges) are not printed."""
    return ", ".join(f"{k}={'<redacted>' if k in ('CHAP_I', 'CHAP_C', 'CHAP_R') else v[:80]}"
                     for k, v in pairs)


def allowed_auth_methods(method: str, credentials: list[ChapCredential]) -> tuple[str, ...]:
    """AuthMethod values acceptable for a configured auth method."""
    if method == "None":
        return ("None",)
    if method in ("CHAP", "CHAP Mutual"):
        return ("CHAP",)
    if method == "Auto":
        return ("CHAP", "None") if credentials else ("None",)
    raise LoginReject(LoginStatus.TARGET_ERROR, f"unknown configured auth method {method!r}")


class LoginMachine:
    """One connection's login; see the module docstring for the protocol it implements."""

    def __init__(self, policy: LoginPolicy, *, values: TargetValues | None = None,
                 cmdsn_window: int = 32,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes,
                 backoff: AuthBackoff | None = None, peer: str = "", peer_ip: str = "") -> None:
        self.policy = policy
        self.backoff = backoff  # CHAP failure backoff shared by every login of the daemon
        self.peer = peer  # "address:port", for the log
        self.peer_ip = peer_ip
        self.values = values or TargetValues()
        self.cmdsn_window = max(1, cmdsn_window)
        self._random = random_bytes
        self.result: LoginResult | None = None
        self.done = False
        self.failed = False
        self.status: LoginStatus | None = None  # the final status
        self.reason = ""  # why it failed (safe to log)
        self.rule: V.Rule | None = None  # the requirement the initiator broke, when it failed
        # Identity fixed by the first request.
        self._isid: bytes | None = None
        self._tsih_req = 0
        self._cid = 0
        self._statsn = 0
        self._cmdsn = 0
        self._stage: int | None = None
        self._pdus = 0
        # Request text accumulation (C bit) and our pending response pieces.
        self._rx = bytearray()
        self._rx_total = 0
        self._tx_rest = b""
        self._tx_transit = False
        self._tx_nsg = 0
        self._tsih = 0
        self._seen: set[str] = set()
        # Session identity, once the first complete request was read.
        self._neg: Negotiator | None = None
        self.initiator_name = ""
        self.session_type = "Normal"
        self.target: TargetInfo | None = None
        self._auth_cfg = "None"
        self._auth_allowed: tuple[str, ...] = ("None",)
        self._credentials: list[ChapCredential] = []
        self._auth_selected: str | None = None
        self._chap: ChapServer | None = None
        self._declared = False
        self._identity: dict[str, str] = {}  # InitiatorName/TargetName/SessionType of the first request

    # -- public -------------------------------------------------------------------------

    def receive(self, pdu: PDU) -> list[LoginResponse]:
        """Feed one received PDU; returns the PDUs to send (see module docstring)."""
        if self.failed or self.done:
            return []
        try:
            return self._receive(pdu)
        except LoginReject as e:
            return [self._fail(pdu, e.status, str(e), e.pairs, e.rule)]
        except TextError as e:
            rule = V.LOGIN_REDECLARED if "offered twice" in str(e) else V.TEXT_MALFORMED
            return [self._fail(pdu, LoginStatus.INITIATOR_ERROR, f"malformed login text: {e}", rule=rule)]
        except ChapError as e:
            return [self._fail(pdu, LoginStatus.AUTHENTICATION_FAILURE, f"CHAP: {e}", rule=V.LOGIN_AUTH_FAILED)]
        except Exception as e:  # a bug or a misbehaving policy must not kill the server
            log.exception("%s: login: internal error", self.peer or "?")
            return [self._fail(pdu, LoginStatus.TARGET_ERROR, f"internal error: {type(e).__name__}")]

    def oversized(self, pdu: PDU, length: int) -> list[LoginResponse]:
        """A login PDU whose data segment exceeded 8192 bytes (the framer skipped it):
        RFC 7143 limits login data segments to the default MaxRecvDataSegmentLength, so
        this is an initiator error (0x0200) rather than a silent drop."""
        if self.failed or self.done:
            return []
        reason = f"login data segment of {length} bytes exceeds {LOGIN_DSL}"
        return [self._fail(pdu, LoginStatus.INITIATOR_ERROR, reason, rule=V.LOGIN_TOO_LONG)]

    # -- request handling ---------------------------------------------------------------

    def _receive(self, pdu: PDU) -> list[LoginResponse]:
        if not isinstance(pdu, LoginRequest):
            raise LoginReject(LoginStatus.INVALID_DURING_LOGIN, f"{type(pdu).__name__} received during login",
                              rule=V.LOGIN_NOT_LOGIN_PDU)
        self._pdus += 1
        if self._pdus > MAX_LOGIN_PDUS:
            raise LoginReject(LoginStatus.INITIATOR_ERROR, "too many login PDUs", rule=V.LOGIN_TOO_LONG)
        if pdu.version_min > ISCSI_VERSION or pdu.version_max < pdu.version_min:
            raise LoginReject(LoginStatus.UNSUPPORTED_VERSION,
                              f"version range {pdu.version_min:#x}..{pdu.version_max:#x} excludes {ISCSI_VERSION:#x}",
                              rule=V.LOGIN_VERSION)
        if self._isid is None:
            self._isid = bytes(pdu.isid)
            self._tsih_req = pdu.tsih
            self._cid = pdu.cid
            self._statsn = pdu.expstatsn
        elif (bytes(pdu.isid), pdu.tsih, pdu.cid) != (self._isid, self._tsih_req, self._cid):
            raise LoginReject(LoginStatus.INITIATOR_ERROR, "ISID, TSIH or CID changed during login",
                              rule=V.LOGIN_IDENTITY_CHANGED)
        if pdu.transit and pdu.cont:
            raise LoginReject(LoginStatus.INITIATOR_ERROR, "T and C bits both set", rule=V.LOGIN_T_AND_C)
        csg = pdu.csg
        if csg not in (0, 1):
            raise LoginReject(LoginStatus.INITIATOR_ERROR, f"invalid CSG {csg}", rule=V.LOGIN_STAGE)
        if self._stage is None:
            self._stage = csg
        elif csg != self._stage:
            raise LoginReject(LoginStatus.INITIATOR_ERROR, f"CSG {csg} but the login is in stage {self._stage}",
                              rule=V.LOGIN_STAGE)
        if pdu.transit and (pdu.nsg not in (1, 3) or pdu.nsg <= csg):
            raise LoginReject(LoginStatus.INITIATOR_ERROR, f"invalid transit from stage {csg} to {pdu.nsg}",
                              rule=V.LOGIN_STAGE)
        self._cmdsn = pdu.cmdsn

        if self._tx_rest:
            # The initiator fetches the rest of our long response with empty requests.
            if pdu.data or pdu.cont:
                raise LoginReject(LoginStatus.INITIATOR_ERROR,
                                  "expected an empty request for the rest of a long response",
                                  rule=V.LOGIN_CONTINUATION)
            return [self._next_chunk(pdu)]

        self._rx_total += len(pdu.data)
        if self._rx_total > MAX_LOGIN_TEXT:
            raise LoginReject(LoginStatus.INITIATOR_ERROR, f"login text exceeds {MAX_LOGIN_TEXT} bytes",
                              rule=V.LOGIN_TOO_LONG)
        self._rx += pdu.data
        if pdu.cont:
            return [self._response(pdu, b"", transit=False, nsg=0)]
        text = bytes(self._rx)
        self._rx.clear()
        pairs = parse_pairs(text)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("login rx CSG %d T %d NSG %d: %s", pdu.csg, pdu.transit, pdu.nsg, _redacted(pairs))
        if self._neg is not None:
            pairs = self._drop_repeated_identity(pairs)
        if self.target is not None and self.target.strict:
            self._no_redeclaration(pairs)
        check_duplicates(pairs, self._seen)
        return self._handle(pdu, pairs)

    def _handle(self, pdu: LoginRequest, pairs: list[tuple[str, str]]) -> list[LoginResponse]:
        out: list[tuple[str, str]] = []
        if self._neg is None:
            out += self._begin(pdu, pairs)
        neg = self._neg
        assert neg is not None
        stage = self._stage
        sec = {k: v for k, v in pairs if is_security_key(k)}
        ops = [(k, v) for k, v in pairs if not is_security_key(k)]
        if sec:
            for k, v in sec.items():
                if len(v.encode()) > KEYS[k].max_len:
                    raise LoginReject(LoginStatus.INITIATOR_ERROR, f"{k} value longer than {KEYS[k].max_len} bytes",
                                      rule=V.LOGIN_KEY_TOO_LONG)
            if stage != 0:
                raise LoginReject(LoginStatus.INITIATOR_ERROR,
                                  f"security key {next(iter(sec))} in the operational stage",
                                  rule=V.LOGIN_SECURITY_KEY_LATE)
            out += self._auth_step(sec)
        # Operational keys are answered in whichever stage they arrive (RFC 7143 6.3).
        out += neg.respond(ops)
        if stage == 1 and not self._declared:
            out += neg.declarations()
            self._declared = True
        transit, nsg = False, 0
        if pdu.transit and (stage != 0 or self._auth_complete()):
            transit, nsg = True, pdu.nsg
        if transit and nsg == 3:
            if not self._declared:
                out += neg.declarations()
                self._declared = True
            self._complete()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("login tx T %d NSG %d: %s", transit, nsg, _redacted(out))
        return [self._response(pdu, encode_pairs(out), transit=transit, nsg=nsg)]

    def _drop_repeated_identity(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """InitiatorName/TargetName/SessionType belong to the first request.  libiscsi repeats
        them in the operational stage after a security stage that settled on AuthMethod=None;
        an identical repeat is harmless and dropped (refused in strict mode), a different or
        late value is an initiator error (RFC 7143 13.4/13.5: not to be redeclared)."""
        out = []
        strict = self.target is not None and self.target.strict
        for k, v in pairs:
            if k not in _FIRST_ONLY:
                out.append((k, v))
            elif self._identity.get(k) != v:
                raise LoginReject(LoginStatus.INITIATOR_ERROR,
                                  f"{k} declared again with another value or after the first request",
                                  rule=V.LOGIN_REDECLARED)
            elif strict:
                raise LoginReject(LoginStatus.INITIATOR_ERROR, f"{k} repeated after the first request",
                                  rule=V.LOGIN_IDENTITY_REPEATED)
        return out

    def _no_redeclaration(self, pairs: list[tuple[str, str]]) -> None:
        """Strict mode: the declaratives default mode lets an initiator declare again
        (MaxRecvDataSegmentLength, InitiatorAlias, X#NodeArchitecture) are declared once."""
        seen = set(self._seen)
        for k, _v in pairs:
            if k in seen and k in REDECLARABLE:
                raise LoginReject(LoginStatus.INITIATOR_ERROR, f"{k} declared twice in one login",
                                  rule=V.LOGIN_REDECLARED_STRICT)
            seen.add(k)

    def _strict_identity(self, initiator_name: str, target_name: str) -> None:
        """Strict mode: names in the normalised iSCSI name form, an ISID of a defined type."""
        for key, value in (("InitiatorName", initiator_name), ("TargetName", target_name)):
            try:
                check_iscsi_name(value)
            except ValueError as e:
                raise LoginReject(LoginStatus.INITIATOR_ERROR, f"{key} {value[:MAX_ISCSI_NAME]!r}: {e}",
                                  rule=V.LOGIN_BAD_NAME_STRICT) from None
        if self._isid is not None and self._isid[0] >> 6 == 3:
            raise LoginReject(LoginStatus.INITIATOR_ERROR, f"ISID {self._isid.hex()} has the reserved type 11b",
                              rule=V.LOGIN_ISID_RESERVED)

    def _begin(self, pdu: LoginRequest, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """First complete request: who is logging in, to what, and how must they authenticate."""
        d = dict(pairs)
        name = d.get("InitiatorName")
        if name is None:
            raise LoginReject(LoginStatus.MISSING_PARAMETER, "no InitiatorName in the first login request",
                              rule=V.LOGIN_NO_INITIATOR_NAME)
        if not acceptable_peer_name(name):
            raise LoginReject(LoginStatus.INITIATOR_ERROR, f"malformed InitiatorName {name[:MAX_ISCSI_NAME]!r}",
                              rule=V.LOGIN_BAD_NAME)
        self.initiator_name = name
        stype = d.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            raise LoginReject(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {stype[:64]!r}",
                              rule=V.LOGIN_SESSION_TYPE)
        self.session_type = stype
        self._identity = {"InitiatorName": name, "SessionType": stype}
        out: list[tuple[str, str]] = []
        if stype == "Discovery":
            method, creds = self.policy.discovery_auth()
        else:
            tname = d.get("TargetName")
            if tname is None:
                raise LoginReject(LoginStatus.MISSING_PARAMETER,
                                  "no TargetName in the first login request of a Normal session",
                                  rule=V.LOGIN_NO_TARGET_NAME)
            target = self.policy.lookup_target(tname) if len(tname.encode()) <= MAX_ISCSI_NAME else None
            if target is None:
                raise LoginReject(LoginStatus.NOT_FOUND, f"target {tname[:MAX_ISCSI_NAME]!r} not found",
                                  rule=V.LOGIN_TARGET_NOT_FOUND)
            self.target = target
            if target.strict:
                self._strict_identity(name, tname)
            if not self.policy.initiator_allowed(target, name):
                raise LoginReject(LoginStatus.AUTHORIZATION_FAILURE,
                                  f"initiator {name!r} may not log in to {target.iqn}", rule=V.LOGIN_NOT_AUTHORIZED)
            self._identity["TargetName"] = tname
            method, creds = target.auth_method, target.credentials
            if self._tsih_req == 0:
                # RFC 7143 13.9: the first response of a Normal session's leading login.
                out.append(("TargetPortalGroupTag", str(self.policy.portal_group_tag)))
                if target.alias:
                    out.append(("TargetAlias", target.alias))
        self._auth_cfg = method
        self._credentials = list(creds)
        self._auth_allowed = allowed_auth_methods(method, self._credentials)
        if self._stage == 1 and "None" not in self._auth_allowed:
            raise LoginReject(LoginStatus.AUTHENTICATION_FAILURE,
                              f"authentication ({method}) required but the security stage was skipped",
                              rule=V.LOGIN_AUTH_REQUIRED)
        self._neg = Negotiator(self.values, leading=self._tsih_req == 0, session_type=stype)
        return out

    # -- authentication -----------------------------------------------------------------

    def _auth_step(self, sec: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if "AuthMethod" in sec:
            offer = sec.pop("AuthMethod").split(",")
            choice = next((m for m in offer if m in self._auth_allowed), None)
            if choice is None:
                raise LoginReject(LoginStatus.AUTHENTICATION_FAILURE,
                                  f"AuthMethod={','.join(offer)[:128]} but {self._auth_cfg} is required",
                                  rule=V.LOGIN_AUTH_REQUIRED)
            self._auth_selected = choice
            out.append(("AuthMethod", choice))
            if choice == "CHAP":
                self._chap = ChapServer(self._credentials, mutual_required=self._auth_cfg == "CHAP Mutual",
                                        random_bytes=self._random)
        if sec:  # CHAP_* keys
            chap = self._chap
            if chap is None:
                raise LoginReject(LoginStatus.AUTHENTICATION_FAILURE,
                                  f"{next(iter(sec))} sent but CHAP was not negotiated", rule=V.LOGIN_AUTH_FAILED)
            backoff = self.backoff
            if backoff is None or chap.algorithm is None or chap.done or "CHAP_R" not in sec:
                out += chap.step(sec)
                return out
            # The response step: where a secret is guessed.
            keys = login_keys(self.initiator_name, self.peer_ip)
            pause = backoff.wait(keys)
            if pause > 0:
                backoff.refused()
                log.debug("%s: CHAP response not checked (backing off %.1fs)", self.peer, pause)
                raise ChapError(f"user {sec.get('CHAP_N', '')[:64]!r}: response not checked, backing off "
                                f"{pause:.1f}s after repeated failures")
            try:
                out += chap.step(sec)
            except ChapError:
                pause = backoff.failed(keys)
                log.debug("%s: CHAP response checked and refused", self.peer)
                if pause > 0:
                    _BACKOFFS.log(log, logging.WARNING, self.peer_ip or None, "%s: repeated CHAP failures (initiator "
                                  "%s): its CHAP responses are not checked for %.0fs", self.peer or "?",
                                  self.initiator_name, pause)
                raise
            backoff.succeeded(keys)
        return out

    def _auth_complete(self) -> bool:
        """May the login leave the security stage?  (Raises if it never can.)"""
        if self._auth_selected is None:
            if "None" not in self._auth_allowed:
                raise LoginReject(LoginStatus.AUTHENTICATION_FAILURE,
                                  f"authentication ({self._auth_cfg}) required but no AuthMethod offered",
                                  rule=V.LOGIN_AUTH_REQUIRED)
            self._auth_selected = "None"
        if self._auth_selected == "None":
            return True
        return self._chap is not None and self._chap.done

    # -- completion and responses -------------------------------------------------------

    def _complete(self) -> None:
        neg = self._neg
        assert neg is not None and self._isid is not None
        result = LoginResult(
            session_type=self.session_type,
            initiator_name=self.initiator_name,
            initiator_alias=neg.declared.get("InitiatorAlias"),
            target=self.target,
            isid=int.from_bytes(self._isid, "big"),
            tsih=self._tsih_req,
            cid=self._cid,
            cmdsn=self._cmdsn,
            statsn=0,  # set when the final response is sent
            params=neg.session_params(),
            leading=self._tsih_req == 0,
        )
        tsih = self.policy.complete_login(result)
        if not isinstance(tsih, int) or not 1 <= tsih <= 0xFFFF:
            raise LoginReject(LoginStatus.TARGET_ERROR, f"policy returned TSIH {tsih!r}")
        result.tsih = tsih
        self._tsih = tsih
        self.result = result

    def _response(self, pdu: LoginRequest, data: bytes, *, transit: bool, nsg: int) -> LoginResponse:
        self._tx_rest = data
        self._tx_transit, self._tx_nsg = transit, nsg
        return self._next_chunk(pdu)

    def _next_chunk(self, pdu: LoginRequest) -> LoginResponse:
        chunk, self._tx_rest = self._tx_rest[:LOGIN_DSL], self._tx_rest[LOGIN_DSL:]
        more = bool(self._tx_rest)
        transit = self._tx_transit and not more
        final = transit and self._tx_nsg == 3
        assert self._stage is not None and self._isid is not None
        rsp = LoginResponse(
            transit=transit, cont=more, csg=self._stage, nsg=self._tx_nsg if transit else 0,
            version_max=ISCSI_VERSION, version_active=ISCSI_VERSION, isid=self._isid,
            tsih=self._tsih if final else self._tsih_req, itt=pdu.itt, statsn=self._statsn,
            expcmdsn=pdu.cmdsn, maxcmdsn=(pdu.cmdsn + self.cmdsn_window - 1) & 0xFFFFFFFF,
            status_class=0, status_detail=0, data=chunk,
        )
        self._statsn = (self._statsn + 1) & 0xFFFFFFFF
        if transit:
            if final:
                assert self.result is not None
                self.result.statsn = self._statsn
                self.done = True
                self.status = LoginStatus.SUCCESS
                log.info("login: %s -> %s (%s session), TSIH %d, CID %d, auth %s%s",
                         self.initiator_name, self.target.iqn if self.target else "-", self.session_type,
                         self._tsih, self._cid, self._auth_selected,
                         f" user {self._chap.user!r}{' mutual' if self._chap.mutual else ''}" if self._chap else "")
            else:
                self._stage = self._tx_nsg
        return rsp

    def _fail(self, pdu: PDU, status: LoginStatus, reason: str,
              pairs: list[tuple[str, str]] | None = None, rule: V.Rule | None = None) -> LoginResponse:
        self.failed = True
        self.status = status
        self.reason = reason
        self.rule = V.login_rule(status, rule)
        # Rate-limited per address (anyone can fail logins at will), except on a strict target,
        # whose developer wants every rule broken in the log.
        strict = self.target is not None and self.target.strict
        _FAILURES.log(log, logging.WARNING, None if strict else self.peer_ip or None,
                      "%s: login rejected (status %#06x) initiator %s: %s%s",
                      self.peer or "?", status, self.initiator_name or "?", reason,
                      f" [{self.rule}]" if self.rule is not None else "")
        req = pdu if isinstance(pdu, LoginRequest) else None
        cmdsn = pdu.cmdsn if isinstance(pdu, LoginRequest | ScsiCommand | NumberedRequest) else 0
        if self._isid is None and req is not None:
            self._statsn = req.expstatsn
        rsp = LoginResponse(
            transit=False, cont=False, csg=(req.csg if req is not None else (self._stage or 0)) & 3, nsg=0,
            version_max=ISCSI_VERSION, version_active=ISCSI_VERSION,
            isid=bytes(req.isid) if req is not None else (self._isid or bytes(6)),
            tsih=req.tsih if req is not None else self._tsih_req, itt=pdu.itt,
            statsn=self._statsn, expcmdsn=cmdsn, maxcmdsn=cmdsn,
            status_class=status.status_class, status_detail=status.status_detail,
        )
        if pairs:
            rsp.data = encode_pairs(pairs)[:LOGIN_DSL]
        self._statsn = (self._statsn + 1) & 0xFFFFFFFF
        return rsp

