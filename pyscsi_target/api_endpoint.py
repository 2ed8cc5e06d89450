"""Where a running daemon's API is, for a CLI on the same host: ``STATE_DIR/api-endpoint.json``.

The daemon writes it once the API listens and removes it when it stops.  It holds no secret
(mode 0644): the URL to use from this host (a wildcard bind is reached on loopback), the
admin user, the certificate to trust when the API speaks TLS, and the file holding the
admin password when the daemon generated one (absent when the password came from the
environment).  This module is imported by the CLI: standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ENDPOINT_FILE = "api-endpoint.json"


@dataclass(frozen=True)
class ApiEndpoint:
    url: str  # e.g. "http://127.0.0.1:8080"
    user: str
    pid: int
    cafile: str | None = None  # the API's certificate (PEM) when it serves TLS
    password_file: str | None = None  # None: the daemon's password came from its environment

    def write(self, state_dir: Path) -> None:
        path = state_dir / ENDPOINT_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def read(cls, state_dir: Path) -> ApiEndpoint | None:
        """The endpoint a live daemon wrote; None if there is none (or its daemon is gone)."""
        try:
            data = json.loads((state_dir / ENDPOINT_FILE).read_text())
            endpoint = cls(
                url=str(data["url"]),
                user=str(data["user"]),
                pid=int(data["pid"]),
                cafile=data.get("cafile"),
                password_file=data.get("password_file"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return endpoint if _alive(endpoint.pid) else None

    @staticmethod
    def remove(state_dir: Path, pid: int) -> None:
        """Remove the file if it is still ``pid``'s (a newer daemon may have replaced it)."""
        path = state_dir / ENDPOINT_FILE
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if int(json.loads(path.read_text())["pid"]) == pid:
                path.unlink()


def local_url(scheme: str, host: str, port: int) -> str:
    """The URL a client on this host uses for an API bound to ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a daemon of another user: alive
        return True
    return True
