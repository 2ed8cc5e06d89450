"""The ``pyscsi-target`` command: the daemon (``serve``) and the operator's tools over its REST API.

Every client command talks to the running daemon through the REST API, so the API's
validation and error messages apply.  Exit status: 0 success, 1 a failed operation, 2 bad
usage (argparse's own).  Shell completion through argcomplete (``pyscsi-target completion
bash``).  Start-up stays light: the client commands import neither aiohttp nor the engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from . import serve as serve_commands

Handler = Callable[[Any, argparse.Namespace], int]
ALLOCATIONS = ("sparse", "preallocate", "zero")
SHELLS = ("bash", "zsh", "fish", "tcsh", "powershell")


def _names(resource: str, key: str) -> Callable[..., Iterable[str]]:
    """An argcomplete completer listing object names from the running daemon."""

    def complete(prefix: str, parsed_args: argparse.Namespace, **_kw: Any) -> Iterable[str]:
        from .client import ApiClient, resolve

        try:
            conn = resolve(parsed_args.url, parsed_args.user, parsed_args.state_dir, parsed_args.cacert)
            client = ApiClient(conn, timeout=2.0)
            return [str(o[key]) for o in client.list_all(resource) if str(o[key]).startswith(prefix)]
        except Exception:  # noqa: BLE001 - completion offers nothing rather than a traceback
            return []

    return complete


TARGETS = _names("target", "iscsi_target_name")
EXTENTS = _names("extent", "iscsi_target_extent_name")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyscsi-target", description="An iSCSI target server (RFC 7143, SPC-4/SBC-3).")
    p.add_argument("--version", action="version", version=f"pyscsi-target {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_commands.add_parsers(sub)

    api = argparse.ArgumentParser(add_help=False)
    conn = api.add_argument_group("connection (default: the daemon of the local state dir)")
    conn.add_argument("--url", help="REST API of a remote daemon, e.g. https://host:8080 "
                                    "(password from $PYSCSI_TARGET_PASSWORD or a prompt)")
    conn.add_argument("--user", help="API user (default: the local daemon's, or admin)")
    conn.add_argument("--cacert", metavar="FILE", help="trust this certificate (PEM) for an https --url")
    conn.add_argument("--state-dir", type=Path, help="state dir of the local daemon")
    api.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    def command(parent: Any, name: str, handler: Handler, help_text: str, fields: str | None = None) -> Any:
        c = parent.add_parser(name, help=help_text, parents=[api], description=help_text)
        c.set_defaults(handler=handler, fields=fields)
        return c

    def group(name: str, help_text: str) -> Any:
        g = sub.add_parser(name, help=help_text, description=help_text)
        return g.add_subparsers(dest="action", required=True, metavar="ACTION")

    from . import configuration as cfg
    from . import objects as o
    from . import state_backup, tree

    ls = command(sub, "ls", lambda client, a: tree.run(client, long=a.long, as_json=a.json),
                 "show portal groups, targets, LUNs, extents, ACLs, auth and live sessions as a tree")
    ls.add_argument("-l", "--long", action="store_true", help="add each session's negotiated parameters")
    command(sub, "sessions", o.sessions, "list live sessions")

    t = group("target", "list, create and delete targets")
    command(t, "list", o.target_list, "list targets")
    c = command(t, "create", o.target_create, "create a target exported on portal groups", "target")
    c.add_argument("name", metavar="NAME", help="short name (the IQN is BASENAME:NAME) or a full iqn./eui./naa. name")
    c.add_argument("--alias", help="iSCSI TargetAlias")
    c.add_argument("--portal-group", type=int, action="append", metavar="TAG",
                   help="export on this portal group (repeatable; default: all)")
    c.add_argument("--initiator-group", type=int, metavar="TAG", help="only initiators of this group may log in")
    c.add_argument("--auth", default="None", choices=["None", "CHAP", "CHAP Mutual"], help="login authentication")
    c.add_argument("--auth-group", type=int, metavar="TAG", help="the CHAP auth group (see `chap create`)")
    c = command(t, "delete", o.target_delete, "delete a target (refused while it has sessions)", "target")
    c.add_argument("name", metavar="NAME").completer = TARGETS

    e = group("extent", "list, create, grow, import and delete extents (backing files and devices)")
    command(e, "list", o.extent_list, "list extents with their size and allocation")
    c = command(e, "create", o.extent_create, "create a File extent", "extent")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--size", help="e.g. 10GB (binary units); omit to use an existing file's size")
    c.add_argument("--path", help="file path inside an extent root (default NAME.img)")
    c.add_argument("--allocation", default="sparse", choices=ALLOCATIONS,
                   help="sparse (thin, instant), preallocate (reserve every block) or zero (write zeroes)")
    _extent_options(c)
    c.add_argument("--no-wait", action="store_true", help="print the job and return at once")
    c = command(e, "resize", o.extent_resize, "grow a File extent (live; initiators get a capacity change)",
                "extent")
    c.add_argument("name", metavar="NAME").completer = EXTENTS
    c.add_argument("size", metavar="SIZE", help="the new size, e.g. 20GB")
    c.add_argument("--allocation", default="sparse", choices=ALLOCATIONS)
    c.add_argument("--no-wait", action="store_true", help="print the job and return at once")
    c = command(e, "import", o.extent_import, "import a raw disk image into a new File extent", "extent")
    c.add_argument("file", metavar="FILE", help="a raw image (convert qcow2/VMDK with qemu-img first)")
    c.add_argument("--name", help="extent name (default: FILE's name without its suffix)")
    c.add_argument("--path", help="file path inside an extent root (default NAME.img)")
    _extent_options(c)
    c = command(e, "delete", o.extent_delete, "delete an extent and its LUN maps", "extent")
    c.add_argument("name", metavar="NAME").completer = EXTENTS
    c.add_argument("--delete-file", action="store_true", help="also delete the extent's file")

    lun = group("lun", "map extents to LUNs of targets")
    command(lun, "list", o.lun_list, "list LUN maps")
    c = command(lun, "map", o.lun_map, "put an extent at a LUN of a target", "lun")
    c.add_argument("target", metavar="TARGET").completer = TARGETS
    c.add_argument("extent", metavar="EXTENT").completer = EXTENTS
    c.add_argument("--lun", type=int, help="LUN number (default: the lowest free one)")
    c = command(lun, "unmap", o.lun_unmap, "remove a LUN from a target (the extent stays)", "lun")
    c.add_argument("target", metavar="TARGET").completer = TARGETS
    c.add_argument("lun", metavar="LUN", type=int)

    ig = group("initiator-group", "who may log in: initiator names and networks")
    command(ig, "list", o.initiator_group_list, "list initiator groups")
    c = command(ig, "create", o.initiator_group_create, "create an initiator group", "initiator-group")
    c.add_argument("--initiators", nargs="+", metavar="IQN", help="initiator names (default ALL)")
    c.add_argument("--networks", nargs="+", metavar="CIDR", help="source networks (default ALL)")
    c.add_argument("--comment")
    c = command(ig, "delete", o.initiator_group_delete, "delete an initiator group", "initiator-group")
    c.add_argument("tag", metavar="TAG", type=int)

    ch = group("chap", "CHAP credentials, grouped in auth groups by tag")
    command(ch, "list", o.chap_list, "list CHAP users (never their secrets)")
    c = command(ch, "create", o.chap_create, "add a CHAP user to an auth group", "chap")
    c.add_argument("tag", metavar="TAG", type=int)
    c.add_argument("chap_user", metavar="USER")  # not "user": that is the API user (--user)
    c.add_argument("--secret", help="12-16 characters (default: $PYSCSI_TARGET_CHAP_SECRET or a prompt; "
                                    "a secret on the command line shows in ps)")
    c.add_argument("--peer-user", help="mutual CHAP: the name the target answers with")
    c.add_argument("--peer-secret", help="default: $PYSCSI_TARGET_CHAP_PEER_SECRET or a prompt")
    c = command(ch, "delete", o.chap_delete, "remove a CHAP user from an auth group", "chap")
    c.add_argument("tag", metavar="TAG", type=int)
    c.add_argument("chap_user", metavar="USER")

    pg = group("portal-group", "addresses the target listens on")
    command(pg, "list", o.portal_group_list, "list portal groups")
    c = command(pg, "create", o.portal_group_create, "create a portal group", "portal-group")
    c.add_argument("listen", metavar="LISTEN", nargs="+", help="IP:PORT ([v6]:PORT)")
    c.add_argument("--comment")
    c = command(pg, "delete", o.portal_group_delete, "delete a portal group", "portal-group")
    c.add_argument("tag", metavar="TAG", type=int)

    j = group("job", "long operations: extent allocation, growth, import, SANITIZE")
    command(j, "list", o.job_list, "list jobs")
    for name, handler, text in (("show", o.job_show, "print a job"), ("wait", o.job_wait, "follow a job to its end"),
                                ("cancel", o.job_cancel, "cancel a running job (forget a finished one)")):
        command(j, name, handler, text).add_argument("id", metavar="ID")

    cf = group("config", "save and restore the whole configuration")
    c = command(cf, "export", cfg.export, "print the configuration as versioned JSON")
    c.add_argument("--redact", action="store_true", help="leave CHAP secrets and API key hashes out")
    c.add_argument("--offline", action="store_true", help="read the state dir of a stopped daemon")
    c.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600) instead of standard output")
    c = command(cf, "import", cfg.import_, "make the running configuration equal to FILE (the difference "
                                           "is applied; untouched targets keep their sessions)")
    c.add_argument("file", metavar="FILE", help="an export ('-' for standard input)")
    c.add_argument("--dry-run", action="store_true", help="validate and show what would change")
    c.add_argument("--force", action="store_true", help="drop the sessions of targets the import removes")
    c.add_argument("--offline", action="store_true", help="write into the state dir of a stopped daemon "
                                                          "(e.g. a restore before the first start)")
    c.add_argument("--extent-root", action="append", metavar="DIR",
                   help="with --offline: the daemon's extent roots (default STATE_DIR/extents)")
    state_backup.add_parsers(cf)

    from . import workbench

    workbench.add_parsers(sub, command, group)

    comp = sub.add_parser("completion", help="print the shell code enabling tab completion",
                          description="eval \"$(pyscsi-target completion bash)\" in ~/.bashrc")
    comp.add_argument("shell", choices=SHELLS)
    comp.set_defaults(handler=_completion)
    return p


def _extent_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--blocksize", type=int, choices=(512, 1024, 2048, 4096), help="logical block size (default 512)")
    c.add_argument("--rpm", help="reported rotation rate: SSD (default), 5400, 7200, 10000, 15000 or Unknown")
    c.add_argument("--ro", action="store_true", help="read-only LUN")
    c.add_argument("--comment")


def _completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["pyscsi-target"], shell=args.shell))
    return 0


def _print_error(args: argparse.Namespace, exc: Exception) -> None:
    from .client import ApiError
    from .objects import FIELDS
    from .workbench import FIELDS as WORKBENCH_FIELDS

    names = {**FIELDS, **WORKBENCH_FIELDS}.get(getattr(args, "fields", None) or "", {})
    lines = [str(exc)]
    if isinstance(exc, ApiError) and exc.fields:
        lines = [f"{names.get(field, field) + ': ' if field != '__all__' else ''}{msg}"
                 for field, msgs in exc.fields.items() for msg in msgs]
    for line in lines:
        print(f"pyscsi-target: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command in ("serve", "api-key", "completion"):
        return int(args.handler(args))
    from .client import ApiClient, CliError, resolve

    try:
        if getattr(args, "offline", False):
            return int(args.handler(None, args))
        client = ApiClient(resolve(args.url, args.user, args.state_dir, args.cacert))
        try:
            return int(args.handler(client, args))
        finally:
            client.close()
    except CliError as exc:
        _print_error(args, exc)
        return 1
    except KeyboardInterrupt:
        print("pyscsi-target: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pyscsi-target ls | head`
        sys.stderr.close()
        return 0
