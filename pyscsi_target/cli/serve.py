"""``pyscsi-target serve`` (the daemon) and ``pyscsi-target api-key create``."""

from __future__ import annotations

import argparse
import socket
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


def _write_budget(text: str) -> int:
    from ..scsi.task import MAX_TRANSFER_BYTES
    from ..values import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < MAX_TRANSFER_BYTES:
        raise argparse.ArgumentTypeError(f"at least {MAX_TRANSFER_BYTES >> 20}MB: one WRITE of the maximum "
                                         "transfer length must fit")
    return size


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
    ceph = s.add_argument_group("Ceph", "how RBD extents that leave these settings empty reach their cluster")
    ceph.add_argument("--ceph-conf", type=Path, default=None, metavar="FILE",
                      help="ceph.conf (default: librados' search, $CEPH_CONF then /etc/ceph/ceph.conf)")
    ceph.add_argument("--ceph-id", default="admin", metavar="ID", help="client id (default admin: client.admin)")
    ceph.add_argument("--ceph-keyring", type=Path, default=None, metavar="FILE",
                      help="keyring of that client (default: ceph.conf's)")
    gw = s.add_argument_group("gateway cluster", "several daemons exporting the same RBD images (docs/ceph.md)")
    gw.add_argument("--cluster", metavar="POOL[/NAMESPACE]", default=None,
                    help="join the gateway cluster whose shared configuration and state live there")
    gw.add_argument("--gateway", metavar="NAME", default=None, help="this gateway's name (default: the host name)")
    gw.add_argument("--portal-group", type=int, default=None, metavar="TAG",
                    help="this gateway's portal group (its target port group); created with the --portal "
                         "addresses when missing (required with --cluster)")
    gw.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS)
    gw.add_argument("--failover-timeout", type=float, default=4.0, metavar="SECONDS",
                    help="a gateway silent this long is taken over (default 4)")
    s.add_argument("--write-buffer-budget", type=_write_budget, default=None, metavar="SIZE",
                   help="memory all sessions together may reserve for WRITE data in flight (default 256MB; "
                        "each session is guaranteed a share, a WRITE beyond it gets TASK SET FULL)")
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
    from ..cluster.member import GatewayOptions
    from ..cluster.rados import ClusterSettings
    from ..daemon import DaemonOptions, run
    from ..values import parse_rados_location

    gateway = None
    if args.cluster:
        try:
            pool, namespace = parse_rados_location(args.cluster)
        except ValueError as exc:
            print(f"pyscsi-target: --cluster: {exc}", file=sys.stderr)
            return 2
        if args.demo:
            print("pyscsi-target: --demo makes a File extent, which a gateway cluster does not serve", file=sys.stderr)
            return 2
        if args.portal_group is None or not 1 <= args.portal_group <= 65535:
            print("pyscsi-target: --cluster needs --portal-group TAG (1-65535): each gateway has its own",
                  file=sys.stderr)
            return 2
        gateway = GatewayOptions(pool, namespace, args.gateway or socket.gethostname(), args.portal_group,
                                 heartbeat=args.heartbeat, timeout=args.failover_timeout)

    opts = DaemonOptions(
        state_dir=state_dir,
        portals=args.portal or [("0.0.0.0", 3260)],
        api=args.api,
        api_cert=args.api_cert,
        api_key_file=args.api_key_file,
        extent_roots=[r.resolve() for r in args.extent_root] if args.extent_root else [state_dir / "extents"],
        demo=args.demo,
        gateway=gateway,
        ceph=ClusterSettings(
            conf=str(args.ceph_conf.resolve()) if args.ceph_conf else None,
            client_id=args.ceph_id,
            keyring=str(args.ceph_keyring.resolve()) if args.ceph_keyring else None,
        ),
    )
    if args.write_buffer_budget is not None:
        opts.write_budget = args.write_buffer_budget
    return run(opts)
