"""The daemon under systemd's notify protocol, and its log formats for journald and JSON.

A datagram socket stands in for systemd's NOTIFY_SOCKET: the daemon must send READY=1 only
once the iSCSI portal and the REST API accept connections, STATUS= lines before and after,
WATCHDOG=1 at the WatchdogSec pace, and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from support.daemon import Daemon
from support.net import port_open

from pyscsi_target.api_endpoint import ENDPOINT_FILE, ApiEndpoint
from pyscsi_target.log_format import JournalFormatter, JsonFormatter, make_formatter, stderr_is_journal
from pyscsi_target.systemd import Notifier


class NotifyListener:
    """Collects sd_notify datagrams; at READY=1 records whether the portal and API accepted TCP."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.ready_probe: tuple[bool, bool] | None = None
        self.portal: tuple[str, int] | None = None
        self.api: tuple[str, int] | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if fields.get("READY") == "1" and self.ready_probe is None:
                assert self.portal is not None and self.api is not None
                self.ready_probe = (port_open(*self.portal), port_open(*self.api))
            self.messages.append((time.monotonic(), fields))

    def keys(self, key: str) -> list[str]:
        return [f[key] for _t, f in self.messages if key in f]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def test_ready_only_when_listening_then_watchdog_and_stopping(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    d = Daemon(tmp_path / "state", env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"})
    listener.portal, listener.api = (d.host, d.port), ("127.0.0.1", d.api_port)
    listener.thread.start()
    try:
        d.start()
        deadline = time.monotonic() + 20
        while listener.ready_probe is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.ready_probe == (True, True), listener.messages
        statuses_before_ready = []
        for _t, fields in listener.messages:
            if "READY" in fields:
                break
            statuses_before_ready.append(fields.get("STATUS"))
        assert any(s and "configuration" in s for s in statuses_before_ready), listener.messages
        ready_status = next(f["STATUS"] for _t, f in listener.messages if "READY" in f)
        assert "1 target(s)" in ready_status and d.portal in ready_status and str(d.api_port) in ready_status
        # The endpoint file a local CLI reads exists once ready, names this daemon and holds no secret.
        endpoint = ApiEndpoint.read(d.state_dir)
        assert endpoint is not None and endpoint.url == d.api_url and endpoint.pid == d.proc.pid  # type: ignore[union-attr]
        assert endpoint.password_file is None  # the test daemon's password comes from its environment
        # WATCHDOG=1 every 0.2 s (half of WatchdogSec): several within a second.
        time.sleep(1.2)
        assert len(listener.keys("WATCHDOG")) >= 3
        assert d.stop() == 0
        time.sleep(0.3)
        assert listener.keys("STOPPING") == ["1"]
        assert not (d.state_dir / ENDPOINT_FILE).exists()
    finally:
        d.stop()
        listener.close()
    d.assert_clean_log()


def test_notifier_outside_systemd_and_abstract_socket() -> None:
    Notifier.from_env({}).notify(ready=1)  # no NOTIFY_SOCKET: nothing happens, nothing raises
    name = f"pyscsi-target-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
        assert n.watchdog_usec == 0  # the watchdog is meant for another process
        n.ready("serving")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving"


def test_journal_format_has_priority_prefix_and_no_timestamp() -> None:
    fmt = JournalFormatter()
    rec = logging.LogRecord("pyscsi_target.x", logging.ERROR, __file__, 1, "broken %s", ("disk",), None)
    assert fmt.format(rec) == "<3>pyscsi_target.x: broken disk"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("p", logging.WARNING, __file__, 1, "m", (), sys.exc_info())
    lines = fmt.format(rec).splitlines()
    assert len(lines) > 2 and all(line.startswith("<4>") for line in lines)
    assert make_formatter("auto", journal=True).__class__ is JournalFormatter
    assert make_formatter("auto", journal=False).__class__ is logging.Formatter


def test_journal_stream_detection(tmp_path: Path) -> None:
    # JOURNAL_STREAM names stderr's device:inode; a redirect elsewhere is not the journal.
    code = (
        "import os, sys; st = os.fstat(2); "
        "from pyscsi_target.log_format import stderr_is_journal as j; "
        "print(j({'JOURNAL_STREAM': f'{st.st_dev}:{st.st_ino}'}), j({'JOURNAL_STREAM': '1:2'}), j({}))"
    )
    with open(tmp_path / "err", "w") as err:
        out = subprocess.run([sys.executable, "-c", code], stderr=err, capture_output=False,
                             stdout=subprocess.PIPE, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.split() == ["True", "False", "False"]
    assert stderr_is_journal({}) is False


def test_daemon_json_log_format(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", extra_args=["--log-format", "json"])
    with d:
        pass
    records = [json.loads(line) for line in d.log_text().splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["message"].startswith("pyscsi-target ready") and r["level"] == "info" for r in records)
    rec = logging.LogRecord("n", logging.INFO, __file__, 1, "line1\nline2", (), None)
    assert json.loads(JsonFormatter().format(rec))["message"] == "line1\nline2"
