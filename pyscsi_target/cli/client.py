"""The CLI's HTTP client for the daemon's REST API, and how it finds the daemon.

On the daemon's host the API address, user and password file come from the state dir
(``api-endpoint.json``, written by the running daemon; ``admin-password``).  Elsewhere
``--url`` and ``--user`` name them and the password comes from ``$PYSCSI_TARGET_PASSWORD``
or a prompt.  One keep-alive connection serves every request of a command.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..api_endpoint import ApiEndpoint

FREENAS = "/api/v1.0/services/iscsi"
NATIVE = "/api/pyscsi/v1"
PAGE = 1000  # the FreeNAS lists' largest page


class CliError(Exception):
    """A failed operation: printed as ``pyscsi-target: <message>``, exit status 1."""


class ApiError(CliError):
    """The API refused a request; ``fields`` maps API field names to messages."""

    def __init__(self, status: int, message: str, fields: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.status = status
        self.fields = fields


def default_state_dir() -> Path:
    env = os.environ.get("PYSCSI_TARGET_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/pyscsi-target")
    return Path.home() / ".local" / "state" / "pyscsi-target"


@dataclass(frozen=True)
class Connection:
    url: str
    user: str
    password: str
    cafile: str | None = None
    local: bool = False  # found through the state dir (trust the daemon's own certificate)


def _read_password(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except PermissionError:
        raise CliError(f"cannot read the admin password in {path}: permission denied "
                       "(run as the daemon's user, or use --user)") from None
    except OSError as exc:
        raise CliError(f"cannot read the admin password in {path}: {exc.strerror}") from None


def resolve(url: str | None, user: str | None, state_dir: Path | None, cacert: str | None = None) -> Connection:
    """Where the API is and how to log in, from the options or the local state dir."""
    if url is not None:
        user = user or os.environ.get("PYSCSI_TARGET_USER") or "admin"
        password = os.environ.get("PYSCSI_TARGET_PASSWORD")
        if password is None:
            if not sys.stdin.isatty():
                raise CliError("no password: set PYSCSI_TARGET_PASSWORD (standard input is not a terminal)")
            import getpass

            password = getpass.getpass(f"password for {user} at {url}: ")
        return Connection(url.rstrip("/"), user, password, cacert)
    state = (state_dir or default_state_dir()).resolve()
    endpoint = ApiEndpoint.read(state)
    if endpoint is None:
        raise CliError(f"no running pyscsi-target found for state dir {state} "
                       "(start the daemon, pass --state-dir, or name a remote API with --url)")
    password = os.environ.get("PYSCSI_TARGET_ADMIN_PASSWORD") or os.environ.get("PYSCSI_TARGET_PASSWORD")
    if password is None:
        if endpoint.password_file is None:
            raise CliError("the daemon's admin password came from its environment: "
                           "set PYSCSI_TARGET_ADMIN_PASSWORD here too")
        password = _read_password(endpoint.password_file)
    return Connection(endpoint.url, user or endpoint.user, password, endpoint.cafile, local=True)


class ApiClient:
    def __init__(self, conn: Connection, timeout: float = 30.0) -> None:
        self.conn = conn
        parts = urllib.parse.urlsplit(conn.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"invalid API URL {conn.url!r} (expected http://HOST:PORT or https://HOST:PORT)")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        token = base64.b64encode(f"{conn.user}:{conn.password}".encode()).decode()
        self._auth = f"Basic {token}"
        self._http: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._http is None:
            if self._scheme == "https":
                ctx = ssl.create_default_context(cafile=self.conn.cafile)
                if self.conn.local:
                    ctx.check_hostname = False  # the daemon's own certificate, reached on loopback
                self._http = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=ctx)
            else:
                self._http = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        query: Mapping[str, object] | None = None,
        data: IO[bytes] | Iterable[bytes] | None = None,
        length: int | None = None,
        raw: bool = False,
    ) -> Any:
        """Decoded JSON of the response (None when empty), or its bytes with ``raw``;
        ApiError for 4xx/5xx."""
        url = self._prefix + path
        if query:
            url += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()})
        headers = {"Authorization": self._auth, "Accept": "application/json"}
        payload: Any = None
        if data is not None:
            payload = data
            headers["Content-Type"] = "application/octet-stream"
            if length is not None:
                headers["Content-Length"] = str(length)
        elif body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, url, body=payload, headers=headers)
                resp = conn.getresponse()
                content = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()  # a keep-alive connection the server closed: retry once on a new one
                if attempt == 2 or data is not None:
                    raise CliError(f"the API at {self.conn.url} closed the connection: {exc}") from None
            except ssl.SSLError as exc:
                self.close()
                raise CliError(f"TLS with {self.conn.url} failed: {exc.reason or exc}") from None
            except OSError as exc:
                self.close()
                raise CliError(f"cannot reach the API at {self.conn.url}: {exc.strerror or exc}") from None
        if raw and resp.status < 400:
            return content
        try:
            decoded = json.loads(content) if content.strip() else None
        except ValueError:
            decoded = content.decode(errors="replace")
        if resp.status >= 400:
            raise _api_error(resp.status, decoded)
        return decoded

    def list_all(self, resource: str) -> list[dict[str, Any]]:
        """Every object of a FreeNAS resource (its lists are paged)."""
        out: list[dict[str, Any]] = []
        while True:
            page = self.request("GET", f"{FREENAS}/{resource}/", query={"limit": PAGE, "offset": len(out)})
            out.extend(page)
            if len(page) < PAGE:
                return out


def _api_error(status: int, body: object) -> ApiError:
    if status == 401:
        return ApiError(status, "the API refused the credentials (401)", {})
    fields: dict[str, list[str]] = {}
    message = ""
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):  # {"error": ...} (FreeNAS), plus "fields" (native)
            message = body["error"]
            extra = body.get("fields")
            if isinstance(extra, dict):
                fields = {str(k): [str(m) for m in v] if isinstance(v, list) else [str(v)] for k, v in extra.items()}
        elif isinstance(body.get("errorMsg"), str):
            message = body["errorMsg"]
        else:  # {"field": ["message", ...]} (FreeNAS)
            fields = {str(k): [str(m) for m in v] if isinstance(v, list) else [str(v)] for k, v in body.items()}
    elif isinstance(body, str):
        message = body.strip()[:200]
    if not message:
        message = "; ".join(f"{k}: {m}" if k != "__all__" else m for k, ms in fields.items() for m in ms)
    return ApiError(status, message or f"HTTP {status}", fields)
