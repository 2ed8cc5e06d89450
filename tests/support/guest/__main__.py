"""Manual runs of the guest harness, from the repository root:

    PYTHONPATH=tests python3 -m support.guest build                 # build (or check) the cached image
    PYTHONPATH=tests python3 -m support.guest interop --portal 127.0.0.1:3260 [--chap-user U --chap-secret S]
    PYTHONPATH=tests python3 -m support.guest run SCRIPT [--portal 127.0.0.1:3260] [--env NAME=VALUE]

``interop`` runs the 8-step open-iscsi flow against a target already listening on host loopback;
``run`` boots a guest with any script (lib.sh's helpers available; the guest-side portals are in
$PORTAL0, $PORTAL1, ...).  Exit status 0 when the run passed, 1 when it did not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .image import ensure_image
from .interop import DIGESTS, InteropOptions, missing_steps, run_interop
from .network import UserNetwork
from .vm import GuestOptions, GuestRun, run_guest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m support.guest", description="kernel-initiator guest harness")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the cached guest image if needed and print its manifest")
    b.add_argument("--rebuild", action="store_true", help="build even if the cache is complete")
    for name, help_text in (("interop", "the open-iscsi flow against a target on host loopback"),
                            ("run", "boot a guest running SCRIPT")):
        s = sub.add_parser(name, help=help_text)
        if name == "run":
            s.add_argument("script", type=Path)
            s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
        s.add_argument("--portal", action="append", default=[], metavar="HOST:PORT",
                       help="a target portal on host loopback, forwarded into the guest (repeatable)")
        s.add_argument("--timeout", type=float, default=300.0, help="the script's time limit in the guest")
        s.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
        s.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    i = sub.choices["interop"]
    i.add_argument("--iqn", default="")
    i.add_argument("--lun", type=int)
    i.add_argument("--chap-user", default="")
    i.add_argument("--chap-secret", default="")
    i.add_argument("--mutual-user", default="")
    i.add_argument("--mutual-secret", default="")
    i.add_argument("--discovery-chap", action="store_true")
    i.add_argument("--digest", choices=DIGESTS, help="header and data digest")
    i.add_argument("--header-digest", choices=DIGESTS, default="None")
    i.add_argument("--data-digest", choices=DIGESTS, default="None")
    i.add_argument("--size-mib", type=int, default=32)
    i.add_argument("--no-fs", action="store_true")
    return p


def _print_run(run: GuestRun) -> None:
    print(run.summary())
    for r in run.failures:
        print(f"FAILED: {r}")
    if run.data:
        print(json.dumps(run.data, indent=1))
    print(f"run directory: {run.run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        image = ensure_image(rebuild=args.rebuild)
        print(json.dumps({"dir": str(image.dir), **image.manifest}, indent=1))
        return 0
    echo = None if args.quiet else (lambda line: print(f"  | {line}", flush=True))
    try:
        net = UserNetwork(args.portal or ["127.0.0.1:3260"])
        guest = GuestOptions(timeout=args.timeout, accel=args.accel).validate()
        if args.command == "interop":
            digests = (args.digest, args.digest) if args.digest else (args.header_digest, args.data_digest)
            flow = InteropOptions(
                portal=net.guest_portal(0), iqn=args.iqn, lun=args.lun, chap_user=args.chap_user,
                chap_secret=args.chap_secret, mutual_user=args.mutual_user, mutual_secret=args.mutual_secret,
                discovery_chap=args.discovery_chap, header_digest=digests[0], data_digest=digests[1],
                size_mib=args.size_mib, fs=not args.no_fs).validate()
            env: dict[str, str] = {}
        else:
            env = dict(e.split("=", 1) for e in args.env if "=" in e)
            if len(env) != len(args.env):
                raise ValueError("--env takes NAME=VALUE")
            env.update({f"PORTAL{i}": p for i, p in enumerate(net.guest_portals)})
            script = args.script.read_text()
    except (ValueError, OSError) as e:
        print(f"usage error: {e}", file=sys.stderr)
        return 2
    if args.command == "interop":
        run = run_interop(net, flow, timeout=guest.timeout, accel=guest.accel, on_console=echo)
        _print_run(run)
        missing = missing_steps(run, flow)
        passed = not missing and run.ok
        failed = f" failed={','.join(missing)}" if missing else ""
        print(f"OPEN-ISCSI-INTEROP: {'PASS' if passed else 'FAIL'} "
              f"steps={len(flow.steps) - len(missing)}/{len(flow.steps)}{failed}")
        return 0 if passed else 1
    run = run_guest(script, net, env=env, options=guest, on_console=echo)
    _print_run(run)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
