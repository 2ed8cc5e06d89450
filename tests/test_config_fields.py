"""Field types: the accepted and refused forms of each, with the messages clients see."""

from __future__ import annotations

import pytest

from pyscsi_target.config.errors import Errors
from pyscsi_target.config.fields import UNSET, Boolean, Choice, Field, Integer, Nullable, StringList, Text


def _read(kind: object, value: object) -> tuple[object, list[str]]:
    errs = Errors()
    got = Field("f", kind).read({"f": value}, errs)  # type: ignore[arg-type]
    return got, errs.errors.get("f", [])


@pytest.mark.parametrize(
    ("value", "expected"), [(5, 5), ("5", 5), (" -5 ", -5), (5.0, 5), ("+7", 7), (10**17, 10**17)]
)
def test_integer_accepts(value: object, expected: int) -> None:
    assert _read(Integer(), value) == (expected, [])


@pytest.mark.parametrize("value", [True, False, 5.5, "5.5", "x", "", "1" * 19, [], {}, "0x1"])
def test_integer_refuses(value: object) -> None:
    assert _read(Integer(), value) == (UNSET, ["Enter a whole number."])


def test_integer_range_messages() -> None:
    assert _read(Integer(lo=1, hi=9), 0)[1] == ["Ensure this value is greater than or equal to 1."]
    assert _read(Integer(lo=1, hi=9), "10")[1] == ["Ensure this value is less than or equal to 9."]


def test_text() -> None:
    assert _read(Text(), 7200) == ("7200", [])  # rpm sent as a number
    assert _read(Text(), 1.5) == ("1.5", [])
    for bad in (True, [], {"a": 1}):
        assert _read(Text(), bad) == (UNSET, ["This field must be a string."])
    assert _read(Text(max_len=3), "abcd")[1] == ["Ensure this value has at most 3 characters (it has 4)."]
    assert _read(Text(), "a\x01")[1] == ["Control characters are not allowed."]
    assert _read(Text(allow_ctrl=True), "a\nb") == ("a\nb", [])


def test_boolean() -> None:
    for value in (True, 1, "true", " TRUE ", "yes", "on", "1"):
        assert _read(Boolean(), value) == (True, []), value
    for value in (False, 0, "false", "no", "off", "0", ""):
        assert _read(Boolean(), value) == (False, []), value
    for value in (2, "maybe", 1.0, [], "y"):
        assert _read(Boolean(), value) == (UNSET, ["Enter a boolean (true or false)."]), value
    strict_words = Boolean(true_words=("true", "1"), false_words=("false", "0"))
    assert _read(strict_words, "yes")[0] is UNSET and _read(strict_words, "1") == (True, [])
    assert _read(Boolean(numbers=False), 1)[0] is UNSET


def test_choice_and_aliases() -> None:
    kind = Choice(Text(), ("File", "Disk"), aliases={"ZVOL": "Disk"})
    assert _read(kind, "zvol") == ("Disk", [])
    assert _read(kind, "file") == (UNSET, ["Select a valid choice: File, Disk."])
    sizes = Choice(Integer(), (512, 4096))
    assert _read(sizes, "4096") == (4096, [])
    assert _read(sizes, 4000) == (UNSET, ["Select a valid choice: 512, 4096."])
    rpm = Choice(Text(), ("SSD", "7200"))
    assert _read(rpm, 7200) == ("7200", [])
    assert {"type": "integer", "enum": [7200]} in rpm.input_schema()["oneOf"]


def test_null_means_unset_unless_nullable() -> None:
    errs = Errors()
    assert Field("f", Integer()).read({"f": None}, errs) is UNSET
    assert Field("f", Integer()).read({}, errs) is UNSET
    assert Field("f", Nullable(Integer())).read({"f": None}, errs) is None
    assert Field("f", Nullable(Integer())).read({"f": ""}, errs) is None
    assert Field("f", Nullable(Integer())).read({"f": "3"}, errs) == 3
    assert not errs.errors
    assert Nullable(Integer()).schema() == {"type": "integer", "nullable": True}


def test_string_list() -> None:
    kind = StringList(message="Enter a list.")
    assert _read(kind, "a b\tc") == (["a", "b", "c"], [])
    assert _read(kind, ["a", 1]) == (["a", 1], [])  # items are the validator's business
    assert _read(kind, 5) == (UNSET, ["Enter a list."])
