"""Connection admission (issue 10, defect 3): the per-address and global caps on connections in
login, and the descriptor gauge that keeps a reserve for the REST API.  The daemon under a
real flood: tests/test_connection_flood.py."""

from __future__ import annotations

import os
import resource

from pyscsi_target.server.admission import Admission, FdGauge, count_open_fds, raise_fd_limit


class Conn:
    pass


def test_per_address_cap_refuses_and_frees_on_login() -> None:
    a = Admission(per_address=2, in_login=100, gauge=FdGauge(limit=1 << 20, reserve=0))
    c1, c2, c3 = Conn(), Conn(), Conn()
    assert a.admit(c1, "10.0.0.1") is None and a.admit(c2, "10.0.0.1") is None
    assert a.admit(c3, "10.0.0.1") is False and a.refused_per_address == 1
    assert a.admit(Conn(), "10.0.0.2") is None  # another address is not affected
    a.login_over(c1)  # logged in: no longer counts against its address
    assert a.admit(c3, "10.0.0.1") is None and a.in_login == 3


def test_global_cap_closes_the_oldest_in_login() -> None:
    a = Admission(per_address=100, in_login=3, gauge=FdGauge(limit=1 << 20, reserve=0))
    conns = [Conn() for _ in range(5)]
    assert [a.admit(c, f"10.0.0.{i}") for i, c in enumerate(conns[:3])] == [None, None, None]
    assert a.admit(conns[3], "10.0.1.1") is conns[0]  # the caller closes it
    assert a.admit(conns[4], "10.0.1.2") is conns[1]
    assert a.evicted == 2 and a.in_login == 3
    a.closed(conns[0])  # its connection_lost comes later: nothing counted twice
    assert a.in_login == 3


def test_default_in_login_cap_is_half_the_descriptors_iscsi_may_use() -> None:
    a = Admission(gauge=FdGauge(limit=512, reserve=64))
    assert a.in_login_limit == (512 - 64) // 2


def test_gauge_counts_descriptors_and_keeps_the_reserve() -> None:
    n = count_open_fds()
    assert n is not None and n > 0
    g = FdGauge(limit=n + 70, reserve=64)
    assert 0 < g.room() <= 6
    for _ in range(6):
        g.opened()
    assert g.room() <= 0
    a = Admission(gauge=g)
    assert not a.may_accept() and a.accept_paused == 1
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]  # counted on the next refresh
    try:
        g._counted_at = -1e9
        for _ in range(6):
            g.closed()
        assert g.room() <= 3
    finally:
        for fd in fds:
            os.close(fd)


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            assert raise_fd_limit() == (256, hard)
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert raise_fd_limit()[0] == raise_fd_limit()[1]  # at the hard limit: nothing to do
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_listener_survives_emfile_and_accepts_when_descriptors_free_up() -> None:
    import asyncio
    import errno
    import socket

    from pyscsi_target.server import portal_groups

    class Flaky:
        """A listening socket whose accept() fails with EMFILE a few times."""

        def __init__(self, real: socket.socket, failures: int) -> None:
            self.real, self.failures = real, failures

        def fileno(self) -> int:
            return self.real.fileno()

        def accept(self) -> tuple[socket.socket, object]:
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return self.real.accept()

    async def main() -> None:
        served: list[object] = []
        adm = Admission(gauge=FdGauge(limit=1 << 20, reserve=0))
        lst = portal_groups.Listener("127.0.0.1", 0, 1, adm)
        await lst.start(lambda _l: Proto(served))
        real = lst.sockets[0]
        loop = asyncio.get_running_loop()
        loop.remove_reader(real.fileno())
        flaky = Flaky(real, failures=3)
        loop.add_reader(real.fileno(), lst._readable, flaky)  # type: ignore[arg-type]
        client = socket.create_connection(("127.0.0.1", lst.port))
        for _ in range(100):
            if served:
                break
            await asyncio.sleep(0.05)
        assert served and adm.accept_errors == 3  # paused 0.1 s after each EMFILE, then accepted it
        client.close()
        await lst.stop()

    class Proto(asyncio.Protocol):
        def __init__(self, served: list[object]) -> None:
            self.served = served

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.served.append(transport)
            transport.close()

    asyncio.run(main())
