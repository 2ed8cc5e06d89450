"""The guest's boot files, built once from the Debian archive and cached.

A guest is Debian bookworm's own kernel plus an initramfs and a read-only "tools disk":

* ``vmlinuz``: the kernel of the ``linux-image-amd64`` metapackage;
* ``initrd.img``: busybox (static), the kernel modules the tests need and /etc.  /init loads the boot
  set (``/guest/modules``, in dependency order); the others load on demand through busybox's modprobe
  (the kernel's request_module, or a script).  It stays small: TCG unpacks it at every boot;
* ``tools.img``: an ext4 image mounted read-only on /usr, holding open-iscsi, multipath-tools and
  udev, fio, e2fsprogs and util-linux with every shared library they load.  fio alone links librbd,
  glusterfs and ICU (~100 MB); from a disk the guest reads only the pages it runs.

Packages come from the host's APT sources (``apt-get download``, then ``dpkg-deb -x``), following
their library dependencies, so the guest does not depend on what the host has installed; the host
needs apt, dpkg, kmod (depmod/modprobe for the module order) and e2fsprogs (``mke2fs -d``).

The cache lives in ``$XDG_CACHE_HOME/pyscsi-target/guest`` (default ``~/.cache/...``), one directory
per ``RECIPE_VERSION``: bump it whenever what is built here changes, and the next run rebuilds.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .cpio import Entry, archive, tree_entries

log = logging.getLogger("pyscsi.guest")

RECIPE_VERSION = 3
KERNEL_METAPACKAGE = "linux-image-amd64"
# Packages whose programs the guest runs; their library dependencies are followed.
PACKAGES = ("busybox-static", "libc6", "zlib1g", "open-iscsi", "multipath-tools", "kpartx", "dmsetup", "udev",
            "libsystemd-shared", "fio", "libaio1", "e2fsprogs", "util-linux", "sg3-utils")
# Programs put on the tools disk (found in bin, sbin, usr/bin, usr/sbin or lib/systemd of the packages).
PROGRAMS = ("iscsid", "iscsiadm", "iscsi-iname", "multipath", "multipathd", "kpartx", "dmsetup", "fio", "mke2fs",
            "e2fsck", "tune2fs", "dumpe2fs", "debugfs", "lsblk", "blkid", "blkdiscard", "blockdev", "fstrim", "wipefs",
            "sg_inq", "sg_persist", "sg_readcap", "sg_rtpg", "sg_turs", "sg_vpd", "udevadm", "systemd-udevd")
ALIASES = {"mkfs.ext4": "mke2fs", "fsck.ext4": "e2fsck", "e2label": "tune2fs"}
# Library directories copied whole: plugins loaded with dlopen, which ldd cannot see.
PLUGIN_DIRS = ("lib/multipath", "usr/lib/multipath", "lib/x86_64-linux-gnu/multipath")
# Kernel modules, with their dependencies: those every run needs load at boot (the optional ones may be
# built in or absent); the rest, and the NIC driver of the run's network, through modprobe.
BOOT_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4", "iscsi_tcp", "sd_mod")
OPTIONAL_BOOT_MODULES = ("crc32c_intel",)
ON_DEMAND_MODULES = ("virtio_net", "e1000", "sg", "dm_multipath", "dm_round_robin", "dm_service_time",
                     "dm_queue_length", "scsi_dh_alua")
# udev rules the guest keeps: block device naming, device-mapper and multipath.
UDEV_RULES = re.compile(r"^(50-udev-default|55-dm|60-block|60-persistent-storage|.*dm.*|.*multipath.*|.*kpartx.*|"
                        r"95-dm-notify|80-drivers)\.rules$")
_LIB_DEP = re.compile(r"^lib|^zlib1g$")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyscsi-target" / "guest"


@dataclass(frozen=True)
class GuestImage:
    """The cached boot files of one recipe version."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def tools_disk(self) -> Path:
        return self.dir / "tools.img"

    @property
    def manifest(self) -> dict[str, object]:
        return dict(json.loads((self.dir / "MANIFEST.json").read_text()))

    def complete(self) -> bool:
        try:
            return self.manifest.get("recipe") == RECIPE_VERSION and all(
                p.stat().st_size > 0 for p in (self.kernel, self.initrd, self.tools_disk))
        except (OSError, ValueError):
            return False


class ImageBuildError(RuntimeError):
    pass


def ensure_image(*, rebuild: bool = False, cache: Path | None = None) -> GuestImage:
    """The cached image, built first if it is missing, incomplete or of another recipe version."""
    root = cache or cache_root()
    image = GuestImage(root / f"image-v{RECIPE_VERSION}")
    if not rebuild and image.complete():
        return image
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".build.lock"):
        if rebuild or not image.complete():  # another process may have built it while we waited
            _build(image.dir, root)
            for old in root.glob("image-v*"):
                if old != image.dir:
                    shutil.rmtree(old, ignore_errors=True)
    return image


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace",
                       env={**os.environ, "LC_ALL": "C", **(env or {})})
    if r.returncode != 0:
        raise ImageBuildError(f"{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''} failed ({r.returncode}): "
                              f"{(r.stderr or r.stdout).strip()[-800:]}")
    return r.stdout


class _Apt:
    """Package queries and downloads through the host's apt, updating its lists once if needed."""

    def __init__(self) -> None:
        self.updated = False

    def _retry(self, *cmd: str, cwd: Path | None = None) -> str:
        try:
            return _run(*cmd, cwd=cwd)
        except ImageBuildError:
            if self.updated:
                raise
            log.info("guest image: apt-get update")
            _run("apt-get", "update", "-qq")
            self.updated = True
            return _run(*cmd, cwd=cwd)

    def depends(self, packages: Iterable[str]) -> dict[str, list[str]]:
        """Each package's Depends/PreDepends, taking the first of a set of alternatives."""
        out = self._retry("apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                          "--no-breaks", "--no-replaces", "--no-enhances", *packages)
        deps: dict[str, list[str]] = {}
        current: list[str] = []
        in_alternatives = False
        for line in out.splitlines():
            if line and not line[0].isspace():
                current = deps.setdefault(line.strip(), [])
                in_alternatives = False
                continue
            m = re.match(r"^\s*(\|)?(?:Pre)?Depends: (\S+)", line)
            if not m:
                continue
            name = m.group(2).split(":")[0]
            if not in_alternatives and not name.startswith("<"):
                current.append(name)
            in_alternatives = m.group(1) == "|"  # the next line is another alternative of this one
        return deps

    def kernel_package(self) -> str:
        deps = self.depends([KERNEL_METAPACKAGE]).get(KERNEL_METAPACKAGE, [])
        for d in deps:
            if re.match(r"^linux-image-\d", d):
                return d
        raise ImageBuildError(f"{KERNEL_METAPACKAGE} names no linux-image-<version> package: {deps}")

    def closure(self, roots: Iterable[str]) -> list[str]:
        """``roots`` plus, transitively, the library packages they depend on."""
        seen = set(roots)
        todo = sorted(seen)
        while todo:
            deps = self.depends(todo)
            todo = sorted({d for ds in deps.values() for d in ds if _LIB_DEP.match(d)} - seen)
            seen.update(todo)
        return sorted(seen)

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        # APT::Sandbox::User=root: the _apt user may not write into a private build directory.
        self._retry("apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", *packages, cwd=dest)
        return sorted(dest.glob("*.deb"))


def _build(dest: Path, cache: Path) -> None:
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "mke2fs", "ldd"):
        if shutil.which(tool) is None:
            raise ImageBuildError(f"building the guest image needs {tool} on the host")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        work = Path(tmp)
        apt = _Apt()
        kernel_pkg = apt.kernel_package()
        packages = apt.closure([kernel_pkg, *PACKAGES])
        log.info("guest image: downloading %d packages (kernel %s)", len(packages), kernel_pkg)
        (work / "debs").mkdir()
        debs = apt.download(packages, work / "debs")
        root = work / "root"
        for deb in debs:
            _run("dpkg-deb", "-x", str(deb), str(root))
        kvers = sorted(p.name for p in (root / "lib/modules").iterdir())
        if len(kvers) != 1:
            raise ImageBuildError(f"expected one kernel in {kernel_pkg}, found {kvers}")
        kver = kvers[0]
        out = work / "out"
        out.mkdir()
        tools = work / "tools"
        host_libs = _populate_tools(root, tools)
        modules = _write_initrd(root, kver, work / "initrd", out / "initrd.img",
                                sorted(p.name for p in (tools / "lib").iterdir() if p.is_dir()))
        shutil.copyfile(root / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
        _make_ext4(tools, out / "tools.img")
        manifest = {
            "recipe": RECIPE_VERSION, "kernel_package": kernel_pkg, "kernel": kver, "modules": modules,
            "packages": [d.name for d in debs], "libraries_from_host": host_libs,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        out.rename(dest)
    log.info("guest image built in %.0f s: kernel %s, %d packages, initrd %d KiB, tools disk %d MiB",
             time.monotonic() - t0, kver, len(debs), (dest / "initrd.img").stat().st_size >> 10,
             (dest / "tools.img").stat().st_size >> 20)


# --- the tools disk (mounted on the guest's /usr) ------------------------------------------


def _resolve_in(root: Path, path: Path) -> Path:
    """``path`` with its symlinks followed inside the extracted tree (absolute links point into it)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise ImageBuildError(f"symlink loop at {path}")


def _find_program(root: Path, name: str) -> Path:
    for d in ("usr/sbin", "sbin", "usr/bin", "bin", "lib/systemd", "usr/lib/systemd"):
        p = root / d / name
        if p.is_file() or p.is_symlink():
            return _resolve_in(root, p)
    raise ImageBuildError(f"{name} is in none of the downloaded packages")


def _guest_path(root: Path, path: Path) -> str:
    """Where a file of the extracted tree (or, failing that, of the host) lives below the guest's /usr:
    the guest merges /lib into /usr/lib, as Debian's merged-/usr does."""
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix().lstrip("/")
    return rel[4:] if rel.startswith("usr/") else rel


def _lib_dirs(root: Path) -> list[str]:
    dirs = {str(p.parent) for base in ("lib", "usr/lib") for p in (root / base).rglob("*.so*")
            if "modules" not in p.relative_to(root).parts[:2]}
    return sorted(dirs)


def _needed(binary: Path, lib_path: str) -> list[tuple[str, Path | None]]:
    """(soname, resolved path or None) for every library ``binary`` loads, as ldd resolves them."""
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, errors="replace",
                       env={**os.environ, "LD_LIBRARY_PATH": lib_path, "LC_ALL": "C"})
    if r.returncode != 0:  # static binaries and scripts: nothing to load
        return []
    out: list[tuple[str, Path | None]] = []
    for line in r.stdout.splitlines():
        m = re.match(r"^\s*(\S+) => (?:(/\S+)|not found)", line)
        if m:
            out.append((m.group(1), Path(m.group(2)) if m.group(2) else None))
    return out


def _populate_tools(root: Path, tools: Path) -> list[str]:
    """Copy the programs, plugins, udev rules and their libraries; returns the libraries that had to
    come from the host (none when the package closure is complete)."""
    lib_path = ":".join(_lib_dirs(root))
    elves: list[Path] = []
    for name in PROGRAMS:
        src = _find_program(root, name)
        in_sbin = "sbin" in src.parent.as_posix() or name == "systemd-udevd"
        dst = tools / ("sbin" if in_sbin else "bin") / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        elves.append(src)
    for alias, target in ALIASES.items():
        (tools / "sbin" / alias).symlink_to(target)
    for d in PLUGIN_DIRS:
        for so in sorted((root / d).glob("*.so")) if (root / d).is_dir() else []:
            dst = tools / _guest_path(root, so)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, dst, follow_symlinks=True)
            elves.append(so)
    elves += _copy_udev(root, tools)
    host: set[str] = set()
    done: set[Path] = set()
    while elves:
        elf = elves.pop()
        for soname, path in _needed(elf, lib_path):
            if path is None:
                raise ImageBuildError(f"{elf.name} needs {soname}, found neither in the packages nor on the host")
            dst = tools / _guest_path(root, path.parent) / soname
            if dst in done:
                continue
            done.add(dst)
            if not path.resolve().is_relative_to(root):
                host.add(str(path))
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst, follow_symlinks=True)
            elves.append(path.resolve())
    loader = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    shutil.copy2(loader, tools / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", follow_symlinks=True)
    if host:
        log.warning("guest image: libraries taken from the host: %s", sorted(host))
    return sorted(host)


def _copy_udev(root: Path, tools: Path) -> list[Path]:
    """The udev rules the guest keeps and the helper programs they run (returned: their libraries
    still need copying)."""
    helpers: list[Path] = []
    for base in ("lib/udev", "usr/lib/udev"):
        src = root / base
        if not src.is_dir():
            continue
        for p in sorted(src.iterdir()):
            if p.is_file() and os.access(p, os.X_OK):  # helpers the rules call: scsi_id, kpartx_id ...
                (tools / "lib/udev").mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tools / "lib/udev" / p.name)
                helpers.append(p)
        rules = src / "rules.d"
        for p in sorted(rules.glob("*.rules")) if rules.is_dir() else []:
            if UDEV_RULES.match(p.name):
                (tools / "lib/udev/rules.d").mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tools / "lib/udev/rules.d" / p.name)
    return helpers


def _make_ext4(tree: Path, image: Path) -> None:
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    size_mib = used * 13 // 10 // (1 << 20) + 16
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal", "-m", "0", "-L", "pyscsi-tools",
         "-E", "root_owner=0:0", "-d", str(tree), str(image), f"{size_mib}M")


# --- the initramfs ----------------------------------------------------------------------


def _module_order(root: Path, kver: str, names: Iterable[str], optional: Iterable[str] = ()) -> list[str]:
    """Module files (relative to lib/modules/KVER) of ``names`` and their dependencies, in an order
    insmod can load them."""
    order: list[str] = []
    for name in (*names, *optional):
        r = subprocess.run(["modprobe", "-d", str(root), "-S", kver, "--show-depends", name],
                           capture_output=True, text=True, errors="replace")
        if r.returncode != 0:
            if name in optional:
                continue
            raise ImageBuildError(f"kernel module {name}: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            if line.startswith("insmod "):
                rel = Path(line.split()[1]).relative_to(root / "lib/modules" / kver).as_posix()
                if rel not in order:
                    order.append(rel)
    return order


def _write_initrd(root: Path, kver: str, work: Path, dest: Path, lib_dirs: list[str]) -> list[str]:
    """The initramfs; ``lib_dirs`` are the tools disk's lib/ directories, which the guest's /lib points to."""
    _run("depmod", "-b", str(root), kver)
    order = _module_order(root, kver, BOOT_MODULES, OPTIONAL_BOOT_MODULES)
    on_demand = _module_order(root, kver, ON_DEMAND_MODULES)
    mods = work / "lib/modules" / kver
    for rel in dict.fromkeys([*order, *on_demand]):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "lib/modules" / kver / rel, mods / rel)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo", "modules.builtin.alias.bin"):
        if (root / "lib/modules" / kver / f).exists():
            shutil.copy2(root / "lib/modules" / kver / f, mods / f)
    _run("depmod", "-b", str(work), kver)
    busybox = root / "bin/busybox"
    applets = sorted({a.rsplit("/", 1)[-1] for a in _run(str(busybox), "--list").split()})
    entries = [Entry.dir(d) for d in ("bin", "dev", "etc", "etc/iscsi", "etc/multipath", "etc/udev", "guest", "lib",
                                      "lib64", "mnt", "proc", "root", "run", "sys", "tmp", "usr", "var",
                                      "var/lib", "var/lock")]
    entries += [Entry.file("bin/busybox", busybox.read_bytes(), 0o755)]
    entries += [Entry.symlink(f"bin/{a}", "busybox") for a in applets if a != "busybox"]
    # /usr is the tools disk; the rest of a merged-/usr layout points into it.
    entries += [Entry.symlink("sbin", "usr/sbin"),
                Entry.symlink("lib64/ld-linux-x86-64.so.2", "../usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")]
    entries += [Entry.symlink(f"lib/{d}", f"../usr/lib/{d}") for d in lib_dirs if d != "modules"]
    entries += tree_entries(work / "lib", prefix="lib/")
    entries += [Entry.file("guest/modules", "".join(f"{m}\n" for m in order).encode())]
    entries += _etc(root)
    dest.write_bytes(gzip.compress(archive(entries), compresslevel=6, mtime=0))
    return [*order, *(m for m in on_demand if m not in order)]


def _etc(root: Path) -> list[Entry]:
    conf = (root / "etc/iscsi/iscsid.conf").read_text()
    # iscsiadm would start iscsid through systemd; the guest starts it itself.
    conf = re.sub(r"(?m)^iscsid\.startup = .*$", "iscsid.startup = /bin/true", conf)
    files = {
        "etc/iscsi/iscsid.conf": conf.encode(),
        "etc/passwd": b"root:x:0:0:root:/:/bin/sh\n",
        "etc/group": b"root:x:0:\ndisk:x:6:\n",
        "etc/nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files\n",
        "etc/hosts": b"127.0.0.1 localhost\n",
        "etc/udev/udev.conf": b"udev_log=err\n",
    }
    if (root / "etc/mke2fs.conf").exists():
        files["etc/mke2fs.conf"] = (root / "etc/mke2fs.conf").read_bytes()
    return [Entry.file(k, v) for k, v in files.items()]
