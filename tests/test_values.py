"""The value types: for each, the forms accepted and the forms refused (pyscsi_target/values.py).

Every layer parses these through the one module, so these tests pin what the API accepts
and what the running target understands at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscsi_target.values import (
    ListenAddress,
    LoginStatus,
    RbdImageName,
    acceptable_peer_name,
    check_iscsi_name,
    initiator_names_text,
    networks_text,
    parse_access_config,
    parse_initiator_names,
    parse_listen,
    parse_naa,
    parse_networks,
    parse_peer_ip,
    parse_rados_location,
    parse_rbd_image,
    parse_size,
)


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("4096", 4096), (" 4096 ", 4096), ("10MB", 10 << 20), ("10mb", 10 << 20), ("2 GiB", 2 << 30),
    ("1T", 1 << 40), ("1.5GB", 3 << 29), ("0.5K", 512), ("1P", 1 << 50), (7, 7),
])
def test_size_accepted(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["ten", "", "1.1B", "0.3K", "-1", "1 XB", "1e9", "GB", True, -5])
def test_size_refused(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text,kw,addr", [
    ("0.0.0.0:3260", {}, ("0.0.0.0", 3260)),
    ("[::1]:3261", {}, ("::1", 3261)),
    (" 10.0.0.1:1 ", {}, ("10.0.0.1", 1)),
    ("[::]", {"default_port": 3260}, ("::", 3260)),
    ("10.0.0.1", {"default_port": 3260}, ("10.0.0.1", 3260)),
    ("127.0.0.1:0", {"allow_zero": True}, ("127.0.0.1", 0)),
    ("[fe80::1]:3260", {}, ("fe80::1", 3260)),
])
def test_listen_accepted(text: str, kw: dict[str, object], addr: tuple[str, int]) -> None:
    a = parse_listen(text, **kw)  # type: ignore[arg-type]
    assert (a.host, a.port) == addr
    assert parse_listen(str(a), allow_zero=True) == a  # str() round-trips


@pytest.mark.parametrize("text,kw", [
    ("10.0.0.1", {}), ("host.example:3260", {}), ("::1:3260", {}), ("10.0.0.1:0", {}), ("10.0.0.1:65536", {}),
    ("[10.0.0.1]:3260", {}), ("10.0.0.256:3260", {}), ("", {}), ("[::1]:", {}), ("1.2.3.4:32 60", {}),
])
def test_listen_refused(text: str, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_listen(text, **kw)  # type: ignore[arg-type]


def test_listen_format() -> None:
    assert str(ListenAddress("::1", 3260)) == "[::1]:3260" and str(ListenAddress("1.2.3.4", 1)) == "1.2.3.4:1"
    assert ListenAddress("0.0.0.0", 3260).wildcard and not ListenAddress("127.0.0.1", 3260).wildcard


def test_access_config_semantics() -> None:
    assert parse_access_config("").rules == () and parse_access_config("  ").rules == ()
    assert parse_access_config("").decide("10.1.2.3") == "rw"
    cfg = parse_access_config("127.0.0.1(ro), 10.0.0.0/8; *(ro)")
    assert cfg.decide("127.0.0.1") == "ro"
    assert cfg.decide("10.9.9.9") == "rw"
    assert cfg.decide("192.0.2.1") == "ro"
    assert parse_access_config("10.0.0.0/8").decide("127.0.0.1") is None
    assert parse_access_config("10.0.0.0/8").decide("::ffff:10.0.0.1") == "rw"  # dual-stack socket
    assert parse_access_config("::1(ro)").decide("::1") == "ro"
    assert parse_access_config("10.0.0.0/8(RW)").decide("10.0.0.1") == "rw"
    assert parse_access_config("10.0.0.0/8 ( ro )").decide("10.0.0.1") == "ro"
    assert parse_access_config("10.0.0.0/8").decide("not an ip") is None


@pytest.mark.parametrize("text", ["host.example", "10.0.0.0/8(rx)", "1.2.3.4,,5.6.7.8", "1.2.3.4 5.6.7.8", "(ro)"])
def test_access_config_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_access_config(text)


def test_initiator_names() -> None:
    assert parse_initiator_names("ALL").allows("iqn.x:anything")
    assert parse_initiator_names("").allows("iqn.x:anything")
    names = parse_initiator_names("iqn.1994-05.com.redhat:A, iqn.2001-04.com.example:b\niqn.x:c")
    assert names.allows("iqn.1994-05.com.redhat:a") and names.allows("IQN.X:C") and not names.allows("iqn.x:d")
    assert initiator_names_text("iqn.x:a iqn.x:B") == "iqn.x:a\niqn.x:B"
    assert initiator_names_text("iqn.x:a all") == "ALL"
    with pytest.raises(ValueError):
        parse_initiator_names("iqn." + "a" * 230)
    with pytest.raises(ValueError):
        initiator_names_text("iqn.x:a iqn.x:\x01b")


def test_networks() -> None:
    assert parse_networks("ALL").allows("192.0.2.1") and parse_networks(" ").allows("::1")
    nets = parse_networks("10.0.0.0/8, 192.0.2.7\n::1")
    assert nets.allows("10.1.1.1") and nets.allows("192.0.2.7") and nets.allows("::1")
    assert nets.allows("::ffff:10.0.0.1") and not nets.allows("192.0.2.8") and not nets.allows("garbage")
    assert networks_text("10.0.0.0/8,192.0.2.7") == "10.0.0.0/8\n192.0.2.7"
    for bad in ("10.0.0.0/33", "host.example", "1.2.3"):
        with pytest.raises(ValueError):
            parse_networks(bad)


def test_peer_ip() -> None:
    assert str(parse_peer_ip("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(parse_peer_ip("fe80::1%eth0")) == "fe80::1"
    assert parse_peer_ip("") is None


@pytest.mark.parametrize("name", [
    "demo", "target0", "iqn.2026-11.org.example:disk.a-1", "iqn.2001-04.com.example", "eui.02004567a425678d",
    "naa.52004567ba64678d", "naa.62004567ba64678d0123456789abcdef",
])
def test_configured_name_accepted(name: str) -> None:
    assert check_iscsi_name(name) == name


@pytest.mark.parametrize("name", [
    "Demo", "with space", "iqn.01-2001.com.example", "iqn.2001-04", "eui.123", "naa.1234", "t_1", "",
    "a" * 224, "ünïcode",
])
def test_configured_name_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_iscsi_name(name)


@pytest.mark.parametrize("name,ok", [
    ("iqn.1994-05.com.redhat:abc", True), ("IQN.2001-04.com.example", True),
    ("eui.02004567A425678D", True), ("naa.52004567BA64678D", True),
    ("naa.62004567BA64678D0123456789ABCDEF", True), ("eui.123", False), ("iqn.", False),
    ("foo", False), ("iqn.with space", False), ("iqn." + "a" * 220, False), ("", False),
])
def test_peer_name(name: str, ok: bool) -> None:
    assert acceptable_peer_name(name) is ok


def test_naa() -> None:
    assert parse_naa("0x6589CFC000000A1B") == "0x6589cfc000000a1b"
    for bad in ("6589cfc000000a1b", "0x6589", "0xZZ89cfc000000a1b", ""):
        with pytest.raises(ValueError):
            parse_naa(bad)


def test_rbd_image_name() -> None:
    assert parse_rbd_image("rbd/disk1") == RbdImageName("rbd", "disk1")
    assert parse_rbd_image("rbd/tenant/disk1") == RbdImageName("rbd", "disk1", "tenant")
    assert str(parse_rbd_image("rbd/tenant/disk1")) == "rbd/tenant/disk1"
    assert parse_rbd_image("my-pool.x/vm_disk-1.img").image == "vm_disk-1.img"
    for bad in ("disk1", "rbd/", "/disk1", "a/b/c/d", "rbd//disk", "rbd/disk@snap", "rbd/my disk", "rbd/a\tb",
                "rbd/" + "x" * 256, ""):
        with pytest.raises(ValueError):
            parse_rbd_image(bad)


def test_rados_location() -> None:
    assert parse_rados_location("rbd") == ("rbd", "")
    assert parse_rados_location("rbd/gateways") == ("rbd", "gateways")
    for bad in ("", "rbd/", "/ns", "a/b/c", "my pool"):
        with pytest.raises(ValueError):
            parse_rados_location(bad)


def test_login_status() -> None:
    assert LoginStatus.TARGET_REMOVED.status_class == 2 and LoginStatus.TARGET_REMOVED.status_detail == 4
    assert LoginStatus.of(3, 2) is LoginStatus.OUT_OF_RESOURCES
    assert LoginStatus.of(2, 0x7F) == 0x027F  # not named by RFC 7143: kept raw
    assert {s.status_class for s in LoginStatus} == {0, 1, 2, 3}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parsers_only_raise_value_error(text: str) -> None:
    """Any text: a value or a ValueError whose message goes back to the client, never a crash."""
    for fn in (parse_size, parse_listen, parse_access_config, parse_initiator_names, parse_networks,
               check_iscsi_name, parse_naa, parse_rbd_image, parse_rados_location):
        try:
            fn(text)  # type: ignore[operator]
        except ValueError:
            pass
    try:
        parse_access_config(text).decide("127.0.0.1")
    except ValueError:
        pass
    acceptable_peer_name(text)
