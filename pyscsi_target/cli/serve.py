"""``pyscsi-target serve`` (the daemon) and ``pyscsi-target api-key create``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..log_format import FORMATS, configure_logging
from .client import default_state_dir


def _hostport(default_port: int) -> Callable[[str], tuple[str, int]]:
    def parse(text: str) -> tuple[str, int]:
        from ..values import parse_listen  # only when serving: the client commands start faster

        try:
            addr = parse_listen(text, default_port=default_port, allow_zero=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return addr.host, addr.port

    return parse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the target and its management API")
    s.set_defaults(handler=serve)
    s.add_argument("--state-dir", type=Path, default=None,
                   help="configuration database and default extent root "
                        "(default $PYSCSI_TARGET_STATE_DIR, /var/lib/pyscsi-target as root, else ~/.local/state)")
    s.add_argument("--portal", action="append", type=_hostport(3260), default=None, metavar="HOST:PORT",
                   help="listen address of the default portal group when the state dir is new "
                        "(repeatable; default 0.0.0.0:3260)")
    s.add_argument("--api", type=_hostport(8080), default=("127.0.0.1", 8080), metavar="HOST:PORT",
                   help="REST API listen address (default 127.0.0.1:8080)")
    s.add_argument("--api-cert", type=Path, help="serve the API over TLS with this certificate (PEM)")
    s.add_argument("--api-key-file", type=Path, help="private key for --api-cert (PEM)")
    s.add_argument("--extent-root", action="append", type=Path, default=None, metavar="DIR",
                   help="directory file extents may live under (repeatable; default STATE_DIR/extents)")
    s.add_argument("--demo", action="store_true",
                   help="on a new (empty) state dir, add a 1 GiB sparse demo LUN, target 'demo', "
                        "open to every initiator")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="auto", choices=list(FORMATS),
                   help="auto: journal when stderr is systemd's journal stream, else text; "
                        "json: one object per line")

    k = sub.add_parser("api-key", help="manage REST API keys")
    ksub = k.add_subparsers(dest="key_command", required=True)
    kc = ksub.add_parser("create", help="create an API key and print it (it is stored hashed)")
    kc.set_defaults(handler=api_key_create)
    kc.add_argument("--state-dir", type=Path, default=None)
    kc.add_argument("--virtual-server", type=int, action="append", default=None, metavar="N",
                    help="limit the key to this virtual server (repeatable; default: all)")


def api_key_create(args: argparse.Namespace) -> int:
    from ..config.store import StateDbError
    from ..config.store import api_key_create as create

    try:
        print(create((args.state_dir or default_state_dir()).resolve(), args.virtual_server or []))
    except StateDbError as exc:
        print(f"pyscsi-target: {exc}", file=sys.stderr)
        return 1
    return 0


def serve(args: argparse.Namespace) -> int:
    state_dir: Path = (args.state_dir or default_state_dir()).resolve()
    configure_logging(args.log_level, args.log_format)
    if bool(args.api_cert) != bool(args.api_key_file):
        print("pyscsi-target: --api-cert and --api-key-file go together", file=sys.stderr)
        return 2
    from ..daemon import DaemonOptions, run

    opts = DaemonOptions(
        state_dir=state_dir,
        portals=args.portal or [("0.0.0.0", 3260)],
        api=args.api,
        api_cert=args.api_cert,
        api_key_file=args.api_key_file,
        extent_roots=[r.resolve() for r in args.extent_root] if args.extent_root else [state_dir / "extents"],
        demo=args.demo,
    )
    return run(opts)
