"""The repository stands alone: no tracked file refers to anything beside it or to a path of one
machine, so a fresh clone runs ``make test`` with nothing next to it.

Forbidden: the team's shared directory (``../shared``, ``shared/tools/...``), and absolute paths of a
machine: under /work, /root, /home, /Users, /usr/local or pytest's temporary directories, or any other
absolute path that exists here and is not a system location (``ALLOWED``: /dev, /proc, /sys, the
/usr/bin tools, /etc, /var, /run, /tmp ...).  Absolute paths that exist nowhere on the host (the
guest's own files, REST routes) are not paths of this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = re.compile(r"\.\./shared\b|(?<![\w.-])shared/(interop|tools|seeds|hooks)\b")
# An absolute path: starts after a blank, quote, bracket, '=' or ':' (not inside a URL or a word).
ABSOLUTE = re.compile(r"(?:(?<=^)|(?<=[\s\"'`(\[=:,]))(/[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+@-]*)*)")
MACHINE_ROOTS = ("/work", "/root", "/home", "/Users", "/usr/local", "/tmp/pytest-of-", "/mnt/c/")
ALLOWED = ("/dev", "/proc", "/sys", "/bin", "/sbin", "/lib", "/lib64", "/usr/bin", "/usr/sbin", "/usr/lib",
           "/usr/share", "/usr/include", "/etc", "/var", "/run", "/tmp", "/mnt", "/boot")


def tracked_files(root: Path) -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True).stdout
        return [root / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
        return [p for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)]


def _machine_path(path: str) -> bool:
    if any(path == r or path.startswith(r if r.endswith(("-", "/")) else r + "/") for r in MACHINE_ROOTS):
        return True
    if path in ("/", "/usr") or any(path == a or path.startswith(a + "/") for a in ALLOWED):
        return False
    return os.path.exists(path)


def violations(text: str) -> Iterator[tuple[int, str]]:
    """(line number, offending text) for every reference outside the repository in ``text``."""
    for n, line in enumerate(text.splitlines(), start=1):
        if m := SHARED.search(line):
            yield n, m.group(0)
        for m in ABSOLUTE.finditer(line):
            if _machine_path(m.group(1)):
                yield n, m.group(1)


def test_the_checker_finds_outside_references() -> None:
    text = "\n".join([
        "see ../shared/tools/testcu_score.py",  # 1
        "HARNESS = Path('/work/shared/interop/open-iscsi-vm.sh')",  # 2
        "python = \"/root/.pyenv/versions/3.11.7/bin/python3\"",  # 3
        "(shared/seeds/002_freenas.md)",  # 4
        "cache=/home/alice/.cache/x",  # 5
        "log: /tmp/pytest-of-root/pytest-3/x.log",  # 6
        "tool `/usr/local/bin/duplicates`",  # 7
        "ok: /dev/sda /proc/mounts /sys/class/iscsi_session /usr/bin/qemu-img /etc/iscsi/iscsid.conf /tmp/x",
        "ok: url http://127.0.0.1:8080/api/v1.0/services/iscsi/target/ and f\"{base}/target/1/\"",
        "ok: a shared/ directory of the guest, shared by two targets; /guest/lib.sh; /init",
    ])
    assert sorted({n for n, _ in violations(text)}) == [1, 2, 3, 4, 5, 6, 7]


def test_no_tracked_file_refers_outside_the_repository() -> None:
    found = []
    for path in tracked_files(ROOT):
        if path.resolve() == Path(__file__).resolve():
            continue  # this file names what it forbids
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not a reference anyone follows
        rel = path.relative_to(ROOT)
        found += [f"{rel}:{n}: {what}" for n, what in violations(text)]
    assert not found, "references outside the repository:\n" + "\n".join(found)
