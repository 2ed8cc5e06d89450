"""Mutational fuzzing of full-feature-phase PDUs against the real daemon.

Valid PDUs of every initiator opcode get random bytes of their header (and sometimes their
length fields or payload) flipped.  Whatever the target answers (Reject, CHECK CONDITION,
a dropped connection), it must never log an internal error, and a parallel session must
keep doing verified I/O throughout.  Seeded, so a failure replays exactly.
"""

from __future__ import annotations

import os
import random

import pytest
from support import rawclient as R
from support.background import BackgroundIO
from support.daemon import Daemon

P = R.P
ROUNDS = 400


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("negative-fuzz")).start()
    bg = BackgroundIO(d.host, d.port, d.iqn).start()
    try:
        yield d, bg
    finally:
        bg.stop()
        d.stop()


def valid_pdu(c: R.RawClient, rng: random.Random) -> P.PDU:
    """One well-formed PDU of a random kind, with the session's current CmdSN/ExpStatSN
    (only the chosen one is built, so CmdSN advances only for what is really sent)."""
    lba = 50_000 + rng.randrange(1000) * 8
    data = rng.randbytes(4096)
    rsoc = bytes([0xA3, 0x0C, 0x01, 0x28]) + bytes(2) + (512).to_bytes(4, "big") + bytes(2)
    makers = [
        lambda: c.scsi_pdu(R.read10(lba, 8), read_len=4096),
        lambda: c.scsi_pdu(R.write10(lba, 8), write_len=4096, immediate_data=data),
        lambda: c.scsi_pdu(R.write10(lba, 16), write_len=8192, immediate_data=data),  # R2T for the rest
        lambda: c.scsi_pdu(R.inquiry(), read_len=96),
        lambda: c.scsi_pdu(rsoc, read_len=512),
        lambda: P.NopOut(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True, data=b"ping"),
        lambda: P.TextRequest(itt=c.next_itt(), cmdsn=c._cmd_sn(False), expstatsn=c.expstatsn,
                              data=P.build_text([("SendTargets", "All")])),
        lambda: P.TaskMgmtRequest(function=1, itt=c.next_itt(), rtt=0x1234, cmdsn=c.cmdsn, expstatsn=c.expstatsn,
                                  immediate=True),
        lambda: P.DataOut(final=1, itt=c.itt, ttt=0x1, expstatsn=c.expstatsn, datasn=0, offset=0, data=data[:512]),
        lambda: P.SnackRequest(type=0, itt=c.itt, expstatsn=c.expstatsn),
        lambda: P.LogoutRequest(reason=rng.choice([0, 1, 2]), itt=c.next_itt(), cid=0, cmdsn=c._cmd_sn(False),
                                expstatsn=c.expstatsn),
    ]
    return rng.choice(makers)()


def mutate(wire: bytes, rng: random.Random) -> bytes:
    b = bytearray(wire)
    how = rng.random()
    if how < 0.6:  # flip 1-4 header bytes (opcode, flags, lengths, tags, CDB)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(48)] = rng.randrange(256)
    elif how < 0.8:  # lie about the data segment length, keeping what was sent
        b[5:8] = rng.randrange(1 << 24).to_bytes(3, "big")
    elif how < 0.9:  # claim AHS that is not there
        b[4] = rng.randrange(1, 256)
    else:  # truncate
        b = b[: rng.randrange(1, len(b))]
    return bytes(b)


def test_mutated_pdus_never_cause_internal_errors(env) -> None:
    d, bg = env
    rng = random.Random(int(os.environ.get("PYSCSI_FUZZ_SEED", "7143")))
    before, mark = bg.ops, d.log_mark()
    c: R.RawClient | None = None
    sessions = 0
    for _ in range(ROUNDS):
        if c is None or c.closed:
            c = R.login_session(d.host, d.port, d.iqn)
            sessions += 1
        pdu = valid_pdu(c, rng)
        try:
            c.send_bytes(mutate(c.encode(pdu), rng))
            while True:  # drain whatever comes back quickly
                c.recv_event(timeout=0.05)
        except TimeoutError:
            if rng.random() < 0.2:  # sometimes abandon the connection with things in flight
                c.close()
        except (R.ConnectionClosed, OSError, P.PduError):
            c.close()
    if c is not None:
        c.close()
    bg.check(before)
    errors = d.errors_since(mark)
    assert not errors, f"internal errors after {ROUNDS} mutated PDUs ({sessions} sessions):\n" + "\n".join(errors[:40])
    assert not bg.errors
    # The daemon still serves new sessions normally.
    with R.login_session(d.host, d.port, d.iqn) as ok:
        assert ok.scsi(R.inquiry(), read_len=96).status == 0
        ok.logout()
