"""The test daemon fixture's ports: picked below the ephemeral range (where no outgoing
connection can take them first), and picked again when taken anyway."""

from __future__ import annotations

import socket
from pathlib import Path

from support.daemon import Daemon
from support.net import _ephemeral_low, free_port


def test_free_ports_are_below_the_ephemeral_range_and_distinct() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(20000 <= p < _ephemeral_low() for p in ports)


def test_a_taken_port_is_picked_again(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        d = Daemon(tmp_path / "state")
        squatter.bind(("127.0.0.1", d.port))  # someone takes the portal's port before the daemon starts
        squatter.listen()
        taken = d.port
        with d:
            assert d.port != taken and d.alive()
            d.assert_clean_log()  # the failed start's lines were set aside
        assert "Address already in use" in (tmp_path / "state" / "daemon.log.failed-start").read_text()
