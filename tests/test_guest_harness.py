"""The kernel-initiator guest harness (tests/support/guest) without booting a guest: the initramfs
overlay and its cpio format, the guest's shell helpers and their records, option validation, the two
network modes' qemu arguments, and the tap namespace itself.  test_interop_openiscsi.py boots it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.guest import image as guest_image
from support.guest.cpio import Entry, archive
from support.guest.image import GuestImage, cache_root
from support.guest.interop import SCRIPT as INTEROP_SCRIPT
from support.guest.interop import STEPS, InteropOptions
from support.guest.network import TapNetwork, UserNetwork, parse_portal
from support.guest.vm import (
    HERE,
    GuestOptions,
    GuestRun,
    Record,
    guest_conf,
    kvm_usable,
    overlay,
    parse_kmsg,
    parse_records,
    shell_quote_env,
)

BUSYBOX = shutil.which("busybox")


def unpack(data: bytes, dest: Path) -> None:
    """Unpack a (gzip'd) newc archive with the host's cpio, as an independent reader of the format."""
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    dest.mkdir()
    r = subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=dest,
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


# --- cpio and the per-run overlay --------------------------------------------------------


def test_cpio_archive_unpacks_with_cpio(tmp_path: Path) -> None:
    data = archive([Entry.dir("etc"), Entry.file("etc/odd", b"abc"), Entry.file("run.sh", b"#!/bin/sh\n", 0o755),
                    Entry.symlink("etc/link", "odd"), Entry.file("empty", b"")])
    assert len(data) % 4 == 0 and b"TRAILER!!!" in data[-128:]
    unpack(data, tmp_path / "x")
    assert (tmp_path / "x/etc/odd").read_bytes() == b"abc"
    assert os.readlink(tmp_path / "x/etc/link") == "odd"
    assert (tmp_path / "x/run.sh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "x/empty").stat().st_size == 0
    with pytest.raises(ValueError):
        archive([Entry.file("/abs", b"")])


def test_overlay_holds_init_helpers_script_conf_env_and_files(tmp_path: Path) -> None:
    conf = guest_conf(UserNetwork(["127.0.0.1:3260"]), GuestOptions(timeout=77))
    data = overlay("echo hi\n", {"FOO": "a b"}, conf, {"/etc/multipath.conf": "defaults {}\n",
                                                       "usr2/bin/tool": b"#!/bin/sh\n"})
    unpack(data, tmp_path / "o")
    o = tmp_path / "o"
    assert (o / "init").read_bytes() == (HERE / "init.sh").read_bytes() and os.access(o / "init", os.X_OK)
    assert (o / "guest/lib.sh").read_bytes() == (HERE / "lib.sh").read_bytes()
    assert (o / "guest/test.sh").read_text() == "echo hi\n"
    assert (o / "guest/env").read_text() == "FOO='a b'\n"
    assert (o / "etc/multipath.conf").read_text() == "defaults {}\n"
    assert os.access(o / "usr2/bin/tool", os.X_OK)
    conf_text = (o / "guest/conf").read_text()
    assert "GUEST_ADDRESS=10.0.2.15/24\n" in conf_text and "GUEST_TIMEOUT=77\n" in conf_text
    assert "GUEST_NIC_MODULE=e1000\n" in conf_text
    assert "GUEST_INITIATOR=iqn.2026-11.org.pyscsi-target.test:guest\n" in conf_text


@pytest.mark.parametrize("name", ["../etc/x", "guest/lib.sh", "init", "a//b", "", "/"])
def test_overlay_refuses_files_outside_or_over_the_harness(name: str) -> None:
    with pytest.raises(ValueError):
        overlay("", {}, "", {name: "x"})


def test_environment_quoting_survives_a_shell(tmp_path: Path) -> None:
    tricky = {"A": "it's $(echo no) `x` \\ \"q\"", "B": "two\nlines", "C": "", "D": "*"}
    env = tmp_path / "env"
    env.write_text(shell_quote_env(tricky))
    for name, value in tricky.items():
        out = subprocess.run(["sh", "-c", f'. "$1"; printf %s "${name}"', "sh", str(env)], capture_output=True,
                             text=True, check=True).stdout
        assert out == value, name


@pytest.mark.parametrize("env", [{"1X": "v"}, {"A-B": "v"}, {"GUEST_TIMEOUT": "1"}, {"PATH": "/x"}, {"A": "a\0b"}])
def test_environment_refuses_bad_or_reserved_names(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        shell_quote_env(env)


# --- the guest's shell: syntax and the record protocol ------------------------------------


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is installed by make test")
@pytest.mark.parametrize("script", [HERE / "init.sh", HERE / "lib.sh", INTEROP_SCRIPT])
def test_guest_scripts_parse_in_busybox_ash(script: Path) -> None:
    r = subprocess.run([str(BUSYBOX), "sh", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is installed by make test")
def test_lib_sh_records_round_trip_through_the_parser(tmp_path: Path) -> None:
    script = f"""
        exec 7>{tmp_path}/results
        GUEST_STATE={tmp_path}
        . {HERE / "lib.sh"}
        begin write
        sleep 0.2
        step write PASS "$(printf '32 MiB\tin 1.0s')"
        check sum abc abc "direct read"
        check other abc abd || echo check-returned-false
        data disk.lbs 4096
        mark started "$(printf 'now\nreally')"
        step fs FAIL boom || echo step-returned-false
    """
    r = subprocess.run([str(BUSYBOX), "sh", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "check-returned-false" in r.stdout and "step-returned-false" in r.stdout
    assert (tmp_path / "step").read_text() == "write\n"  # what the guest's watchdog reports on a time-out
    recs = parse_records((tmp_path / "results").read_text())
    assert [(x.kind, x.name, x.status) for x in recs] == [
        ("begin", "write", ""), ("step", "write", "PASS"), ("check", "sum", "PASS"), ("check", "other", "FAIL"),
        ("data", "disk.lbs", ""), ("mark", "started", ""), ("step", "fs", "FAIL")]
    assert recs[1].detail == "32 MiB in 1.0s" and recs[1].uptime is not None
    assert recs[1].seconds is not None and 0.15 <= recs[1].seconds < 5
    assert recs[6].seconds is None  # "fs" was never begun
    assert recs[3].detail.startswith("expected 'abc', got 'abd'")
    assert recs[5].detail == "now really"  # a record stays one line
    run = GuestRun(recs, "", "", tmp_path, "tcg", 1.0, False, 0)
    assert run.data == {"disk.lbs": "4096"} and run.marks == ["started"]
    assert [f.name for f in run.failures] == ["other", "fs"] and not run.ok


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is installed by make test")
def test_wait_host_sees_an_event_and_times_out_without_one(tmp_path: Path) -> None:
    (tmp_path / "host-events").write_text("restarted\n")
    script = f"GUEST_STATE={tmp_path}; . {HERE / 'lib.sh'}; wait_host restarted 1 && echo got; " \
             "wait_host other 1 || echo timed-out"
    r = subprocess.run([str(BUSYBOX), "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["got", "timed-out"], r.stderr


def test_parse_records_drops_a_line_cut_by_power_off() -> None:
    text = "step\ta\tPASS\t1.50\t9.1\tfine\nexit\t\t0\t\t10.0\t\nstep\tb\tPA"
    recs = parse_records(text)
    assert recs == [Record("step", "a", "PASS", 1.5, 9.1, "fine"), Record("exit", "", "0", None, 10.0, "")]


def test_parse_kmsg_formats_dedupes_and_unescapes() -> None:
    text = ("6,1,1500000,-;first\\x0asecond\n SUBSYSTEM=scsi\n 6,1,1500000,-;first\\x0asecond\n"
            "3,7,2000001,-;sd 2:0:0:0: [sda] tag#0 FAILED\n4,8,2100000")
    assert parse_kmsg(text) == "[    1.500000] first\nsecond\n[    2.000001] sd 2:0:0:0: [sda] tag#0 FAILED"


def test_guest_run_verdicts() -> None:
    def run(*recs: Record, killed: bool = False) -> GuestRun:
        return GuestRun(list(recs), "", "", Path("."), "tcg", 3.0, killed, 0)

    def rec(kind: str, name: str = "", status: str = "") -> Record:
        return Record(kind, name, status, None, 1.0, "")

    assert run(rec("step", "a", "PASS"), rec("exit", status="0")).ok
    assert not run(rec("step", "a", "PASS"), rec("exit", status="1")).ok
    assert not run(rec("step", "a", "PASS")).ok  # no exit record: the script never finished
    timed = run(rec("begin", "write"), rec("timeout", "write"))
    assert timed.timed_out and timed.timeout_step == "write" and "timed out in step 'write'" in timed.summary()
    assert run(rec("exit", status="0"), killed=True).timed_out
    assert not run(rec("check", "x", "FAIL"), rec("exit", status="0")).ok


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"timeout": 5}, {"mem_mib": 64}, {"smp": 0}, {"accel": "hvf"},
                                {"initiator": "not-a-name"}])
def test_guest_options_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GuestOptions(**kw).validate()  # type: ignore[arg-type]


def test_interop_options_env_and_steps() -> None:
    o = InteropOptions(portal="10.0.2.100:3260", lun=2, chap_user="u", chap_secret="s3cret", mutual_user="t",
                       mutual_secret="s4cret", header_digest="CRC32C", fs=False, tcp_window=None).validate()
    env = o.env()
    assert env["IO_LUN"] == "2" and env["IO_FS"] == "0" and env["IO_TCP_WINDOW"] == "default"
    assert env["IO_HDIGEST"] == "CRC32C" and env["IO_DDIGEST"] == "None" and env["IO_MCHAP_USER"] == "t"
    assert o.steps == tuple(s for s in STEPS if s != "fs")
    assert InteropOptions(portal="10.0.2.100:3260").env()["IO_LUN"] == "auto"
    assert len(InteropOptions(portal="10.0.2.100:3260").steps) == 8


@pytest.mark.parametrize("kw", [
    {"portal": "10.0.2.100"}, {"portal": "host:3260"}, {"portal": "10.0.2.100:70000"},
    {"iqn": "target"}, {"lun": -1}, {"header_digest": "crc32c"}, {"data_digest": "MD5"},
    {"chap_user": "u"}, {"chap_user": "u", "chap_secret": "has blank"},
    {"mutual_user": "t", "mutual_secret": "x"}, {"chap_user": "u", "chap_secret": "s", "mutual_user": "t"},
    {"discovery_chap": True}, {"size_mib": 0}, {"size_mib": 5000}, {"tcp_window": 100}, {"chap_algs": "CRC"},
])
def test_interop_options_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        InteropOptions(**{"portal": "10.0.2.100:3260", **kw}).validate()  # type: ignore[arg-type]


# --- networks -----------------------------------------------------------------------------------


def test_user_network_forwards_each_portal_to_its_own_guest_address(tmp_path: Path) -> None:
    net = UserNetwork(["127.0.0.1:3260", ("localhost", 3261)])
    assert net.guest_portals == ["10.0.2.100:3260", "10.0.2.101:3261"]
    args = net.qemu_args(tmp_path / "a,b")
    netdev = args[args.index("-netdev") + 1]
    assert netdev.startswith("user,id=n0,ipv6=off,restrict=on,")
    assert netdev.count("guestfwd=tcp:10.0.2.10") == 2 and "127.0.0.1 3261" in netdev
    assert "a,,b" in netdev and sys.executable in netdev  # commas in a path are doubled for qemu
    assert args[-1] == "e1000,netdev=n0,romfile="


@pytest.mark.parametrize("portals", [[], ["10.1.1.1:3260"], ["[::1]:3260"], ["127.0.0.1:3260", "127.0.0.1:3260"]])
def test_user_network_refuses(portals: list[str]) -> None:
    with pytest.raises(ValueError):
        UserNetwork(portals)


def test_parse_portal() -> None:
    assert parse_portal("127.0.0.1:3260") == ("127.0.0.1", 3260)
    assert parse_portal("localhost:1") == ("127.0.0.1", 1)
    for bad in ("127.0.0.1", "127.0.0.1:0", ":3260", "example.org:3260"):
        with pytest.raises(ValueError):
            parse_portal(bad)


def test_tap_network_options() -> None:
    net = TapNetwork(3)
    assert net.target_addresses == ["10.231.0.1", "10.231.0.2", "10.231.0.3"]
    assert net.guest_portal(3260, 2) == "10.231.0.3:3260" and net.guest_address == "10.231.0.100/24"
    assert net.command_prefix() == ["ip", "netns", "exec", net.name]
    assert net.qemu_args(Path("."))[-1] == "virtio-net-pci,netdev=n0,romfile="
    for bad in ({"targets": 0}, {"targets": 51}, {"nic": "rtl8139"}):
        with pytest.raises(ValueError):
            TapNetwork(**bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError), net.entered():
        pass  # not created yet


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_tap_namespace_is_private_and_removed() -> None:
    with TapNetwork(2) as net:
        assert net.name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        with net.entered():
            # Inside: the target addresses exist, so a target can listen on them.
            with socket.socket() as s:
                s.bind((net.target_addresses[1], 0))
            links = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
            assert "tap0" in links and "10.231.0.2/24" in links
        # Back outside: the thread is in the host's namespace again, where the address does not exist.
        with socket.socket() as s, pytest.raises(OSError):
            s.bind((net.target_addresses[1], 0))
    assert net.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_namespaces_left_by_dead_test_processes_are_removed() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"pyscsi-guest-{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in TapNetwork.remove_stale()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# --- the image cache and the host ---------------------------------------------------------------


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "pyscsi-target/guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache/pyscsi-target/guest"


def test_an_image_of_another_recipe_is_incomplete(tmp_path: Path) -> None:
    img = GuestImage(tmp_path)
    assert not img.complete()
    for f in ("vmlinuz", "initrd.img", "tools.img"):
        (tmp_path / f).write_bytes(b"x")
    (tmp_path / "MANIFEST.json").write_text(f'{{"recipe": {guest_image.RECIPE_VERSION - 1}}}')
    assert not img.complete()
    (tmp_path / "MANIFEST.json").write_text(f'{{"recipe": {guest_image.RECIPE_VERSION}}}')
    assert img.complete()


def test_apt_depends_takes_the_first_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    out = ("open-iscsi\n |PreDepends: debconf\n  PreDepends: <debconf-2.0>\n    cdebconf\n"
           "  Depends: libisns0\n  Depends: libsystemd0\n    libelogind0\n  Depends: python3:any\n"
           "libisns0\n  Depends: libc6\n")
    monkeypatch.setattr(guest_image, "_run", lambda *cmd, **kw: out)
    deps = guest_image._Apt().depends(["open-iscsi", "libisns0"])
    assert deps == {"open-iscsi": ["debconf", "libisns0", "libsystemd0", "python3"], "libisns0": ["libc6"]}


def test_kvm_detection_gives_a_reason() -> None:
    usable, why = kvm_usable()
    assert usable or why


# --- the manual-run CLI ------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["interop", "--portal", "10.1.1.1:3260"],  # not loopback: user-mode networking cannot forward it
    ["interop", "--portal", "127.0.0.1:3260", "--chap-user", "u"],  # a user without a secret
    ["interop", "--portal", "127.0.0.1:3260", "--size-mib", "0"],
    ["interop", "--timeout", "1"],
    ["run", "/nonexistent/script.sh"],
    ["run", "--env", "NOVALUE", "/dev/null"],
])
def test_cli_refuses_bad_arguments_before_booting(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from support.guest.__main__ import main

    assert main(argv) == 2
    assert "usage error" in capsys.readouterr().err


def test_qemu_command_line(tmp_path: Path) -> None:
    from support.guest.vm import Guest

    image = GuestImage(tmp_path / "image")
    image.dir.mkdir()
    for f in ("vmlinuz", "initrd.img", "tools.img"):
        (image.dir / f).write_bytes(b"x")
    net = UserNetwork(["127.0.0.1:3260"])
    g = Guest("true\n", net, options=GuestOptions(mem_mib=600, smp=1), run_dir=tmp_path / "run", image=image)
    cmd = g.qemu_command("tcg")
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64" and "-no-reboot" in cmd and "-nodefaults" in cmd
    assert cmd[cmd.index("-accel") + 1] == "tcg,thread=multi" and cmd[cmd.index("-m") + 1] == "600"
    assert cmd[cmd.index("-smp") + 1] == "1"
    for name in ("results", "kmsg", "control"):
        assert f"name={name}" in joined
    assert f"pipe,id=ch2,path={tmp_path / 'run' / 'control'}" in joined  # the host's events, through a FIFO
    assert "readonly=on" in cmd[cmd.index("-drive") + 1]  # the tools disk is shared by concurrent guests
    assert "restrict=on" in joined and "rdinit=/init" in cmd[cmd.index("-append") + 1]
    assert g.qemu_command("kvm")[g.qemu_command("kvm").index("-accel") + 1] == "kvm"
    # The run's initramfs is the image plus the overlay; the FIFOs for the host's events exist.
    assert (tmp_path / "run/initrd.img").read_bytes().startswith(b"x\x1f\x8b")
    assert all((tmp_path / "run" / f).exists() for f in ("control.in", "control.out"))
