"""Boot a guest under qemu, run one shell script in it, and collect what it reported.

``Guest(script, network, ...)`` builds the run's initramfs (the cached image plus an overlay with
/init, the helper library, the script, its configuration and any extra files), starts qemu (KVM when
it is usable, else TCG) and returns at once; ``wait()`` returns a ``GuestRun``.  While it runs, the
host can watch the records (``records()``, ``wait_for_mark()``) and send events (``send()``), e.g. to
restart a target at a precise point of the guest's I/O.  ``run_guest()`` does it all in one call.

Time limits: ``timeout`` bounds the script inside the guest, where a watchdog records which step was
running and powers off; the host kills qemu ``BOOT_ALLOWANCE`` seconds later if the guest hangs
harder than that.  Everything the guest reported up to then is in the ``GuestRun`` either way, with
the console and the kernel log.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .cpio import Entry, archive
from .image import GuestImage, ensure_image
from .network import NIC_MODULES, GuestNetwork

HERE = Path(__file__).parent
BOOT_ALLOWANCE = 90.0  # host-side margin over the guest's own limit: boot, module loading, power-off
KVM_BOOT_LIMIT = 30.0  # a KVM guest that has not reached /init by then is retried under TCG
DEFAULT_INITIATOR = "iqn.2026-11.org.pyscsi-target.test:guest"
ACCELS = ("auto", "kvm", "tcg")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = re.compile(r"^(GUEST_|PATH$|HOME$)")
_KMSG_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True)
class Record:
    """One line the guest reported (see lib.sh): kind is boot, ready, begin, step, check, data, mark,
    timeout or exit."""

    kind: str
    name: str
    status: str
    seconds: float | None
    uptime: float | None
    detail: str

    def __str__(self) -> str:
        secs = f" ({self.seconds:.1f}s)" if self.seconds is not None else ""
        return f"{self.kind} {self.name} {self.status}{secs} {self.detail}".replace("  ", " ").strip()


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_records(text: str) -> list[Record]:
    """The records of a results channel; a line cut short by a power-off is dropped."""
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 6:
            continue
        kind, name, status, secs, uptime, detail = parts
        out.append(Record(kind, name, status, _float(secs), _float(uptime), detail))
    return out


def parse_kmsg(text: str) -> str:
    """``dmesg``-style text from /dev/kmsg records ("prio,seq,usec,flags;message"), each record once:
    the guest re-reads the buffer from the start if its reader ever has to restart."""
    seen: set[int] = set()
    lines = []
    for line in text.splitlines():
        head, sep, msg = line.partition(";")
        fields = head.split(",")
        if not sep or len(fields) < 3 or not fields[1].isdigit() or not fields[2].isdigit():
            continue  # a continuation line (" KEY=value") or a cut line
        seq = int(fields[1])
        if seq in seen:
            continue
        seen.add(seq)
        # The kernel escapes unprintable bytes (a newline inside a message, a backslash) as \xNN.
        msg = _KMSG_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), msg)
        lines.append(f"[{int(fields[2]) / 1e6:12.6f}] {msg}")
    return "\n".join(lines)


def kvm_usable() -> tuple[bool, str]:
    """Whether KVM can run a stock kernel here, and why not."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "the host's KVM is PVM (kvm_pvm), which only runs PVM-enabled guest kernels"
    return True, ""


def shell_quote_env(env: Mapping[str, str]) -> str:
    """``NAME='value'`` lines for the guest's /guest/env, after checking names and values."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"guest environment name must be a shell identifier, got {name!r}")
        if _RESERVED_ENV.match(name):
            raise ValueError(f"guest environment name {name!r} is reserved for the harness")
        if "\0" in value:
            raise ValueError(f"guest environment value of {name} contains NUL")
        lines.append(f"{name}={shlex.quote(value)}\n")
    return "".join(lines)


def _guest_file_name(name: str) -> str:
    rel = name.lstrip("/")
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"guest file path must be a plain path, got {name!r}")
    if parts[0] == "guest" or rel == "init":
        raise ValueError(f"guest file {name!r} would replace part of the harness")
    return rel


@dataclass(frozen=True)
class GuestOptions:
    """How to boot the guest; ``validate()`` refuses what qemu or the guest could not honour."""

    timeout: float = 300.0
    mem_mib: int = 512
    smp: int = 2
    accel: str = "auto"
    initiator: str = DEFAULT_INITIATOR

    def validate(self) -> GuestOptions:
        if not 10 <= self.timeout <= 86400:
            raise ValueError(f"timeout must be 10 s to 24 h, got {self.timeout}")
        if not 128 <= self.mem_mib <= 65536:
            raise ValueError(f"mem_mib must be 128-65536, got {self.mem_mib}")
        if not 1 <= self.smp <= 16:
            raise ValueError(f"smp must be 1-16, got {self.smp}")
        if self.accel not in ACCELS:
            raise ValueError(f"accel must be one of {ACCELS}, got {self.accel!r}")
        if not re.match(r"^(iqn\.\d{4}-\d{2}\.[^\s]+|eui\.[0-9A-Fa-f]{16})$", self.initiator):
            raise ValueError(f"initiator must be an iqn. or eui. name, got {self.initiator!r}")
        return self


def guest_conf(network: GuestNetwork | None, options: GuestOptions) -> str:
    """The guest's /guest/conf, read by /init."""
    values = {"GUEST_ADDRESS": network.guest_address if network else "",
              "GUEST_NIC_MODULE": NIC_MODULES[network.nic] if network else "",
              "GUEST_TIMEOUT": str(int(options.timeout)), "GUEST_INITIATOR": options.initiator}
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def overlay(script: str, env: Mapping[str, str], conf: str, files: Mapping[str, bytes | str]) -> bytes:
    """The per-run initramfs overlay (gzip'd cpio) appended to the cached image."""
    entries = [Entry.file("init", (HERE / "init.sh").read_bytes(), 0o755), Entry.dir("guest"),
               Entry.file("guest/lib.sh", (HERE / "lib.sh").read_bytes()),
               Entry.file("guest/test.sh", script.encode()),
               Entry.file("guest/conf", conf.encode()),
               Entry.file("guest/env", shell_quote_env(env).encode())]
    dirs: set[str] = set()
    for name, content in sorted(files.items()):
        rel = _guest_file_name(name)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append(Entry.dir(d))
        data = content.encode() if isinstance(content, str) else content
        entries.append(Entry.file(rel, data, 0o755 if data.startswith(b"#!") else 0o644))
    return gzip.compress(archive(entries), compresslevel=1, mtime=0)


@dataclass
class GuestRun:
    """What a guest run produced."""

    records: list[Record]
    console: str
    dmesg: str
    run_dir: Path
    accel: str
    seconds: float
    host_killed: bool
    qemu_status: int | None
    notes: list[str] = field(default_factory=list)

    def _last(self, kind: str) -> Record | None:
        return next((r for r in reversed(self.records) if r.kind == kind), None)

    @property
    def exit_status(self) -> int | None:
        """The script's exit status; None when it did not finish."""
        r = self._last("exit")
        return int(r.status) if r is not None and r.status.lstrip("-").isdigit() else None

    @property
    def timed_out(self) -> bool:
        return self.host_killed or self._last("timeout") is not None

    @property
    def timeout_step(self) -> str | None:
        r = self._last("timeout")
        return r.name if r is not None else None

    @property
    def boot_seconds(self) -> float | None:
        """Guest uptime when the tools and network were ready."""
        r = self._last("ready")
        return r.uptime if r is not None else None

    @property
    def steps(self) -> dict[str, Record]:
        return {r.name: r for r in self.records if r.kind == "step"}

    @property
    def checks(self) -> list[Record]:
        return [r for r in self.records if r.kind == "check"]

    @property
    def data(self) -> dict[str, str]:
        return {r.name: r.detail for r in self.records if r.kind == "data"}

    @property
    def marks(self) -> list[str]:
        return [r.name for r in self.records if r.kind == "mark"]

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.kind in ("step", "check") and r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        """The script exited 0 in time and reported no failed step or check."""
        return self.exit_status == 0 and not self.timed_out and not self.failures

    def summary(self) -> str:
        steps = " ".join(f"{n}={r.status}" for n, r in self.steps.items())
        end = (f"exit {self.exit_status}" if self.exit_status is not None
               else f"timed out in step {self.timeout_step!r}" if self.timeout_step is not None
               else "killed by the host" if self.host_killed else "no exit record")
        return f"{end}; {steps or 'no steps'}; {self.seconds:.1f}s {self.accel}"

    def describe(self, tail: int = 40) -> str:
        """Everything needed to understand a failure, for an assertion message."""
        console = "\n".join(self.console.splitlines()[-tail:])
        dmesg = "\n".join(self.dmesg.splitlines()[-tail:])
        return "\n".join([
            f"guest run {self.run_dir}: {self.summary()}", *self.notes,
            "--- records ---", *map(str, self.records),
            f"--- console (last {tail} lines) ---", console,
            f"--- kernel log (last {tail} lines) ---", dmesg])


class Guest:
    """One running guest; a context manager that kills it on exit."""

    def __init__(self, script: str, network: GuestNetwork | None, *, env: Mapping[str, str] | None = None,
                 files: Mapping[str, bytes | str] | None = None, options: GuestOptions | None = None,
                 run_dir: Path | None = None, image: GuestImage | None = None,
                 on_console: Callable[[str], None] | None = None) -> None:
        self.options = (options or GuestOptions()).validate()
        self.network = network
        self.on_console = on_console
        self.image = image or ensure_image()
        self.run_dir = Path(run_dir) if run_dir else _new_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = guest_conf(network, self.options)
        (self.run_dir / "initrd.img").write_bytes(
            self.image.initrd.read_bytes() + overlay(script, env or {}, conf, files or {}))
        for name in ("control.in", "control.out"):
            path = self.run_dir / name
            path.unlink(missing_ok=True)
            os.mkfifo(path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.accel = ""
        self.notes: list[str] = []
        self.t0 = 0.0
        self._printed = 0
        self._result: GuestRun | None = None

    # --- lifecycle ---
    def start(self) -> Guest:
        self.t0 = time.monotonic()
        usable, why = kvm_usable()
        if self.options.accel == "kvm" or (self.options.accel == "auto" and usable):
            self._launch("kvm")
            if self._wait_record("boot", KVM_BOOT_LIMIT) is not None:
                return self
            self.notes.append(f"KVM guest did not reach /init in {KVM_BOOT_LIMIT:.0f}s: "
                              f"{self._qemu_log()[-300:]!r}; falling back to TCG")
            self._stop_qemu()
        elif self.options.accel == "auto":
            self.notes.append(f"not using KVM: {why}")
        self._launch("tcg")
        return self

    def _launch(self, accel: str) -> None:
        self.accel = accel
        for name in ("console.log", "results.log", "kmsg.log"):
            (self.run_dir / name).write_bytes(b"")
        cmd = [*(self.network.command_prefix() if self.network else []), *self.qemu_command(accel)]
        (self.run_dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
        with open(self.run_dir / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def qemu_command(self, accel: str) -> list[str]:
        o, d = self.options, self.run_dir
        machine = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
        channels = []
        for i, (name, backend, path) in enumerate((("results", "file", "results.log"), ("kmsg", "file", "kmsg.log"),
                                                   ("control", "pipe", "control"))):
            channels += ["-chardev", f"{backend},id=ch{i},{_q(f'path={d / path}')}",
                         "-device", f"virtserialport,bus=vser.0,chardev=ch{i},name={name}"]
        net = self.network.qemu_args(d) if self.network else []
        return ["qemu-system-x86_64", "-machine", "q35", *machine, "-smp", str(o.smp), "-m", str(o.mem_mib),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(d / "initrd.img"),
                "-append", "console=ttyS0 panic=-1 loglevel=4 log_buf_len=1M rdinit=/init",
                "-chardev", f"file,id=con,{_q('path=' + str(d / 'console.log'))}", "-serial", "chardev:con",
                "-device", "virtio-serial-pci,id=vser", *channels,
                "-drive", f"if=none,id=tools,format=raw,readonly=on,{_q('file=' + str(self.image.tools_disk))}",
                "-device", "virtio-blk-pci,drive=tools", *net]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _stop_qemu(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # qemu and, in user mode, its forwarders
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def kill(self) -> None:
        self._stop_qemu()

    def __enter__(self) -> Guest:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self._stop_qemu()

    # --- while it runs ---
    def records(self) -> list[Record]:
        return parse_records((self.run_dir / "results.log").read_text(errors="replace"))

    def _wait_record(self, kind: str, timeout: float, name: str | None = None) -> Record | None:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records():
                if r.kind == kind and (name is None or r.name == name):
                    return r
            if not self.running() or time.monotonic() > deadline:
                return None
            self._echo_console()
            time.sleep(0.1)

    def wait_for_mark(self, name: str, timeout: float) -> Record | None:
        """The guest's ``mark NAME`` record, or None if the guest stopped or ``timeout`` passed first."""
        return self._wait_record("mark", timeout, name)

    def send(self, event: str) -> None:
        """Deliver ``event`` to the guest's ``wait_host``."""
        if "\n" in event or not event:
            raise ValueError("an event is one non-empty line")
        fd = os.open(self.run_dir / "control.in", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, event.encode() + b"\n")
        finally:
            os.close(fd)

    def _echo_console(self) -> None:
        if self.on_console is None:
            return
        with open(self.run_dir / "console.log", "rb") as f:
            f.seek(self._printed)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._printed += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            self.on_console(line.rstrip("\r"))

    def wait(self) -> GuestRun:
        """Wait for the guest to power off (killing it after its time limit) and collect the run."""
        if self._result is not None:
            return self._result
        if self.proc is None:
            self.start()
        deadline = self.t0 + self.options.timeout + BOOT_ALLOWANCE
        killed = False
        while self.running():
            if time.monotonic() > deadline:
                killed = True
                self.notes.append(f"qemu killed by the host {self.options.timeout + BOOT_ALLOWANCE:.0f}s after start")
                break
            self._echo_console()
            time.sleep(0.2)
        status = self._stop_qemu()
        self._echo_console()
        d = self.run_dir
        self._result = GuestRun(
            records=self.records(), console=(d / "console.log").read_text(errors="replace").replace("\r", ""),
            dmesg=parse_kmsg((d / "kmsg.log").read_text(errors="replace")), run_dir=d, accel=self.accel,
            seconds=time.monotonic() - self.t0, host_killed=killed, qemu_status=status, notes=self.notes)
        if status not in (0, None) and not killed:
            self.notes.append(f"qemu exit status {status}: {self._qemu_log()[-400:]}")
        (d / "initrd.img").unlink(missing_ok=True)
        return self._result

    def _qemu_log(self) -> str:
        try:
            return (self.run_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""


def _q(option: str) -> str:
    """A qemu ``key=value`` whose value may hold commas."""
    key, _, value = option.partition("=")
    return f"{key}={value.replace(',', ',,')}"


def _new_run_dir(keep: int = 20) -> Path:
    base = Path(tempfile.gettempdir()) / "pyscsi-guest-runs"
    base.mkdir(parents=True, exist_ok=True)
    runs = sorted(base.glob("run-*"), key=lambda p: p.stat().st_mtime)
    for old in runs[:-keep] if len(runs) > keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=base))


def run_guest(script: str, network: GuestNetwork | None, *, env: Mapping[str, str] | None = None,
              files: Mapping[str, bytes | str] | None = None, options: GuestOptions | None = None,
              run_dir: Path | None = None, on_console: Callable[[str], None] | None = None) -> GuestRun:
    """Boot, run ``script``, and return its ``GuestRun``."""
    with Guest(script, network, env=env, files=files, options=options, run_dir=run_dir,
               on_console=on_console) as guest:
        return guest.wait()
